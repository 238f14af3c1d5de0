"""memdec against the peers' own code on the same work (issue 32): neulab/knn-transformers and
LUMIA-Group/MemoryDecoder, each from a snapshot outside this repository that this script only calls.

The work: a base (a HF folder), the first N train tokens of a domain as the datastore, the first
M test tokens scored, memdec's windows (``make_windows``: the first window scores every position,
then ``stride`` new positions per window), exact search, k, T and λ fixed. memdec tokenises once
(``prepare``); the peers read those windows, so both sides see the same token ids.

Stages, each a separate process timed with ``/usr/bin/time -v`` (wall, peak RSS), memdec and the
peer alternating, the order flipped every round:

- ``save``: the datastore's keys and values (memdec ``datastore build --no-index`` against
  knn-transformers' ``KNNSaver`` hooked into the base, over the same train windows);
- ``index``: an exact (``Flat``) faiss index of those keys (memdec ``datastore build`` on the
  stored keys against faiss's ``IndexFlatL2`` over knn-transformers' key file);
- ``knn``: kNN-LM test perplexity, knobs fixed (memdec ``eval --method knn-lm`` against
  knn-transformers' ``KNNWrapper`` hooked into the base);
- ``joint``: base + a trained memory, λ fixed (memdec ``eval --method memdec`` against the
  official ``evaluate_joint.py``).

    python benchmarks/peer_bench.py prepare --work /tmp/peer-work
    python benchmarks/peer_bench.py rounds --work /tmp/peer-work --memory MEMORY_FOLDER --rounds 3

The peer steps run in the interpreter given by ``--peer-python`` (the MemoryDecoder script needs
loguru, accelerate and datasets); ``knnt-save``, ``knnt-index`` and ``knnt-eval`` are this
script's own entry points for the knn-transformers side (run by ``rounds``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]
MODEL = REPO / "plugins" / "memdec_zoo" / "models" / "memdec-demo-l"
LABEL_PAD = -100


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("prepare", "rounds", "knnt-save", "knnt-index", "knnt-eval", "joint-data"):
        command = sub.add_parser(name)
        command.add_argument("--work", type=Path, required=True, help="a folder for the shared windows and stores")
        command.add_argument("--peers", type=Path, default=Path("/tmp/peers"),
                             help="holds knn-transformers/ and MemoryDecoder/ (snapshots, outside the repo)")
        command.add_argument("--base", default=str(MODEL), help="the base model, a HF folder")
        command.add_argument("--domain", default="finance")
        command.add_argument("--max-train-tokens", type=int, default=32_768)
        command.add_argument("--max-eval-tokens", type=int, default=4_096)
        command.add_argument("--batch-size", type=int, default=4)
        command.add_argument("--k", type=int, default=1024)
        command.add_argument("--temperature", type=float, default=10.0)
        command.add_argument("--lam", type=float, default=0.25, help="λ of the kNN-LM row")
        command.add_argument("--joint-lam", type=float, default=0.4, help="λ of the base + memory row")
        command.add_argument("--memory", type=Path, default=None, help="a trained memory folder (joint row)")
        command.add_argument("--rounds", type=int, default=3)
        command.add_argument("--stages", default="save,index,knn,joint")
        command.add_argument("--peer-python", default=sys.executable,
                             help="the interpreter of the MemoryDecoder script (loguru, accelerate, datasets)")
    args = parser.parse_args()
    return {"prepare": prepare, "rounds": rounds, "knnt-save": knnt_save, "knnt-index": knnt_index,
            "knnt-eval": knnt_eval, "joint-data": joint_data}[args.command](args)


# ---------------------------------------------------------------- the shared windows (memdec tokenises)

def prepare(args) -> int:
    """Tokenise with memdec and write each split's windows as token ids and labels (-100: not
    scored) to ``work/{train,test}.npz``; the peers read these."""
    import numpy as np

    from memdec_core.inputs.context import prepare_context
    from memdec_core.interfaces import EvalSettings

    os.environ["MEMDEC_CACHE"] = str(args.work / "cache")  # memdec's runs then find the token streams cached
    settings = EvalSettings(batch_size=args.batch_size, max_train_tokens=args.max_train_tokens,
                            max_eval_tokens=args.max_eval_tokens)
    ctx = prepare_context(args.domain, args.base, settings)
    args.work.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        stream, windows = ctx.corpus.streams[split].astype(np.int64), ctx.windows(split)
        ids = np.zeros((len(windows), ctx.context), dtype=np.int64)
        labels = np.full((len(windows), ctx.context), LABEL_PAD, dtype=np.int64)
        lengths = np.zeros(len(windows), dtype=np.int64)
        for row, window in enumerate(windows):
            length = window.end - window.start
            ids[row, :length] = stream[window.start:window.end]
            first = window.score_from - window.start + 1  # the label at p is token p (the model shifts)
            labels[row, first:length] = stream[window.score_from + 1:window.end]
            lengths[row] = length
        np.savez(args.work / f"{split}.npz", ids=ids, labels=labels, lengths=lengths)
        print(f"{split}: {len(windows)} windows of {ctx.context}, {int((labels != LABEL_PAD).sum())} scored",
              file=sys.stderr)
    return 0


def _batches(path: Path, batch_size: int):
    import numpy as np
    import torch

    data = np.load(path)
    ids, labels, lengths = data["ids"], data["labels"], data["lengths"]
    for first in range(0, len(ids), batch_size):
        rows = slice(first, first + batch_size)
        width = int(lengths[rows].max())
        mask = (np.arange(width)[None, :] < lengths[rows][:, None]).astype(np.int64)
        yield (torch.from_numpy(ids[rows, :width].copy()), torch.from_numpy(mask),
               torch.from_numpy(labels[rows, :width].copy()))


# ---------------------------------------------------------------- knn-transformers, called as its run_clm.py would

def _knnlm(args):
    """knn-transformers' ``knnlm`` module, with its layer table taught the Llama block (its table
    names gpt2, bart, marian and t5: the last MLP's input, as for gpt2)."""
    sys.path.insert(0, str(args.peers / "knn-transformers"))
    import knnlm

    knnlm.KNNWrapper.model_layer_to_capture.setdefault("llama", {
        knnlm.KEY_TYPE.last_ffn_input: (lambda model: model.base_model.layers[-1].mlp, True),
        knnlm.KEY_TYPE.last_ffn_output: (lambda model: model.base_model.layers[-1], False)})
    return knnlm


