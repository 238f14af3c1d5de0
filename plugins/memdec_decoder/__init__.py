"""The Memory Decoder (arXiv 2508.09874): a small causal LM trained to imitate a kNN-LM.

From the bottom up:

- ``recipe``, ``settings``: the knobs (``DecoderSettings``, help text included) and the recipe that
  fills those left at auto; ``TrainSettings`` is the training loop's view of them.
- ``loss``: β·KL(p_kNN ‖ p_mem) + (1−β)·CE with a sparse KL over the targets' support.
- ``vocab``: vocabulary-restricted memories for large-vocabulary families.
- ``memory``: a trained memory on disk, and its stepper with its own KV cache for generation.
- ``targets``, ``teacher_targets``: the training signals (the teacher's kNN distribution, its own).
- ``train``: the training loop (resumable, best epoch kept); ``transfer``: a memory moved to
  another tokenizer.
- ``pipeline``: teacher datastore → targets → training, each step cached; ``fidelity``: how well a
  memory imitates its teacher, measured once per memory and data.
- ``memory_model``, ``method``: the ``memory-decoder`` MemoryModel and ``memdec eval --method memdec``.
- ``api`` (what other code calls), ``commands`` (``memdec targets|train|transfer``), ``plugin``.
"""
