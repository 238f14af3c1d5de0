"""The Memory Decoder (arXiv 2508.09874): a small causal LM trained to imitate a kNN-LM.

Work in progress: the training objective lives here; the method, training loop and inference
plugin follow (issue "Memory Decoder: kNN targets, training, plug-and-play inference").
"""
