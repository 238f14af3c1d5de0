"""Faults at a command's own outputs (issue 31): a disk that fills while a checkpoint is written, a
read-only disk under --output, a MEMDEC_CACHE that is a file, an export onto the folder it runs in,
a --plot that cannot be written. Each is one ``Error:`` line (exit 1, or 2 for bad usage), found
before the work where it can be, and leaves no temporary file behind."""

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import invoke, one_line_error
from test_faults import leftovers, tmpfs

from memdec_core.errors import DiskError
from memdec_core.store import artifacts
from memdec_core.store.disk import disk_errors

TRAIN = ["--epochs", 1, "--k", 8, "--knn-temperature", 1, "--train-batch", 2, "--context", 64]


def fill(folder: Path) -> None:
    """Write into ``folder`` until its disk refuses: the disk is then really full."""
    chunk = b"\0" * 4096
    with open(folder / "filler", "wb", buffering=0) as file:
        try:
            while True:
                file.write(chunk)
        except OSError as error:
            assert error.errno == errno.ENOSPC


# ----------------------------------------------------------------------------------------------
# 8. A disk that fills while a training checkpoint is written


def test_a_disk_that_fills_during_a_checkpoint_is_one_line(tmp_path, monkeypatch, corpus_dir, tiny_llama):
    real_save = torch.save

    def fill_then_save(state, path, *args, **kwargs):
        if str(path).startswith(str(disk)):  # the optimizer state of a checkpoint on that disk
            fill(disk)
        return real_save(state, path, *args, **kwargs)

    with tmpfs(tmp_path / "disk", "50m") as disk:
        monkeypatch.setattr(torch, "save", fill_then_save)
        result = invoke("train", "--domain", corpus_dir, "--teacher", tiny_llama, "--init", tiny_llama, *TRAIN,
                        "--output", disk / "memory")
        line = one_line_error(result)
        assert "no space left on the device" in line and "checkpoint" in line, line
        assert "MEMDEC_CACHE" not in line  # the output's disk is full, not the cache's
        assert not leftovers(disk) and not (disk / "memory").exists()


def test_a_runtime_error_on_a_disk_with_room_is_not_called_a_full_disk(tmp_path):
    with pytest.raises(RuntimeError, match="unrelated"):
        with disk_errors(tmp_path / "target"):
            raise RuntimeError("unrelated")


def test_a_safetensors_refusal_is_one_line(tmp_path):
    from safetensors.torch import save_file

    with tmpfs(tmp_path / "disk", "64k") as disk:
        with pytest.raises(DiskError, match="no space left on the device"):
            with disk_errors(disk / "weights.safetensors"):
                save_file({"w": torch.zeros(100_000)}, str(disk / "weights.safetensors"))


# ----------------------------------------------------------------------------------------------
# 9. --output on a read-only disk; the advice names the output, not the cache


def test_eval_output_on_a_read_only_disk_is_one_line(tmp_path, corpus_dir, tiny_gpt2):
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as read_only:
        result = invoke("eval", "--domain", corpus_dir, "--base", tiny_gpt2, "--method", "base", "--context", 64,
                        "--output", read_only / "report.json")
        line = one_line_error(result)
        assert "read-only" in line and str(read_only) in line and "MEMDEC_CACHE" not in line, line


def test_write_json_on_a_read_only_disk_raises_the_refusal_not_the_cleanup(tmp_path):
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as read_only:
        with pytest.raises(DiskError, match="read-only"):
            artifacts.write_json(read_only / "report.json", {"a": 1})


def test_train_onto_a_read_only_folder_names_the_folder_not_the_cache(tmp_path, corpus_dir, tiny_llama):
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as read_only:
        result = invoke("train", "--domain", corpus_dir, "--teacher", tiny_llama, "--init", tiny_llama, *TRAIN,
                        "--output", read_only / "memory")
        line = one_line_error(result)
        assert "read-only" in line and "MEMDEC_CACHE" not in line and f"{read_only} is not writable" in line, line


# ----------------------------------------------------------------------------------------------
# 10. MEMDEC_CACHE is a file


@pytest.mark.parametrize("under", ["", "cache"])
def test_eval_with_a_cache_that_is_a_file_is_one_line(tmp_path, monkeypatch, corpus_dir, tiny_gpt2, under):
    not_a_folder = tmp_path / "cache-file"
    not_a_folder.write_text("not a cache\n")
    monkeypatch.setenv("MEMDEC_CACHE", str(not_a_folder / under))  # the file, or a folder "in" it
    line = one_line_error(invoke("eval", "--domain", corpus_dir, "--base", tiny_gpt2, "--method", "base",
                                 "--context", 64))
    assert "is not a folder" in line and "MEMDEC_CACHE" in line, line
    assert not_a_folder.read_text() == "not a cache\n"


