"""``memdec``: a Memory Decoder mixed with the base, λ tuned on validation.

The mixture path with its memory fixed to ``memory-decoder``; its settings are that memory's
(``--set memdec.path=DIR`` for a trained memory, ``--set memdec.teacher=...`` to train one).

Where a ``memdec`` row's number comes from (docs/architecture.md): ``MixtureMethod.evaluate``
(``memdec_core.engine.mixture``) creates this method's memory, ``DecoderMemory``
(``memory_model.py``), whose ``prepare`` opens ``--set memdec.path`` or trains the memory once
per teacher, init and data (``pipeline.memory_for``); ``evaluate_mixture`` then tunes λ on
validation and scores test in one pass of the base. The memory's fidelity to its teacher
(``fidelity.py``) is measured once per memory and data, and cached.
"""

from __future__ import annotations

from memdec_core.engine.mixture import MixtureMethod
from memdec_decoder.settings import DecoderSettings


class MemoryDecoderMethod(MixtureMethod):
    """Memory Decoder: a small LM trained to imitate the teacher's kNN-LM, mixed with any base; λ tuned."""

    name = "memdec"
    Config = DecoderSettings
    memory = "memory-decoder"
    compare_rank = 50
    compute_reference = True  # the paper's protocol: the baselines get the memory's training FLOPs
    requires = ("knn", "combiners")
