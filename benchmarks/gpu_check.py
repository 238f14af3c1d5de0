"""The GPU check: memdec's GPU paths measured on one GPU in at most 8 minutes, prepared in advance.

When a GPU is lent, run this first, one prepared command (docs/scale.md, "GPU check"):

    device run:  command="sh benchmarks/gpu_check.sh"  carry=["benchmarks/gpu_wheels"]  timeout_s=600

    python benchmarks/gpu_check.py                      # on the GPU: writes gpu_check.json and .md into $OUT
    python benchmarks/gpu_check.py --dry-run            # the same steps on the CPU at tiny sizes (the tests run it)
    python benchmarks/gpu_check.py --prepare-wheels     # here, with the network: fill benchmarks/gpu_wheels
    python benchmarks/gpu_check.py --write-reference [--dry-run]   # the CPU fp32 numbers the GPU's are compared with

Steps, each in its own process under its own budget (a step past it is killed and reported as
skipped; the whole run keeps within --budget seconds): install the missing packages from the
wheels folder; the GPU-only checks (CUDA RNG state through a checkpoint, --dtype auto's choice);
faiss against exact search and faiss-gpu against faiss on a Flat store; `compare` on the finance
pack with every method in fp32 and under --dtype auto (bf16 on a GPU), each test perplexity held
against gpu_check_reference.json; and the stages timed in tokens/s with their peak GPU memory.
"""

from __future__ import annotations

import argparse
import datetime
import json
import lzma
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
REFERENCE = HERE / "gpu_check_reference.json"
WHEELS = HERE / "gpu_wheels"
SCHEMA = "memdec-gpu-check/1"
TREE_LIMIT = 64 * 2**20  # what travels to the device machine: the tree and the carried folder together
# The wheels the device lacks (its image has numpy, scipy, torch, transformers, peft, accelerate ...):
# faiss-cpu's is packed as .tar.xz (19 MB as a wheel, 9 MB in xz) so that it fits beside the tree.
WHEEL_PINS = {"faiss": "faiss-cpu==1.15.1", "bm25s": "bm25s==0.3.16"}
FAISS_GPU_WHY = ("no faiss GPU wheel fits the 64 MiB that travel: faiss-gpu-cu12 1.14.1 is 48 MB and needs the CUDA "
                 "12 runtime and cuBLAS wheels (hundreds of MB; this torch is CUDA 13), faiss-gpu 1.15.1 is 135 MB, "
                 "and there is no faiss-gpu-cu13 on PyPI (2026-12-07)")
TOLERANCE = {"fp32": 1e-3, "auto": 2e-2}  # relative, against the CPU fp32 reference

# What each profile runs. "caps" must equal the reference's for a comparison to be made.
PROFILES = {
    "gpu": {
        "caps": {"domain": "finance", "bases": ["memdec-demo-s", "memdec-demo-m", "memdec-demo-l"],
                 "methods": ["base", "dapt", "lora", "knn-lm", "rag", "memdec"], "context": 512,
                 "max_train_tokens": 8192, "max_eval_tokens": 1024, "general_tokens": 256,
                 # 4 windows a step: -l's share of the memory's FLOPs (2,633 tokens) holds one step of DAPT and LoRA
                 "component_settings": {"memdec": {"teacher": "memdec-demo-l", "init": "memdec-demo-s"},
                                        "dapt": {"batch_size": 4}, "lora": {"batch_size": 4}}},
        "measure": {"latency_tokens": 128, "generation_tokens": 8, "latency_seconds": 0.0},
        "stages": {"teacher": "memdec-demo-l", "init": "memdec-demo-s", "train_tokens": 32768, "eval_tokens": 0,
                   "context": 512, "max_steps": 40, "prompts": 8, "new_tokens": 64, "store_keys": 8192},
        "budgets": {"install": 60, "checks": 30, "faiss": 40, "compare-fp32": 150, "compare-auto": 150,
                    "stages": 80},
        "budget": 480,
    },
    "dry-run": {
        "caps": {"domain": "finance", "bases": ["memdec-demo-s"],
                 "methods": ["base", "dapt", "lora", "knn-lm", "rag", "memdec"], "context": 64,
                 "max_train_tokens": 512, "max_eval_tokens": 192, "general_tokens": 64,
                 "component_settings": {"memdec": {"teacher": "memdec-demo-s", "init": "memdec-demo-s",
                                                   "max_steps": 2},
                                        "rag": {"passage_tokens": 16}, "knn-lm": {"k": 64}}},
        "measure": {"latency_tokens": 16, "generation_tokens": 0, "latency_seconds": 0.0},
        "stages": {"teacher": "memdec-demo-s", "init": "memdec-demo-s", "train_tokens": 512, "eval_tokens": 128,
                   "context": 64, "max_steps": 2, "prompts": 2, "new_tokens": 4, "store_keys": 512},
        # a CPU shared with others: budgets wide enough for a loaded machine (the mechanism is what is tested)
        "budgets": {"install": 60, "checks": 120, "faiss": 120, "compare-fp32": 300, "compare-auto": 300,
                    "stages": 300},
        "budget": 1200,
    },
}
STEPS = ["install", "checks", "faiss", "compare-fp32", "compare-auto", "stages"]
STAGES = ["forward", "datastore", "targets", "train", "generate"]