def _peer_model(args):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    return model.eval()


def _store_size(args) -> int:
    import numpy as np

    return int((np.load(args.work / "train.npz")["labels"] != LABEL_PAD).sum())


def knnt_save(args) -> int:
    import torch

    knnlm = _knnlm(args)
    model = _peer_model(args)
    store = args.work / "knnt"
    shutil.rmtree(store, ignore_errors=True)
    saver = knnlm.KNNSaver(dstore_size=_store_size(args), dstore_dir=str(store),
                           dimension=model.config.hidden_size, knn_keytype=knnlm.KEY_TYPE.last_ffn_input)
    saver.break_into(model)
    with torch.no_grad():
        for ids, mask, labels in _batches(args.work / "train.npz", args.batch_size):
            model(input_ids=ids, attention_mask=mask, labels=labels)
    saver.dstore_keys.flush()
    saver.dstore_vals.flush()
    saver.break_out()
    print(f"saved {saver.dstore_idx} keys")
    return 0


def knnt_index(args) -> int:
    """knn-transformers' ``run_clm.py --build_index`` path: the model loaded and a ``KNNSaver``
    hooked into it (it opens the stored keys), then its ``build_index`` loop, with the exact
    ``IndexFlatL2`` knn-transformers' ``KNNWrapper`` searches in place of the IVFPQ it trains, at
    the path its ``get_index_path`` names. (run_clm.py also loads the dataset and a Trainer
    first; not done here.)"""
    import faiss
    import numpy as np
    import torch

    knnlm = _knnlm(args)
    model = _peer_model(args)
    store = str(args.work / "knnt")
    saver = knnlm.KNNSaver(dstore_size=_store_size(args), dstore_dir=store, dimension=model.config.hidden_size,
                           knn_keytype=knnlm.KEY_TYPE.last_ffn_input)
    saver.break_into(model)
    index = faiss.IndexFlatL2(saver.dimension)
    for start in range(0, saver.dstore_size, 1_000_000):  # its build_index's loop, keys converted per chunk
        chunk = saver.dstore_keys[start:start + 1_000_000].copy()
        index.add(torch.tensor(chunk.astype(np.float32)))
    faiss.write_index(index, knnlm.get_index_path(store, model.config.model_type, saver.dstore_size,
                                                  saver.dimension))
    saver.break_out()
    print(f"indexed {index.ntotal} keys")
    return 0


