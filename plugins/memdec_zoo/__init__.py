"""The offline demo model family: small causal LMs of different sizes sharing one tokenizer.

They were pretrained on the ``general`` domain's train split only (never on domain text), so
the domain packs are genuinely out of domain for them. Retrain with
``benchmarks/zoo/train_demo_family.py``; weights ship as safetensors in ``models/<name>/``.
"""