# ---------------------------------------------------------------- the driver


def main(argv=None) -> int:
    args = parse_args(argv)
    profile_name = "dry-run" if args.dry_run else "gpu"
    if args.prepare_wheels:
        return prepare_wheels()
    if args.step:
        return run_child(args.step, json.loads(Path(args.plan).read_text()), Path(args.result))
    if args.write_reference:
        return write_reference(profile_name)
    out = Path(args.out or os.environ.get("OUT") or Path.cwd())
    report = run_check(profile_name, out, args.budget, parse_budgets(args.step_budget))
    problems = schema_problems(report)
    if problems:
        print("gpu_check: the report breaks its schema: " + "; ".join(problems), file=sys.stderr)
        return 2
    print(f"gpu_check: {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    return 0


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="the same steps on the CPU at tiny sizes")
    parser.add_argument("--out", help="folder for gpu_check.json and gpu_check.md [default: $OUT, else here]")
    parser.add_argument("--budget", type=float, help="seconds for the whole run [default: the profile's, 480]")
    parser.add_argument("--step-budget", action="append", default=[], metavar="STEP=SECONDS",
                        help=f"another budget for one step ({', '.join(STEPS)}); 0 skips it")
    parser.add_argument("--prepare-wheels", action="store_true", help="download the wheels (needs the network)")
    parser.add_argument("--write-reference", action="store_true", help="measure the CPU fp32 reference")
    parser.add_argument("--step", help=argparse.SUPPRESS)  # a child process: one step
    parser.add_argument("--plan", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def parse_budgets(items: list[str]) -> dict[str, float]:
    budgets = {}
    for item in items:
        name, _, seconds = item.partition("=")
        if name not in STEPS or not seconds:
            raise SystemExit(f"--step-budget {item!r}: give STEP=SECONDS, STEP one of {', '.join(STEPS)}")
        budgets[name] = float(seconds)
    return budgets


def run_check(profile_name: str, out: Path, budget: float | None, overrides: dict[str, float]) -> dict:
    """Every step in order, each under min(its budget, what is left of the run's); the report written."""
    profile = PROFILES[profile_name]
    budget = budget if budget is not None else profile["budget"]
    started, clock = datetime.datetime.now(datetime.timezone.utc), time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="memdec-gpu-check-"))
    plan = {"profile": profile_name, "work": str(work), "site": str(work / "site"),
            "device": "cpu" if profile_name == "dry-run" else "cuda"}
    report = {"schema": SCHEMA, "profile": profile_name, "dry_run": profile_name == "dry-run",
              "started": started.isoformat(timespec="seconds"), "budget_s": budget, "command": sys.argv,
              "commit": git_commit(), "caps": profile["caps"], "environment": {}, "install": {}, "steps": [],
              "comparisons": [], "timings": [], "checks": []}
    for name in STEPS:
        step_budget = overrides.get(name, profile["budgets"][name])
        left = budget - (time.monotonic() - clock)
        report["steps"].append(run_step(name, plan, step_budget, left, report))
    report["seconds"] = round(time.monotonic() - clock, 1)
    report["comparisons"] = compare_with_reference(report, profile_name)
    write_report(report, out)
    keep_logs(work, out)
    return report


def keep_logs(work: Path, out: Path) -> None:
    """The end of each step's log in one file beside the report, and the work folder removed."""
    parts = []
    for name in STEPS:
        log = work / f"{name}.log"
        if log.exists():
            parts += [f"==== {name}", *log.read_text(errors="replace").splitlines()[-200:]]
    (out / "gpu_check.log").write_text("\n".join(parts) + "\n")
    shutil.rmtree(work, ignore_errors=True)


def run_step(name: str, plan: dict, step_budget: float, left: float, report: dict) -> dict:
    entry = {"name": name, "budget_s": step_budget, "status": "skipped", "reason": "", "seconds": 0.0}
    if step_budget <= 0:
        entry["reason"] = "its budget is 0 s"
        return entry
    if left < 5:
        entry["reason"] = f"the run's budget was spent ({left:.0f} s left)"
        return entry
    timeout = min(step_budget, left)
    clock = time.monotonic()
    if name == "install":
        result, status, reason = install(plan, timeout)
    else:
        result, status, reason = run_in_child(name, plan, timeout)
    entry.update(status=status, reason=reason, seconds=round(time.monotonic() - clock, 1))
    merge_result(name, result, report, entry)
    print(f"gpu_check: {name}: {status} {reason} ({entry['seconds']} s)", file=sys.stderr, flush=True)
    return entry


