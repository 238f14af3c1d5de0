"""memdec's own fixtures: the plugin authors' kit (``memdec_core.testing``) under short names, and
a Memory Decoder trained once per run.

Everything is built in-process from configs and generated text: no downloads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytest.register_assert_rewrite("memdec_core.testing")

from memdec_core.testing import save_tiny_model, synthetic_documents, write_corpus  # noqa: E402, F401 (tests use them)

pytest_plugins = ["memdec_core.testing"]

os.environ.setdefault("MEMDEC_NO_PROGRESS", "1")
# Tiny models gain nothing from threads, and OpenMP threads spin badly when the machine is busy.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tokenizer_dir(memdec_tokenizer_dir) -> Path:
    return memdec_tokenizer_dir


@pytest.fixture(scope="session")
def tiny_gpt2(memdec_tiny_gpt2) -> Path:
    return memdec_tiny_gpt2


@pytest.fixture(scope="session")
def tiny_llama(memdec_tiny_llama) -> Path:
    return memdec_tiny_llama


@pytest.fixture(scope="session")
def corpus_dir(memdec_corpus_dir) -> Path:
    return memdec_corpus_dir


@pytest.fixture
def fresh_plugins():
    """Reset the plugin manager before and after a test that changes plugins or the environment."""
    from memdec_core.components.plugins import reset_plugin_manager

    reset_plugin_manager()
    yield
    reset_plugin_manager()


#: Windows and Memory Decoder settings small enough for the tiny corpus.
QUICK_MEMORY = dict(epochs=2, batch_size=4, k=16, temperature=1.0, lr=3e-3)
SMALL_WINDOWS = dict(context=64, stride=32, batch_size=4)


def invoke(*args):
    """``memdec ARGS`` in-process (arguments turned to strings: paths may be passed as they are)."""
    from click.testing import CliRunner

    from memdec_cli.main import build_cli

    return CliRunner().invoke(build_cli(), [str(arg) for arg in args])


def one_line_error(result) -> str:
    """The single ``Error: ...`` line of a command that failed with exit status 1."""
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def checkpoint_step(work: Path) -> int:
    """The optimizer step that the training checkpoint an interrupted run left in ``work`` holds."""
    state = Path(work) / "checkpoint" / "trainer_state.json"
    assert state.is_file(), f"no training checkpoint in {work}"
    return json.loads(state.read_text())["global_step"]


def record_steps(monkeypatch) -> list[tuple[int, int]]:
    """From now on, each optimizer step any training takes, as (the step it starts from, the run's total)."""
    from memdec_core.engine import training

    real, taken = training.Trainer._step, []

    def step(self, starts):
        taken.append((self.state["global_step"], self.total_steps))
        return real(self, starts)

    monkeypatch.setattr(training.Trainer, "_step", step)
    return taken


def assert_only_the_rest(taken: list[tuple[int, int]], done: int) -> None:
    """A rerun that resumed from a checkpoint of ``done`` steps took exactly the steps after it
    (a rerun from scratch would start at 0 and take them all)."""
    assert taken, "the rerun took no optimizer step"
    total = taken[0][1]
    assert 0 < done < total, (done, total)
    assert [start for start, _ in taken] == list(range(done, total))


@pytest.fixture(scope="session")
def trained_memory(tmp_path_factory, corpus_dir, tiny_llama):
    """A Memory Decoder trained on the tiny corpus with the tiny Llama as teacher and init."""
    from memdec_core.interfaces import EvalSettings
    from memdec_decoder import api

    folder = tmp_path_factory.mktemp("memories") / "tiny-memory"
    return api.train(str(corpus_dir), teacher=str(tiny_llama), init=str(tiny_llama), output=folder,
                     settings=EvalSettings(**SMALL_WINDOWS), **QUICK_MEMORY)


@pytest.fixture
def fake_gpu_faiss(monkeypatch):
    """faiss's GPU API played by its CPU indexes, so the faiss-gpu retriever's plumbing (placement,
    writing the CPU copy, reloading, nprobe) runs on a machine without a GPU. Nothing runs on a GPU:
    a test using it checks memdec's placement logic, never faiss's GPU results. Returns the calls
    that moved an index to a "GPU": (gpu number, useFloat16)."""
    import faiss

    from memdec_knn import gpu_index

    moved = []

    class ClonerOptions:
        useFloat16 = False

    def to_gpu(resources, number, index, options=None):
        moved.append((number, options.useFloat16 if options else None))
        return faiss.clone_index(index)

    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(faiss, "GpuClonerOptions", ClonerOptions, raising=False)
    monkeypatch.setattr(faiss, "GpuParameterSpace", faiss.ParameterSpace, raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", to_gpu, raising=False)
    monkeypatch.setattr(faiss, "index_gpu_to_cpu", faiss.clone_index, raising=False)
    monkeypatch.setattr(gpu_index, "_RESOURCES", [])
    return moved
