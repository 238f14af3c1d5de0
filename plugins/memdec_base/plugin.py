"""Registers the ``base`` method."""

from memdec_core.hookspecs import hookimpl


@hookimpl
def memdec_register_methods():
    from memdec_base.method import Base

    return [Base]
