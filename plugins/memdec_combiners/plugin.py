"""Registers the built-in combiners."""

from memdec_core.hookspecs import hookimpl


@hookimpl
def memdec_register_combiners():
    from memdec_combiners.adaptive import Adaptive
    from memdec_combiners.linear import Linear

    return [Linear, Adaptive]
