"""A portable memory (``memdec export --memory M``) mixed by code that is not memdec.

Two halves, run by two Pythons:

``mix`` imports torch and transformers only (it runs in a separate virtual environment, e.g.
transformers 4.55.4, the official MemoryDecoder's pin): the base and the exported memory loaded
with ``AutoModelForCausalLM``, mixed as the official ``evaluate_joint.py`` does
(``logaddexp(log p_base + log(1 − λ), log p_memory + log λ)``) over token windows given in a JSON
file; prints the mixture's perplexity as JSON.

``compare`` (memdec's Python) writes the windows, scores the same windows with memdec's own
mixture of the *original* memory (restricted or not), runs ``mix`` with the given Python on the
export, and prints both numbers and their relative difference; with ``--official REPOSITORY`` it
also runs that checkout's ``evaluate_joint.py`` (as it is, in the same Python: it needs datasets
4.0.0, accelerate, loguru and faiss there) on the same windows.

    python benchmarks/portable_memory_check.py compare --base memdec-demo-m --memory MEMORY \\
        --export EXPORTED --domain finance --python /tmp/tf455/bin/python --lam 0.4
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys


def mix(base: str, memory: str, windows_file: str, lam: float) -> dict:
    """Mixture perplexity of ``windows_file``'s windows (each scores all its tokens after the first)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    dtype = {"dtype": torch.float32} if int(transformers.__version__.split(".")[0]) >= 5 else \
        {"torch_dtype": torch.float32}
    base_model = AutoModelForCausalLM.from_pretrained(base, **dtype).eval()
    memory_model = AutoModelForCausalLM.from_pretrained(memory, **dtype).eval()
    vocab = memory_model.config.vocab_size
    with open(windows_file) as handle:
        windows = json.load(handle)
    total, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            ids = torch.tensor([window])
            p_base = torch.log_softmax(base_model(ids).logits[0, :-1, :vocab].float(), -1)
            p_memory = torch.log_softmax(memory_model(ids).logits[0, :-1].float(), -1)
            mixed = torch.logaddexp(p_base + math.log(1 - lam), p_memory + math.log(lam))
            total -= mixed.gather(1, ids[0, 1:, None]).sum().item()
            count += len(window) - 1
    return {"ppl": math.exp(total / count), "tokens": count, "transformers": transformers.__version__,
            "torch": torch.__version__, "memory_class": type(memory_model).__name__}


def memdec_mixture(base: str, memory: str, windows: list[list[int]], lam: float) -> float:
    """The same windows scored by memdec: its loaded base, its memory (restricted rows scattered
    to the full vocabulary), its linear combiner."""
    import torch

    from memdec_combiners.linear import Linear
    from memdec_core.inputs.models import load_model
    from memdec_decoder.memory import open_memory

    loaded, opened = load_model(base), open_memory(memory)
    total, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            ids = torch.tensor([window])
            p_base = torch.log_softmax(loaded.model(ids).logits[0, :-1].float(), -1)
            p_memory = opened.logprobs(ids)[0, :-1]
            width = p_base.shape[-1]
            if p_memory.shape[-1] < width:
                p_memory = opened.to_full(opened.restricted_logprobs(opened.forward(ids).logits[0, :-1]), width)
            mixed = Linear(lam=lam).combine(p_base, p_memory, {})
            total -= mixed.gather(1, ids[0, 1:, None]).sum().item()
            count += len(window) - 1
    return math.exp(total / count)


def domain_windows(base: str, domain: str, context: int, count: int) -> list[list[int]]:
    """``count`` windows of ``context`` tokens from the start of the domain's test split."""
    from memdec_core.inputs.data import load_corpus, tokenize_corpus
    from memdec_core.inputs.models import load_model

    loaded = load_model(base)
    corpus = tokenize_corpus(load_corpus(domain), loaded.tokenizer, loaded.tokenizer_fingerprint,
                             context=context, max_tokens={"train": context + 1, "valid": context + 1,
                                                         "test": context * count + 1})
    stream = [int(token) for token in corpus.streams["test"]]
    return [stream[start:start + context] for start in range(0, len(stream) - context + 1, context)][:count]


#: Written by ``--python``: the windows as the official code's preprocessed dataset (load_from_disk).
DATASET_PROGRAM = """
import json, sys
from datasets import Dataset, DatasetDict
windows = json.load(open(sys.argv[1]))
DatasetDict({"test": Dataset.from_dict({"input_ids": windows, "labels": windows,
                                        "attention_mask": [[1] * len(w) for w in windows]})}).save_to_disk(sys.argv[2])
"""


