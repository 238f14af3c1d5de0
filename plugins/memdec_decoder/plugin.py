"""Registers the Memory Decoder method, its MemoryModel and ``memdec targets|train|generate``."""

from memdec_core.hookspecs import hookimpl


@hookimpl
def memdec_register_methods():
    from memdec_decoder.method import MemoryDecoderMethod

    return [MemoryDecoderMethod]


@hookimpl
def memdec_register_memory_models():
    from memdec_decoder.memory import DecoderMemoryModel

    return [DecoderMemoryModel]


@hookimpl
def memdec_register_commands(cli):
    from memdec_decoder.commands import generate, targets, train

    for command in (targets, train, generate):
        cli.add_command(command)
