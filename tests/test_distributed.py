"""Several processes (torchrun, gloo on the CPU): the numbers of N processes are those of one,
each run really has the world size it was launched with, and launchers' silent failures are refused."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import SMALL_WINDOWS, invoke, one_line_error

from memdec_core.engine.scoring import iter_scored_batches, nll_total
from memdec_core.inputs.data import make_windows
from memdec_core.inputs.models import load_model
from memdec_core.runtime import distributed
from memdec_core.runtime.distributed import World

TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")


def torchrun(processes: int, *args, cache, check: bool = True, logs: bool = False) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node N -m memdec_cli ARGS`` with its own cache (``logs``:
    with memdec's status lines on stderr)."""
    env = {**os.environ, "MEMDEC_CACHE": str(cache), "OMP_NUM_THREADS": "1", "MEMDEC_NO_PROGRESS": "0" if logs else "1"}
    command = [TORCHRUN, "--standalone", "--nproc_per_node", str(processes), "-m", "memdec_cli", *map(str, args)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-30000:]
    return result


def eval_args(corpus_dir, model, output, methods="base,knn-lm"):
    return ["eval", "--domain", corpus_dir, "--base", model, "--method", methods, "--context",
            SMALL_WINDOWS["context"], "--stride", SMALL_WINDOWS["stride"], "--batch-size", SMALL_WINDOWS["batch_size"],
            "--set", "knn-lm.k=32",
            "--format", "json", "--output", output]


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed")
def test_two_processes_give_the_report_of_one(corpus_dir, tiny_llama, tmp_path):
    """Each of 2 gloo ranks scores half the batches (of windows, or of RAG's runs) and the NLL sums
    are reduced: the same perplexities as one process. The datastore is built by both ranks (the same bytes: see the
    build test below); the memory and LoRA are trained data-parallel, so their weights are those
    of one process up to the order of float sums: their perplexities agree to 1e-6."""
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    methods = "base,knn-lm,rag,memdec,lora"
    short = ["--set", "memdec.epochs=1", "--set", "lora.epochs=1", "--set", "rag.passage_tokens=16"]
    single = invoke("--world-size", 1, *eval_args(corpus_dir, tiny_llama, one, methods), *short)
    assert single.exit_code == 0, single.stderr
    result = torchrun(2, "--world-size", 2, *eval_args(corpus_dir, tiny_llama, two, methods), *short,
                      cache=tmp_path / "cache-two")
    first, second = json.loads(one.read_text()), json.loads(two.read_text())
    assert first["meta"]["world_size"] == 1 and second["meta"]["world_size"] == 2
    assert [row["method"] for row in second["results"]] == methods.split(",")
    for alone, shared in zip(first["results"], second["results"]):
        tolerance = 1e-6 if alone["method"] in ("memdec", "lora") else 1e-9  # trained, or only scored
        assert shared["test_ppl"] == pytest.approx(alone["test_ppl"], rel=tolerance), alone["method"]
        if alone["valid_ppl"] is None:  # the base is not tuned
            assert shared["valid_ppl"] is None
        else:
            assert shared["valid_ppl"] == pytest.approx(alone["valid_ppl"], rel=tolerance), alone["method"]
        assert shared["knobs"] == alone["knobs"]
    assert result.stdout.count('"results"') == 1  # rank 0 alone prints the report


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed")
def test_two_processes_fit_the_learned_weight_and_gate_of_one(corpus_dir, tiny_gpt2, tmp_path):
    """A combiner that learns is fitted by every rank on the whole validation split (the same
    positions, the same seed: the same weights), then test is scored half by each rank and
    reduced: the report of one process, its learned weight's mean and its gate's skipped share."""
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    learned = ["--combiner", "adaptive", "--set", "adaptive.gate=0.05", "--set", "knn-lm.temperatures=3,10"]
    single = invoke("--world-size", 1, *eval_args(corpus_dir, tiny_gpt2, one), *learned)
    assert single.exit_code == 0, single.stderr
    torchrun(2, "--world-size", 2, *eval_args(corpus_dir, tiny_gpt2, two), *learned, cache=tmp_path / "cache-two")
    first, second = json.loads(one.read_text()), json.loads(two.read_text())
    assert first["meta"]["world_size"] == 1 and second["meta"]["world_size"] == 2
    alone, shared = first["results"][1], second["results"][1]
    assert alone["method"] == shared["method"] == "knn-lm" and alone["details"]["knobs_from"] == "fit"
    assert shared["test_ppl"] == pytest.approx(alone["test_ppl"], rel=1e-9)
    assert shared["knobs"] == alone["knobs"]
    weights = alone["details"]["weights"]
    assert shared["details"]["weights"]["weight_mean"] == pytest.approx(weights["weight_mean"], rel=1e-9)
    assert shared["details"]["gate"]["test_skipped_share"] == alone["details"]["gate"]["test_skipped_share"]


