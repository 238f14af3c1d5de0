"""The teacher's own next-token distribution at every train position: a second training signal.

The paper trains a memory on the kNN targets alone. With ``memdec.distill`` = d > 0 the KL term
is split: β·[(1−d)·KL(p_kNN ‖ p_mem) + d·KL(p_teacher ‖ p_mem)] + (1−β)·CE, where p_teacher is
the teacher's language model itself (not its datastore). A small memory trained on a small corpus
overfits the kNN targets of its few positions; the teacher's distribution is smoother and may
keep it from doing so (recipe study, benchmarks/memory_recipes.py).

Stored like the kNN targets (``targets.TargetSet``: sparse rows in shards of consecutive
positions, written atomically, resumed by shard, every N-th shard per rank), keeping the teacher's
``top`` most probable tokens of each position, renormalised. Row p is the teacher's distribution
of token p + 1, scored in the same windows as its datastore's keys.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from memdec_core.engine.scoring import iter_scored_batches
from memdec_core.errors import ConfigError
from memdec_core.inputs.data import Window, make_windows
from memdec_core.inputs.model_cards import write_readme
from memdec_core.inputs.models import LoadedModel
from memdec_core.runtime.distributed import barrier, sharding
from memdec_core.store.artifacts import start_or_resume, write_manifest
from memdec_decoder.targets import TargetSet, shard_name, write_sparse_shard

ARTIFACT_TYPE = "teacher-targets"
MANIFEST_SCHEMA = {"size": int, "shard_size": int, "shards": int, "top": int, "data_hash": str,
                   "tokenizer_fingerprint": str, "model_fingerprint": str}
#: Tokens kept per position: the teacher's top 64 hold nearly all of its mass on domain text.
DEFAULT_TOP = 64
SHARD_SIZE = 16_384


class TeacherTargets(TargetSet):
    """Opened teacher distributions: ``row(p)`` and ``padded(positions)`` as for kNN targets."""

    artifact_type, manifest_schema = ARTIFACT_TYPE, MANIFEST_SCHEMA


def build_teacher_targets(teacher: LoadedModel, stream: np.ndarray, folder: Path, *, context: int, stride: int,
                          batch_size: int, data_hash: str, top: int = DEFAULT_TOP, shard_size: int = SHARD_SIZE,
                          domain: str | None = None) -> TeacherTargets:
    """Run ``teacher`` over the train ``stream`` and write its top-``top`` distribution of every
    position to ``folder``, resuming an interrupted build shard by shard."""
    folder = Path(folder)
    if folder.exists():
        raise ConfigError(f"teacher targets folder already exists: {folder}")
    if top < 1 or shard_size < 1:
        raise ConfigError(f"top and shard_size must be at least 1, got {top} and {shard_size}")
    windows = make_windows(len(stream), context, stride)
    size, n_shards = len(stream) - 1, -(-(len(stream) - 1) // shard_size)
    work = folder.parent / f".{folder.name}.partial"
    ranks = sharding()
    if ranks.main:
        start_or_resume(work, {"model": teacher.fingerprint, "data_hash": data_hash, "size": size, "context": context,
                               "stride": stride, "top": top, "shard_size": shard_size}, "teacher targets build")
    barrier()
    for shard in range(n_shards):
        start, end = shard * shard_size, min((shard + 1) * shard_size, size)
        if ranks.owns(shard) and not (work / shard_name(shard)).exists():
            _write_shard(teacher, stream, windows, work / shard_name(shard), start, end, top, batch_size,
                         f"teacher distributions {shard + 1}/{n_shards}")
    barrier()
    if ranks.main:
        write_manifest(work, ARTIFACT_TYPE, base_model=teacher.model_id, model_fingerprint=teacher.fingerprint,
                       tokenizer_fingerprint=teacher.tokenizer_fingerprint, data_hash=data_hash, domain=domain,
                       size=size, shard_size=shard_size, shards=n_shards, top=top, context=context, stride=stride)
        write_readme(work, f"Next-token distributions of {teacher.model_id}", [
            f"- For each of the {size:,} train positions, the teacher's {top} most probable next tokens and "
            f"their probabilities, renormalised (windows of {context} tokens, stride {stride}).",
            f"- Sparse rows in {n_shards} shard(s) of {shard_size:,} positions, as kNN targets are.",
            "- A memory's second training signal (`memdec.distill`); made and reused by `memdec train`."],
            tags=("memory-decoder", "distillation"), domain=domain)
        work.replace(folder)
    barrier()
    return TeacherTargets(folder)


def windows_scoring(windows: list[Window], start: int, end: int) -> list[Window]:
    """The windows that score at least one position of ``[start, end)``."""
    return [window for window in windows if window.score_from < end and window.end - 1 > start]


def top_distribution(logits: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, top]`` token ids and probabilities: the ``top`` most probable, renormalised to sum to 1."""
    probs, ids = torch.softmax(logits.float(), dim=-1).topk(min(top, logits.shape[-1]), dim=-1)
    return ids, probs / probs.sum(dim=-1, keepdim=True)


def _write_shard(teacher: LoadedModel, stream: np.ndarray, windows: list[Window], target: Path, start: int,
                 end: int, top: int, batch_size: int, description: str) -> None:
    width = min(top, teacher.vocab_size)
    token_ids = np.zeros((end - start, width), dtype=np.int32)
    probs = np.zeros((end - start, width), dtype=np.float32)
    filled = np.zeros(end - start, dtype=bool)
    for batch in iter_scored_batches(teacher.model, stream, windows_scoring(windows, start, end),
                                     batch_size=batch_size, description=description):
        inside = (batch.positions >= start) & (batch.positions < end)
        rows = batch.positions[inside].numpy() - start
        ids, row_probs = top_distribution(batch.logits[inside], width)
        token_ids[rows], probs[rows], filled[rows] = ids.numpy(), row_probs.numpy(), True
    if not filled.all():
        raise RuntimeError(f"teacher targets: positions {start}..{end} not all scored")  # a windowing bug
    probs = probs.astype(np.float16)
    keep = probs > 0  # entries that round to 0 in fp16 add nothing to the KL
    write_sparse_shard(target, keep.sum(axis=1), token_ids[keep], probs[keep])
