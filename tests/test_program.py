"""The ``memdec`` program ends without the interpreter's teardown (memdec_cli/program.py), and loses
nothing by it: threads, exit handlers, buffered output and the exit status are what a full exit gives."""

import os
import subprocess
import sys
import textwrap

import pytest


def _python(*args, env=None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})}, **kwargs)


ENDING = textwrap.dedent("""
    import atexit, sys, threading, time
    from pathlib import Path
    from memdec_cli.program import end

    folder = Path(sys.argv[1])
    def late_writer():
        time.sleep(0.3)
        (folder / "thread").write_text("done")
    threading.Thread(target=late_writer).start()  # not a daemon: a full exit waits for it
    atexit.register(lambda: (folder / "atexit").write_text("ran"))
    sys.stdout.write("x" * 1_000_000)  # buffered: lost unless flushed before the process ends
    sys.stderr.write("last words")
    end(int(sys.argv[2]) if sys.argv[2].isdigit() else sys.argv[2])
""")


@pytest.mark.parametrize("full", ["0", "1"])
def test_the_quick_ending_waits_for_threads_runs_exit_handlers_and_flushes(tmp_path, full):
    """The same outcome with and without the full interpreter shutdown (MEMDEC_FULL_EXIT=1)."""
    result = _python("-c", ENDING, str(tmp_path), "3", env={"MEMDEC_FULL_EXIT": full})
    assert result.returncode == 3
    assert len(result.stdout) == 1_000_000 and result.stderr == "last words"
    assert (tmp_path / "thread").read_text() == "done" and (tmp_path / "atexit").read_text() == "ran"


def test_the_exit_status_is_what_sys_exit_gives(tmp_path):
    statuses = {}
    for code in ("0", "256", "a message"):
        for full in ("0", "1"):
            result = _python("-c", ENDING, str(tmp_path), code, env={"MEMDEC_FULL_EXIT": full})
            statuses[code, full] = (result.returncode, result.stderr)
    assert statuses["0", "0"] == statuses["0", "1"] == (0, "last words")
    assert statuses["256", "0"] == statuses["256", "1"] == (0, "last words")
    assert statuses["a message", "0"] == statuses["a message", "1"] == (1, "last wordsa message\n")


def test_the_command_line_gives_its_output_and_status(tmp_path):
    """``python -m memdec_cli`` (the console script's entry): full output into a file, errors in one
    line with status 1, usage errors with 2."""
    with open(tmp_path / "out", "w") as out:
        listing = subprocess.run([sys.executable, "-m", "memdec_cli", "list", "methods", "--json"], stdout=out,
                                 stderr=subprocess.PIPE, text=True, timeout=120)
    reference = _python("-m", "memdec_cli", "list", "methods", "--json", env={"MEMDEC_FULL_EXIT": "1"})
    assert listing.returncode == 0 and (tmp_path / "out").read_text() == reference.stdout != ""
    unknown = _python("-m", "memdec_cli", "eval", "--domain", "no-such-domain", "--method", "base")
    assert unknown.returncode == 1 and unknown.stderr.startswith("Error: ") and unknown.stderr.count("\n") == 1
    assert _python("-m", "memdec_cli", "no-such-command").returncode == 2


def test_a_profiler_still_gets_the_full_shutdown(tmp_path):
    """cProfile writes its file after the program returns: the quick ending must not cut it off."""
    profile = tmp_path / "memdec.prof"
    result = _python("-m", "cProfile", "-o", str(profile), "-m", "memdec_cli", "--version")
    assert result.returncode == 0 and "memdec, version" in result.stdout
    assert profile.stat().st_size > 0


REPORT_COLLECTOR = textwrap.dedent("""
    import atexit, gc, sys
    atexit.register(lambda: print("collector", gc.isenabled(), gc.get_freeze_count() > 0, file=sys.stderr))
    sys.argv = ["memdec", *sys.argv[1:]]
    from memdec_cli.program import run
    run()
""")


def test_the_program_collects_no_garbage_until_a_model_is_loaded(tiny_llama):
    """``memdec`` defers Python's cyclic collector through start-up (memdec_core/runtime/collector.py);
    loading a model's weights ends that: the collector runs again, over what was made since."""
    generated = _python("-c", REPORT_COLLECTOR, "generate", "--base", str(tiny_llama), "--max-new-tokens", "2",
                        "The bank")
    assert generated.returncode == 0, generated.stderr
    assert "collector True True" in generated.stderr
    listed = _python("-c", REPORT_COLLECTOR, "list", "methods")  # no model: start-up never ended
    assert listed.returncode == 0 and "collector False False" in listed.stderr


def test_a_library_caller_keeps_its_collector(tiny_llama):
    """Without the program's ``defer``, loading a model leaves the collector as it was."""
    import gc

    from memdec_core.inputs.models import load_model
    from memdec_core.runtime import collector

    assert gc.isenabled() and gc.get_freeze_count() == 0
    load_model(str(tiny_llama))
    assert gc.isenabled() and gc.get_freeze_count() == 0
    collector.defer()
    try:
        assert not gc.isenabled()
        load_model(str(tiny_llama))
        assert gc.isenabled() and gc.get_freeze_count() > 0
    finally:  # the collector as it was, whatever failed
        collector.settle()
        gc.unfreeze()
