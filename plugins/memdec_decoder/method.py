"""``memdec``: a Memory Decoder mixed with the base, λ tuned on validation.

The mixture path with its memory fixed to ``memory-decoder``; its settings are that memory's
(``--set memdec.path=DIR`` for a trained memory, ``--set memdec.teacher=...`` to train one).
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
