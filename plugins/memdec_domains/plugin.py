"""Registers the shipped domain packs."""

from memdec_core.hookspecs import hookimpl


@hookimpl
def memdec_register_domains():
    from memdec_domains.packs import pack_domains

    return pack_domains()
