"""Faults: a full or read-only disk, a killed process, two runs sharing a cache, corrupt artifacts,
NaN from a combiner or a memory. Each gives one clear line (or the right result) and leaves
nothing half-written; a killed job reruns to the same bits."""

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from conftest import SMALL_WINDOWS, assert_only_the_rest, checkpoint_step

from memdec_core import api
from memdec_core.components.plugins import register_plugin, unregister_plugin
from memdec_core.errors import ArtifactError, DiskError, ResultError
from memdec_core.hookspecs import hookimpl
from memdec_core.interfaces import EvalSettings, MemoryModel

WINDOW = EvalSettings(**SMALL_WINDOWS)
ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False


def memdec(*args, cache: Path, timeout=300, **env):
    return subprocess.run([sys.executable, "-m", "memdec_cli.main", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "MEMDEC_CACHE": str(cache), **env})


def cli(*args, cache: Path):
    """The CLI in this process (no interpreter start-up), with its own cache."""
    from click.testing import CliRunner

    from memdec_cli.main import build_cli

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MEMDEC_CACHE", str(cache))
        result = CliRunner().invoke(build_cli(), [str(arg) for arg in args])
    result.returncode = result.exit_code
    return result


def one_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    """Temporary folders or files a failed write left (locks are not artifacts)."""
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*")
                  if ".tmp-" in path.name and "locks" not in path.parts)


@contextlib.contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False, fill_from: Path | None = None):
    """A real small (or read-only) file system, when running as root."""
    if not ROOT or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        if fill_from is not None:
            shutil.copytree(fill_from, path, dirs_exist_ok=True)
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        yield path
    finally:
        # A failing test's traceback may still hold a file open on it: then detach it lazily.
        if subprocess.run(["umount", str(path)], check=False, capture_output=True).returncode:
            subprocess.run(["umount", "--lazy", str(path)], check=False)


# ----------------------------------------------------------------------------------------------
# A full disk, a read-only cache


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, corpus_dir, tiny_gpt2):
    with tmpfs(tmp_path / "full", "96k") as cache:
        result = cli("datastore", "build", "--domain", corpus_dir, "--base", tiny_gpt2, "--context", 64, cache=cache)
        line = one_line(result)
        assert "no space left on the device" in line and "needs about" in line and "free" in line
        assert not leftovers(cache) and not list(cache.glob("datastores/*"))


def test_a_disk_that_fills_mid_write_is_one_line(tmp_path, monkeypatch, corpus_dir, tiny_gpt2):
    from memdec_knn import datastore as datastore_module

    def full(self, first_row, rows):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setenv("MEMDEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(datastore_module.RowFile, "write", full)
    with pytest.raises(DiskError, match="no space left on the device"):
        api.evaluate(str(corpus_dir), [str(tiny_gpt2)], ["knn-lm"], settings=WINDOW,
                     method_settings={"knn-lm": {"k": 8}})
    assert not leftovers(tmp_path / "cache")
    assert not [path for path in (tmp_path / "cache" / "datastores").iterdir() if not path.name.endswith(".partial")]


def test_faiss_index_writes_on_a_full_disk_are_one_line(tmp_path):
    from memdec_knn.index import FaissRetriever

    keys = np.random.default_rng(0).normal(size=(20_000, 64)).astype(np.float32)
    with tmpfs(tmp_path / "full", "1m") as folder:
        with pytest.raises(DiskError, match="no space left"):
            FaissRetriever(factory="Flat").build(keys, folder)


def test_a_read_only_cache_refuses_to_build_and_still_reads(tmp_path, corpus_dir, tiny_gpt2):
    warm = tmp_path / "warm"
    args = ["eval", "--domain", corpus_dir, "--base", tiny_gpt2, "--method", "knn-lm", "--context", 64,
            "--set", "knn-lm.k=8", "--format", "json"]
    built = cli(*args, cache=warm)
    assert built.returncode == 0, built.stderr
    with tmpfs(tmp_path / "cold", "10m", read_only=True) as cold:
        line = one_line(cli(*args, cache=cold))
        assert "read-only" in line and "MEMDEC_CACHE" in line
    with tmpfs(tmp_path / "ro", "200m", read_only=True, fill_from=warm) as copy:
        again = cli(*args, cache=copy)
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout)["results"][0]["test_ppl"] == json.loads(built.stdout)["results"][0]["test_ppl"]