def merge_result(name: str, result: dict, report: dict, entry: dict) -> None:
    """A step's findings go to their section of the report; a step killed midway keeps what it finished."""
    if not result:
        return
    report["environment"].update(result.get("environment", {}))
    report["checks"].extend(result.get("checks", []))
    report["timings"].extend(result.get("timings", []))
    if name == "install":
        report["install"] = result["install"]
    if name.startswith("compare-"):
        entry["rows"] = result.get("rows", [])
        entry["precision"] = result.get("precision")
        entry["peak_gpu_mib"] = result.get("peak_gpu_mib")
    if name == "stages" and entry["status"] == "skipped":  # the stages it did not reach
        done = {timing["stage"] for timing in result.get("timings", [])}
        report["timings"].extend({"stage": stage, "status": "skipped", "reason": "past the step's budget"}
                                 for stage in STAGES if stage not in done)


def run_in_child(name: str, plan: dict, timeout: float) -> tuple[dict, str, str]:
    """One step in its own process (its own session, so a timeout kills everything it started)."""
    result_file = Path(plan["work"]) / f"{name}.json"
    plan_file = Path(plan["work"]) / "plan.json"
    plan_file.write_text(json.dumps(plan))
    env = child_env(plan)
    command = [sys.executable, str(Path(__file__).resolve()), "--step", name, "--plan", str(plan_file),
               "--result", str(result_file)]
    log_file = Path(plan["work"]) / f"{name}.log"
    with open(log_file, "w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return read_json(result_file), "skipped", f"past its budget of {round(timeout, 1):g} s"
    result = read_json(result_file)
    if code != 0:
        return result, "error", last_line(log_file)
    return result, result.get("status", "ok"), result.get("reason", "")


def child_env(plan: dict) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", MEMDEC_NO_PROGRESS="1", HF_HUB_OFFLINE="1")
    paths = [plan["site"], str(ROOT), str(ROOT / "plugins"), str(ROOT / "cli"), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(path for path in paths if path)
    return env


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None  # the device machine's copy of the tree has no .git


# ---------------------------------------------------------------- install


def install(plan: dict, timeout: float) -> tuple[dict, str, str]:
    """Each missing package from the wheels folder into plan['site'] (a dry run asks pip only what it
    would do); faiss-gpu when a GPU wheel is there, else faiss-cpu and the reason."""
    deadline = time.monotonic() + timeout
    packages = {}
    for module, pin in WHEEL_PINS.items():
        packages[pin.split("==")[0]] = install_one(module, pin, plan, deadline)
    packages["faiss-gpu"] = faiss_gpu_status()
    packages["memdec"] = register_memdec(plan, deadline)
    failed = [name for name, entry in packages.items() if entry["status"] == "not installed"]
    return {"install": {"wheels": str(WHEELS.relative_to(ROOT)), "site": plan["site"], "packages": packages}}, \
        "ok", ("not installed: " + ", ".join(failed)) if failed else ""


def install_one(module: str, pin: str, plan: dict, deadline: float) -> dict:
    present = module_version(module)
    if present:
        return {"status": "present", "detail": present}
    wheel = find_wheel(pin.split("==")[0], Path(plan["work"]) / "wheels")
    if wheel is None:
        return {"status": "not installed", "detail": f"no wheel of {pin} in {WHEELS.relative_to(ROOT)}"}
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--target", plan["site"], str(wheel)]
    if plan["profile"] == "dry-run":
        command[4:4] = ["--dry-run"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return {"status": "not installed", "detail": "pip ran past the step's budget"}
    if done.returncode:
        return {"status": "not installed", "detail": error_line(done.stderr)}
    return {"status": "installed" if plan["profile"] != "dry-run" else "would install", "detail": wheel.name}


def register_memdec(plan: dict, deadline: float) -> dict:
    """memdec's plugins are found through its entry points, so the tree must be installed: editable,
    offline (the device has setuptools and wheel); where pip cannot, the tree's entry points are
    declared in a dist-info folder on the children's path (what the editable install would add)."""
    probe = "from importlib import metadata; print(' '.join(e.name for e in metadata.entry_points(group='memdec')))"
    found = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=child_env(plan)).stdout
    if "knn" in found.split():
        return {"status": "present", "detail": f"plugins {found.strip()}"}
    if plan["profile"] == "dry-run":
        return {"status": "not installed", "detail": "the dry run installs nothing into this environment"}
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-build-isolation", "-e",
               str(ROOT)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=max(1.0, deadline - time.monotonic()))
        if done.returncode == 0:
            return {"status": "installed", "detail": "pip install --no-index --no-deps --no-build-isolation -e ."}
        why = error_line(done.stderr)
    except subprocess.TimeoutExpired:
        why = "pip ran past the step's budget"
    declare_entry_points(Path(plan["site"]))
    return {"status": "declared", "detail": f"pip -e failed ({why}); the tree's entry points declared in "
                                            f"{plan['site']}"}


def declare_entry_points(site: Path) -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    info = site / f"memdec-{project['version']}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: memdec\nVersion: {project['version']}\n")
    groups = [f"[{group}]\n" + "".join(f"{name} = {target}\n" for name, target in entries.items())
              for group, entries in project["entry-points"].items()]
    (info / "entry_points.txt").write_text("\n".join(groups))


