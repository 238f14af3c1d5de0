"""memdec: adapt language models to a domain and compare the ways of doing it.

The core package holds the interfaces, the plugin manager and registry, data handling,
evaluation and artifacts. Every method, retriever, memory model, combiner and domain is
provided by a plugin (built-in ones live under ``plugins/``) registered through the
``memdec`` entry-point group.
"""

__version__ = "0.1.0"
