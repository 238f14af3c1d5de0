"""Runtime: how a run reports progress, which process of a launch (torchrun, accelerate) it is, and
when Python's cyclic garbage collector runs.

Imports only the contracts below it (``memdec_core.errors``).
"""
