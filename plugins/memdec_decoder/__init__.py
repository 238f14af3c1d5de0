"""The Memory Decoder (arXiv 2508.09874): a small causal LM trained to imitate a kNN-LM.

- ``loss``: β·KL(p_kNN ‖ p_mem) + (1−β)·CE with a sparse KL over the targets' support.
- ``train``: the training loop (resumable, best epoch kept); ``memdec train``.
- ``vocab``: vocabulary-restricted memories for large-vocabulary families.
- ``memory``: a trained memory on disk; the ``memory-decoder`` MemoryModel.
- ``method``: ``memdec eval --method memdec`` (memory made on first use and cached).
- ``generate``: a LogitsProcessor with its own KV cache for greedy, sampling and beam search.
"""