# ----------------------------------------------------------------------------------------------
# 11. export onto the folder it runs in, one that holds it, or the source


@pytest.fixture
def dapt_folder(tmp_path, tiny_gpt2) -> Path:
    """A DAPT artifact as export reads one: whole weights and a manifest naming the base."""
    folder = tmp_path / "sources" / "dapt"
    shutil.copytree(tiny_gpt2, folder)
    (folder / "memdec.json").write_text(json.dumps({"type": "dapt", "format_version": 1,
                                                    "base_model": str(tiny_gpt2)}))
    return folder


@pytest.mark.parametrize("output", [".", "..", "{tmp}", "{source}", "{source}/..", "{source}/../../sources"])
def test_export_refuses_an_output_that_holds_the_cwd_or_the_source(tmp_path, monkeypatch, dapt_folder, output):
    here = tmp_path / "work" / "here"
    here.mkdir(parents=True)
    (here / "notes.txt").write_text("mine\n")
    monkeypatch.chdir(here)
    output = output.format(tmp=tmp_path, source=dapt_folder)
    line = one_line_error(invoke("export", dapt_folder, "--output", output, "--force"))
    assert "choose another" in line, line
    assert (here / "notes.txt").read_text() == "mine\n" and (dapt_folder / "memdec.json").is_file()
    assert not [path for path in tmp_path.rglob("*") if ".tmp-" in path.name or path.name.endswith(".old")]


def test_export_composite_refuses_an_output_that_holds_its_memory(dapt_folder, tiny_gpt2):
    line = one_line_error(invoke("export", "--base", tiny_gpt2, "--memory", dapt_folder, "--force",
                                 "--output", dapt_folder.parent))
    assert "choose another" in line and (dapt_folder / "memdec.json").is_file(), line


def test_a_replacement_that_cannot_be_swapped_in_leaves_the_old_version_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "target"
    target.mkdir()
    (target / "old.txt").write_text("old")
    real_replace, calls = os.replace, []

    def second_fails(source, destination):
        calls.append(source)
        if len(calls) == 2:  # the new version into place, after the old one moved aside
            raise OSError(errno.EBUSY, "Device or resource busy")
        real_replace(source, destination)

    monkeypatch.setattr(artifacts.os, "replace", second_fails)
    with pytest.raises(OSError):
        with artifacts.replacing_directory(target) as temporary:
            (temporary / "new.txt").write_text("new")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["target"]
    assert (target / "old.txt").read_text() == "old"


# ----------------------------------------------------------------------------------------------
# 12. --plot is checked before the run


@pytest.fixture
def no_run(monkeypatch):
    """compare's run, replaced: a test that reaches it failed to refuse before the work."""
    from memdec_core.runs import compare as compare_module

    def run(*args, **kwargs):
        raise AssertionError("the comparison ran")

    monkeypatch.setattr(compare_module, "compare", run)


@pytest.mark.parametrize("name, message", [("fig.xyz", "supported"), ("missing-folder/fig.png", "does not exist")])
def test_a_plot_that_cannot_be_written_is_refused_before_the_run(tmp_path, corpus_dir, no_run, name, message):
    pytest.importorskip("matplotlib")
    result = invoke("compare", "--domain", corpus_dir, "--method", "base", "--plot", tmp_path / name)
    assert result.exit_code == 2 and message in result.stderr, result.output
    assert "xyz" not in message or ".png" in result.stderr  # the formats that would do are listed


def test_a_plot_in_a_read_only_folder_is_refused_before_the_run(tmp_path, corpus_dir, no_run):
    pytest.importorskip("matplotlib")
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as read_only:
        result = invoke("compare", "--domain", corpus_dir, "--method", "base", "--plot", read_only / "fig.png")
        assert result.exit_code == 2 and "not writable" in result.stderr, result.output


def test_help_does_not_import_matplotlib():
    probe = ("import sys; from memdec_cli.main import main\n"
             "try:\n    main(['compare', '--help'])\nexcept SystemExit:\n    pass\n"
             "print('MATPLOTLIB', 'matplotlib' in sys.modules, file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert "MATPLOTLIB False" in result.stderr, result.stderr
