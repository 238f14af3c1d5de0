"""The ``memdec`` program: the command line, then the end of the process without the interpreter's
teardown.

Python frees every module, object and extension on the way out; with torch and a transformers model
loaded that takes about a second on a 2-core CPU (benchmarks/RESULTS.md: 1.0-1.2 s of a 7.5 s kNN-LM
eval) and does nothing the operating system does not do anyway. So once the command has returned,
the program does what the interpreter's shutdown would do that matters: it waits for threads that are
not daemons, runs the ``atexit`` handlers (logging, temporary folders, multiprocessing, a plugin's),
flushes standard output and error, and then ends with ``os._exit``. Everything memdec writes is
closed and renamed into place before its command returns.

The full shutdown is kept where something reads the process's state on the way out: a profiler or
a tracer (cProfile, coverage, a debugger), or ``MEMDEC_FULL_EXIT=1``. Library callers and tests call
:func:`memdec_cli.main.main`, which returns or raises ``SystemExit`` as any click program does.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import NoReturn


def run() -> NoReturn:
    """The console script's and ``python -m memdec_cli``'s entry point."""
    from memdec_cli.main import main
    from memdec_core.runtime import collector

    collector.defer()  # until a model is loaded: start-up makes no garbage worth 0.7 s of walking
    try:
        main()
    except SystemExit as stop:
        end(stop.code)
    end(0)


def end(code: object) -> NoReturn:
    """End the process with ``code`` (as ``sys.exit`` reads it) once the exit handlers have run."""
    if _full_exit_wanted():
        sys.exit(code)
    status = _status(code)
    for thread in threading.enumerate():  # what the interpreter's shutdown waits for first
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # the handlers the shutdown would run next, in its order
    for stream in {id(s): s for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)}.values():
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):  # closed, a broken pipe, or not a stream: nothing left to lose
            pass
    os._exit(status)


def _full_exit_wanted() -> bool:
    return (sys.getprofile() is not None or sys.gettrace() is not None
            or os.environ.get("MEMDEC_FULL_EXIT", "") not in ("", "0"))


def _status(code: object) -> int:
    """The exit status ``sys.exit(code)`` gives: None is 0, an int itself, anything else is printed and 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1
