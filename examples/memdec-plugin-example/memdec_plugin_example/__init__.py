"""An example memdec plugin: one component of each kind a plugin usually adds.

- ``product``: a combiner (product of experts), in ``combiner.py``;
- ``numpy-exact``: a vectors retriever (exact L2 search in numpy), in ``retriever.py``;
- ``unigram``: a memory model (the domain's token frequencies), in ``memory.py``;
The hooks live in ``plugin.py``; the entry point in ``pyproject.toml`` names that module.
"""
