"""Runs: what a command does end to end. Preparing a run (names resolved, settings checked),
evaluating every base × method, comparing them with costs, run configs, report metadata,
downstream tasks and exports.

Imports the layers below it. ``memdec_core.api`` is the facade over this layer.
"""
