"""Registers the Memory Decoder method, its memory model and ``memdec targets|train|transfer``."""

from memdec_core.hookspecs import hookimpl


@hookimpl
def memdec_register_methods():
    from memdec_decoder.method import MemoryDecoderMethod

    return [MemoryDecoderMethod]


@hookimpl
def memdec_register_memory_models():
    from memdec_decoder.memory_model import DecoderMemory

    return [DecoderMemory]


@hookimpl
def memdec_register_commands(cli):
    from memdec_decoder.commands import targets, train, transfer

    for command in (targets, train, transfer):
        cli.add_command(command)
