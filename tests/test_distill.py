"""Distilling the teacher's own distribution beside the kNN targets (``memdec.distill``)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import QUICK_MEMORY as QUICK
from conftest import SMALL_WINDOWS
from test_decoder_loss import densify, random_sparse_targets

from memdec_core.api import prepare_context
from memdec_core.errors import ConfigError
from memdec_core.inputs.data import make_windows
from memdec_core.interfaces import EvalSettings
from memdec_core.store.artifacts import resolve_reference
from memdec_decoder import api
from memdec_decoder.loss import memory_decoder_loss
from memdec_decoder.memory import open_memory
from memdec_decoder.settings import TrainSettings
from memdec_decoder.teacher_targets import TeacherTargets, build_teacher_targets
from memdec_decoder.train import sparse_rows
from memdec_decoder.vocab import Vocabulary

WINDOW = EvalSettings(**SMALL_WINDOWS)


def test_distill_splits_the_kl_between_knn_and_teacher_against_dense_references():
    vocab = 40
    logits = torch.randn(6, vocab, dtype=torch.float64, requires_grad=True)
    gold = torch.randint(0, vocab, (6,))
    knn, teacher = random_sparse_targets(6, vocab, 5, seed=2), random_sparse_targets(6, vocab, 8, seed=3)
    logprobs = torch.log_softmax(logits, dim=-1)

    def dense_kl(ids, probs):
        return F.kl_div(logprobs, densify(ids, probs, vocab), reduction="none").sum(1)

    cross_entropy = F.cross_entropy(logits, gold, reduction="none")
    for beta, distill in ((0.5, 0.0), (0.5, 0.3), (1.0, 1.0), (0.2, 0.7)):
        expected = (beta * ((1 - distill) * dense_kl(*knn) + distill * dense_kl(*teacher))
                    + (1 - beta) * cross_entropy).mean()
        got = memory_decoder_loss(logits, gold, *knn, beta, teacher=teacher, distill=distill).detach()
        assert float(got) == pytest.approx(float(expected.detach()), rel=1e-6)  # the loss is computed in fp32
    with pytest.raises(ConfigError, match=r"distill must be in \[0, 1\]"):
        memory_decoder_loss(logits, gold, *knn, teacher=teacher, distill=1.5)
    with pytest.raises(ConfigError, match="needs the teacher's distributions"):
        memory_decoder_loss(logits, gold, *knn, distill=0.5)
    with pytest.raises(ConfigError, match="distill"):
        TrainSettings(distill=-0.1)


def test_teacher_rows_are_the_top_tokens_of_each_scoring_window(tiny_llama, corpus_dir, tmp_path):
    """Against a plain forward pass of every window; shards of 50 positions cut through windows."""
    ctx = prepare_context(str(corpus_dir), str(tiny_llama), WINDOW)
    stream = ctx.corpus.streams["train"]
    targets = build_teacher_targets(ctx.base, stream, tmp_path / "teacher", context=ctx.context, stride=ctx.stride,
                                    batch_size=3, data_hash=ctx.corpus.data_hash("train"), top=5, shard_size=50)
    assert len(targets) == len(stream) - 1 and targets.manifest["shards"] == -(-(len(stream) - 1) // 50)
    checked = 0
    for window in make_windows(len(stream), ctx.context, ctx.stride):
        tokens = torch.from_numpy(stream[window.start:window.end].astype(np.int64))[None]
        with torch.no_grad():
            probs = torch.softmax(ctx.base.model(input_ids=tokens).logits[0].double(), dim=-1)
        for position in range(window.score_from, window.end - 1):
            ids, row_probs = targets.row(position)
            expected = probs[position - window.start]
            top = expected.topk(5)
            assert sorted(ids.tolist()) == sorted(top.indices.tolist()), position
            np.testing.assert_allclose(row_probs.astype(np.float64), (top.values / top.values.sum()).numpy(),
                                       rtol=2e-3, atol=1e-4)  # stored in fp16
            checked += 1
    assert checked == len(stream) - 1  # every position, each from the window that scores it


def test_teacher_tokens_a_restricted_memory_cannot_name_are_dropped_and_the_row_renormalised(tmp_path):
    vocabulary = Vocabulary(np.array([2, 5, 7]), full_size=10)

    class Rows:
        def padded(self, positions):
            ids = torch.tensor([[5, 3, 7, -1], [2, 7, -1, -1]])
            probs = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.6, 0.4, 0.0, 0.0]])
            return ids, probs

    ids, probs = sparse_rows(Rows(), np.array([0, 1]), vocabulary, "cpu")
    assert ids.tolist() == [[1, -1, 2, -1], [0, 2, -1, -1]]  # 3 is not in the vocabulary
    torch.testing.assert_close(probs, torch.tensor([[0.5 / 0.7, 0.0, 0.2 / 0.7, 0.0], [0.6, 0.4, 0.0, 0.0]]))


def test_a_distilled_restricted_memory_trains_records_its_teacher_rows_and_differs(corpus_dir, tiny_llama, tmp_path):
    common = dict(teacher=str(tiny_llama), init=str(tiny_llama), settings=WINDOW, vocabulary="restricted",
                  init_layers=1, **dict(QUICK, epochs=1))
    plain = open_memory(api.train(str(corpus_dir), output=tmp_path / "plain", **common))
    distilled = open_memory(api.train(str(corpus_dir), output=tmp_path / "distilled", distill=0.5, **common))
    assert distilled.manifest["train"]["distill"] == 0.5 and "teacher_targets" in distilled.manifest
    assert "teacher_targets" not in plain.manifest
    teacher_rows = TeacherTargets(resolve_reference(distilled.manifest["teacher_targets"]))
    train_stream = prepare_context(str(corpus_dir), str(tiny_llama), WINDOW).corpus.streams["train"]
    assert teacher_rows.manifest["top"] == 64 and len(teacher_rows) == len(train_stream) - 1
    changed = [name for (name, a), (_, b) in zip(plain.model.named_parameters(), distilled.model.named_parameters())
               if not torch.equal(a, b)]
    assert changed  # the second signal changed the weights
    assert np.isfinite(distilled.manifest["best_valid_ppl"])


def test_cli_refuses_a_share_outside_zero_to_one(corpus_dir):
    from conftest import invoke

    result = invoke("train", "--domain", corpus_dir, "--distill", "1.5")
    assert result.exit_code == 2 and "--distill" in result.output and "0<=x<=1" in result.output


def test_a_killed_teacher_build_resumes_from_its_last_shard_to_the_same_bytes(tiny_llama, corpus_dir, tmp_path,
                                                                             monkeypatch):
    from memdec_decoder import teacher_targets as module

    ctx = prepare_context(str(corpus_dir), str(tiny_llama), WINDOW)
    stream = ctx.corpus.streams["train"]

    def build(folder):
        return build_teacher_targets(ctx.base, stream, folder, context=ctx.context, stride=ctx.stride, batch_size=4,
                                     data_hash=ctx.corpus.data_hash("train"), top=5, shard_size=2000)

    reference = build(tmp_path / "reference")
    real_write, written = module._write_shard, []

    def killed_after_two(*args, **kwargs):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(args[3].name)
        return real_write(*args, **kwargs)

    monkeypatch.setattr(module, "_write_shard", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path / "resumed")
    assert not (tmp_path / "resumed").exists() and len(list((tmp_path / ".resumed.partial").glob("shard-*"))) == 2
    written.clear()
    monkeypatch.setattr(module, "_write_shard", lambda *args, **kwargs: written.append(args[3].name)
                        or real_write(*args, **kwargs))
    resumed = build(tmp_path / "resumed")
    assert written == [f"shard-{shard:05d}" for shard in range(2, reference.manifest["shards"])]  # only the rest
    for shard in range(reference.manifest["shards"]):
        for name in ("offsets", "token_ids", "probs"):
            assert (np.load(resumed.folder / f"shard-{shard:05d}" / f"{name}.npy").tobytes()
                    == np.load(reference.folder / f"shard-{shard:05d}" / f"{name}.npy").tobytes())