def knnt_eval(args) -> int:
    import torch

    knnlm = _knnlm(args)
    model = _peer_model(args)
    wrapper = knnlm.KNNWrapper(dstore_size=_store_size(args), dstore_dir=str(args.work / "knnt"),
                               dimension=model.config.hidden_size, knn_sim_func=knnlm.DIST.l2,
                               knn_keytype=knnlm.KEY_TYPE.last_ffn_input, knn_gpu=False,
                               move_dstore_to_mem=True, k=args.k, lmbda=args.lam, knn_temp=args.temperature)
    # Its setup_faiss sets an IVF index's nprobe and asks it for a direct map; an exact IndexFlat
    # has neither (and takes no new attributes): it is searched through a holder that does.
    read_index = knnlm.faiss.read_index
    knnlm.faiss.read_index = lambda *where: _ExactIndex(read_index(*where))
    wrapper.break_into(model)
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, mask, labels in _batches(args.work / "test.npz", args.batch_size):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss  # the mean over scored tokens
            scored = int((labels[:, 1:] != LABEL_PAD).sum())
            total += float(loss) * scored
            count += scored
    wrapper.break_out()
    print(f"knn-lm perplexity: {torch.tensor(total / count, dtype=torch.float64).exp().item():.6f} ({count} tokens)")
    return 0


class _ExactIndex:
    """An exact faiss index as knn-transformers' ``setup_faiss`` handles an IVF one."""

    def __init__(self, index):
        self.index, self.nprobe = index, 1

    def make_direct_map(self) -> None:
        pass  # every key of a flat index is reachable by its id already

    def search(self, queries, k):
        return self.index.search(queries, k)


# ---------------------------------------------------------------- the official evaluate_joint.py

def joint_data(args) -> int:
    """The test windows as the dataset folder ``evaluate_joint.py`` loads (``load_from_disk``):
    input_ids, labels and attention_mask per window, padded to the context with -100 labels."""
    import numpy as np
    from datasets import Dataset, DatasetDict

    data = np.load(args.work / "test.npz")
    DatasetDict({"test": Dataset.from_dict({
        "input_ids": data["ids"].tolist(), "labels": data["labels"].tolist(),
        "attention_mask": np.ones_like(data["ids"]).tolist()})}).save_to_disk(str(args.work / "joint-data"))
    return 0


# ---------------------------------------------------------------- the rounds

def _memdec(*words: str) -> list[str]:
    return [sys.executable, "-m", "memdec_cli", *words]


def _windows(args) -> list[str]:
    return ["--domain", args.domain, "--base", args.base, "--batch-size", str(args.batch_size),
            "--max-train-tokens", str(args.max_train_tokens), "--max-eval-tokens", str(args.max_eval_tokens)]


def _commands(args, stage: str) -> tuple[list[str], list[str], dict]:
    """(memdec's command, the peer's command, the peer's extra environment and folder) of a stage."""
    me, peer_env = [sys.executable, str(HERE)], {}
    common = ["--work", str(args.work), "--peers", str(args.peers), "--base", args.base,
              "--batch-size", str(args.batch_size), "--k", str(args.k), "--temperature", str(args.temperature),
              "--lam", str(args.lam)]
    if stage == "save":  # into memdec's cache (MEMDEC_CACHE=work/cache), where eval finds it
        return (_memdec("datastore", "build", *_windows(args), "--no-index"),
                [*me, "knnt-save", *common], peer_env)
    if stage == "index":  # the stored keys are reused; only the index is built
        return (_memdec("datastore", "build", *_windows(args), "--set", "faiss.factory=Flat"),
                [*me, "knnt-index", *common], peer_env)
    if stage == "knn":
        return (_memdec("eval", *_windows(args), "--method", "knn-lm", "--lam", str(args.lam),
                        "--set", f"knn-lm.temperatures={args.temperature}", "--set", f"knn-lm.k={args.k}",
                        "--set", "faiss.factory=Flat", "--format", "json"),
                [*me, "knnt-eval", *common], peer_env)
    if stage == "joint":
        joint = args.peers / "MemoryDecoder"
        return (_memdec("eval", *_windows(args), "--method", "memdec", "--lam", str(args.joint_lam),
                        "--set", "memdec.fidelity=false", "--set", f"memdec.path={args.memory}", "--format", "json"),
                [args.peer_python, "-m", "evaluate_joint", "--do_test", "--model_name_or_path", args.base,
                 "--dataset_name", str(args.work / "joint-data"), "--dataset_split_name", "test",
                 "--per_device_eval_batch_size", str(args.batch_size), "--output_dir", str(args.work / "joint-out"),
                 "--lmbda", str(args.joint_lam), "--knn_generator_path", str(args.memory), "--report_to", "none"],
                {"cwd": str(joint), "CUDA_VISIBLE_DEVICES": ""})
    raise SystemExit(f"unknown stage {stage!r}")


