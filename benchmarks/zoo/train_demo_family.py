#!/usr/bin/env python3
"""Train memdec's offline demo model family (``memdec_zoo``): three small Llama-style causal LMs of
clearly different sizes that share ONE byte-level BPE tokenizer, pretrained from scratch on the
``general`` train split only.

Why a family: a Memory Decoder works for every base model that shares its tokenizer, so the demo
needs several bases with one tokenizer (the larger ones act as bases / kNN teacher, the smallest
one initialises the memory).

What it does, in order:
  1. trains a byte-level BPE tokenizer on the general TRAIN split (never valid/test);
  2. tokenises train and valid into one token stream each (documents joined by ``<|endoftext|>``);
  3. for each model: builds a ``LlamaForCausalLM``, pretrains it on random contiguous chunks of the
     train stream for a token budget (with a per-model wall-clock safety stop), evaluates perplexity
     on the valid stream periodically, keeps the best-on-valid weights, casts them to float16 and
     writes ``<output-dir>/<name>/`` atomically (temp dir, then rename) with the tokenizer and a
     ``train_log.json``;
  4. writes the exact settings to a settings file and a log file, so the run can be repeated.

Self-contained on purpose (torch, transformers, tokenizers, safetensors, numpy, stdlib; it does not
import memdec) so it runs on a bare GPU machine.

Run (from anywhere; relative paths are resolved against the repository root):

  # the shipped family, on one GPU (under 6 minutes on an H200 even at the time stops; the general
  # train split is ~3.7M tokens, so this is ~16 / ~11 / ~8 epochs for s / m / l):
  python3 benchmarks/zoo/train_demo_family.py --tokens-s 60e6 --tokens-m 40e6 --tokens-l 30e6 \\
      --time-budget-s 100

  # quick smoke test on CPU (about a minute; writes nothing under plugins/ or benchmarks/zoo/):
  python benchmarks/zoo/train_demo_family.py --output-dir /tmp/zoo_smoke --device cpu \\
      --num-threads 1 --max-train-docs 1500 --max-valid-docs 50 --seq-len 128 --num-evals 4 \\
      --tokens-s 8e4 --tokens-m 4e4 --tokens-l 2e4 --eval-max-tokens 4096 --final-eval-max-tokens 8192

  # a CPU retrain (2 cores: roughly 2 hours, weaker models than the GPU run):
  python benchmarks/zoo/train_demo_family.py --device cpu --tokens-s 6e6 --tokens-m 3e6 \\
      --tokens-l 2e6 --num-evals 5

On a CPU shared with other jobs, ``--num-threads 1`` was ~3x faster than torch's default of one
thread per core (the threads wait on each other while the other jobs hold the cores).

Defaults: data from ``plugins/memdec_domains/data/general/{train,valid}.jsonl.gz``, models to
``plugins/memdec_zoo/models/<name>/``, settings to ``benchmarks/zoo/settings.json`` and logs to
``benchmarks/zoo/logs/``. When ``--output-dir`` is not the default, settings and logs go under the
output dir instead (unless ``--settings-path`` / ``--log-dir`` are given), so a smoke test never
overwrites the settings of the shipped models.
"""
from __future__ import annotations

import argparse
import copy
import gzip
import hashlib
import inspect
import json
import logging
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA_DIR = "plugins/memdec_domains/data/general"
DEFAULT_OUTPUT_DIR = "plugins/memdec_zoo/models"
DEFAULT_SETTINGS = "benchmarks/zoo/settings.json"
DEFAULT_LOG_DIR = "benchmarks/zoo/logs"

EOT = "<|endoftext|>"  # the only special token: document separator, BOS, EOS and PAD at once

