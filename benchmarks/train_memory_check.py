"""Peak memory of one continued-training step (DAPT/LoRA loss, forward and backward) with the
full logits against memdec's chunked output layer, side by side in one run.

    python benchmarks/train_memory_check.py                     # Qwen2.5-0.5B's vocabulary and width
    python benchmarks/train_memory_check.py --vocab 8192 --layers 4

Each variant runs in its own process (peak RSS is per process); the model is a randomly
initialised qwen2 of the given vocabulary, width and depth, so no download is needed. Prints the
peak RSS of each, their ratio, and the two losses (they must agree to float precision).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def one_step(variant: str, vocab: int, width: int, layers: int, batch: int, context: int, lora: bool) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from memdec_core.engine.training import TrainBatch, next_token_cross_entropy

    torch.manual_seed(0)
    config = AutoConfig.for_model("qwen2", vocab_size=vocab, hidden_size=width, intermediate_size=4 * width,
                                  num_hidden_layers=layers, num_attention_heads=14, num_key_value_heads=2,
                                  tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    model.train()
    input_ids = torch.randint(0, vocab, (batch, context + 1))
    attention_mask = torch.ones((batch, context), dtype=torch.long)
    rows, columns = attention_mask.nonzero(as_tuple=True)
    step = TrainBatch(torch.arange(len(rows)), rows, columns, input_ids[:, :-1], attention_mask,
                      input_ids[:, 1:][rows, columns])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    if variant == "full logits":
        logits = model(input_ids=step.input_ids, attention_mask=attention_mask, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits[rows, columns].float(), step.gold)
    else:
        loss = next_token_cross_entropy(model, step)
    loss.backward()
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"loss": float(loss), "peak_mb": peak / 1024, "model_mb": before / 1024, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--width", type=int, default=896)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="windows per step (LoRA and DAPT's default)")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--dapt", action="store_true", help="train every weight instead of LoRA adapters")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # the child process's own run
    args = parser.parse_args()
    shape = (args.vocab, args.width, args.layers, args.batch, args.context, not args.dapt)
    if args.variant:
        print(json.dumps(one_step(args.variant, *shape)))
        return
    results = {}
    for variant in ("full logits", "chunked output layer"):
        child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--variant", variant],
                               check=True, capture_output=True, text=True)
        results[variant] = json.loads(child.stdout.strip().splitlines()[-1])
    print(f"one {'DAPT' if args.dapt else 'LoRA'} step: vocabulary {args.vocab:,}, width {args.width}, "
          f"{args.layers} blocks, {args.batch} windows of {args.context}")
    for variant, result in results.items():
        print(f"  {variant:22s} peak RSS {result['peak_mb']:8,.0f} MB (model and inputs {result['model_mb']:6,.0f} MB)"
              f"  {result['seconds']:6.2f} s  loss {result['loss']:.6f}")
    full, chunked = results["full logits"], results["chunked output layer"]
    print(f"  peak RSS ratio {full['peak_mb'] / chunked['peak_mb']:.2f}x, step time ratio "
          f"{chunked['seconds'] / full['seconds']:.2f}x, loss difference {abs(full['loss'] - chunked['loss']):.2e}")


if __name__ == "__main__":
    main()
