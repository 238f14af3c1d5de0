"""Runtime: how a run reports progress and which process of a launch (torchrun, accelerate) it is.

Imports only the contracts below it (``memdec_core.errors``).
"""