def error_line(stderr: str) -> str:
    """pip's own error line (its last lines are hints)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.lower().startswith("error")]
    return (errors or lines or ["pip failed"])[-1][:300]


def module_version(module: str) -> str | None:
    code = f"import {module}; print(getattr({module}, '__version__', 'unknown'))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return done.stdout.strip() or None if done.returncode == 0 else None


def find_wheel(name: str, unpack_to: Path) -> Path | None:
    """The wheel of ``name`` in the wheels folder; one kept as .whl.tar.xz is zipped back first (the
    same files and RECORD, so pip installs what was downloaded)."""
    stem = name.replace("-", "_")
    for path in sorted(WHEELS.glob(f"{stem}-*.whl")):
        return path
    for path in sorted(WHEELS.glob(f"{stem}-*.whl.tar.xz")):
        return restore_wheel(path, unpack_to)
    return None


def restore_wheel(packed: Path, folder: Path) -> Path:
    files = folder / packed.name.removesuffix(".tar.xz")
    folder.mkdir(parents=True, exist_ok=True)
    with lzma.open(packed) as stream, tarfile.open(fileobj=stream) as tar, \
            zipfile.ZipFile(files, "w", zipfile.ZIP_STORED) as wheel:
        for member in tar:
            if member.isfile():
                wheel.writestr(member.name.removeprefix("./"), tar.extractfile(member).read())
    return files


def faiss_gpu_status() -> dict:
    if find_wheel("faiss-gpu", WHEELS) or list(WHEELS.glob("faiss_gpu_cu*.whl")):
        return {"status": "not installed", "detail": "a faiss-gpu wheel is in the folder but not installed by "
                                                     "this script (it needs its CUDA runtime wheels too)"}
    return {"status": "not installed", "detail": FAISS_GPU_WHY}


def prepare_wheels() -> int:
    """Download the wheels for the device (Python 3.12, x86-64 Linux) and check the size that travels."""
    WHEELS.mkdir(exist_ok=True)
    platforms = [arg for tag in ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_27_x86_64",
                                 "manylinux_2_28_x86_64") for arg in ("--platform", tag)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
                    "3.12", "--implementation", "cp", *platforms, "-d", str(WHEELS), *WHEEL_PINS.values()], check=True)
    for wheel in WHEELS.glob("faiss_cpu-*.whl"):
        pack_wheel(wheel)
    size = tree_bytes() + sum(path.stat().st_size for path in WHEELS.iterdir())
    print(f"the tree with {WHEELS.relative_to(ROOT)}: {size / 2**20:.1f} MiB of {TREE_LIMIT / 2**20:.0f} MiB")
    return 0 if size <= TREE_LIMIT else 1


def pack_wheel(wheel: Path) -> None:
    """The wheel's files in one .tar.xz (xz -9 over the whole, not zip's file by file), the wheel removed."""
    packed = wheel.with_name(wheel.name + ".tar.xz")
    with zipfile.ZipFile(wheel) as source, lzma.open(packed, "w", preset=9 | lzma.PRESET_EXTREME) as stream, \
            tarfile.open(fileobj=stream, mode="w") as tar:
        for info in source.infolist():
            if info.is_dir():
                continue
            data = source.read(info)
            member = tarfile.TarInfo(info.filename)
            member.size = len(data)
            tar.addfile(member, fileobj=__import__("io").BytesIO(data))
    wheel.unlink()


def tree_bytes() -> int:
    """The bytes of what travels without the carried folder: tracked and untracked-not-ignored files."""
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, check=True).stdout.split(b"\0")
    return sum((ROOT / name.decode()).stat().st_size for name in listed if name and (ROOT / name.decode()).is_file())


# ---------------------------------------------------------------- comparing with the reference


def compare_with_reference(report: dict, profile_name: str) -> list[dict]:
    reference = read_json(REFERENCE).get("profiles", {}).get(profile_name)
    comparisons = []
    for step in report["steps"]:
        if not step["name"].startswith("compare-"):
            continue
        dtype = step["name"].removeprefix("compare-")
        comparisons.append(compare_rows(dtype, step, reference, report["caps"]))
    return comparisons


def compare_rows(dtype: str, step: dict, reference: dict | None, caps: dict) -> dict:
    entry = {"name": dtype, "precision": step.get("precision"), "tolerance": TOLERANCE[dtype], "rows": []}
    if reference is None:
        return {**entry, "status": "refused", "reason": f"no reference for this profile in {REFERENCE.name}"}
    if reference["caps"] != caps:
        return {**entry, "status": "refused", "reason": f"the caps differ from {REFERENCE.name}'s: measure it again "
                                                        f"with --write-reference"}
    if not step.get("rows"):
        return {**entry, "status": "not run", "reason": f"the step was {step['status']}: {step['reason']}"}
    for row in step["rows"]:
        expected = reference["test_ppl"].get(f"{row['base']}/{row['method']}")
        relative = abs(row["test_ppl"] - expected) / expected if expected else None
        entry["rows"].append({"base": row["base"], "method": row["method"], "reference": expected,
                              "measured": row["test_ppl"], "relative": relative,
                              "ok": relative is not None and relative <= TOLERANCE[dtype]})
    missing = len(reference["test_ppl"]) - len(entry["rows"])
    status = "pass" if all(row["ok"] for row in entry["rows"]) and not missing else "fail"
    reason = f"{missing} row(s) not measured" if missing > 0 else ""
    return {**entry, "status": status, "reason": reason}


def write_reference(profile_name: str) -> int:
    """The CPU fp32 test perplexities of this profile's compare, with the command and the commit."""
    work = Path(tempfile.mkdtemp(prefix="memdec-gpu-reference-"))
    plan = {"profile": profile_name, "work": str(work), "site": str(work / "site"), "device": "cpu"}
    result, status, reason = run_in_child("compare-fp32", plan, 3600)
    shutil.rmtree(work, ignore_errors=True)
    if status != "ok":
        print(f"gpu_check: the reference run was {status}: {reason}", file=sys.stderr)
        return 1
    stored = read_json(REFERENCE) or {"about": "CPU fp32 test perplexities gpu_check.py compares the GPU's with",
                                      "profiles": {}}
    stored["profiles"][profile_name] = {
        "caps": PROFILES[profile_name]["caps"], "command": " ".join(["python", *sys.argv]), "commit": git_commit(),
        "date": datetime.date.today().isoformat(), "device": result["environment"].get("device_name"),
        "test_ppl": {f"{row['base']}/{row['method']}": row["test_ppl"] for row in result["rows"]}}
    temporary = REFERENCE.with_suffix(".tmp")
    temporary.write_text(json.dumps(stored, indent=1) + "\n")
    temporary.replace(REFERENCE)
    print(f"gpu_check: {REFERENCE}")
    return 0


