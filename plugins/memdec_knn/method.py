"""kNN-LM (Khandelwal et al.): mix the base with a distribution over its nearest training contexts.

``knn-lm`` is the mixture path with its memory fixed to ``knn-datastore``; its settings are that
memory's (``--set knn-lm.k=256``, ``--set knn-lm.retriever=NAME``).
"""

from __future__ import annotations

from memdec_core.engine.mixture import MixtureMethod
from memdec_knn.settings import KnnSettings


class KnnLM(MixtureMethod):
    """kNN-LM: a datastore of (hidden state → next token) over the train split; λ and T tuned."""

    name = "knn-lm"
    Config = KnnSettings
    memory = "knn-datastore"
    compare_rank = 30
