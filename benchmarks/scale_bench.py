"""Scale: 1 vs N processes on the long jobs, and faiss indexes on synthetic keys (issue 12).

Two sections, each measured side by side in one run (these machines are noisy):

``processes``: the demo family on a domain, with a fresh cache per world size, launched by
torchrun (gloo) with the CPU's cores split between the ranks (``OMP_NUM_THREADS`` = cores / N):
``datastore build`` (memdec-demo-l), ``targets build`` (its kNN targets) and ``train`` (a memory
from memdec-demo-s), each timed as a whole command (process start included). Equality: the
datastore's and the targets' bytes, and the largest weight difference of the memories.

``overhead``: the per-token cost a kNN-LM's search (k = 1024, with its distribution) and a
2-block Memory Decoder (restricted vocabulary) add to a base of Qwen2.5-0.5B's architecture, in
teacher-forced scoring (windows of 512 scoring 256) and in generation (one token, KV cache), at
several store sizes of synthetic keys: the paper's claim is that the gap grows with the store.

``indexes``: synthetic keys of Qwen2.5-0.5B's width (896) — clustered, so IVF has structure to
find — indexed with several faiss factories in a subprocess each (peak RSS is that process's),
then k = 1024 searched for a sample of the keys: build seconds, index bytes, queries per
second (and, for an on-disk index, through the batched path kNN targets take: big_batch_search)
and recall@1024 against the exact search.

    OMP_NUM_THREADS=2 python benchmarks/scale_bench.py processes --domain finance --max-train-tokens 65536
    python benchmarks/scale_bench.py indexes --keys 1000000
    python benchmarks/scale_bench.py indexes --datastore DATASTORE --factories "IVF{lists},PQ64;OPQ64,IVF{lists},PQ64"
    python benchmarks/scale_bench.py overhead --keys 65536,1048576
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
#: "@disk": built with on_disk (inverted lists merged into one file, searched memory-mapped);
#: "{lists}": the inverted lists memdec's "auto" gives the store (about 4·√keys).
FACTORIES = ("Flat", "auto", "IVF{lists},Flat@disk", "IVF{lists},PQ64", "OPQ64,IVF{lists}_HNSW32,PQ64")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sections = parser.add_subparsers(dest="section", required=True)
    processes = sections.add_parser("processes")
    processes.add_argument("--domain", default="finance")
    processes.add_argument("--max-train-tokens", type=int, default=65_536)
    processes.add_argument("--world-sizes", default="1,2")
    processes.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    indexes = sections.add_parser("indexes")
    indexes.add_argument("--keys", type=int, default=1_000_000)
    indexes.add_argument("--dim", type=int, default=896)
    indexes.add_argument("--queries", type=int, default=512)
    indexes.add_argument("--k", type=int, default=1024)
    indexes.add_argument("--factories", default=";".join(FACTORIES), help="faiss factory strings, separated by ;")
    indexes.add_argument("--datastore", type=Path,
                         help="index a datastore's real keys (its keys.npy) instead of synthetic ones; "
                              "--keys and --dim are then the datastore's")
    overhead = sections.add_parser("overhead")
    overhead.add_argument("--keys", default="65536,1048576", help="store sizes, comma-separated")
    overhead.add_argument("--k", type=int, default=1024)
    overhead.add_argument("--window", type=int, default=512)
    overhead.add_argument("--memory-blocks", type=int, default=24,
                          help="blocks of the memory: 24 is the whole 0.5B (the paper recipe), 2 the cut one")
    overhead.add_argument("--memory-vocabulary", type=int, default=16_384,
                          help="tokens of the memory's restricted output layer")
    overhead.add_argument("--repeats", type=int, default=5, help="at least this many timed pairs per ratio")
    one = sections.add_parser("_index")  # one factory, in its own process
    exact = sections.add_parser("_exact")  # the true neighbours, in its own process
    for child in (one, exact):
        for name in ("keys", "dim", "queries", "k"):
            child.add_argument(f"--{name}", type=int)
        child.add_argument("--exact")
        child.add_argument("--keys-file")
    one.add_argument("--factory")
    args = parser.parse_args()
    return {"processes": run_processes, "indexes": run_indexes, "overhead": run_overhead,
            "_index": run_one_index, "_exact": run_exact}[args.section](args)


# ----------------------------------------------------------------------------------------------
# processes


def run_processes(args) -> int:
    sizes = [int(size) for size in args.world_sizes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="memdec-scale-"))
    runs = {size: run_jobs(size, args.cores // size, args, work / f"world-{size}") for size in sizes}
    # The bits depend on the threads a process computes with (BLAS splits its sums by thread), so
    # the N-process run is compared with one process of the ranks' thread count.
    threads = args.cores // max(sizes)
    reference = run_jobs(1, threads, args, work / "reference") if threads != args.cores else runs[1]
    print(f"equality against 1 process of {threads} thread(s), as each rank has")
    print("| job | " + " | ".join(f"{size} process{'es' if size > 1 else ''} (s)" for size in sizes)
          + " | speed-up | equal to 1 process |")
    print("|---|" + "---|" * (len(sizes) + 2))
    for job in ("datastore", "targets", "train"):
        seconds = [runs[size]["seconds"][job] for size in sizes]
        equal = [equality(job, reference, runs[size]) for size in sizes if size > 1]
        print(f"| {job} | " + " | ".join(f"{value:.1f}" for value in seconds)
              + f" | {seconds[0] / seconds[-1]:.2f}× | {'; '.join(equal)} |")
    shutil.rmtree(work, ignore_errors=True)
    return 0


def run_jobs(size: int, threads: int, args, folder: Path) -> dict:
    folder.mkdir(parents=True)
    env = {**os.environ, "MEMDEC_CACHE": str(folder / "cache"), "MEMDEC_NO_PROGRESS": "1",
           "OMP_NUM_THREADS": str(max(1, threads))}
    launcher = ([TORCHRUN, "--standalone", "--nproc_per_node", str(size)] if size > 1 else [sys.executable])
    common = ["--domain", args.domain, "--max-train-tokens", str(args.max_train_tokens)]
    jobs = {"datastore": ["datastore", "build", "--base", "memdec-demo-l", *common],
            "targets": ["targets", "build", "--teacher", "memdec-demo-l", *common],
            "train": ["train", "--teacher", "memdec-demo-l", "--init", "memdec-demo-s", "--output",
                      str(folder / "memory"), *common]}
    seconds = {}
    for job, arguments in jobs.items():
        started = time.perf_counter()
        result = subprocess.run([*launcher, "-m", "memdec_cli", "--world-size", str(size), *arguments], env=env,
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"{job} with {size} process(es) failed:\n{result.stderr[-2000:]}")
        seconds[job] = time.perf_counter() - started
    return {"seconds": seconds, "folder": folder}


def equality(job: str, reference: dict, other: dict) -> str:
    if job == "train":
        from memdec_decoder.memory import open_memory

        one, two = (open_memory(run["folder"] / "memory").model for run in (reference, other))
        largest = max(float((a - b).detach().abs().max()) for a, b in zip(one.parameters(), two.parameters()))
        return f"weights within {largest:.1e}"
    kind = "datastores" if job == "datastore" else "targets"
    same = folder_bytes(reference["folder"] / "cache" / kind) == folder_bytes(other["folder"] / "cache" / kind)
    return "identical bytes" if same else "DIFFERENT bytes"


def folder_bytes(root: Path) -> dict[str, bytes]:
    """The data files of the entries under ``root`` (not their manifests: those hold times and commands)."""
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*.npy"))}


# ----------------------------------------------------------------------------------------------
# indexes


def run_indexes(args) -> int:
    from memdec_knn.index import inverted_lists, resolve_factory

    work = Path(tempfile.mkdtemp(prefix="memdec-index-"))
    keys_file, exact_file = work / "keys.npy", work / "exact.npy"
    if args.datastore:
        keys_file = args.datastore / "keys.npy"
        args.keys, args.dim = np.load(keys_file, mmap_mode="r").shape
    else:
        synthetic_keys(args.keys, args.dim, path=keys_file)  # once, memory-mapped by every child
    sizes = ["--keys", str(args.keys), "--dim", str(args.dim), "--queries", str(args.queries), "--k", str(args.k),
             "--exact", str(exact_file), "--keys-file", str(keys_file)]
    run_child([sys.executable, __file__, "_exact", *sizes], "the exact search")
    origin = f"keys of the datastore {args.datastore}" if args.datastore else "synthetic keys"
    print(f"{args.keys:,} {origin} of dimension {args.dim}, k = {args.k}, {args.queries} queries")
    print("| factory | build s | index MB | queries/s | batched queries/s | recall@k | peak RSS MB |")
    print("|---|---|---|---|---|---|---|", flush=True)
    factories = args.factories.format(lists=inverted_lists(args.keys)).split(";")
    auto = resolve_factory("auto", args.keys, args.dim)
    for factory in factories:
        if factory != "auto" and factory == auto and "auto" in factories:
            continue  # measured as auto's row
        too_large = what_does_not_fit(auto if factory == "auto" else factory, args.keys, args.dim, work)
        if too_large:
            print(f"| {factory} | not built: {too_large} | | | | | |", flush=True)
            continue
        row = run_child([sys.executable, __file__, "_index", *sizes, "--factory", factory], factory)
        batched = f"{row['qps_batched']:.1f}" if row.get("qps_batched") else "–"
        print(f"| {row['factory']} | {row['build_seconds']:.1f} | {row['index_mb']:.0f} | {row['qps']:.1f} | "
              f"{batched} | {row['recall']:.3f} | {row['peak_rss_mb']:.0f} |", flush=True)  # each row as it comes
    shutil.rmtree(work, ignore_errors=True)
    return 0


def what_does_not_fit(factory: str, n_keys: int, dim: int, work: Path) -> str:
    """Why this machine cannot hold ``factory``'s index of the keys (empty when it can): an index
    whose vectors stay uncompressed holds 4 bytes a dimension, in memory or (@disk) on disk, where
    the blocks and the merged file are both written before the blocks are deleted."""
    name, _, where = factory.partition("@")
    if "PQ" in name or "SQ" in name:
        return ""  # compressed codes: a few dozen bytes a key
    needed = n_keys * dim * 4 * (2 if where == "disk" else 1)
    if where == "disk":
        free, room = shutil.disk_usage(work).free, "free on disk"
    else:
        free, room = available_memory(), "of memory available"
    return "" if needed < free else f"needs {needed / 2**30:.1f} GiB, {free / 2**30:.1f} GiB {room}"


def available_memory() -> int:
    """MemAvailable from /proc/meminfo (bytes); the physical memory where there is no /proc."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def run_child(command: list[str], what: str) -> dict:
    """One measurement in its own process (its peak RSS is its own); its last line of JSON."""
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{what} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def sample_queries(keys: np.ndarray, count: int) -> np.ndarray:
    return np.asarray(keys[np.random.default_rng(1).choice(len(keys), count, replace=False)], dtype=np.float32)