# ---------------------------------------------------------------- the report


def write_report(report: dict, out: Path) -> None:
    for name, text in (("gpu_check.json", json.dumps(report, indent=1) + "\n"), ("gpu_check.md", markdown(report))):
        temporary = out / (name + ".tmp")
        temporary.write_text(text)
        temporary.replace(out / name)


def markdown(report: dict) -> str:
    environment = report["environment"]
    lines = [f"# memdec GPU check ({report['profile']})", "",
             f"{report['started']}, {environment.get('device_name', '?')}, torch {environment.get('torch', '?')}, "
             f"{report['seconds']} s of {report['budget_s']:.0f}", "", "| step | status | seconds | budget | note |",
             "|---|---|---|---|---|"]
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']} | {s['budget_s']:.0f} | {s['reason']} |"
              for s in report["steps"]]
    lines += ["", "| package | status | detail |", "|---|---|---|"]
    lines += [f"| {name} | {entry['status']} | {entry['detail']} |"
              for name, entry in report["install"].get("packages", {}).items()]
    for comparison in report["comparisons"]:
        lines += ["", f"**{comparison['name']}** (precision {comparison['precision']}, tolerance "
                      f"{comparison['tolerance']:g} relative): {comparison['status']} {comparison['reason']}", "",
                  "| base | method | CPU fp32 | here | relative |", "|---|---|---|---|---|"]
        lines += [f"| {r['base']} | {r['method']} | {r['reference']:.4f} | {r['measured']:.4f} | "
                  f"{r['relative']:.2e} |" if r["reference"] else f"| {r['base']} | {r['method']} | - | "
                  f"{r['measured']:.4f} | - |" for r in comparison["rows"]]
    lines += ["", "| stage | tokens | seconds | tokens/s | peak GPU MiB | note |", "|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(str(t.get(key) if t.get(key) is not None else "-") for key in
                                ("stage", "tokens", "seconds", "tokens_per_s", "peak_gpu_mib"))
              + f" | {t.get('reason', t.get('what', ''))} |" for t in report["timings"]]
    lines += ["", "| check | status | detail |", "|---|---|---|"]
    lines += [f"| {c['name']} | {c['status']} | {c['detail']} |" for c in report["checks"]]
    return "\n".join(lines) + "\n"