@pytest.fixture
def second_row_write_fails(monkeypatch):
    """The disk refuses the second compare row: the first two rows are measured by then."""
    from memdec_core.runs import compare as compare_module

    real, calls = compare_module.write_json, []

    def fails_on_second(path, data):
        calls.append(path)
        if len(calls) == 2:
            raise DiskError("cannot write the row: no space left on the device")
        real(path, data)

    monkeypatch.setattr(compare_module, "write_json", fails_on_second)


def test_a_compare_that_fails_keeps_what_it_measured(tmp_path, corpus_dir, tiny_gpt2, monkeypatch,
                                                     second_row_write_fails):
    from memdec_core.runs import compare as compare_module

    monkeypatch.setenv("MEMDEC_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DiskError) as raised:
        compare_module.compare(str(corpus_dir), [str(tiny_gpt2)], ["base", "knn-lm"], settings=WINDOW,
                               method_settings={"knn-lm": {"k": 8}},
                               measure=compare_module.CompareSettings(general="", latency_tokens=50))
    partial = raised.value.partial_report
    assert [row["method"] for row in partial["results"]] == ["base", "knn-lm"]


# ----------------------------------------------------------------------------------------------
# Killed processes: the rerun gives the same bits


KILL_DATASTORE = """
import json, os, signal, sys
from memdec_knn import datastore
datastore.COMMIT_EVERY = 1
real = datastore.RowFile.write
count, rows_written = [0], []
def write(self, first_row, rows):
    real(self, first_row, rows)
    if self.path.name == "vals.npy":
        count[0] += 1
        rows_written.extend(range(first_row, first_row + len(rows)))
        if count[0] == int(sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)
datastore.RowFile.write = write
from memdec_knn.api import build_datastore
from memdec_core.interfaces import EvalSettings
build_datastore(sys.argv[1], sys.argv[2], settings=EvalSettings(context=64, stride=32, batch_size=2))
print(json.dumps(rows_written))
"""


def test_a_killed_datastore_build_resumes_to_the_same_bytes(tmp_path, corpus_dir, tiny_gpt2):
    """Killed after 5 batches, the rerun computes only the rows of the windows after the last
    progress record (4 batches of 2 windows), to the bytes of an uninterrupted build."""
    from memdec_core.api import prepare_context
    from memdec_core.inputs.data import make_windows
    from memdec_knn.api import build_datastore

    env = {**os.environ, "MEMDEC_CACHE": str(tmp_path / "cache")}
    killed = subprocess.run([sys.executable, "-c", KILL_DATASTORE, str(corpus_dir), str(tiny_gpt2), "5"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    work = next((tmp_path / "cache" / "datastores").glob(".*.partial"))
    recorded = json.loads((work / "progress.json").read_text())["windows"]
    assert recorded == 4 * 2  # the record after the 4th batch; the 5th batch's rows were written, not recorded
    resumed = subprocess.run([sys.executable, "-c", KILL_DATASTORE, str(corpus_dir), str(tiny_gpt2), "0"], env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert not work.exists()
    train = prepare_context(str(corpus_dir), str(tiny_gpt2), EvalSettings(context=64)).corpus.streams["train"]
    first_row = make_windows(len(train), 64, 32)[recorded].score_from
    assert json.loads(resumed.stdout) == list(range(first_row, len(train) - 1))  # the rest, each row once
    folder = work.parent / work.name[1:-len(".partial")]
    fresh = Path(build_datastore(str(corpus_dir), str(tiny_gpt2), output=tmp_path / "fresh",
                                 settings=EvalSettings(context=64, stride=32, batch_size=2)))
    for name in ("keys.npy", "vals.npy"):
        assert (folder / name).read_bytes() == (fresh / name).read_bytes(), name


KILL_TRAINING = """
import json, os, signal, sys
from memdec_core.engine import training
real = training.Trainer._step
taken = []
def step(self, starts):
    if len(taken) + 1 == int(sys.argv[4]):
        os.kill(os.getpid(), signal.SIGKILL)
    taken.append((self.state["global_step"], self.total_steps))
    return real(self, starts)
training.Trainer._step = step
from memdec_decoder import api
from memdec_core.interfaces import EvalSettings
api.train(sys.argv[1], teacher=sys.argv[2], init=sys.argv[2], output=sys.argv[3], epochs=2, batch_size=2, k=8,
          temperature=1.0, lr=3e-3, save_every=1, settings=EvalSettings(context=64, stride=32))
print(json.dumps(taken))
"""


def test_a_killed_training_resumes_to_the_same_weights_dropout_included(tmp_path, corpus_dir, tiny_gpt2):
    """The tiny GPT-2 has dropout 0.1: bit-identical weights need the RNG state in the checkpoint.
    Killed in its 5th step, the rerun starts from the checkpoint of 4 and takes only the rest."""
    from safetensors.numpy import load_file

    from memdec_decoder import api as decoder

    env = {**os.environ, "MEMDEC_CACHE": str(tmp_path / "cache")}

    def train(output, kill_at):
        return subprocess.run([sys.executable, "-c", KILL_TRAINING, str(corpus_dir), str(tiny_gpt2), str(output),
                               str(kill_at)], env=env, capture_output=True, text=True, timeout=600)

    killed = train(tmp_path / "resumed", 5)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert checkpoint_step(tmp_path / ".resumed.partial") == 4
    resumed = train(tmp_path / "resumed", 0)
    assert resumed.returncode == 0, resumed.stderr
    assert_only_the_rest(json.loads(resumed.stdout), 4)
    # The same run uninterrupted, in another process and another cache: the same bits.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MEMDEC_CACHE", str(tmp_path / "other-cache"))
        decoder.train(str(corpus_dir), teacher=str(tiny_gpt2), init=str(tiny_gpt2), output=tmp_path / "reference",
                      epochs=2, batch_size=2, k=8, temperature=1.0, lr=3e-3, save_every=1,
                      settings=EvalSettings(context=64, stride=32))
    expected = load_file(tmp_path / "reference" / "model.safetensors")
    weights = load_file(tmp_path / "resumed" / "model.safetensors")
    assert expected.keys() == weights.keys()
    assert all(np.array_equal(expected[name], weights[name]) for name in expected)


KILL_TARGETS = """
import json, os, signal, sys
from memdec_decoder import settings, targets
settings.DecoderSettings.target_settings = lambda self, tuned=None: targets.TargetSettings(
    k=self.k, temperature=tuned or self.temperature, shard_size=700, search_batch=64)
real, written = targets._write_shard, []
def write_shard(*args):
    if len(written) + 1 == int(sys.argv[4]):
        os.kill(os.getpid(), signal.SIGKILL)
    written.append(args[1].name)
    return real(*args)
targets._write_shard = write_shard
from memdec_decoder import api
from memdec_core.interfaces import EvalSettings
api.build_targets(sys.argv[1], sys.argv[2], k=8, temperature=1.0, output=sys.argv[3],
                  settings=EvalSettings(context=64, stride=32))
print(json.dumps(written))
"""


def test_a_killed_targets_build_resumes_to_the_same_bytes(tmp_path, corpus_dir, tiny_llama):
    """Killed while writing its 3rd shard, the rerun writes only the shards after the two on disk,
    to the bytes of an uninterrupted build."""
    env = {**os.environ, "MEMDEC_CACHE": str(tmp_path / "cache")}

    def build(output, kill_at):
        return subprocess.run([sys.executable, "-c", KILL_TARGETS, str(corpus_dir), str(tiny_llama), str(output),
                               str(kill_at)], env=env, capture_output=True, text=True, timeout=300)

    killed = build(tmp_path / "resumed", 3)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    done = sorted(path.name for path in (tmp_path / ".resumed.partial").glob("shard-*"))
    assert done == ["shard-00000", "shard-00001"]
    resumed, fresh = build(tmp_path / "resumed", 0), build(tmp_path / "fresh", 0)
    assert resumed.returncode == fresh.returncode == 0, resumed.stderr + fresh.stderr
    assert json.loads(resumed.stdout) == json.loads(fresh.stdout)[2:]  # only the shards after the two on disk
    shards = sorted(path.relative_to(tmp_path / "fresh") for path in (tmp_path / "fresh").rglob("*.npy"))
    assert len(shards) > 6
    for shard in shards:
        assert (tmp_path / "resumed" / shard).read_bytes() == (tmp_path / "fresh" / shard).read_bytes(), shard


KILL_COMPARE = """
import os, signal, sys, json
from memdec_core.runs import compare
real, count = compare.write_json, [0]
def write_json(path, data):
    real(path, data)
    count[0] += 1
    if count[0] == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)
compare.write_json = write_json
from memdec_core.interfaces import EvalSettings
report = compare.compare(sys.argv[1], [sys.argv[2]], ["base", "knn-lm", "rag"], settings=EvalSettings(context=64),
                         method_settings={"knn-lm": {"k": 8}, "rag": {"passage_tokens": 16, "retrieval_stride": 16}},
                         measure=compare.CompareSettings(general="", latency_tokens=50, latency_seconds=0))
print(json.dumps([row["test_ppl"] for row in report["results"]]))
"""


def test_a_killed_compare_resumes_to_the_same_table(tmp_path, corpus_dir, tiny_gpt2):
    def run(cache, kill_at):
        return subprocess.run([sys.executable, "-c", KILL_COMPARE, str(corpus_dir), str(tiny_gpt2), str(kill_at)],
                              env={**os.environ, "MEMDEC_CACHE": str(tmp_path / cache), "MEMDEC_NO_PROGRESS": "0"},
                              capture_output=True,
                              text=True, timeout=300)

    assert run("cache", 2).returncode == -signal.SIGKILL  # killed after two rows were saved
    resumed, fresh = run("cache", 0), run("other-cache", 0)
    assert resumed.returncode == fresh.returncode == 0, resumed.stderr + fresh.stderr
    assert resumed.stderr.count("reusing the row") == 2
    assert json.loads(resumed.stdout) == json.loads(fresh.stdout)


def test_resuming_with_another_teacher_is_refused(tmp_path, corpus_dir, tiny_gpt2, tiny_llama, monkeypatch):
    from memdec_core.engine import training
    from memdec_decoder import api as decoder

    monkeypatch.setenv("MEMDEC_CACHE", str(tmp_path / "cache"))
    real, count = training.Trainer._step, []

    def interrupted(self, starts):
        if len(count) == 2:
            raise KeyboardInterrupt
        count.append(1)
        return real(self, starts)

    common = dict(init=str(tiny_llama), output=tmp_path / "memory", epochs=2, batch_size=2, k=8, temperature=1.0,
                  save_every=1, settings=WINDOW)
    monkeypatch.setattr(training.Trainer, "_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        decoder.train(str(corpus_dir), teacher=str(tiny_llama), **common)
    monkeypatch.setattr(training.Trainer, "_step", real)
    other_teacher = tmp_path / "other-teacher"
    shutil.copytree(tiny_llama, other_teacher)
    from safetensors.torch import load_file, save_file

    weights = load_file(other_teacher / "model.safetensors")
    weights = {name: tensor * 1.01 for name, tensor in weights.items()}
    save_file(weights, other_teacher / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ArtifactError, match="other settings .*teacher"):
        decoder.train(str(corpus_dir), teacher=str(other_teacher), **common)


# ----------------------------------------------------------------------------------------------
# Two runs sharing one cache


#: ``memdec ARGS`` recording what this process built and which locks it waited for, in
#: ``MEETING/PID.json``. The process that builds the datastore holds its lock until the other
#: has been seen waiting for it (or five minutes pass), so the two runs always meet there.
RACE = """
import json, os, sys, time
from pathlib import Path
from memdec_core.engine import training
from memdec_core.runtime import progress
from memdec_core.store import cache_dir
from memdec_decoder import targets
from memdec_knn import datastore

meeting = Path(sys.argv[1])
cache_dir.QUIET_WAIT_SECONDS = 0  # every wait for a held lock is logged (read when a lock is taken)
record = {"built": [], "waited": []}
real_log = progress.log
def log(message):
    if message.startswith("waiting for another memdec process to finish"):
        record["waited"].append(message)
        if "datastores" in message:
            (meeting / f"waiting-{os.getpid()}").touch()
    real_log(message)
progress.log = log
def counted(module, name, what, before=lambda: None):
    real = getattr(module, name)
    def call(*args, **kwargs):
        if what not in record["built"]:
            record["built"].append(what)
        before()
        return real(*args, **kwargs)
    setattr(module, name, call)
def meet():
    started = time.monotonic()
    while not list(meeting.glob("waiting-*")) and time.monotonic() < started + 300:
        time.sleep(0.05)
counted(datastore, "_write_keys_and_values", "datastore", meet)
counted(targets, "_write_shard", "targets")
counted(training.Trainer, "run", "memory")
from memdec_cli.main import main
try:
    main(sys.argv[2:])
finally:
    (meeting / f"{os.getpid()}.json").write_text(json.dumps(record))
"""


def test_two_runs_started_together_wait_for_each_other_and_build_once(tmp_path, corpus_dir, tiny_llama):
    """Two evals sharing a cache: the datastore, the kNN targets and the memory are each built by
    one run only, the run that did not build the datastore waited for its lock and reused it, and
    both print the same numbers. (Without the locks both would build everything.)"""
    args = ["eval", "--domain", corpus_dir, "--base", tiny_llama, "--method", "base,knn-lm,memdec", "--context", 64,
            "--set", "knn-lm.k=8", "--set", "memdec.k=8", "--set", "memdec.epochs=1", "--set", "memdec.temperature=1",
            "--format", "json"]
    env = {**os.environ, "MEMDEC_CACHE": str(tmp_path / "cache")}
    meeting = tmp_path / "meeting"
    meeting.mkdir()
    runs = [subprocess.Popen([sys.executable, "-c", RACE, str(meeting), *map(str, args)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=600) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-2000:] for _, err in outputs]
    first, second = (json.loads(out)["results"] for out, _ in outputs)
    assert [row["test_ppl"] for row in first] == [row["test_ppl"] for row in second]
    records = [json.loads((meeting / f"{run.pid}.json").read_text()) for run in runs]
    # each artifact built by one run only (which run builds the targets and the memory is a race)
    assert sorted(records[0]["built"] + records[1]["built"]) == ["datastore", "memory", "targets"], records
    waiter, = (record for record in records if "datastore" not in record["built"])
    assert any("datastores" in message for message in waiter["waited"]), records
    cache = tmp_path / "cache"
    assert not leftovers(cache) and not list(cache.rglob("*.partial"))


def test_two_trainings_onto_one_output_both_end_with_the_memory_trained_once(tmp_path, corpus_dir, tiny_llama):
    """Both runs print the memory's folder; the datastore, the targets and the memory were each
    built by one of them, and the other waited for the datastore's lock."""
    args = ["train", "--domain", corpus_dir, "--teacher", tiny_llama, "--init", tiny_llama, "--epochs", 1, "--k", 8,
            "--knn-temperature", 1, "--train-batch", 2, "--output", tmp_path / "memory", "--context", 64]
    env = {**os.environ, "MEMDEC_CACHE": str(tmp_path / "cache")}
    meeting = tmp_path / "meeting"
    meeting.mkdir()
    runs = [subprocess.Popen([sys.executable, "-c", RACE, str(meeting), *map(str, args)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=600) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-2000:] for _, err in outputs]
    assert [out.strip() for out, _ in outputs] == [str(tmp_path / "memory")] * 2
    records = [json.loads((meeting / f"{run.pid}.json").read_text()) for run in runs]
    assert sorted(records[0]["built"] + records[1]["built"]) == ["datastore", "memory", "targets"], records
    waiter, = (record for record in records if "datastore" not in record["built"])
    assert any("datastores" in message for message in waiter["waited"]), records


# ----------------------------------------------------------------------------------------------
# Corrupt artifacts


@pytest.fixture
def store_copy(tmp_path, corpus_dir, tiny_gpt2):
    from memdec_knn.api import build_datastore

    return Path(build_datastore(str(corpus_dir), str(tiny_gpt2), output=tmp_path / "store", settings=WINDOW))


def knn_with(store, corpus_dir, model):
    return api.evaluate(str(corpus_dir), [str(model)], ["knn-lm"], settings=WINDOW,
                        method_settings={"knn-lm": {"k": 8, "datastore": str(store)}})


def test_out_of_range_values_are_refused(store_copy, corpus_dir, tiny_gpt2):
    vals = np.load(store_copy / "vals.npy")
    vals[3] = 10_000
    np.save(store_copy / "vals.npy", vals)
    with pytest.raises(ArtifactError, match="token ids outside"):
        knn_with(store_copy, corpus_dir, tiny_gpt2)


@pytest.mark.parametrize("manifest, message", [
    ([1, 2], "not a JSON object"), ({"type": "datastore"}, "lacks a valid 'size'"),
    ({"type": "datastore", "format_version": 99}, "newer than this memdec reads"),
])
def test_bad_manifests_are_one_clear_error(store_copy, corpus_dir, tiny_gpt2, manifest, message):
    (store_copy / "memdec.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=message):
        knn_with(store_copy, corpus_dir, tiny_gpt2)


def test_a_manifest_from_a_newer_memdec_is_read_with_a_warning(store_copy, corpus_dir, tiny_gpt2, monkeypatch):
    from memdec_core.store import artifacts

    said = []
    monkeypatch.setattr("memdec_core.runtime.progress.log", said.append)
    manifest = json.loads((store_copy / "memdec.json").read_text())
    manifest.update(memdec_version="9.0.0", a_field_from_the_future=[1, 2])
    (store_copy / "memdec.json").write_text(json.dumps(manifest))
    assert artifacts.read_manifest(store_copy, "datastore")["size"] == manifest["size"]
    assert any("written by memdec 9.0.0" in line and "ignored" in line for line in said)


def test_corrupt_targets_are_refused(tmp_path, corpus_dir, tiny_llama):
    from memdec_decoder import api as decoder
    from memdec_decoder.targets import TargetSet

    folder = Path(decoder.build_targets(str(corpus_dir), str(tiny_llama), settings=WINDOW, k=8,
                                        output=tmp_path / "targets"))
    shard = folder / "shard-00000"
    ids = np.load(shard / "token_ids.npy")
    ids[0] = 99_999
    np.save(shard / "token_ids.npy", ids)
    with pytest.raises(ArtifactError, match="outside the vocabulary of 300"):
        TargetSet(folder).check_token_range(300)
    np.save(shard / "offsets.npy", np.load(shard / "offsets.npy")[:-5])
    with pytest.raises(ArtifactError, match="corrupt targets shard"):
        TargetSet(folder).row(0)


# ----------------------------------------------------------------------------------------------
# Results that are not numbers


class NanMemory(MemoryModel):
    """A memory whose weights decoded to NaN."""

    name = "nan-memory"

    def prepare(self, ctx):
        import torch

        self.vocab = ctx.base.vocab_size
        self.tokenizer_fingerprint = ctx.base.tokenizer_fingerprint
        self.torch = torch

    def score(self, batch):
        return None

    def gold_logprobs(self, state, batch, knobs):
        return self.torch.full((len(batch.targets),), float("nan"))

    def logprobs(self, state, batch, knobs):
        return self.torch.full((len(batch.targets), self.vocab), float("nan"))

    def stepper(self, knobs):
        raise NotImplementedError


@pytest.fixture
def nan_memory(fresh_plugins):
    register_plugin(types.SimpleNamespace(memdec_register_memory_models=hookimpl(lambda: [NanMemory])), name="nan")
    yield
    unregister_plugin("nan")


def test_a_memory_that_gives_nan_is_named(nan_memory, corpus_dir, tiny_gpt2):
    with pytest.raises(ResultError, match="memory 'nan-memory' .*NaN log-probs on the valid split"):
        api.evaluate(str(corpus_dir), [str(tiny_gpt2)], ["mixture"], settings=WINDOW,
                     method_settings={"mixture": {"memory": "nan-memory"}})


@pytest.fixture
def nan_base(tmp_path, tiny_gpt2):
    """The tiny GPT-2 with one NaN row in its output layer (tied to the embeddings, so the token's
    input row too): every position's logits hold a NaN."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2, dtype=torch.float32)
    with torch.no_grad():
        model.get_output_embeddings().weight[7] = float("nan")
    folder = tmp_path / "nan-gpt2"
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (Path(tiny_gpt2) / name).is_file():
            shutil.copy(Path(tiny_gpt2) / name, folder / name)
    return folder


@pytest.mark.parametrize("method, message", [
    ("base", r"base on {base}: the test perplexity is nan"),
    ("knn-lm", r"the base {base} gave NaN on the valid split"),
])
def test_a_base_that_gives_nan_is_refused_in_one_line(nan_base, corpus_dir, tmp_path, method, message):
    """README: "A NaN or infinite result is an error naming the component (... base) and the split,
    never a number in a table": the base's own row and a mixture over it."""
    result = cli("eval", "--domain", corpus_dir, "--base", nan_base, "--method", method, "--context", 64,
                 *(["--set", "knn-lm.k=8"] if method == "knn-lm" else []), "--format", "json",
                 cache=tmp_path / "cache")
    assert re.search(message.format(base=re.escape(str(nan_base))), one_line(result))
    assert result.stdout == ""  # no table, no row


COMBINER_FILES = {
    "nan": ("import torch\nfrom memdec_core.interfaces import combiner\n\n@combiner('nan', elementwise=True)\n"
            "def nan(base, memory, context):\n    return base * float('nan')\n", "gave NaN on the valid split"),
    "raises": ("from memdec_core.interfaces import combiner\n\n@combiner('raises', elementwise=True)\n"
               "def raises(base, memory, context):\n    raise ValueError('boom')\n",
               "combiner 'raises' .*raised ValueError: boom"),
    "liar": ("from memdec_core.interfaces import combiner\n\n@combiner('liar', elementwise=True)\n"
             "def liar(base, memory, context):\n    return base - base.logsumexp(-1, keepdim=True)\n",
             "declares elementwise = True, but"),
}


@pytest.mark.parametrize("kind", sorted(COMBINER_FILES))
def test_a_combiner_that_breaks_is_one_line(kind, tmp_path, corpus_dir, tiny_gpt2):
    source, message = COMBINER_FILES[kind]
    (tmp_path / "mine.py").write_text(source)
    result = cli("eval", "--domain", corpus_dir, "--base", tiny_gpt2, "--method", "knn-lm", "--context", 64,
                 "--set", "knn-lm.k=8", "--combiner", f"{tmp_path / 'mine.py'}:{kind}", "--format", "json",
                 cache=tmp_path.parent / "shared-cache")
    import re

    assert re.search(message, one_line(result)), result.stderr
    assert result.stdout == ""  # no NaN result printed, no half report


def dead_pid() -> int:
    """A PID no process has (the kernel's limit is far below it)."""
    return 2 ** 22 + 12345


def test_temporary_folders_of_killed_processes_are_cleared(tmp_path, corpus_dir, tiny_gpt2, monkeypatch):
    from memdec_core.store.artifacts import cached_artifact
    from memdec_knn.api import datastore_for, datastore_key

    monkeypatch.setenv("MEMDEC_CACHE", str(tmp_path / "cache"))
    ctx = api.prepare_context(str(corpus_dir), str(tiny_gpt2), WINDOW)
    target = cached_artifact("datastores", datastore_key(ctx))
    stale = target.parent / f".{target.name}.tmp-{dead_pid()}-deadbeef"
    alive = target.parent / f".{target.name}.tmp-{os.getpid()}-cafef00d"
    for folder in (stale, alive):
        (folder / "keys.npy").parent.mkdir(parents=True)
        (folder / "keys.npy").write_bytes(b"half")
    datastore_for(ctx)
    assert not stale.exists() and alive.exists()  # a live process's work is never touched


def test_the_cli_prints_the_rows_a_failed_compare_measured(tmp_path, corpus_dir, tiny_gpt2, second_row_write_fails):
    result = cli("compare", "--domain", corpus_dir, "--base", tiny_gpt2, "--method", "base,knn-lm",
                 "--set", "knn-lm.k=8", "--context", 64, "--general-tokens", 100, "--latency-tokens", 50,
                 "--format", "json", cache=tmp_path / "cache")
    assert result.exit_code == 1 and "no space left" in result.stderr.strip().splitlines()[-1]
    assert [row["method"] for row in json.loads(result.stdout)["results"]] == ["base", "knn-lm"]
