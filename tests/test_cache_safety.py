"""Nothing outside a memdec cache is ever listed, written or removed (issue 29).

A cache is memdec's when it holds memdec's ``CACHEDIR.TAG``, or, for a cache an earlier memdec
made, memdec manifests (then it is tagged). Inside a cache, only memdec's kinds of entries count.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from conftest import invoke, one_line_error

from memdec_core.errors import ConfigError
from memdec_core.store import cache as cache_lib
from memdec_core.store import cache_dir
from memdec_core.store.artifacts import atomic_directory, cached_artifact, write_manifest

KEY = "3f2a9c41d0e5b7a8c9d1"
OLD = time.time() - 30 * 86400


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its contents: what must stay untouched."""
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def age(root: Path) -> None:
    for path in [*root.rglob("*"), root]:
        os.utime(path, (OLD, OLD))


@pytest.fixture
def scratch(tmp_path, monkeypatch) -> Path:
    """A folder a user keeps other things in (with folder names memdec also uses), set as the cache."""
    root = tmp_path / "scratch"
    files = {"var/lib/db": "precious", "var/cache/apt/pkg": "x" * 100, "work/project/main.py": "1",
             "results/summary.csv": "a,b", "models/my-model/config.json": "{}",
             f"datastores/{KEY}/keys.npy": "not memdec's", f"lora/.{KEY}.tmp-999999999-ab/x": "y"}
    for relative, text in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text)
    age(root)
    monkeypatch.setenv("MEMDEC_CACHE", str(root))
    return root


@pytest.mark.parametrize("args", [
    ["cache", "rm", "--older-than", "1d"], ["cache", "rm", "--kind", "work"], ["cache", "rm", "--stale"],
    ["cache", "rm", "--older-than", "1d", "--dry-run"], ["cache", "rm", KEY], ["cache", "ls"],
    ["cache", "ls", "--json"], ["cache", "du"], ["cache", "du", "--json"]])
def test_every_cache_command_refuses_a_folder_without_the_tag(scratch, args):
    before = tree(scratch)
    error = one_line_error(invoke(*args))
    assert "is not a memdec cache" in error and "MEMDEC_CACHE" in error
    assert tree(scratch) == before
    assert not (scratch / cache_dir.CACHE_MARKER).exists()


def test_another_tools_cachedir_tag_is_not_memdecs(scratch):
    (scratch / cache_dir.CACHE_MARKER).write_text("Signature: 8a477f597d28d172789f06886806bc55\n# cargo\n")
    before = tree(scratch)
    assert "is not a memdec cache" in one_line_error(invoke("cache", "rm", "--older-than", "1d"))
    assert tree(scratch) == before


def test_memdec_refuses_to_write_into_a_folder_that_is_not_a_cache(scratch):
    before = tree(scratch)
    with pytest.raises(ConfigError, match="is not a memdec cache"):
        cached_artifact("datastores", "0123456789abcdef0123")
    assert tree(scratch) == before


def test_a_cache_pointing_at_a_file_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMDEC_CACHE", str(tmp_path / "a-file"))
    (tmp_path / "a-file").write_text("x")
    assert "is not a folder" in one_line_error(invoke("cache", "ls"))
    with pytest.raises(ConfigError, match="is not a folder"):
        cached_artifact("tokens", "0123456789abcdef0123.npy")


def test_a_new_cache_is_tagged_when_memdec_creates_it(tmp_path, monkeypatch):
    root = tmp_path / "new" / "cache"
    monkeypatch.setenv("MEMDEC_CACHE", str(root))
    assert invoke("cache", "ls").exit_code == 0 and not root.exists()  # reading creates nothing
    with atomic_directory(cached_artifact("datastores", KEY)) as folder:
        write_manifest(folder, "knn-datastore")
    assert cache_dir.is_memdec_cache(root)
    assert (root / "CACHEDIR.TAG").read_text().startswith("Signature: 8a477f597d28d172789f06886806bc55\n")
    assert [entry.key for entry in cache_lib.cache_entries()] == [KEY]


def test_an_empty_folder_becomes_a_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMDEC_CACHE", str(tmp_path))
    cached_artifact("results", KEY)
    assert cache_dir.is_memdec_cache(tmp_path)