REQUIRED = {"schema": str, "profile": str, "dry_run": bool, "started": str, "budget_s": (int, float),
            "seconds": (int, float), "caps": dict, "environment": dict, "install": dict, "steps": list,
            "comparisons": list, "timings": list, "checks": list}
STEP_KEYS = {"name", "status", "reason", "seconds", "budget_s"}
STATUSES = {"ok", "fail", "error", "skipped"}


def schema_problems(report: dict) -> list[str]:
    """What in ``report`` breaks the schema (empty: nothing); the dry run and the tests check it."""
    problems = [f"{key} is not {kind}" for key, kind in REQUIRED.items() if not isinstance(report.get(key), kind)]
    if problems:
        return problems
    if report["schema"] != SCHEMA:
        problems.append(f"schema {report['schema']!r}")
    if [step.get("name") for step in report["steps"]] != STEPS:
        problems.append("the steps are not " + ", ".join(STEPS))
    problems += [f"step {s.get('name')} lacks {sorted(STEP_KEYS - set(s))}" for s in report["steps"]
                 if not STEP_KEYS <= set(s)]
    problems += [f"step {s['name']} has status {s['status']!r}" for s in report["steps"] if s["status"] not in STATUSES]
    problems += [f"step {s['name']} was skipped without a reason" for s in report["steps"]
                 if s["status"] == "skipped" and not s["reason"]]
    problems += [f"timing {t} lacks stage or status" for t in report["timings"] if not {"stage", "status"} <= set(t)]
    problems += [f"check {c} lacks name, status or detail" for c in report["checks"]
                 if not {"name", "status", "detail"} <= set(c)]
    return problems


# ---------------------------------------------------------------- the steps, in a child process


def run_child(name: str, plan: dict, result_file: Path) -> int:
    """One step; its result file is rewritten after each part, so a step killed midway keeps them."""
    os.environ["MEMDEC_DEVICE"] = plan["device"]
    os.environ["MEMDEC_CACHE"] = str(Path(plan["work"]) / f"cache-{cache_name(name, plan)}")
    result = {"status": "ok", "reason": "", "environment": environment(), "checks": [], "timings": []}

    def save():
        temporary = result_file.with_suffix(".tmp")
        temporary.write_text(json.dumps(result))
        temporary.replace(result_file)

    save()
    profile = PROFILES[plan["profile"]]
    {"checks": step_checks, "faiss": step_faiss, "compare-fp32": step_compare, "compare-auto": step_compare,
     "stages": step_stages}[name](name, profile, plan, result, save)
    failed = [check["name"] for check in result["checks"] if check["status"] == "fail"]
    if failed:
        result.update(status="fail", reason=f"{result['reason']} failed: {', '.join(failed)}".strip())
    save()
    return 0


def cache_name(step: str, plan: dict) -> str:
    """Each step its own cache, except in the dry run, where --dtype auto is fp32 (a CPU) and
    compare-auto reads back compare-fp32's rows from their shared cache instead of measuring again."""
    return "compare" if plan["profile"] == "dry-run" and step.startswith("compare-") else step


def environment() -> dict:
    import torch

    facts = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
             "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        facts.update(device_name=torch.cuda.get_device_name(0), capability=".".join(
            map(str, torch.cuda.get_device_capability(0))), bf16=torch.cuda.is_bf16_supported())
    else:
        facts.update(device_name=f"cpu ({os.cpu_count()} cores)", bf16=False)
    try:
        import faiss

        facts.update(faiss=faiss.__version__, faiss_gpus=faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus")
                     else 0)
    except ImportError as error:
        facts.update(faiss=f"not importable: {error}", faiss_gpus=0)
    return facts


def peak_reset() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_mib() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


def check(result: dict, name: str, ok: bool | None, detail: str) -> None:
    result["checks"].append({"name": name, "status": "skipped" if ok is None else "pass" if ok else "fail",
                             "detail": detail})


