"""Registers ``base`` (the unadapted model) and ``mixture`` (any memory model mixed with the base)."""

from memdec_core.hookspecs import hookimpl


@hookimpl
def memdec_register_methods():
    from memdec_base.method import Base
    from memdec_core.engine.mixture import Mixture

    return [Base, Mixture]
