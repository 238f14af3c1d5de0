"""The ``memdec`` command group, its error handling and plugin-provided commands.

Commands are attached when ``main`` runs, not at import, so importing this module has no side
effects. Neither this module nor ``memdec --help`` / ``memdec plugins`` imports torch or faiss.
"""

from __future__ import annotations

import os
import sys

import click

from memdec_core import __version__
from memdec_core.errors import MemdecError


class MemdecGroup(click.Group):
    """Turns a MemdecError into one line on stderr and exit 1 (a traceback with MEMDEC_DEBUG=1)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MemdecError as error:
            if _debug():
                raise
            click.echo(f"Error: {error}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            ctx.exit(130)


def _debug() -> bool:
    return os.environ.get("MEMDEC_DEBUG", "") not in ("", "0")


def build_cli() -> click.Group:
    """The command group with the built-in commands and every plugin's commands."""
    from memdec_cli import cache_command, compare_command, eval_command, generate_command, list_command, plugins_command
    from memdec_cli.export_command import export
    from memdec_cli.tasks_command import tasks_command

    @click.group(cls=MemdecGroup, context_settings={"help_option_names": ["-h", "--help"]})
    @click.version_option(__version__, prog_name="memdec")
    @click.option("--world-size", type=click.IntRange(min=1), envvar="MEMDEC_WORLD_SIZE", show_envvar=True,
                  help="The number of processes the launcher must have started (torchrun, accelerate launch); "
                       "another number is refused. docs/scale.md")
    @click.option("--dtype", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), envvar="MEMDEC_DTYPE",
                  show_envvar=True, help="Precision of the model passes (weights stay fp32; the mixture and the KL "
                                         "are fp32): auto is bf16 on GPUs that have it, fp32 on CPUs.")
    @click.option("--device", envvar="MEMDEC_DEVICE", show_envvar=True, metavar="DEVICE",
                  help="Where models run: cpu, cuda, cuda:1, mps [default: the GPU when there is one].")
    @click.option("--fsdp", is_flag=True, envvar="MEMDEC_FSDP", show_envvar=True,
                  help="Under several processes, shard full-parameter training (Memory Decoder, DAPT) over the "
                       "ranks with FSDP2 instead of a copy per rank: for models that do not fit one device. "
                       "docs/scale.md")
    def cli(world_size, dtype, device, fsdp):
        """memdec: adapt a language model to a domain, and compare the ways of doing it.

        \b
        Methods, combiners and domains come from plugins; see them with
          memdec plugins            which plugins are installed
          memdec list methods       what each kind of component offers
        Start with:
          memdec compare --domain finance           every method on every demo model
          memdec eval --domain path/to/corpus --base MODEL --method base,knn-lm,memdec
        Several processes (each scores its share of the windows; the numbers are those of one):
          torchrun --standalone --nproc_per_node 2 -m memdec_cli --world-size 2 eval ...
        """
        _join_launcher(world_size)
        _set_precision(dtype, device)
        if fsdp:
            os.environ["MEMDEC_FSDP"] = "1"  # read by the training loop (distributed.fsdp_requested)

    for command in (plugins_command.plugins, list_command.list_components, eval_command.eval_command,
                    compare_command.compare_command, generate_command.generate, cache_command.cache, export,
                    tasks_command):
        cli.add_command(command)
    _add_plugin_commands(cli)
    return cli


def _join_launcher(world_size: int | None) -> None:
    """Join a launcher's processes (nothing to do for one); only the first prints results."""
    from memdec_core.runtime.distributed import join, launched_size

    if world_size is None and launched_size() == 1:
        return  # one process: torch is not imported for nothing
    if not join(world_size).main:
        sys.stdout = open(os.devnull, "w")  # results and reports come from rank 0; errors still reach stderr


def _set_precision(dtype: str | None, device: str | None) -> None:
    """Pass --dtype / --device to the library (and child processes) and check them before any work."""
    from memdec_core.inputs.models import compute_dtype

    for variable, value in (("MEMDEC_DEVICE", device), ("MEMDEC_DTYPE", dtype)):
        if value:
            os.environ[variable] = value
    if dtype or device:
        compute_dtype()  # also checks the device


def _add_plugin_commands(cli: click.Group) -> None:
    from memdec_core.components.plugins import get_plugin_manager

    manager = get_plugin_manager()  # a bad MEMDEC_DISABLE_PLUGINS is the user's error: let it out
    try:
        manager.hook.memdec_register_commands(cli=cli)
    except Exception as error:  # a plugin's broken command must not take the CLI down
        if _debug():
            raise
        click.echo(f"Warning: a plugin failed to add its commands: {type(error).__name__}: {error}", err=True)


def main(argv: list[str] | None = None) -> None:
    try:
        build_cli().main(args=argv, prog_name="memdec")
    except MemdecError as error:  # raised while building the CLI, e.g. a duplicate component
        if _debug():
            raise
        click.echo(f"Error: {error}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
