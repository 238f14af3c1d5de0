"""Registers the ``rag`` method."""

from memdec_core.hookspecs import hookimpl


@hookimpl
def memdec_register_methods():
    from memdec_rag.method import Rag

    return [Rag]