def official(python: str, repository: str, base: str, export: str, windows_file, folder, lam: float) -> dict:
    """The official ``evaluate_joint.py`` (a local checkout of LUMIA-Group/MemoryDecoder, run as it is)
    on the same windows: its "lm perplexity" and "joint perplexity" lines."""
    import os
    import re
    from pathlib import Path

    dataset = Path(folder) / "dataset"
    subprocess.run([python, "-c", DATASET_PROGRAM, str(windows_file), str(dataset)], check=True, capture_output=True)
    environment = {**{key: value for key, value in os.environ.items() if key != "PYTHONPATH"},
                   "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([python, "-m", "evaluate_joint", "--do_test", "--model_name_or_path", base,
                          "--dataset_name", str(dataset), "--dataset_split_name", "test",
                          "--per_device_eval_batch_size", "4", "--output_dir", str(Path(folder) / "out"),
                          "--lmbda", str(lam), "--knn_generator_path", export, "--report_to", "none"],
                         cwd=repository, env=environment, capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"evaluate_joint.py failed:\n{run.stderr[-3000:]}")
    found = dict(re.findall(r"^(lm|joint) perplexity: ([0-9.eE+-]+)$", run.stdout, re.MULTILINE))
    return {"lm_ppl": float(found["lm"]), "joint_ppl": float(found["joint"])}


def outside_base(location: str, folder) -> str:
    """The base as transformers 4.x reads it: a folder written by transformers 5 (a GGUF conversion in
    memdec's cache) names its RoPE base only in ``rope_parameters``, which 4.x ignores (it would use
    its default base), and may name a tokenizer class 4.x lacks. A copy with links to the weights
    and both fixed; a folder that needs neither is used as it is."""
    import shutil
    from pathlib import Path

    from memdec_decoder.portable import make_config_portable, make_tokenizer_portable

    source, copy = Path(location), Path(folder) / "base"
    if not source.is_dir():
        return location
    copy.mkdir()
    for file in source.iterdir():
        if file.name in ("config.json", "tokenizer_config.json"):
            shutil.copy(file, copy / file.name)
        else:
            (copy / file.name).symlink_to(file.resolve())
    make_config_portable(copy / "config.json")
    if (copy / "tokenizer_config.json").is_file():
        make_tokenizer_portable(copy / "tokenizer_config.json")
    return str(copy)


def compare(args) -> dict:
    import tempfile
    from pathlib import Path

    windows = domain_windows(args.base, args.domain, args.context, args.windows)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "windows.json"
        path.write_text(json.dumps(windows))
        from memdec_core.inputs.models import resolve_model_location

        base_location = outside_base(resolve_model_location(args.base)[0], folder)
        outside = subprocess.run([args.python, __file__, "mix", "--base", base_location, "--memory", args.export,
                                  "--windows", str(path), "--lam", str(args.lam)],
                                 check=True, capture_output=True, text=True)
        theirs = json.loads(outside.stdout.strip().splitlines()[-1])
        ours = memdec_mixture(args.base, args.memory, windows, args.lam)
        report = {"base": args.base, "memory": args.memory, "export": args.export, "lam": args.lam,
                  "tokens": theirs["tokens"], "memdec_ppl": ours, "outside_ppl": theirs["ppl"],
                  "relative_difference": abs(theirs["ppl"] - ours) / ours, "outside": theirs}
        if args.official:
            found = official(args.python, args.official, base_location, args.export, path, folder, args.lam)
            report["official"] = {**found, "relative_difference": abs(found["joint_ppl"] - ours) / ours}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    mixing = commands.add_parser("mix", help="torch + transformers only: the mixture's perplexity")
    mixing.add_argument("--base", required=True)
    mixing.add_argument("--memory", required=True)
    mixing.add_argument("--windows", required=True)
    mixing.add_argument("--lam", type=float, default=0.4)
    comparing = commands.add_parser("compare", help="memdec's number and the outside one, side by side")
    comparing.add_argument("--base", required=True)
    comparing.add_argument("--memory", required=True, help="the memory as memdec trained it")
    comparing.add_argument("--export", required=True, help="its `memdec export --memory` folder")
    comparing.add_argument("--domain", required=True)
    comparing.add_argument("--python", default=sys.executable, help="the Python that runs `mix`")
    comparing.add_argument("--lam", type=float, default=0.4)
    comparing.add_argument("--context", type=int, default=256)
    comparing.add_argument("--windows", type=int, default=8)
    comparing.add_argument("--official", default=None, metavar="REPOSITORY",
                           help="also run evaluate_joint.py of this checkout of LUMIA-Group/MemoryDecoder")
    args = parser.parse_args()
    if args.command == "mix":
        print(json.dumps(mix(args.base, args.memory, args.windows, args.lam)))
    else:
        print(json.dumps(compare(args), indent=2))


if __name__ == "__main__":
    main()
