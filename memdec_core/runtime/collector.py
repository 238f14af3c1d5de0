"""Python's cyclic garbage collector through a program's start-up.

Importing torch and transformers and building a model makes about 640,000 objects that live as long
as the process. CPython's collector walks every one of them in each full collection, and start-up
sets off six of those: about 0.7 s of a 7 s kNN-LM eval on the 2-core CPU (benchmarks/RESULTS.md), in
memdec and in the peers' scripts alike. So a program (the ``memdec`` command) calls :func:`defer` at
its start, and no cyclic collection runs until :func:`settle`, which loading a model's weights calls:
what exists then is moved to the permanent generation (``gc.freeze``), which later collections do
not walk, and collection resumes.

Reference counting frees objects as before; only the cyclic garbage made before ``settle`` is never
freed (about 12,000 objects, some MB, for memdec-demo-l's start-up). A library caller that never
calls ``defer`` sees no change: ``settle`` then does nothing.
"""

from __future__ import annotations

import gc

_deferred = [False]


def defer() -> None:
    """No cyclic collection until :func:`settle` (unless the collector is already off)."""
    if gc.isenabled():
        gc.disable()
        _deferred[0] = True


def settle() -> None:
    """Start-up is over: what exists now is permanent, and the collector runs again (after a
    :func:`defer`; otherwise nothing)."""
    if _deferred[0]:
        _deferred[0] = False
        gc.freeze()
        gc.enable()
