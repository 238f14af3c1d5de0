"""Inputs: what a run reads. Base models (HF, local, GGUF; their tokenizers and fingerprints),
corpora (documents → token streams → windows), model cards, and the EvalContext that puts a
loaded base and its tokenised corpus together.

Imports the layers below it: store, components, runtime, contracts.
"""
