"""DAPT and LoRA: the training-based baselines (continued pre-training of all weights, or of
low-rank adapters through PEFT), trained through memdec's shared loop."""