def _timed(command: list[str], env: dict, cwd: str | None, log: Path) -> dict:
    with open(log, "w") as out:
        completed = subprocess.run(["/usr/bin/time", "-v", *command], stdout=out, stderr=subprocess.STDOUT,
                                   env=env, cwd=cwd)
    text = log.read_text()
    if completed.returncode:
        raise SystemExit(f"failed ({completed.returncode}): {' '.join(command)}; see {log}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", text).group(1)
    seconds = sum(float(part) * 60 ** power for power, part in enumerate(reversed(wall.split(":"))))
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1)) / 1024
    return {"seconds": seconds, "rss_mib": rss, "perplexity": _perplexity(text)}


def _perplexity(text: str) -> float | None:
    for pattern in (r"knn-lm perplexity: ([\d.]+)", r"joint perplexity: ([\d.]+)", r'"test_ppl": ([\d.]+)'):
        found = re.findall(pattern, text)
        if found:
            return float(found[-1])
    return None


def rounds(args) -> int:
    stages = args.stages.split(",")
    if "joint" in stages and args.memory is None:
        raise SystemExit("the joint stage needs --memory FOLDER (a memory from `memdec train`)")
    if "joint" in stages and not (args.work / "joint-data").is_dir():
        subprocess.run([args.peer_python, str(HERE), "joint-data", "--work", str(args.work)], check=True,
                       env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    logs = args.work / "logs"
    logs.mkdir(exist_ok=True)
    results = {stage: {"memdec": [], "peer": []} for stage in stages}
    for number in range(args.rounds):
        for stage in stages:
            memdec, peer, extra = _commands(args, stage)
            sides = [("memdec", memdec, {**os.environ, "MEMDEC_CACHE": str(args.work / "cache")}, None)]
            peer_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} if stage == "joint" else dict(
                os.environ)
            peer_env.update({k: v for k, v in extra.items() if k != "cwd"})
            sides.append(("peer", peer, peer_env, extra.get("cwd")))
            if number % 2:
                sides.reverse()
            for side, command, env, cwd in sides:
                _clean(args, stage, side)
                result = _timed(command, env, cwd, logs / f"{stage}-{side}-{number}.log")
                results[stage][side].append(result)
                print(f"round {number} {stage:<6} {side:<7} {result['seconds']:7.2f} s {result['rss_mib']:7.0f} MiB"
                      f"  ppl {result['perplexity']}", flush=True)
    (args.work / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\n{'stage':<7}{'memdec s':>10}{'peer s':>10}{'ratio':>8}{'memdec MiB':>12}{'peer MiB':>10}"
          "  perplexity memdec / peer (relative difference); memdec / peer per round")
    for stage, sides in results.items():
        ratios = [m["seconds"] / p["seconds"] for m, p in zip(sides["memdec"], sides["peer"])]
        mean = {side: statistics.mean(r["seconds"] for r in runs) for side, runs in sides.items()}
        rss = {side: max(r["rss_mib"] for r in runs) for side, runs in sides.items()}
        ppl = [sides[side][-1]["perplexity"] for side in ("memdec", "peer")]
        same = f"{ppl[0]:.6f} / {ppl[1]:.6f} ({abs(ppl[0] - ppl[1]) / ppl[1]:.1e})" if None not in ppl else "-"
        print(f"{stage:<7}{mean['memdec']:>10.2f}{mean['peer']:>10.2f}{mean['memdec'] / mean['peer']:>8.3f}"
              f"{rss['memdec']:>12.0f}{rss['peer']:>10.0f}  {same}; " + " ".join(f"{r:.3f}" for r in ratios))
    return 0


def _clean(args, stage: str, side: str) -> None:
    """What a stage makes is removed before it runs again, so every round does the whole work."""
    if stage == "save":
        shutil.rmtree(args.work / ("cache/datastores" if side == "memdec" else "knnt"), ignore_errors=True)
    elif stage == "index":
        if side == "memdec":
            for path in (args.work / "cache" / "datastores").glob("*/indexes"):
                shutil.rmtree(path)
        else:
            for path in (args.work / "knnt").glob("index_*"):
                path.unlink()


if __name__ == "__main__":
    sys.exit(main())