def run_exact(args) -> int:
    """The true k nearest keys of the query sample, searched a slice of keys at a time (bounded memory
    at any store size), merged by distance."""
    import faiss

    keys = stored_keys(args)
    queries = sample_queries(keys, args.queries)
    best_distances = np.full((len(queries), 0), np.inf, dtype=np.float32)
    best_ids = np.empty((len(queries), 0), dtype=np.int64)
    for start in range(0, len(keys), 1 << 18):
        block = np.asarray(keys[start:start + (1 << 18)], dtype=np.float32)
        distances, ids = faiss.knn(queries, block, min(args.k, len(block)))
        best_distances = np.concatenate([best_distances, distances], axis=1)
        best_ids = np.concatenate([best_ids, ids + start], axis=1)
        order = np.argsort(best_distances, axis=1, kind="stable")[:, :args.k]
        best_distances = np.take_along_axis(best_distances, order, axis=1)
        best_ids = np.take_along_axis(best_ids, order, axis=1)
    np.save(args.exact, best_ids)
    print(json.dumps({"queries": len(queries)}))
    return 0


def synthetic_keys(n: int, dim: int, seed: int = 0, path: Path | None = None) -> np.ndarray:
    """fp16 keys around 4,096 centres (hidden states cluster by context), as a datastore stores them;
    written to the ``.npy`` file ``path`` and memory-mapped, when given (10M keys are 18 GB)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(4096, dim)).astype(np.float32) * 4
    shape = (n, dim)
    keys = (np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=shape) if path
            else np.empty(shape, dtype=np.float16))
    for start in range(0, n, 65_536):
        count = min(65_536, n - start)
        keys[start:start + count] = centres[rng.integers(0, 4096, count)] + rng.normal(size=(count, dim))
    if path:
        keys.flush()
    return keys


def stored_keys(args) -> np.ndarray:
    """The parent's synthetic keys, memory-mapped."""
    return np.load(args.keys_file, mmap_mode="r")