# The family. Sizes grow ~4x then ~2.5x in parameters so "small base vs large base" is a visible
# difference. head_dim is 32 (s) / 64 (m, l); intermediate = ~8/3 * hidden (SwiGLU's usual ratio),
# rounded to a multiple of 128. With vocab 8192 the tied embedding is a large share of s and m.
# The seed offset makes each model reproducible on its own (``--models m`` == m of a full run).
MODEL_SPECS = {
    "memdec-demo-s": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=384, seed_offset=0, lr=2e-3, dropout=0.0),
    "memdec-demo-m": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                          intermediate_size=768, seed_offset=1, lr=1.5e-3, dropout=0.1),
    "memdec-demo-l": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6,
                          intermediate_size=1024, seed_offset=2, lr=1e-3, dropout=0.1),
}
# Why dropout on m and l: ~3.7M unique train tokens is far less than these models could use, so
# they are trained for many epochs; residual dropout delays overfitting (s is too small to need it).
# Token budgets for one GPU: sized so the whole run stays well inside 10 minutes on an H200
# (with --time-budget-s as the backstop) and to a moderate number of epochs over ~3.7M tokens.
DEFAULT_TOKENS_CUDA = {"s": 60e6, "m": 40e6, "l": 30e6}
SHORT = {"s": "memdec-demo-s", "m": "memdec-demo-m", "l": "memdec-demo-l"}

log = logging.getLogger("train_demo_family")


# --------------------------------------------------------------------------------------------
# arguments, paths, logging
# --------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                   help="folder with train.jsonl.gz and valid.jsonl.gz (gzip JSONL, key 'text')")
    p.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR, help="models go to <output-dir>/<name>/")
    p.add_argument("--settings-path", default=None, help=f"default {DEFAULT_SETTINGS} (see above)")
    p.add_argument("--log-dir", default=None, help=f"default {DEFAULT_LOG_DIR} (see above)")
    p.add_argument("--models", default="s,m,l", help="comma list of s,m,l (or full names)")
    p.add_argument("--vocab-size", type=int, default=8192,
                   help="BPE vocab: small enough for a cheap output layer on CPU, big enough that "
                        "most English words are 1-2 tokens")
    p.add_argument("--tokenizer-min-frequency", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=512, help="training chunk length (tokens)")
    p.add_argument("--max-position-embeddings", type=int, default=512,
                   help="model context; keep it = seq-len: these models degrade badly past the length "
                        "they were trained on, and memdec sizes its windows from this value")
    p.add_argument("--batch-size", type=int, default=None,
                   help="chunks per step (default 64 on CUDA, 8 on CPU)")
    for k in "sml":
        p.add_argument(f"--tokens-{k}", type=float, default=None,
                       help=f"training token budget for {SHORT[k]} (accepts 3e7); "
                            f"default {DEFAULT_TOKENS_CUDA[k]:.0e} on CUDA, 2e6 on CPU")
    p.add_argument("--time-budget-s", type=float, default=None,
                   help="per-model wall-clock safety stop for training, periodic evals included "
                        "(default 100 on CUDA, 0 = none on CPU). The LR schedule "
                        "follows max(token progress, time progress), so a time stop still ends "
                        "with a fully decayed LR")
    p.add_argument("--lr", type=float, default=None, help="peak LR for every model (default per size)")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decays to lr * this")
    p.add_argument("--warmup-frac", type=float, default=0.02)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--beta2", type=float, default=0.95)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--dropout", type=float, default=None,
                   help="residual dropout on every attention/MLP output while training, for every "
                        "model (default per size: s 0, m 0.1, l 0.1); never saved in the model")
    p.add_argument("--num-evals", type=int, default=20, help="periodic valid evaluations per model")
    p.add_argument("--eval-max-tokens", type=int, default=131072,
                   help="valid tokens used by periodic evals (final eval uses --final-eval-max-tokens)")
    p.add_argument("--final-eval-max-tokens", type=int, default=0, help="0 = the whole valid split")
    p.add_argument("--max-train-docs", type=int, default=0, help="use only the first N train docs (smoke)")
    p.add_argument("--max-valid-docs", type=int, default=0, help="use only the first N valid docs (smoke)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--device", default=None, help="cuda / cpu / cuda:1 (default: cuda if available)")
    p.add_argument("--num-threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA only)")
    return p.parse_args(argv)


def resolve(path: str | Path) -> Path:
    path = Path(path).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


