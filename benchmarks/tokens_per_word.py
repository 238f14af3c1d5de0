"""Tokens per whitespace-separated word of the demo family's tokenizer on a pack's train split.

    python benchmarks/tokens_per_word.py [DOMAIN]     # default: general (the README's 1.48)
"""
import sys

from transformers import AutoTokenizer

from memdec_core.components import registry
from memdec_core.inputs.data import load_corpus

domain = sys.argv[1] if len(sys.argv) > 1 else "general"
tokenizer = AutoTokenizer.from_pretrained(registry.get("models", "memdec-demo-s")().path())
tokenizer.model_max_length = 10**9  # counting, not running the model: no length warning
documents = load_corpus(domain).documents["train"]
words = sum(len(document.split()) for document in documents)
tokens = sum(len(tokenizer(document)["input_ids"]) for document in documents)
print(f"{domain} train: {tokens:,} tokens for {words:,} words: {tokens / words:.2f} tokens per word")