def step_checks(name, profile, plan, result, save) -> None:
    """What a CPU cannot check: the CUDA generators through a checkpoint, and --dtype auto's choice."""
    import torch

    from memdec_core.engine.training import load_rng_states, save_rng_states, set_rng_states
    from memdec_core.inputs.models import compute_dtype

    os.environ["MEMDEC_DTYPE"] = "auto"
    expected = "bf16" if plan["device"].startswith("cuda") and torch.cuda.is_bf16_supported() else "fp32"
    chosen = compute_dtype()
    check(result, "dtype-auto", chosen == expected, f"--dtype auto chose {chosen} on {plan['device']} "
                                                    f"(expected {expected})")
    save()
    path = Path(plan["work"]) / "rng.safetensors"
    torch.manual_seed(1234)
    save_rng_states(path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    first = torch.rand(4, device=device)
    torch.manual_seed(99)  # moved on, as a run is before it resumes
    states = load_rng_states(path)
    set_rng_states(states)
    again = torch.rand(4, device=device)
    saved = sorted(states)
    if not torch.cuda.is_available():
        check(result, "rng-checkpoint-cuda", None, f"no CUDA here; the checkpoint kept {saved}")
    else:
        check(result, "rng-checkpoint-cuda", "cuda:0" in states and torch.equal(first, again),
              f"the checkpoint kept {saved}; the CUDA draws after restoring are "
              f"{'the same' if torch.equal(first, again) else 'different'}")
    save()


def step_faiss(name, profile, plan, result, save) -> None:
    """A datastore built on this device with an exact Flat index: the faiss retriever's neighbours
    against exact search, and faiss-gpu's against faiss's where faiss sees a GPU."""
    import faiss
    import numpy as np

    from memdec_core.components import registry

    stages = profile["stages"]
    folder = Path(plan["work"]) / "store"
    run_cli(["datastore", "build", "--domain", profile["caps"]["domain"], "--base", stages["teacher"],
             "--max-train-tokens", str(stages["store_keys"]), "--context", str(stages["context"]),
             "--set", "faiss.factory=Flat", "--output", str(folder)])
    keys = np.load(folder / "keys.npy", mmap_mode="r")
    queries = np.asarray(keys[:: max(1, len(keys) // 256)][:256], dtype=np.float32)
    retrievers = registry.components("retrievers")
    cpu = retrievers["faiss"](factory="Flat")
    cpu.build(keys, Path(tempfile.mkdtemp(dir=plan["work"])))
    _, found = cpu.search(queries, 8)
    exact = exact_neighbours(np.asarray(keys, dtype=np.float32), queries, 8)
    agree = float(np.mean([len(set(a) & set(b)) / 8 for a, b in zip(found, exact)]))
    check(result, "faiss-flat-exact", agree == 1.0, f"{len(queries)} queries, k=8 over {len(keys)} keys: "
                                                    f"{agree:.4f} of faiss's neighbours are the exact ones")
    save()
    if not faiss.get_num_gpus():
        check(result, "faiss-gpu-flat", None, "faiss sees no GPU (faiss.get_num_gpus() == 0)")
        return
    gpu = retrievers["faiss-gpu"](factory="Flat")
    gpu.build(keys, Path(tempfile.mkdtemp(dir=plan["work"])))
    _, on_gpu = gpu.search(queries, 8)
    same = float(np.mean(on_gpu == found))
    check(result, "faiss-gpu-flat", same == 1.0, f"{same:.4f} of faiss-gpu's neighbours are faiss's, in order")


def exact_neighbours(keys, queries, k):
    import numpy as np

    distances = (queries**2).sum(1)[:, None] - 2 * queries @ keys.T + (keys**2).sum(1)[None, :]
    return np.argsort(distances, axis=1, kind="stable")[:, :k]


def run_cli(arguments: list[str]) -> str:
    """A memdec command as a user types it, in this process; returns what it printed."""
    import contextlib
    import io

    from memdec_cli.main import build_cli

    printed, errors = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(errors):
        code = build_cli().main(["--device", os.environ["MEMDEC_DEVICE"], *arguments], standalone_mode=False)
    sys.stderr.write(errors.getvalue())
    if isinstance(code, int) and code:
        said = (errors.getvalue().strip().splitlines() or ["no message"])[-1]
        raise SystemExit(f"memdec {' '.join(arguments[:2])} exited with {code}: {said}")
    return printed.getvalue()


def step_compare(name, profile, plan, result, save) -> None:
    """`compare` on every base × method, one base at a time (the memory's teacher and init fixed, so
    this is the family's run), in fp32 or under --dtype auto."""
    from memdec_core import api
    from memdec_core.errors import MemdecError
    from memdec_core.interfaces import EvalSettings
    from memdec_core.runs.compare import CompareSettings

    os.environ["MEMDEC_DTYPE"] = name.removeprefix("compare-")
    caps = profile["caps"]
    settings = EvalSettings(context=caps["context"], max_train_tokens=caps["max_train_tokens"],
                            max_eval_tokens=caps["max_eval_tokens"])
    measure = CompareSettings(general_tokens=caps["general_tokens"], **profile["measure"])
    result["rows"] = []
    peak_reset()
    for base in caps["bases"]:
        try:
            report = api.compare(caps["domain"], bases=[base], methods=caps["methods"], settings=settings,
                                 component_settings=caps["component_settings"], measure=measure)
        except MemdecError as error:  # one line, and the other bases are still measured
            result.update(status="fail", reason=f"{result['reason']} {base}: {error}".strip())
            save()
            continue
        result["precision"] = report["meta"]["precision"]
        result["rows"] += [{"base": row["base"], "method": row["method"], "test_ppl": row["test_ppl"],
                            "seconds": row["seconds"]} for row in report["results"]]
        result["peak_gpu_mib"] = peak_mib()
        save()


def step_stages(name, profile, plan, result, save) -> None:
    """The stages a user runs, timed: forward (scoring), datastore build, kNN targets, memory
    training and generation with the memory, each with its peak GPU memory."""
    stages = profile["stages"]
    os.environ["MEMDEC_DTYPE"] = "auto"
    common = ["--domain", profile["caps"]["domain"], "--max-train-tokens", str(stages["train_tokens"]),
              "--max-eval-tokens", str(stages["eval_tokens"]), "--context", str(stages["context"])]
    memory = Path(plan["work"]) / "memory"
    for stage in STAGES:
        peak_reset()
        clock = time.monotonic()
        facts = STAGE_RUNNERS[stage](stages, common, memory, result)
        seconds = facts.pop("seconds", None) or time.monotonic() - clock
        tokens = facts.pop("tokens")
        result["timings"].append({"stage": stage, "status": "ok", "tokens": tokens, "seconds": round(seconds, 3),
                                  "tokens_per_s": round(tokens / seconds, 1), "peak_gpu_mib": peak_mib(), **facts})
        save()


def stage_forward(stages, common, memory, result) -> dict:
    from memdec_core import api
    from memdec_core.interfaces import EvalSettings

    settings = EvalSettings(context=stages["context"], max_eval_tokens=stages["eval_tokens"])
    report = api.evaluate(common[1], bases=[stages["teacher"]], methods=["base"], settings=settings)
    row = report["results"][0]
    return {"tokens": row["test_tokens"], "seconds": row["seconds"],
            "what": "`api.evaluate`'s base row: the test split scored (its seconds, to 0.01 s)"}


def stage_datastore(stages, common, memory, result) -> dict:
    import numpy as np

    folder = run_cli(["datastore", "build", "--base", stages["teacher"], *common]).strip().splitlines()[-1]
    return {"tokens": int(np.load(Path(folder) / "keys.npy", mmap_mode="r").shape[0]),
            "what": "`memdec datastore build`, model loading included"}


def stage_targets(stages, common, memory, result) -> dict:
    folder = run_cli(["targets", "build", "--teacher", stages["teacher"], *common]).strip().splitlines()[-1]
    manifest = json.loads((Path(folder) / "memdec.json").read_text())
    return {"tokens": int(manifest["size"]), "what": "`memdec targets build` over the cached datastore"}


def stage_train(stages, common, memory, result) -> dict:
    run_cli(["train", "--teacher", stages["teacher"], "--init", stages["init"], "--max-steps", str(stages["max_steps"]),
             "--output", str(memory), *common])
    manifest = json.loads((memory / "memdec.json").read_text())
    return {"tokens": manifest["train_tokens"], "seconds": manifest["train_seconds"],
            "what": f"`memdec train`, {manifest['train_steps']} steps (the training loop's own clock)"}


def stage_generate(stages, common, memory, result) -> dict:
    """Greedy generation with the trained memory beside the base; the memory's weights and the
    base's must sit on the same device (the composite a user builds with api.composite_model)."""
    from memdec_core import api
    from memdec_core.inputs.models import load_model

    base = load_model(stages["teacher"])
    composite = api.composite_model(base, str(memory), domain=common[1])
    devices = sorted({str(p.device) for module in modules_of(composite.memory) for p in module.parameters()}
                     | {str(p.device) for p in composite.base_lm.parameters()})
    check(result, "memory-base-same-device", len(devices) == 1 and devices[0].startswith(os.environ["MEMDEC_DEVICE"]),
          f"the base's and the memory's weights are on {', '.join(devices)}")
    prompts = ["The central bank said"] * stages["prompts"]
    clock = time.monotonic()
    texts = api.generate(base, prompts, memory=str(memory), domain=common[1], max_new_tokens=stages["new_tokens"])
    seconds = time.monotonic() - clock
    tokens = sum(len(base.tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts)
    return {"tokens": tokens, "seconds": seconds, "what": f"api.generate, {len(prompts)} prompts in one batch, "
                                                          f"greedy, new tokens counted again by the tokenizer"}


def modules_of(memory) -> list:
    """The torch modules a memory component holds (one level down: its loaded model)."""
    import torch

    found = []
    for value in vars(memory).values():
        if isinstance(value, torch.nn.Module):
            found.append(value)
        elif hasattr(value, "__dict__"):
            found += [inner for inner in vars(value).values() if isinstance(inner, torch.nn.Module)]
    return found


STAGE_RUNNERS = {"forward": stage_forward, "datastore": stage_datastore, "targets": stage_targets,
                 "train": stage_train, "generate": stage_generate}

if __name__ == "__main__":
    sys.exit(main())
