"""benchmarks/gpu_check.py, the check a lent GPU runs first, cannot rot: its dry run does the same
steps on the CPU at tiny sizes and must write a report of the schema with every step done and the
CPU numbers equal to its stored reference; a step out of budget is reported as skipped, never
dropped; a reference of other caps is refused; the xz-packed wheel is restored file for file."""

import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(out: Path, *arguments: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "plugins"), str(ROOT / "cli")]))
    env.pop("OUT", None)
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), *arguments], env=env,
                          capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "gpu_check.md").read_text().startswith("# memdec GPU check (dry-run)")
    return json.loads((out / "gpu_check.json").read_text())


def test_dry_run_does_every_step_and_matches_its_reference(gpu_check, tmp_path):
    report = run_script(tmp_path)
    assert gpu_check.schema_problems(report) == []
    assert {step["name"]: step["status"] for step in report["steps"]} == dict.fromkeys(gpu_check.STEPS, "ok")
    assert [(c["name"], c["status"]) for c in report["comparisons"]] == [("fp32", "pass"), ("auto", "pass")]
    assert all(row["ok"] for c in report["comparisons"] for row in c["rows"])
    methods = {row["method"] for row in report["comparisons"][0]["rows"]}
    assert methods == {"base", "dapt", "lora", "knn-lm", "rag", "memdec"}
    assert [t["stage"] for t in report["timings"]] == gpu_check.STAGES
    assert all(t["status"] == "ok" and t["tokens_per_s"] > 0 for t in report["timings"])
    checks = {c["name"]: c["status"] for c in report["checks"]}
    assert checks == {"dtype-auto": "pass", "rng-checkpoint-cuda": "skipped", "faiss-flat-exact": "pass",
                      "faiss-gpu-flat": "skipped", "memory-base-same-device": "pass"}
    assert (tmp_path / "gpu_check.log").exists()


def test_a_step_out_of_budget_is_reported_as_skipped(gpu_check, tmp_path):
    """A zero budget skips a step before it starts; a budget shorter than the step kills it midway."""
    skipped = ("faiss", "compare-fp32", "compare-auto", "stages")
    zero = [arg for name in skipped for arg in ("--step-budget", f"{name}=0")]
    report = run_script(tmp_path, *zero, "--step-budget", "checks=0.5")
    assert gpu_check.schema_problems(report) == []
    steps = {step["name"]: step for step in report["steps"]}
    assert steps["install"]["status"] == "ok"
    assert (steps["checks"]["status"], steps["checks"]["reason"]) == ("skipped", "past its budget of 0.5 s")
    for name in skipped:
        assert (steps[name]["status"], steps[name]["reason"]) == ("skipped", "its budget is 0 s")
    assert [c["status"] for c in report["comparisons"]] == ["not run", "not run"]
    assert "| stages | skipped | 0.0 | 0 | its budget is 0 s |" in (tmp_path / "gpu_check.md").read_text()


def test_a_reference_of_other_caps_is_refused(gpu_check):
    step = {"name": "compare-fp32", "status": "ok", "reason": "", "precision": "fp32",
            "rows": [{"base": "b", "method": "base", "test_ppl": 10.0}]}
    reference = {"caps": {"max_train_tokens": 8192}, "test_ppl": {"b/base": 10.005}}
    refused = gpu_check.compare_rows("fp32", step, reference, {"max_train_tokens": 4096})
    assert refused["status"] == "refused" and "caps differ" in refused["reason"]
    compared = gpu_check.compare_rows("fp32", step, reference, {"max_train_tokens": 8192})
    assert compared["status"] == "pass" and compared["rows"][0]["relative"] == pytest.approx(5e-4, rel=1e-3)
    assert gpu_check.compare_rows("fp32", {**step, "rows": [{**step["rows"][0], "test_ppl": 10.2}]}, reference,
                                  {"max_train_tokens": 8192})["status"] == "fail"


def test_schema_catches_a_dropped_step(gpu_check, tmp_path):
    report = run_script(tmp_path, *[arg for name in gpu_check.STEPS for arg in ("--step-budget", f"{name}=0")])
    assert gpu_check.schema_problems(report) == []
    report["steps"].pop()
    assert gpu_check.schema_problems(report) == ["the steps are not " + ", ".join(gpu_check.STEPS)]


def test_packed_wheel_is_restored_file_for_file(gpu_check, tmp_path):
    wheel = tmp_path / "demo-1.0-py3-none-any.whl"
    files = {"demo/__init__.py": b"x = 1\n", "demo/lib.so": os.urandom(4096),
             "demo-1.0.dist-info/RECORD": b"demo/__init__.py,,\n"}
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    gpu_check.pack_wheel(wheel)
    assert not wheel.exists()
    restored = gpu_check.restore_wheel(tmp_path / (wheel.name + ".tar.xz"), tmp_path / "restored")
    with zipfile.ZipFile(restored) as archive:
        assert {name: archive.read(name) for name in archive.namelist()} == files


def test_the_stored_references_are_of_the_profiles_caps(gpu_check):
    """A GPU run compares nothing if the caps were changed without measuring the reference again."""
    stored = json.loads(gpu_check.REFERENCE.read_text())["profiles"]
    for name, profile in gpu_check.PROFILES.items():
        assert stored[name]["caps"] == profile["caps"], f"{name}: run gpu_check.py --write-reference again"
        bases, methods = profile["caps"]["bases"], profile["caps"]["methods"]
        assert set(stored[name]["test_ppl"]) == {f"{base}/{method}" for base in bases for method in methods}