def resolve_outputs(args) -> tuple[Path, Path, Path]:
    """Output, settings and log locations. A non-default output dir keeps its settings and logs
    next to it, so a smoke test cannot clobber the settings of the shipped models."""
    out = resolve(args.output_dir)
    default_out = out == resolve(DEFAULT_OUTPUT_DIR)
    settings = resolve(args.settings_path) if args.settings_path else (
        resolve(DEFAULT_SETTINGS) if default_out else out / "settings.json")
    logs = resolve(args.log_dir) if args.log_dir else (
        resolve(DEFAULT_LOG_DIR) if default_out else out / "logs")
    return out, settings, logs


def setup_logging(log_dir: Path, stamp: str) -> Path:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_file = log_dir / f"train_{stamp}.log"
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    log.setLevel(logging.INFO)
    for h in (logging.StreamHandler(sys.stderr), logging.FileHandler(log_file, encoding="utf-8")):
        h.setFormatter(fmt)
        log.addHandler(h)
    return log_file


def write_json_atomic(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# data and tokenizer
# --------------------------------------------------------------------------------------------

def read_texts(path: Path, max_docs: int = 0) -> list[str]:
    """Documents of one split, in file order (order matters for reproducibility)."""
    if not path.exists():
        raise SystemExit(f"error: missing corpus file {path}")
    texts = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            text = json.loads(line)["text"]
            if text:
                texts.append(text)
            if max_docs and len(texts) >= max_docs:
                break
    return texts


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def train_tokenizer(texts: list[str], vocab_size: int, min_frequency: int):
    """Byte-level BPE (GPT-2 style): every byte is in the base alphabet, so no UNK is ever needed;
    the only special token is <|endoftext|> (id 0)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # trim_offsets=False keeps offsets byte-exact; the processor adds no special tokens, so
    # tokenising a text gives exactly its tokens (memdec joins documents with EOT itself).
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    assert tok.token_to_id(EOT) == 0, "EOT must be id 0"
    return tok


def wrap_tokenizer(tok, model_max_length: int):
    """The transformers wrapper saved into every model folder (AutoTokenizer loads it)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT,
                                   pad_token=EOT, model_max_length=model_max_length)


def encode_stream(tok, texts: list[str], eot_id: int, batch: int = 2000) -> np.ndarray:
    """One token stream for a split: EOT doc EOT doc ... (EOT also opens the first document, so
    every document is predicted from the same 'start of text' state)."""
    parts = []
    for i in range(0, len(texts), batch):
        for enc in tok.encode_batch(texts[i:i + batch], add_special_tokens=False):
            parts.append(np.asarray([eot_id] + enc.ids, dtype=np.uint16))  # vocab < 65536
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


# --------------------------------------------------------------------------------------------
# model, schedule, evaluation
# --------------------------------------------------------------------------------------------

def build_model(spec: dict, vocab_size: int, max_pos: int, eot_id: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec["hidden_size"],
        num_hidden_layers=spec["num_hidden_layers"],
        num_attention_heads=spec["num_attention_heads"],
        num_key_value_heads=spec["num_attention_heads"],  # plain MHA: these models are tiny
        intermediate_size=spec["intermediate_size"],
        max_position_embeddings=max_pos,
        tie_word_embeddings=True,  # halves the vocab-sized weights, which dominate small models
        bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=eot_id,
    )
    torch.manual_seed(seed)  # same seed -> same init, independent of which other models run
    return LlamaForCausalLM(cfg)


def add_residual_dropout(model, p: float) -> list:
    """Dropout on each block's attention and MLP output (GPT-2-style residual dropout), done with
    forward hooks so the saved model stays a plain Llama (dropout is a training-time device only).
    Returns the hook handles so they can be removed before saving."""
    if p <= 0:
        return []

    def hook(module, inputs, out):
        if isinstance(out, tuple):  # LlamaAttention returns (attn_output, attn_weights)
            return (F.dropout(out[0], p, module.training),) + tuple(out[1:])
        return F.dropout(out, p, module.training)

    return [m.register_forward_hook(hook) for layer in model.model.layers
            for m in (layer.self_attn, layer.mlp)]


def lr_at(progress: float, peak: float, warmup_frac: float, min_ratio: float) -> float:
    """Linear warmup then cosine decay to peak*min_ratio; progress in [0, 1]."""
    if warmup_frac > 0 and progress < warmup_frac:
        return peak * max(progress / warmup_frac, 0.01)
    t = min(1.0, (progress - warmup_frac) / max(1e-9, 1.0 - warmup_frac))
    return peak * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t)))