BUILD_SCRIPT = """
import dataclasses, json, os, signal, sys
from memdec_core.runtime import distributed
world = distributed.join()
from memdec_knn import datastore
from memdec_decoder import api, pipeline
from memdec_core.interfaces import EvalSettings

datastore.COMMIT_EVERY = 1  # a progress record after every round of batches
kill_after = int(os.environ.get("KILL_AFTER_WRITES", "0"))
real_write, writes = datastore.RowFile.write, [0]
def write(self, first_row, rows):
    real_write(self, first_row, rows)
    writes[0] += self.path.name == "vals.npy"
    if kill_after and world.rank == world.size - 1 and writes[0] == kill_after:
        os.kill(os.getpid(), signal.SIGKILL)
datastore.RowFile.write = write
from memdec_decoder import targets
real_shard, shards = targets._write_shard, [0]
def write_shard(*args):
    shards[0] += 1
    return real_shard(*args)
targets._write_shard = write_shard
real_settings = pipeline.target_settings_for  # shards of 512 positions: several, so each rank has some
pipeline.target_settings_for = lambda *args: dataclasses.replace(real_settings(*args), shard_size=512)
folder = api.build_targets(sys.argv[1], sys.argv[2], k=8, temperature=1.0, output=sys.argv[3],
                           settings=EvalSettings(context=64, stride=32, batch_size=4))
json.dump({"world_size": world.size, "batches": writes[0], "shards": shards[0]},
          open(f"{sys.argv[3]}.rank{world.rank}.json", "w"))
"""


def run_build(processes: int, corpus_dir, model, output, cache, kill_after: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "MEMDEC_CACHE": str(cache), "OMP_NUM_THREADS": "1", "MEMDEC_NO_PROGRESS": "1",
           "MEMDEC_WORLD_SIZE": str(processes), "KILL_AFTER_WRITES": str(kill_after)}
    script = output.parent / "build.py"
    script.write_text(BUILD_SCRIPT)
    launcher = [TORCHRUN, "--standalone", "--nproc_per_node", str(processes)] if processes > 1 else [sys.executable]
    return subprocess.run([*launcher, str(script), str(corpus_dir), str(model), str(output)], env=env,
                          capture_output=True, text=True, timeout=600)


