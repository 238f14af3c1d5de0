"""``memdec cache ls|du|rm`` on a cache built by hand: statuses, sizes, selection, safety, light imports."""

import datetime as dt
import json
import os
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from memdec_cli.main import build_cli
from memdec_core import __version__
from memdec_core.store import cache as cache_lib
from memdec_core.store.artifacts import FORMAT_VERSION
from memdec_decoder.memory import ARTIFACT_TYPE as MEMORY_TYPE
from memdec_knn.datastore import ARTIFACT_TYPE as DATASTORE_TYPE
from memdec_knn.datastore import INDEX_TYPE

DATASTORE, MEMORY, LORA = "3f2a9c41d0e5b7a8c9d1", "7b1e0c2d3f4a5b6c7d8e", "9c8d7e6f5a4b3c2d1e0f"
RESULT = "5e4d3c2b1a0f9e8d7c6b"
CORRUPT, DAPT, FINGERPRINT = "1a2b3c4d5e6f7a8b9c0d", "2b3c4d5e6f7a8b9c0d1e", "c0ffee" * 5 + "00"
MODEL = "smollm2-135m-q8_0-0123456789abcdef"


def dead_pid() -> int:
    """A pid no process has (the kernel's pid_max is at most 4194304)."""
    for pid in (4194304 + 1, 999_999_999):
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, OverflowError):
            return pid
        except PermissionError:
            continue
    pytest.skip("found no unused pid", allow_module_level=True)  # called at import: skips the module


DEAD = dead_pid()
STALE_TMP = f".{DATASTORE}x.tmp-{DEAD}-abcd1234"
LIVE_TMP = f".{MEMORY}x.tmp-{os.getpid()}-abcd1234"
PARTIAL = f".{LORA}x.partial"


def iso(days_ago: float) -> str:
    moment = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=days_ago)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def set_age(path: Path, days_ago: float) -> None:
    stamp = time.time() - days_ago * 86400
    for item in [*path.rglob("*"), path] if path.is_dir() else [path]:
        os.utime(item, (stamp, stamp))


class FakeCache:
    """Writes entries and remembers how many bytes each one holds."""

    def __init__(self, root: Path):
        self.root, self.sizes = root, {}

    def write(self, kind: str, key: str, relative: str, data) -> Path:
        text = json.dumps(data) if isinstance(data, dict) else data
        path = self.root / kind / key / relative if relative else self.root / kind / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        self.sizes[key] = self.sizes.get(key, 0) + len(text.encode())
        return path

    def folder(self, kind: str, key: str) -> Path:
        path = self.root / kind / key
        path.mkdir(parents=True, exist_ok=True)
        self.sizes.setdefault(key, 0)
        return path


#: A base model named by a long path: its "made by" is cut to the column's width.
LONG_BASE = "/data/checkpoints/" + "x" * 80


def manifest(artifact_type: str, days_ago: float, **fields) -> dict:
    """``memdec.json`` as ``store.artifacts.write_manifest`` writes it, of a type memdec writes
    (the writers' own constants), ``days_ago`` old."""
    return {"type": artifact_type, "format_version": FORMAT_VERSION, "memdec_version": __version__,
            "created": iso(days_ago), "command": "memdec eval --domain finance --method base,knn-lm", **fields}


