"""Registers the ``dapt`` and ``lora`` methods."""

from memdec_core.hookspecs import hookimpl


@hookimpl
def memdec_register_methods():
    from memdec_peft.methods import Dapt, Lora

    return [Dapt, Lora]