def run_one_index(args) -> int:
    from memdec_knn.index import FaissRetriever

    keys = stored_keys(args)
    queries = sample_queries(keys, args.queries)
    folder = Path(tempfile.mkdtemp(prefix="memdec-index-"))
    factory, _, where = args.factory.partition("@")
    retriever = FaissRetriever(factory=factory, on_disk=where == "disk")
    started = time.perf_counter()
    retriever.build(keys, folder)
    build_seconds = time.perf_counter() - started
    started = time.perf_counter()
    _, ids = retriever.search(queries, args.k)
    qps = args.queries / (time.perf_counter() - started)
    qps_batched = None
    if where == "disk":
        from memdec_knn import index as index_module

        index_module.BATCHED_SEARCH_MIN_QUERIES = 1  # the batched path for this sample too
        retriever = FaissRetriever(factory=factory, on_disk=True, batched_search=True)
        retriever.load(keys, folder)
        started = time.perf_counter()
        retriever.search_many(queries, args.k)
        qps_batched = args.queries / (time.perf_counter() - started)
    truth = np.load(args.exact)
    recall = float(np.mean([len(np.intersect1d(a, b)) / args.k for a, b in zip(ids, truth)]))
    index_mb = sum(path.stat().st_size for path in folder.iterdir()) / 2**20
    shutil.rmtree(folder, ignore_errors=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    named = args.factory if factory != "auto" else f"auto = {retriever.factory}"
    print(json.dumps({"factory": named, "build_seconds": build_seconds, "index_mb": index_mb, "qps": qps,
                      "qps_batched": qps_batched, "recall": recall, "peak_rss_mb": peak}))
    return 0


# ----------------------------------------------------------------------------------------------
# overhead


def qwen_0_5b_config(vocab_size: int = 151_936):
    """Qwen2.5-0.5B's architecture (the cost of a pass depends on it, not on the weights)."""
    from transformers import AutoConfig

    return AutoConfig.for_model("qwen2", vocab_size=vocab_size, hidden_size=896, intermediate_size=4864,
                                num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                max_position_embeddings=32768, tie_word_embeddings=True)


def run_overhead(args) -> int:
    """Per-token cost of kNN-LM's search and of a memory beside a Qwen2.5-0.5B-sized base.

    Each ratio is the base's call against the base's call plus the method's work, timed
    alternately pair after pair (``memdec_core.engine.latency``), so load on the machine hits both sides."""
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    from memdec_core.engine.latency import Timing, ratio_statistics, time_pairs
    from memdec_knn.api import sparse_distribution
    from memdec_knn.index import FaissRetriever

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(qwen_0_5b_config()).eval()
    memory_config = qwen_0_5b_config(args.memory_vocabulary + 1)
    memory_config.num_hidden_layers = args.memory_blocks
    memory = AutoModelForCausalLM.from_config(memory_config).eval()
    window = torch.randint(0, args.memory_vocabulary, (1, args.window))
    scored = args.window // 2  # tokens a window scores (stride = window / 2)
    timing = Timing(min_pairs=args.repeats, min_seconds=3.0, max_seconds=120.0)

    @torch.inference_mode()
    def forward(model):
        model(input_ids=window, logits_to_keep=scored)

    def step(model):  # one generated token after a prompt of a whole window, KV cache held
        with torch.inference_mode():
            cache = DynamicCache(config=model.config)
            model(input_ids=window, past_key_values=cache, logits_to_keep=1)

        @torch.inference_mode()
        def one():
            model(input_ids=window[:, -1:], past_key_values=cache, logits_to_keep=1)
            cache.crop(-1)  # back to the prompt: every repeat generates the same token
        return one

    def ratio(base_call, extra_call) -> str:
        def both():
            base_call()
            extra_call()
        median, spread = ratio_statistics(*time_pairs(base_call, both, timing))
        return f"{median:.3f} ±{spread:.0%}"

    base_step, memory_step = step(base), step(memory)
    memory_scoring = ratio(lambda: forward(base), lambda: forward(memory))
    memory_generation = ratio(base_step, memory_step)
    print(f"{args.memory_blocks}-block memory over {args.memory_vocabulary:,} tokens beside a base of "
          "Qwen2.5-0.5B's architecture; "
          f"k = {args.k}; each cell: median ratio over the base alone ± half its interquartile range", flush=True)
    print("| keys | index | kNN-LM scoring ×base | memory scoring ×base | kNN-LM generation ×base | "
          "memory generation ×base |")
    print("|---|---|---|---|---|---|", flush=True)
    for n_keys in (int(size) for size in args.keys.split(",")):
        folder = Path(tempfile.mkdtemp(prefix="memdec-overhead-"))
        keys = synthetic_keys(n_keys, 896, path=folder / "keys.npy")
        retriever = FaissRetriever()  # auto: Flat up to 100k keys, then IVF (with PQ codes above 2M)
        retriever.build(keys, folder)
        queries = np.asarray(keys[:scored], dtype=np.float32)
        values = torch.from_numpy(np.random.default_rng(0).integers(0, 151_936, n_keys))

        def knn(batch, retriever=retriever, values=values):
            distances, ids = retriever.search(batch, args.k)
            sparse_distribution(torch.from_numpy(distances), torch.from_numpy(ids),
                                values[np.clip(ids, 0, None)], 16.0)

        knn_scoring = ratio(lambda: forward(base), lambda queries=queries: knn(queries))
        knn_generation = ratio(base_step, lambda queries=queries: knn(queries[:1]))
        print(f"| {n_keys:,} | {retriever.factory} | {knn_scoring} | {memory_scoring} | {knn_generation} | "
              f"{memory_generation} |", flush=True)
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