@pytest.fixture
def cache(tmp_path, monkeypatch) -> FakeCache:
    monkeypatch.setenv("MEMDEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("COLUMNS", "250")  # rich wraps tables at 80 columns otherwise
    fake = FakeCache(tmp_path / "cache")
    fake.write("datastores", DATASTORE, "memdec.json", manifest(DATASTORE_TYPE, 10, base_model="memdec-demo-l"))
    fake.write("datastores", DATASTORE, "keys.npy", "k" * 1500)
    fake.write("datastores", DATASTORE, "indexes/faiss-0a1b2c/memdec.json",
               manifest(INDEX_TYPE, 10, retriever="faiss"))
    fake.write("datastores", DATASTORE, "indexes/faiss-0a1b2c/index.faiss", "i" * 700)
    fake.write("memories", MEMORY, "memdec.json", manifest(MEMORY_TYPE, 3, teacher="memdec-demo-l",
                                                           init="memdec-demo-s"))
    fake.write("memories", MEMORY, "model.safetensors", "m" * 300)
    fake.write("lora", LORA, "memdec.json", manifest("lora", 1 / 24, base_model="memdec-demo-m"))
    fake.write("lora", LORA, "adapter_model.safetensors", "a" * 200)
    fake.write("dapt", DAPT, "memdec.json", manifest("dapt", 2, base_model=LONG_BASE))  # peft: the kind is the type
    fake.write("results", RESULT, "row.json", {"base": "memdec-demo-l", "method": "knn-lm", "test_ppl": 12.5})
    fake.write("models", MODEL, "config.json", {"model_type": "llama"})
    fake.write("models", MODEL, "model.safetensors", "w" * 400)
    fake.write("fingerprints", FINGERPRINT, "", "f" * 64)
    fake.write("targets", CORRUPT, "memdec.json", "{not json")
    fake.write("datastores", STALE_TMP, "keys.npy", "s" * 50)
    fake.write("memories", LIVE_TMP, "model.safetensors", "l" * 30)
    fake.write("lora", PARTIAL, "settings.json", {"lr": 0.001})
    fake.write("lora", PARTIAL, "checkpoint/state.bin", "p" * 80)
    set_age(fake.root / "results" / RESULT, 6)
    set_age(fake.root / "models" / MODEL, 20)
    set_age(fake.root / "fingerprints" / FINGERPRINT, 20)
    set_age(fake.root / "targets" / CORRUPT, 30)
    set_age(fake.root / "datastores" / STALE_TMP, 8)
    set_age(fake.root / "lora" / PARTIAL, 9)
    return fake


def invoke(*args):
    return CliRunner().invoke(build_cli(), list(args))


def listed(*args) -> dict:
    result = invoke("cache", "ls", "--json", *args)
    assert result.exit_code == 0, result.output
    return {row["key"]: row for row in json.loads(result.stdout)}


def one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert result.stdout == ""
    return lines[0]


def test_ls_json_shows_kind_type_size_maker_and_status(cache):
    result = invoke("cache", "ls", "--json")
    rows = json.loads(result.stdout)
    entries = {row["key"]: row for row in rows}
    assert set(entries) == set(cache.sizes)
    assert {key: row["bytes"] for key, row in entries.items()} == cache.sizes
    assert {key: row["status"] for key, row in entries.items()} == {
        DATASTORE: "complete", MEMORY: "complete", LORA: "complete", DAPT: "complete", RESULT: "complete",
        MODEL: "complete", FINGERPRINT: "complete", CORRUPT: "stale", STALE_TMP: "stale",
        LIVE_TMP: "in progress", PARTIAL: "partial"}
    assert entries[DATASTORE]["type"] == DATASTORE_TYPE and entries[DATASTORE]["made_by"] == "memdec-demo-l"
    assert entries[DATASTORE]["kind"] == "datastores" and entries[DATASTORE]["path"].endswith(DATASTORE)
    assert entries[MEMORY]["made_by"] == "memdec-demo-l → memdec-demo-s"
    assert entries[DAPT]["made_by"] == LONG_BASE[:59] + "…"
    assert entries[RESULT]["type"] == "compare-row" and entries[RESULT]["made_by"] == "memdec-demo-l / knn-lm"
    assert entries[MODEL]["type"] == "converted-model" and "smollm2-135m-q8_0" in entries[MODEL]["made_by"]
    assert entries[FINGERPRINT]["type"] == "fingerprint"
    assert entries[STALE_TMP]["pid"] == DEAD and entries[LIVE_TMP]["pid"] == os.getpid()
    manifest_created = json.loads((cache.root / "memories" / MEMORY / "memdec.json").read_text())["created"]
    assert entries[MEMORY]["created"] == manifest_created
    order = [(row["kind"], row["created"]) for row in rows]
    assert order == sorted(order)


def test_ls_table_and_kind_filter(cache):
    result = invoke("cache", "ls")
    assert result.exit_code == 0 and result.stderr == ""
    for text in (DATASTORE, STALE_TMP, LIVE_TMP, PARTIAL, "in progress", "stale", "partial", "complete",
                 f" {DATASTORE_TYPE} ", cache_lib.human_bytes(cache.sizes[DATASTORE]), "memdec-demo-l", "11 entries"):
        assert text in result.stdout, text
    assert set(listed("--kind", "lora")) == {LORA, PARTIAL}
    assert set(listed("--kind", "passage-indexes")) == set()  # a known kind that is absent: empty
    assert "did you mean 'datastores'" in one_line_error(invoke("cache", "ls", "--kind", "datastore"))
    assert "did you mean" not in one_line_error(invoke("cache", "ls", "--kind", "../.."))


def test_empty_or_missing_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMDEC_CACHE", str(tmp_path / "nowhere"))
    assert json.loads(invoke("cache", "ls", "--json").stdout) == []
    assert "No entries" in invoke("cache", "ls").stdout
    assert json.loads(invoke("cache", "du", "--json").stdout)["total"] == {"entries": 0, "bytes": 0}
    assert invoke("cache", "rm", "--stale").stdout.strip() == "Nothing to remove."


def test_du_totals_are_the_bytes_written(cache):
    usage = json.loads(invoke("cache", "du", "--json").stdout)
    assert usage["total"] == {"entries": len(cache.sizes), "bytes": sum(cache.sizes.values())}
    kinds = {row["kind"]: row for row in usage["kinds"]}
    assert kinds["datastores"] == {"kind": "datastores", "entries": 2,
                                   "bytes": cache.sizes[DATASTORE] + cache.sizes[STALE_TMP]}
    assert kinds["lora"]["entries"] == 2 and kinds["results"]["entries"] == 1
    table = invoke("cache", "du").stdout
    assert "total" in table and str(sum(cache.sizes.values())) in table


def remaining(cache) -> set:
    return {path.name for kind in cache.root.iterdir() if kind.is_dir() for path in kind.iterdir()}


def test_rm_by_key_prefix(cache):
    result = invoke("cache", "rm", DATASTORE[:8])
    assert result.exit_code == 0, result.output
    assert f"removed datastores/{DATASTORE}" in result.stdout
    assert f"Freed {cache_lib.human_bytes(cache.sizes[DATASTORE])} (1 entry)" in result.stdout
    assert remaining(cache) == set(cache.sizes) - {DATASTORE}
    assert invoke("cache", "rm", f"results/{RESULT}").exit_code == 0 and RESULT not in remaining(cache)


def test_rm_kind_keeps_partial_work_unless_asked(cache):
    result = invoke("cache", "rm", "--kind", "lora")
    assert result.exit_code == 0 and f"removed lora/{LORA}" in result.stdout
    assert PARTIAL in remaining(cache) and LORA not in remaining(cache)
    assert invoke("cache", "rm", "--partial").exit_code == 0 and PARTIAL not in remaining(cache)
    assert invoke("cache", "rm", "--kind", "memories").exit_code == 0
    assert MEMORY not in remaining(cache) and LIVE_TMP in remaining(cache)  # a running job's folder stays


def test_rm_older_than(cache):
    result = invoke("cache", "rm", "--older-than", "5d")
    assert result.exit_code == 0, result.output
    gone = {DATASTORE, RESULT, MODEL, FINGERPRINT, CORRUPT, STALE_TMP}
    assert remaining(cache) == set(cache.sizes) - gone
    assert f"Freed {cache_lib.human_bytes(sum(cache.sizes[key] for key in gone))} (6 entries)" in result.stdout
    assert invoke("cache", "rm", "--older-than", "30m", "--kind", "lora").exit_code == 0
    assert LORA not in remaining(cache) and PARTIAL in remaining(cache)
    assert invoke("cache", "rm", "--older-than", "7 days").exit_code == 2


def test_rm_stale_removes_only_dead_jobs_left_overs(cache):
    result = invoke("cache", "rm", "--stale")
    assert result.exit_code == 0, result.output
    assert remaining(cache) == set(cache.sizes) - {STALE_TMP, CORRUPT}
    assert LIVE_TMP in remaining(cache) and PARTIAL in remaining(cache)
    assert invoke("cache", "rm", "--stale").stdout.strip() == "Nothing to remove."


def test_dry_run_removes_nothing(cache):
    result = invoke("cache", "rm", "--kind", "datastores", "--dry-run")
    assert result.exit_code == 0
    assert f"would remove datastores/{DATASTORE}" in result.stdout and "nothing removed" in result.stdout
    assert f"would remove datastores/{STALE_TMP}" in result.stdout
    assert remaining(cache) == set(cache.sizes)


def test_rm_without_a_selector_is_a_usage_error(cache):
    result = invoke("cache", "rm")
    assert result.exit_code == 2 and "say what to remove" in result.stderr
    assert invoke("cache", "rm", "--dry-run").exit_code == 2
    assert remaining(cache) == set(cache.sizes)


def test_rm_unknown_short_ambiguous_or_live_key_removes_nothing(cache):
    assert "unknown cache entry 'ffffffff'" in one_line_error(invoke("cache", "rm", DATASTORE, "ffffffff"))
    assert "too short" in one_line_error(invoke("cache", "rm", "3f2a"))
    (cache.root / "targets" / (DATASTORE[:10] + "0" * 10)).mkdir()
    assert "ambiguous" in one_line_error(invoke("cache", "rm", DATASTORE[:8]))
    assert "running" in one_line_error(invoke("cache", "rm", LIVE_TMP))
    assert remaining(cache) == set(cache.sizes) | {DATASTORE[:10] + "0" * 10}
    assert invoke("cache", "rm", DATASTORE[:12]).exit_code == 0  # longer: unique again


def test_a_deletion_that_fails_is_one_line_and_the_rest_still_go(cache, monkeypatch):
    real_rmtree = cache_lib.shutil.rmtree

    def refuse(path, *args, **kwargs):
        if Path(path).name == CORRUPT:
            raise PermissionError(13, "Permission denied", str(path))
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(cache_lib.shutil, "rmtree", refuse)
    result = invoke("cache", "rm", "--stale")
    assert f"removed datastores/{STALE_TMP}" in result.stdout
    assert "Permission denied" in one_line_error_allowing_stdout(result)
    assert CORRUPT in remaining(cache) and STALE_TMP not in remaining(cache)


def one_line_error_allowing_stdout(result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def test_an_entry_vanishing_while_listed_is_skipped(cache, monkeypatch):
    real = cache_lib.path_bytes

    def vanishing(path):
        if path.name == MEMORY:
            raise FileNotFoundError(2, "No such file or directory", str(path))
        if path.name == DAPT:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(cache_lib, "path_bytes", vanishing)
    entries = {entry.key: entry for entry in cache_lib.cache_entries()}
    assert MEMORY not in entries and DATASTORE in entries
    assert entries[DAPT].status == "complete" and "unreadable" in entries[DAPT].made_by


def test_library_helpers():
    assert cache_lib.parse_age("7d") == dt.timedelta(days=7)
    assert cache_lib.parse_age("12h") == dt.timedelta(hours=12)
    assert cache_lib.parse_age("30m") == dt.timedelta(minutes=30)
    with pytest.raises(cache_lib.ConfigError):
        cache_lib.parse_age("soon")
    assert [cache_lib.human_bytes(n) for n in (0, 999, 1500, 2_500_000, 3 * 10**9)] == [
        "0 B", "999 B", "1.5 kB", "2.5 MB", "3.0 GB"]
    assert cache_lib.pid_alive(os.getpid()) and not cache_lib.pid_alive(DEAD)
    # a manifest naming no model or retriever (a plugin's artifact) is described by its command
    command = "memdec compare " + "x" * 80
    assert cache_lib.made_by({"type": "x", "command": command}) == command[:59] + "…"
    with pytest.raises(cache_lib.ConfigError):
        cache_lib.select_entries([])  # nothing selected never means everything


@pytest.mark.parametrize("args", [["cache", "ls"], ["cache", "du", "--json"], ["cache", "rm", "--stale", "--dry-run"]])
def test_cache_commands_do_not_import_torch_or_faiss(args, cache):
    from test_cli import run_counting_heavy_imports

    result = run_counting_heavy_imports(*args)
    assert "HEAVY []" in result.stderr, result.stderr
    assert "Error" not in result.stderr and result.stdout


@pytest.fixture
def running_job(cache):
    """The lock a job building ``lora/<LORA>x`` holds (``entry_lock``) while it works in ``PARTIAL``."""
    from filelock import FileLock

    from memdec_core.store.cache_dir import lock_file

    lock = FileLock(str(lock_file(cache.root / "lora" / f"{LORA}x")))
    with lock:
        yield lock


def test_rm_partial_skips_the_work_folder_of_a_running_job_and_says_so(cache, running_job):
    """``cache rm --partial`` deleted the .partial folder of a training that was still running."""
    assert listed()[PARTIAL]["status"] == "in progress"
    dry = invoke("cache", "rm", "--partial", "--dry-run")
    assert dry.exit_code == 0 and f"would skip lora/{PARTIAL}: a running job is writing it" in dry.stdout
    result = invoke("cache", "rm", "--partial")
    assert result.exit_code == 0, result.output
    assert f"skipped lora/{PARTIAL}: a running job is writing it" in result.stdout
    assert "running job" in one_line_error(invoke("cache", "rm", PARTIAL))
    assert PARTIAL in remaining(cache)
    running_job.release()  # the job ended (killed): its folder is a resumable one again
    assert listed()[PARTIAL]["status"] == "partial"
    assert invoke("cache", "rm", "--partial").exit_code == 0 and PARTIAL not in remaining(cache)


def test_a_job_that_starts_after_the_listing_keeps_its_work_folder(cache):
    """The lock is taken again when deleting: a job that started since ``ls`` is not robbed."""
    from filelock import FileLock

    from memdec_core.store.cache_dir import lock_file

    chosen = cache_lib.select_entries(cache_lib.cache_entries(), partial=True)
    assert [entry.key for entry in chosen] == [PARTIAL]
    with FileLock(str(lock_file(cache.root / "lora" / f"{LORA}x"))):
        removal = cache_lib.remove_entries(chosen)
    assert removal.removed == [] and [entry.key for entry, _ in removal.skipped] == [PARTIAL]
    assert PARTIAL in remaining(cache)


@pytest.mark.parametrize("given", ["/tmp", "./datastores", "cache/datastores", "~/x", "entry"])
def test_rm_of_a_path_says_keys_are_expected_and_removes_nothing(cache, given):
    """``cache rm PATH`` said "too short a prefix" (or listed every key as a did-you-mean)."""
    path = cache.root / "datastores" / DATASTORE
    line = one_line_error(invoke("cache", "rm", str(path) if given == "entry" else given))
    assert "is a path; memdec cache rm takes the keys that memdec cache ls lists" in line, line
    if given == "entry":
        assert line.endswith(f"that path is the entry datastores/{DATASTORE}"), line
    assert remaining(cache) == set(cache.sizes)
