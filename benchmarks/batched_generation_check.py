r"""Issue 14's case: a short and a long prompt generated as one left-padded batch vs alone, with a
Memory Decoder mixed in (λ = 0.6, greedy). "new" runs memdec's composite model; "old" runs the
logits-processor path of commit 6511f6e, which gave the memory neither the attention mask nor
the position ids:

    memdec train --domain finance --output /tmp/finance-memory
    python benchmarks/batched_generation_check.py new /tmp/finance-memory
    git worktree add /tmp/old 6511f6e
    PYTHONPATH=/tmp/old:/tmp/old/plugins:/tmp/old/cli \
        python benchmarks/batched_generation_check.py old /tmp/finance-memory
"""
import sys

import torch

from memdec_combiners.linear import Linear
from memdec_core.api import prepare_context
from memdec_decoder.memory_model import DecoderMemory

PROMPTS = ["The central bank", "Shares of the largest lenders fell sharply after the regulator said that"]
ctx = prepare_context(None, "memdec-demo-m")
base, tokenizer = ctx.base, ctx.base.tokenizer
memory = DecoderMemory(path=sys.argv[2])
memory.prepare(ctx)


def batch(prompts):
    rows = [tokenizer(p)["input_ids"] for p in prompts]
    n, pad = max(map(len, rows)), tokenizer.eos_token_id
    ids = torch.tensor([[pad] * (n - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (n - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def run(prompts):
    ids, mask = batch(prompts)
    if sys.argv[1] == "old":
        from transformers import GenerationConfig, LogitsProcessorList

        # Only in commit 6511f6e (run from its worktree, as above): today's path has no such class.
        from memdec_core.generation import MixtureLogitsProcessor
        processor = MixtureLogitsProcessor(memory.stepper({}), Linear(lam=0.6))
        out = base.model.generate(input_ids=ids, attention_mask=mask, logits_processor=LogitsProcessorList([processor]),
                                  generation_config=GenerationConfig(max_new_tokens=12, do_sample=False,
                                                                     pad_token_id=tokenizer.eos_token_id))
    else:
        from memdec_core.engine.generation import mixture_model
        model = mixture_model(base, memory, {}, Linear(lam=0.6))
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
    return tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)


together = run(PROMPTS)
for prompt, text in zip(PROMPTS, together):
    alone = run([prompt])[0]
    print(f"{sys.argv[1]}: {prompt!r}\n  batched: {text!r}\n  alone:   {alone!r}\n  equal: {text == alone}")