def make_optimizer(model, lr: float, weight_decay: float, beta2: float, device: torch.device):
    # No decay on norms (1-D weights); the tied embedding is decayed like any other matrix.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    kw = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, beta2), eps=1e-8, **kw)


def autocast_ctx(device: torch.device):
    # bf16 autocast on CUDA (fast, no loss scaling needed); plain fp32 on CPU.
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def lm_loss(model, chunk: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL of a [B, T+1] chunk: inputs chunk[:, :-1], targets chunk[:, 1:]."""
    logits = model(input_ids=chunk[:, :-1]).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), chunk[:, 1:].reshape(-1))


@torch.no_grad()
def evaluate_ppl(model, stream: torch.Tensor, seq_len: int, batch_size: int,
                 device: torch.device, max_tokens: int = 0) -> float:
    """Perplexity over non-overlapping windows of seq_len+1 tokens stepping by seq_len, so every
    token after the first is scored exactly once (a quick monitor, not memdec's sliding-window
    evaluation). The last partial window is dropped."""
    was_training = model.training
    model.eval()
    n = len(stream) if not max_tokens else min(len(stream), max_tokens + 1)
    starts = list(range(0, n - seq_len - 1 + 1, seq_len))
    total_nll, total_tok = 0.0, 0
    idx = torch.arange(seq_len + 1, device=device)
    for i in range(0, len(starts), batch_size):
        s = torch.tensor(starts[i:i + batch_size], device=device)
        chunk = stream[s[:, None] + idx]
        with autocast_ctx(device):
            loss = lm_loss(model, chunk)
        total_nll += loss.item() * chunk[:, 1:].numel()
        total_tok += chunk[:, 1:].numel()
    model.train(was_training)
    return math.exp(total_nll / max(1, total_tok)) if total_tok else float("nan")


# --------------------------------------------------------------------------------------------
# training one model
# --------------------------------------------------------------------------------------------

def train_one(name: str, spec: dict, args, train_stream: torch.Tensor, valid_stream: torch.Tensor,
              vocab_size: int, eot_id: int, device: torch.device, token_budget: int) -> tuple:
    seed = args.seed + spec["seed_offset"]
    model = build_model(spec, vocab_size, args.max_position_embeddings, eot_id, seed).to(device)
    n_params = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    peak_lr = args.lr if args.lr is not None else spec["lr"]
    opt = make_optimizer(model, peak_lr, args.weight_decay, args.beta2, device)
    dropout = args.dropout if args.dropout is not None else spec["dropout"]
    hooks = add_residual_dropout(model, dropout)
    fwd = torch.compile(model) if (args.compile and device.type == "cuda") else model

    bs, T = args.batch_size, args.seq_len
    tokens_per_step = bs * T
    total_steps = max(1, token_budget // tokens_per_step)
    # Chunk starts come from a CPU generator so the data order is the same on every device.
    gen = torch.Generator().manual_seed(seed)
    n_starts = len(train_stream) - T - 1
    if n_starts < 1:
        raise SystemExit(f"error: train stream ({len(train_stream)} tokens) shorter than seq-len")
    # All chunk starts drawn up front and moved to the device once: no host->device copy (which
    # would stall the GPU queue) inside the loop.
    all_starts = torch.randint(0, n_starts + 1, (total_steps, bs), generator=gen).to(device)
    idx = torch.arange(T + 1, device=device)
    log.info("%s: dropout %g", name, dropout)
    log.info("%s: %.2fM params, peak lr %g, %d steps x %d tokens = %.1fM tokens (%.1f epochs)",
             name, n_params / 1e6, peak_lr, total_steps, tokens_per_step,
             total_steps * tokens_per_step / 1e6, total_steps * tokens_per_step / len(train_stream))

    # Log the train loss ~200 times, evaluate valid ~num_evals times (by progress, so a time stop
    # still gets its evals).
    log_every = max(1, total_steps // 200)
    next_eval = 1
    curve, evals = [], []
    best = {"ppl": float("inf"), "state": None, "step": 0}
    loss_acc = torch.zeros((), device=device)
    loss_n, stop_reason, eval_s = 0, "token_budget", 0.0
    model.train()
    t0 = time.time()
    if device.type == "cuda":
        torch.cuda.synchronize()

    step = 0
    while step < total_steps:
        elapsed = time.time() - t0
        time_prog = elapsed / args.time_budget_s if args.time_budget_s > 0 else 0.0
        progress = max(step / total_steps, time_prog)
        if progress >= 1.0:
            stop_reason = "time_budget"
            break
        lr = lr_at(progress, peak_lr, args.warmup_frac, args.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr

        chunk = train_stream[all_starts[step][:, None] + idx]
        with autocast_ctx(device):
            loss = lm_loss(fwd, chunk)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        step += 1
        loss_acc += loss.detach()
        loss_n += 1

        if step % log_every == 0 or step == total_steps:
            mean_loss = (loss_acc / loss_n).item()  # the only per-interval GPU sync
            loss_acc.zero_(); loss_n = 0
            if not math.isfinite(mean_loss):
                raise SystemExit(f"error: {name} diverged at step {step} (loss {mean_loss})")
            curve.append({"step": step, "tokens": step * tokens_per_step, "loss": round(mean_loss, 4),
                          "lr": lr, "elapsed_s": round(time.time() - t0, 2)})
        progress = max(step / total_steps,
                       (time.time() - t0) / args.time_budget_s if args.time_budget_s > 0 else 0.0)
        if progress * args.num_evals >= next_eval or step == total_steps:
            next_eval = math.floor(progress * args.num_evals) + 1
            t_eval = time.time()
            ppl = evaluate_ppl(model, valid_stream, T, bs, device, args.eval_max_tokens)
            eval_s += time.time() - t_eval
            evals.append({"step": step, "tokens": step * tokens_per_step, "valid_ppl": round(ppl, 3),
                          "elapsed_s": round(time.time() - t0, 2)})
            log.info("%s step %d/%d  tokens %.2fM  train loss %.3f  valid ppl %.2f  lr %.2e  %.0fs  "
                     "%.0f tok/s", name, step, total_steps, step * tokens_per_step / 1e6,
                     curve[-1]["loss"] if curve else float("nan"), ppl, lr, time.time() - t0,
                     step * tokens_per_step / max(1e-9, time.time() - t0))
            if ppl < best["ppl"]:  # keep the best-on-valid weights (guards against overfitting)
                best = {"ppl": ppl, "state": copy.deepcopy(model.state_dict()), "step": step}

    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.time() - t0
    tokens_seen = step * tokens_per_step
    # A final eval for the last step if the loop ended (time stop) between evals.
    if not evals or evals[-1]["step"] != step:
        ppl = evaluate_ppl(model, valid_stream, T, bs, device, args.eval_max_tokens)
        evals.append({"step": step, "tokens": tokens_seen, "valid_ppl": round(ppl, 3),
                      "elapsed_s": round(wall, 2)})
        if ppl < best["ppl"]:
            best = {"ppl": ppl, "state": None, "step": step}
    if best["state"] is not None and best["step"] != step:
        log.info("%s: restoring best-on-valid weights from step %d", name, best["step"])
        model.load_state_dict(best["state"])

    info = {
        "parameters": n_params, "peak_lr": peak_lr, "seed": seed, "tokens_budget": token_budget,
        "tokens_seen": tokens_seen, "steps": step, "steps_planned": total_steps,
        "tokens_per_step": tokens_per_step, "epochs": round(tokens_seen / len(train_stream), 3),
        "stop_reason": stop_reason, "train_wall_s": round(wall, 2),
        # throughput of the training steps alone (periodic evals excluded)
        "train_tokens_per_s": round(tokens_seen / max(wall - eval_s, 1e-9), 1),
        "periodic_eval_s": round(eval_s, 2), "dropout": dropout,
        "selected_step": best["step"], "loss_curve": curve, "valid_evals": evals,
    }
    for h in hooks:
        h.remove()
    del opt
    return model, info


# --------------------------------------------------------------------------------------------
# saving
# --------------------------------------------------------------------------------------------

def save_model_dir(model, hf_tok, info: dict, out_dir: Path, name: str) -> Path:
    """Write <out_dir>/<name>/ atomically: build it in a temp dir, then swap it into place."""
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / name
    tmp = out_dir / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    model = model.to("cpu", dtype=torch.float16)  # fp16 halves the shipped size; loads fine as fp32
    kw = {}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kw["safe_serialization"] = True  # transformers 4.x; 5.x always writes safetensors
    model.save_pretrained(tmp, **kw)
    hf_tok.save_pretrained(tmp)
    portable_tokenizer_class(tmp)
    if not list(tmp.glob("*.safetensors")):
        raise SystemExit(f"error: no safetensors written for {name}")
    info["weights_bytes"] = sum(p.stat().st_size for p in tmp.glob("*.safetensors"))
    write_json_atomic(tmp / "train_log.json", info)
    check_saved(tmp, model, hf_tok)  # before the swap: a broken folder never replaces a good one
    old = out_dir / f".old-{name}-{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)
    return final


def portable_tokenizer_class(folder: Path) -> None:
    """transformers 5 writes tokenizer_class "TokenizersBackend", which transformers 4 cannot load;
    "PreTrainedTokenizerFast" loads in both (5.x maps it to the same backend)."""
    path = folder / "tokenizer_config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    if cfg.get("tokenizer_class") != "PreTrainedTokenizerFast":
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def check_saved(path: Path, model, hf_tok) -> None:
    """Reload the folder the way users will (AutoModel/AutoTokenizer, fp32) and compare logits
    with the in-memory model, so a broken save fails the run instead of shipping."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    text = "The committee met on Tuesday to discuss the new budget, which rose by 3.5%."
    ids = tok(text)["input_ids"]
    if ids != hf_tok(text)["input_ids"] or tok.decode(ids) != text:
        raise SystemExit(f"error: reloaded tokenizer of {path.name} does not round-trip")
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ref = model.to("cpu", dtype=torch.float32).eval()
    x = torch.tensor([[tok.eos_token_id] + ids])
    with torch.no_grad():
        diff = (loaded(x).logits - ref(x).logits).abs().max().item()
    # Same fp16-rounded weights on both sides; only kernel choice and summation order differ.
    if not diff < 1e-2:
        raise SystemExit(f"error: reloaded {path.name} differs from the trained model ({diff})")


def tokenizer_files_digest(folder: Path) -> dict:
    return {p.name: sha256_of(p) for p in sorted(folder.iterdir())
            if p.name.startswith(("tokenizer", "special_tokens"))}


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    run_t0 = time.time()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir, settings_path, log_dir = resolve_outputs(args)
    log_file = setup_logging(log_dir, stamp)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for the few fp32 matmuls outside autocast
    if args.batch_size is None:
        args.batch_size = 64 if device.type == "cuda" else 8
    if args.time_budget_s is None:
        args.time_budget_s = 100.0 if device.type == "cuda" else 0.0
    budgets = {}
    for k in "sml":
        v = getattr(args, f"tokens_{k}")
        default = DEFAULT_TOKENS_CUDA[k] if device.type == "cuda" else 2e6
        budgets[SHORT[k]] = int(v if v is not None else default)
        setattr(args, f"tokens_{k}", budgets[SHORT[k]])
    names = [SHORT.get(m.strip(), m.strip()) for m in args.models.split(",") if m.strip()]
    unknown = [n for n in names if n not in MODEL_SPECS]
    if unknown:
        raise SystemExit(f"error: unknown model(s) {unknown}; choose from s,m,l")
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    data_dir = resolve(args.data_dir)
    train_path, valid_path = data_dir / "train.jsonl.gz", data_dir / "valid.jsonl.gz"
    settings = {
        "command": [sys.executable, *sys.argv],
        "args": vars(args),
        "resolved": {"data_dir": str(data_dir), "output_dir": str(out_dir),
                     "settings_path": str(settings_path), "log_file": str(log_file)},
        "model_specs": {n: MODEL_SPECS[n] for n in names},
        "data_sha256": {"train": sha256_of(train_path) if train_path.exists() else None,
                        "valid": sha256_of(valid_path) if valid_path.exists() else None},
        "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else f"cpu, {torch.get_num_threads()} torch threads"),
        "versions": versions(),
        "started": stamp,
    }
    write_json_atomic(settings_path, settings)  # written first: a crashed run still says what it was
    log.info("device %s (%s); models %s; budgets %s; settings -> %s", device, settings["device_name"],
             names, {n: budgets[n] for n in names}, settings_path)

    # 1-2. tokenizer on TRAIN only, then the two token streams.
    t = time.time()
    train_texts = read_texts(train_path, args.max_train_docs)
    valid_texts = read_texts(valid_path, args.max_valid_docs)
    tok = train_tokenizer(train_texts, args.vocab_size, args.tokenizer_min_frequency)
    eot_id = tok.token_to_id(EOT)
    vocab_size = tok.get_vocab_size()
    hf_tok = wrap_tokenizer(tok, args.max_position_embeddings)
    train_np = encode_stream(tok, train_texts, eot_id)
    valid_np = encode_stream(tok, valid_texts, eot_id)
    tok_wall = time.time() - t
    log.info("tokenizer: vocab %d, %d train docs -> %d tokens (%.2f chars/token), %d valid docs -> "
             "%d tokens, %.1fs", vocab_size, len(train_texts), len(train_np),
             sum(map(len, train_texts)) / max(1, len(train_np)), len(valid_texts), len(valid_np), tok_wall)
    del train_texts, valid_texts
    train_stream = torch.from_numpy(train_np.astype(np.int64)).to(device)
    valid_stream = torch.from_numpy(valid_np.astype(np.int64)).to(device)

    # 3. the models, one after the other.
    summary = {}
    tok_digest = None
    for name in names:
        spec = MODEL_SPECS[name]
        model, info = train_one(name, spec, args, train_stream, valid_stream, vocab_size, eot_id,
                                device, budgets[name])
        # Final perplexity is measured on the weights we ship: fp16, upcast to fp32 for compute.
        model = model.to(dtype=torch.float16).to(dtype=torch.float32)
        t = time.time()
        info["final_valid_ppl"] = round(evaluate_ppl(model, valid_stream, args.seq_len,
                                                     args.batch_size, device,
                                                     args.final_eval_max_tokens), 3)
        info["final_eval_tokens"] = (min(len(valid_np) - 1, args.final_eval_max_tokens)
                                     if args.final_eval_max_tokens else len(valid_np) - 1)
        info["final_eval_s"] = round(time.time() - t, 2)
        info.update({
            "name": name, "architecture": "LlamaForCausalLM", "spec": spec,
            "vocab_size": vocab_size, "seq_len": args.seq_len,
            "device": str(device), "device_name": settings["device_name"],
            "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
            "saved_dtype": "float16",
            "train_tokens_in_corpus": int(len(train_np)), "valid_tokens": int(len(valid_np)),
            "tokenizer_train_s": round(tok_wall, 2), "settings": settings,
            "note": "pretrained on the general train split only; valid used for monitoring and "
                    "best-checkpoint selection; test never read",
        })
        path = save_model_dir(model, hf_tok, info, out_dir, name)
        digest = tokenizer_files_digest(path)
        if tok_digest is None:
            tok_digest = digest
        elif digest != tok_digest:  # the family contract: one tokenizer, byte for byte
            raise SystemExit(f"error: tokenizer files of {name} differ from the first model's")
        log.info("%s: saved %s (%.1f MB fp16), final valid ppl %.2f, %.0f tok/s, %s", name, path,
                 info["weights_bytes"] / 1e6, info["final_valid_ppl"], info["train_tokens_per_s"],
                 info["stop_reason"])
        summary[name] = {k: info[k] for k in ("parameters", "tokens_seen", "epochs", "train_wall_s",
                                              "selected_step", "steps",
                                              "train_tokens_per_s", "final_valid_ppl",
                                              "weights_bytes", "stop_reason")}
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()

    settings["summary"] = summary
    settings["tokenizer_sha256"] = tok_digest
    settings["total_wall_s"] = round(time.time() - run_t0, 1)
    write_json_atomic(settings_path, settings)
    log.info("done in %.0fs: %s", settings["total_wall_s"], json.dumps(summary))
    return 0


def versions() -> dict:
    import tokenizers
    import transformers
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
            "numpy": np.__version__}


if __name__ == "__main__":
    sys.exit(main())