def test_a_cache_another_process_is_tagging_this_moment_is_new(tmp_path, monkeypatch):
    """Two runs started together on a new cache: the one that looks while the other's tag is being
    written (a temporary file, renamed into place) must tag it too, not refuse it as foreign."""
    monkeypatch.setenv("MEMDEC_CACHE", str(tmp_path))
    (tmp_path / f"{cache_dir.TAG_TEMPORARY}4242").write_text("Signature: 8a47")  # the other's, half written
    cached_artifact("results", KEY)
    assert cache_dir.is_memdec_cache(tmp_path)


def test_an_earlier_memdecs_cache_is_recognised_and_tagged(tmp_path, monkeypatch):
    root = tmp_path / "old-cache"
    (root / "memories" / KEY).mkdir(parents=True)
    (root / "memories" / KEY / "memdec.json").write_text(json.dumps({"type": "memory-decoder",
                                                                      "memdec_version": "0.1.0"}))
    (root / "tokens").mkdir()
    (root / "tokens" / f"{KEY}.npy").write_bytes(b"\x93NUMPY")
    monkeypatch.setenv("MEMDEC_CACHE", str(root))
    assert set(json.loads(invoke("cache", "ls", "--json").stdout)[i]["kind"] for i in range(2)) == {
        "memories", "tokens"}
    assert cache_dir.is_memdec_cache(root)
    assert invoke("cache", "rm", "--kind", "tokens").exit_code == 0
    assert not (root / "tokens" / f"{KEY}.npy").exists() and (root / "memories" / KEY).exists()


def test_an_earlier_cache_of_token_streams_and_locks_only_is_recognised(tmp_path, monkeypatch):
    root = tmp_path / "old-cache"
    for relative in (f"tokens/{KEY}.npy", f"locks/{KEY}.npy-0123456789abcdef01234567.lock", f"results/{KEY}/row.json"):
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text("{}")
    monkeypatch.setenv("MEMDEC_CACHE", str(root))
    assert cached_artifact("tokens", "0123456789abcdef0123.npy").parent == root / "tokens"
    assert cache_dir.is_memdec_cache(root)
    (root / "results" / "summary.csv").write_text("a,b")  # one name that is not memdec's is enough to refuse
    (root / cache_dir.CACHE_MARKER).unlink()
    with pytest.raises(ConfigError, match="is not a memdec cache"):
        cached_artifact("tokens", "0123456789abcdef0123.npy")


def test_inside_a_cache_only_memdecs_entries_are_listed_or_removed(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("MEMDEC_CACHE", str(root))
    with atomic_directory(cached_artifact("datastores", KEY)) as folder:
        write_manifest(folder, "knn-datastore", created="2020-01-01T00:00:00Z")
    strays = {"notes/todo.txt": "mine", "results/summary.csv": "a,b", "datastores/README.txt": "mine",
              "models/my-model/config.json": "{}", "plugin-kind/no-manifest/file": "x"}
    for relative, text in strays.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text)
    (root / "plugin-kind" / KEY).mkdir()
    (root / "plugin-kind" / KEY / "memdec.json").write_text(json.dumps({"type": "a-plugins-artifact"}))
    age(root)
    keep = {relative: (root / relative).read_bytes() for relative in strays}
    listed = {(row["kind"], row["key"]) for row in json.loads(invoke("cache", "ls", "--json").stdout)}
    assert listed == {("datastores", KEY), ("plugin-kind", KEY)}
    result = invoke("cache", "rm", "--older-than", "1d")
    assert result.exit_code == 0, result.output
    assert not (root / "datastores" / KEY).exists() and not (root / "plugin-kind" / KEY).exists()
    assert {relative: (root / relative).read_bytes() for relative in strays} == keep


def test_removal_checks_each_entry_again(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("MEMDEC_CACHE", str(root))
    cached_artifact("datastores", KEY).mkdir(parents=True)
    (root / "datastores" / "mine").mkdir()
    [entry] = cache_lib.cache_entries()
    forged = cache_lib.describe_entry("datastores", root / "datastores" / "mine")
    with pytest.raises(ConfigError, match="not an entry of the memdec cache"):
        cache_lib.remove_entries([entry, forged])
    assert (root / "datastores" / KEY).exists() and (root / "datastores" / "mine").exists()