def built_files(cache, targets) -> dict[str, bytes]:
    """The datastore's keys and values and every targets file, by name."""
    store = next(path for path in (cache / "datastores").iterdir() if not path.name.startswith("."))
    files = {name: (store / name).read_bytes() for name in ("keys.npy", "vals.npy")}
    for shard in sorted(targets.glob("shard-*")):
        files.update({f"{shard.name}/{file.name}": file.read_bytes() for file in sorted(shard.iterdir())})
    return files


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed")
def test_two_processes_build_the_datastore_and_targets_of_one_and_resume_with_any_number(corpus_dir, tiny_gpt2,
                                                                                          tmp_path):
    """Each rank computes every other batch of windows (written at their rows) and every other
    shard of targets: the same bytes as one process (a buffered writer once wrote stale zeros over
    the other rank's rows of the small vals.npy). A 2-process build killed midway resumes in one
    process, from the windows both ranks had finished (computing only the batches after them), to
    the same bytes."""
    (tmp_path / "one").mkdir(), (tmp_path / "two").mkdir(), (tmp_path / "killed").mkdir()
    single = run_build(1, corpus_dir, tiny_gpt2, tmp_path / "one" / "targets", tmp_path / "one" / "cache")
    assert single.returncode == 0, single.stderr[-3000:]
    double = run_build(2, corpus_dir, tiny_gpt2, tmp_path / "two" / "targets", tmp_path / "two" / "cache")
    assert double.returncode == 0, double.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "targets.rank0.json").read_text())
    ranks = [json.loads((tmp_path / "two" / f"targets.rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [rank["world_size"] for rank in ranks] == [2, 2]
    for work in ("batches", "shards"):  # the work was shared, not repeated
        assert all(rank[work] > 0 for rank in ranks) and sum(rank[work] for rank in ranks) == one[work], work
    reference = built_files(tmp_path / "one" / "cache", tmp_path / "one" / "targets")
    assert len([name for name in reference if name.endswith("offsets.npy")]) >= 3  # several shards to share
    assert built_files(tmp_path / "two" / "cache", tmp_path / "two" / "targets") == reference

    killed_cache = tmp_path / "killed" / "cache"
    killed = run_build(2, corpus_dir, tiny_gpt2, tmp_path / "killed" / "targets", killed_cache, kill_after=4)
    assert killed.returncode != 0
    work = next((killed_cache / "datastores").glob(".*.partial"))
    recorded = json.loads((work / "progress.json").read_text())["windows"]
    assert recorded >= 2 * 2 * 4  # two rounds of 2 ranks × 4
    resumed = run_build(1, corpus_dir, tiny_gpt2, tmp_path / "killed" / "targets", killed_cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rerun = json.loads((tmp_path / "killed" / "targets.rank0.json").read_text())
    assert rerun["batches"] == one["batches"] - recorded // 4  # only the batches after the record, not all
    assert built_files(killed_cache, tmp_path / "killed" / "targets") == reference


def test_a_data_parallel_step_sums_to_the_gradient_of_one_process(tiny_llama, tmp_path, monkeypatch):
    """Rank r of N trains on windows r, r + N, ... of each micro-batch; the ranks' gradients sum
    to the one-process gradient of the whole step (the brute-force reference)."""
    from memdec_core.engine.training import LoopSettings, Trainer, next_token_cross_entropy

    stream = np.arange(2000) % 300
    settings = LoopSettings(batch_size=3, accumulate=2, clip=1e9)  # no clipping: the raw gradients

    def gradients(world: World) -> tuple[dict, list]:
        monkeypatch.setattr(distributed, "_WORLD", [world])
        model = load_model(str(tiny_llama)).model.train()
        trainer = Trainer(model, stream, 64, settings, tmp_path, loss=next_token_cross_entropy,
                          validate=lambda trained: (1.0, {}))
        seen, real_batch = [], trainer._batch
        trainer._batch = lambda starts: seen.append(starts.tolist()) or real_batch(starts)
        trainer._step(trainer.chunk_starts[:6])
        return {name: parameter.grad.clone() for name, parameter in model.named_parameters()}, seen

    monkeypatch.setattr(distributed, "sum_gradients", lambda parameters, extra=(): list(extra))  # no group here
    monkeypatch.setattr("memdec_core.engine.training.sum_gradients", distributed.sum_gradients)
    whole, seen_alone = gradients(World())
    halves = [gradients(World(rank=rank, size=2)) for rank in (0, 1)]
    assert seen_alone == [[0, 64, 128], [192, 256, 320]]
    assert halves[0][1] == [[0, 128], [192, 320]] and halves[1][1] == [[64], [256]]
    for name, expected in whole.items():
        torch.testing.assert_close(halves[0][0][name] + halves[1][0][name], expected, rtol=1e-5, atol=1e-7, msg=name)


def test_a_sharded_scorer_takes_every_nth_batch_and_the_sums_are_reduced(corpus_dir, tiny_gpt2, monkeypatch):
    base = load_model(str(tiny_gpt2))
    stream = np.arange(600) % 300
    windows = make_windows(len(stream), 32, 16)
    every = [batch.positions for batch in iter_scored_batches(base.model, stream, windows, batch_size=4)]
    monkeypatch.setattr(distributed, "_WORLD", [World(rank=1, size=2)])
    mine = [batch.positions for batch in iter_scored_batches(base.model, stream, windows, batch_size=4, sharded=True)]
    assert len(mine) == len(every) // 2 and all(torch.equal(a, b) for a, b in zip(mine, every[1::2]))
    with distributed.alone():  # a cache entry's builder works by itself
        assert len(list(iter_scored_batches(base.model, stream, windows, batch_size=4, sharded=True))) == len(every)
    # the reduction: rank 1's half and rank 0's half make the whole
    halves = {}
    monkeypatch.setattr("memdec_core.engine.scoring.sum_across", lambda values: list(values))  # no group to reduce in
    for rank in (0, 1):
        monkeypatch.setattr(distributed, "_WORLD", [World(rank=rank, size=2)])
        halves[rank] = nll_total(base.model, stream, windows, batch_size=4)
    monkeypatch.setattr(distributed, "_WORLD", [World()])
    whole = nll_total(base.model, stream, windows, batch_size=4)
    assert halves[0].count + halves[1].count == whole.count
    assert halves[0].total + halves[1].total == pytest.approx(whole.total, rel=1e-12)


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed")
def test_a_world_size_other_than_the_launched_one_is_refused(corpus_dir, tiny_gpt2, tmp_path):
    result = torchrun(2, "--world-size", 3, *eval_args(corpus_dir, tiny_gpt2, tmp_path / "r.json", "base"),
                      cache=tmp_path / "cache", check=False)
    assert result.returncode != 0
    assert "Error: this run expects 3 processes but has 2" in result.stderr
    assert not (tmp_path / "r.json").exists()


def test_one_process_where_several_were_expected_is_refused(corpus_dir, tiny_gpt2, tmp_path):
    """The silent trap: `accelerate launch --cpu --num_processes 2` starts one process, which
    would do the whole job where two were meant to share it."""
    result = invoke("--world-size", 2, *eval_args(corpus_dir, tiny_gpt2, tmp_path / "r.json", "base"))
    assert "expects 2 processes but has 1" in one_line_error(result)
    assert "torchrun --standalone --nproc_per_node 2" in result.stderr


@pytest.mark.parametrize("value, message", [("0", "must be at least 1"), ("two", "is not a number of processes")])
def test_a_bad_launcher_world_size_is_a_one_line_error(value, message, monkeypatch, corpus_dir, tiny_gpt2, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", value)
    result = invoke(*eval_args(corpus_dir, tiny_gpt2, tmp_path / "r.json", "base"))
    assert "WORLD_SIZE" in one_line_error(result) and message in result.stderr


def test_python_dash_m_memdec_cli_runs_the_command():
    result = subprocess.run([sys.executable, "-m", "memdec_cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--world-size" in result.stdout and "torchrun" in result.stdout


ACCELERATE = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")


@pytest.mark.skipif(ACCELERATE is None, reason="accelerate's launcher is not installed")
def test_accelerate_launch_on_cpus_starting_one_process_is_caught(corpus_dir, tiny_gpt2, tmp_path):
    """The trap itself, with the real launcher: asked for 2 CPU processes, it starts one."""
    env = {**os.environ, "MEMDEC_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    command = [ACCELERATE, "launch", "--cpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
               "no", "--dynamo_backend", "no", "-m", "memdec_cli", "--world-size", "2",
               *map(str, eval_args(corpus_dir, tiny_gpt2, tmp_path / "r.json", "base"))]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "Error: this run expects 2 processes but has 1" in result.stderr
    assert not (tmp_path / "r.json").exists()


def test_a_model_saved_on_a_rank_other_than_0_is_written(tiny_gpt2, tmp_path, monkeypatch):
    """transformers writes nothing from rank 1 of a process group; memdec builds a cache entry on
    whichever rank holds its lock, so its saves must write anyway (the trap, then the fix)."""
    import transformers.distributed.mixin as mixin

    from memdec_core.inputs.models import save_model

    monkeypatch.setattr(mixin, "_is_torch_distributed_initialized", lambda: True)
    monkeypatch.setattr(mixin, "_get_torch_distributed_rank", lambda: 1)
    model = load_model(str(tiny_gpt2)).model
    model.save_pretrained(tmp_path / "plain")
    assert not (tmp_path / "plain" / "config.json").exists()  # the silent skip memdec must avoid
    save_model(model, tmp_path / "ours")
    assert (tmp_path / "ours" / "config.json").is_file() and (tmp_path / "ours" / "model.safetensors").is_file()
    assert "should_save_on_this_rank" not in vars(model)  # the model is left as it was


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed")
@pytest.mark.parametrize("train_batch, accumulate", [(3, 1), (1, 2)])
def test_fsdp_resumes_a_one_process_checkpoint_and_ends_where_one_process_does(corpus_dir, tiny_llama, tmp_path,
                                                                              monkeypatch, train_batch, accumulate):
    """A memory trained by 1 process, against one interrupted in its second epoch in 1 process and
    finished by 2 ranks under FSDP2 (the checkpoint's optimizer state moved onto the shards, the
    weights gathered for every checkpoint and the best epoch): the same weights, up to the order of
    float sums. Micro-batches of 3 windows split 2 + 1; of 1 window, rank 1 joins every pass with
    nothing to add. Validation has 5 batches of 5 windows, so rank 1 joins rank 0's last pass."""
    from memdec_decoder import train as train_module
    from memdec_decoder.memory import open_memory

    arguments = ["train", "--domain", corpus_dir, "--teacher", tiny_llama, "--init", tiny_llama, "--epochs", 2,
                 "--train-batch", train_batch, "--accumulate", accumulate, "--k", 16, "--knn-temperature", 1,
                 "--lr", "3e-3", "--context", SMALL_WINDOWS["context"], "--stride", SMALL_WINDOWS["stride"],
                 "--batch-size", 5]
    reference = invoke(*arguments, "--output", tmp_path / "reference")
    assert reference.exit_code == 0, reference.stderr
    real_step = train_module.Trainer._step

    def interrupted_step(self, starts):  # one step into the second epoch: the checkpoint is the first's
        if self.state["global_step"] == self.steps_per_epoch + 1:
            raise KeyboardInterrupt
        return real_step(self, starts)

    monkeypatch.setattr(train_module.Trainer, "_step", interrupted_step)
    interrupted = invoke(*arguments, "--output", tmp_path / "memory")
    assert interrupted.exit_code != 0 and (tmp_path / ".memory.partial" / "checkpoint").is_dir()
    cache = os.environ["MEMDEC_CACHE"]  # the kNN targets the interrupted run made
    result = torchrun(2, "--world-size", 2, "--fsdp", *arguments, "--output", tmp_path / "memory", cache=cache,
                      logs=True)
    assert "resuming training memory at step" in result.stderr
    assert "weights sharded over 2 ranks by FSDP2" in result.stderr
    expected, got = open_memory(tmp_path / "reference"), open_memory(tmp_path / "memory")
    assert expected.manifest["parallel"] == {"ranks": 1, "fsdp": False}
    assert got.manifest["parallel"] == {"ranks": 2, "fsdp": True}
    assert got.manifest["train_steps"] == expected.manifest["train_steps"]
    for (name, want), (_, have) in zip(expected.model.named_parameters(), got.model.named_parameters()):
        torch.testing.assert_close(have, want, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed")
def test_continued_training_sharded_by_fsdp_gives_the_report_of_one_process(corpus_dir, tiny_llama, tmp_path):
    """DAPT under FSDP2 (its loss takes the full output layer: the root's weights are gathered in
    the root's pass only): the perplexity of one process."""
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    arguments = ["eval", "--domain", corpus_dir, "--base", tiny_llama, "--method", "dapt", "--context",
                 SMALL_WINDOWS["context"], "--stride", SMALL_WINDOWS["stride"], "--batch-size", 5, "--set",
                 "dapt.epochs=1", "--format", "json", "--output"]
    single = invoke("--world-size", 1, *arguments, one)
    assert single.exit_code == 0, single.stderr
    result = torchrun(2, "--world-size", 2, "--fsdp", *arguments, two, cache=tmp_path / "cache-two", logs=True)
    assert "weights sharded over 2 ranks by FSDP2" in result.stderr
    alone, shared = json.loads(one.read_text())["results"][0], json.loads(two.read_text())["results"][0]
    assert shared["test_ppl"] == pytest.approx(alone["test_ppl"], rel=1e-6)
    assert shared["knobs"] == alone["knobs"]


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed")
def test_two_processes_distil_the_memory_of_one(corpus_dir, tiny_llama, tmp_path):
    """``--distill``: the teacher's distributions a 2-rank run builds are the bytes one process
    writes (the tiny split is one shard, so rank 0 computes it while rank 1 waits at the barrier),
    and the memory trained on them is one process's."""
    from memdec_core.store.artifacts import resolve_reference
    from memdec_decoder.memory import open_memory

    arguments = ["train", "--domain", corpus_dir, "--teacher", tiny_llama, "--init", tiny_llama, "--epochs", 1,
                 "--distill", "0.5", "--k", 16, "--knn-temperature", 1, "--context", SMALL_WINDOWS["context"],
                 "--stride", SMALL_WINDOWS["stride"], "--batch-size", 4, "--output"]
    single = invoke("--world-size", 1, *arguments, tmp_path / "one")
    assert single.exit_code == 0, single.stderr
    cache = tmp_path / "cache-two"
    torchrun(2, "--world-size", 2, *arguments, tmp_path / "two", cache=cache)
    one, two = open_memory(tmp_path / "one"), open_memory(tmp_path / "two")
    assert one.manifest["parallel"]["ranks"] == 1 and two.manifest["parallel"] == {"ranks": 2, "fsdp": False}
    rows_one = resolve_reference(one.manifest["teacher_targets"])
    rows_two = cache / "teacher-targets" / rows_one.name
    shards = sorted(path.relative_to(rows_one) for path in rows_one.glob("shard-*/*.npy"))
    assert len(shards) == 3 * json.loads((rows_one / "memdec.json").read_text())["shards"]
    for name in shards:
        assert (rows_one / name).read_bytes() == (rows_two / name).read_bytes(), name
    for (name, want), (_, have) in zip(one.model.named_parameters(), two.model.named_parameters()):
        torch.testing.assert_close(have, want, rtol=1e-4, atol=1e-5, msg=name)
