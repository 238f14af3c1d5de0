"""The command kit: the options a plugin's click commands share with memdec's own commands.

A command that runs a model over a domain takes the same window options (``--context``,
``--stride``, ``--batch-size``, ``--max-train-tokens``, ``--max-eval-tokens``) with the same
defaults as ``memdec eval``, so an artifact it builds is the one the other commands find in the
cache; and it takes ``--set NAME.KEY=VALUE`` for the settings of any component it uses::

    import click

    from memdec_core.command_kit import eval_settings, parse_assignments, set_option, window_options
    from memdec_core.hookspecs import hookimpl


    @click.command("shelve")
    @click.option("--domain", required=True)
    @set_option
    @window_options
    def shelve(domain, assignments, context, stride, batch_size, max_train_tokens, max_eval_tokens):
        \"\"\"Build the shelf of a domain.\"\"\"
        from memdec_shelf.api import build_shelf  # torch and friends: imported when the command runs

        settings = eval_settings(context, stride, batch_size, max_train_tokens, max_eval_tokens)
        click.echo(build_shelf(domain, settings=settings, component_settings=parse_assignments(assignments)))


    @hookimpl
    def memdec_register_commands(cli):
        cli.add_command(shelve)

The kit imports click and nothing heavy: ``memdec --help`` builds every plugin's commands without
importing torch or faiss. docs/plugins.md ("Commands: the command kit") has more.
"""

from __future__ import annotations

import functools

import click

from memdec_core.interfaces import BYTES_PER_TOKEN, EvalSettings
from memdec_core.runs.runconfig import QUICK_EVAL_TOKENS, QUICK_TRAIN_TOKENS, window_settings


def window_options(command=None, *, train_default: int = QUICK_TRAIN_TOKENS, eval_default: int = QUICK_EVAL_TOKENS):
    """Add --context, --stride, --batch-size, --max-train-tokens and --max-eval-tokens to a command.

    Use it bare (``@window_options``) or with other caps (``@window_options(train_default=0)``).
    The command receives the parameters ``context``, ``stride``, ``batch_size``,
    ``max_train_tokens`` and ``max_eval_tokens``; ``eval_settings`` turns them into EvalSettings.
    Every command caps the splits the same way by default (memdec compare's quick CPU profile), so
    that an artifact one command builds (a datastore, a memory) is the one the others find in the
    cache; 0 means the whole split.
    """
    options = [
        click.option("--context", type=click.IntRange(min=2), default=None,
                     help="Window length in tokens [default: min(1024, the model's maximum)]."),
        click.option("--stride", type=click.IntRange(min=1), default=None,
                     help="New tokens scored per window [default: context / 2, as in the paper]."),
        click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True,
                     help="Windows per forward pass."),
        click.option("--max-train-tokens", type=click.IntRange(min=0), default=train_default, show_default=True,
                     callback=_token_cap, help="Use only the first N tokens of the train split; 0: the whole split. "
                                               f"Bases of different tokenizers: the same whole documents within "
                                               f"{BYTES_PER_TOKEN}×N bytes for each."),
        click.option("--max-eval-tokens", type=click.IntRange(min=0), default=eval_default, show_default=True,
                     callback=_token_cap,
                     help="Use only the first N tokens of the valid and test splits; 0: the whole splits. "
                          f"Bases of different tokenizers: the same whole documents within {BYTES_PER_TOKEN}×N "
                          "bytes for each."),
    ]

    def decorate(function):
        return functools.reduce(lambda cmd, option: option(cmd), reversed(options), function)

    return decorate(command) if command is not None else decorate


def _token_cap(ctx, param, value):
    """0 (the whole split) or at least 2 tokens: one token makes no window (bad usage, exit 2)."""
    if value == 1:
        raise click.BadParameter("0 (the whole split) or at least 2", ctx=ctx, param=param)
    return value


def eval_settings(context, stride, batch_size, max_train_tokens, max_eval_tokens) -> EvalSettings:
    """The EvalSettings of the window options' values (a cap of 0 caps nothing: the whole split)."""
    return window_settings(dict(context=context, stride=stride, batch_size=batch_size,
                                max_train_tokens=max_train_tokens, max_eval_tokens=max_eval_tokens))


#: ``--set NAME.KEY=VALUE``, repeatable: the command receives the texts as ``assignments`` (a tuple);
#: ``parse_assignments`` turns them into the ``settings`` the Python API takes.
set_option = click.option(
    "--set", "assignments", multiple=True, metavar="NAME.KEY=VALUE",
    help="A setting of any component of the run by its name — method, memory model, retriever, combiner or "
         "domain: --set knn-lm.k=256 --set faiss.nprobe=64 --set linear.lam=0.3 --set finance.source=hub "
         "(`memdec list KIND` shows every setting, its default and what it does).")


def parse_assignments(assignments: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """``("knn-lm.k=64",)`` → ``{"knn-lm": {"k": "64"}}`` (values stay text: each component types its own).

    A text that is not NAME.KEY=VALUE is a usage error on --set (click.BadParameter: exit 2).
    """
    parsed: dict[str, dict[str, str]] = {}
    for assignment in assignments:
        target, equals, value = assignment.partition("=")
        name, dot, key = target.partition(".")
        if not (equals and dot and name and key):
            raise click.BadParameter(f"{assignment!r} is not NAME.KEY=VALUE", param_hint="--set")
        parsed.setdefault(name, {})[key] = value
    return parsed


def removed_option(name: str, replacement: str, *, flag: bool = False):
    """``name``, an option removed from a command, kept hidden for one release so that giving it
    names its replacement instead of click's "no such option" (a guess at a neighbour's name).

    ``replacement`` may hold ``{value}``, the value given: ``removed_option("--factory",
    "--set faiss.factory={value}")`` answers ``--factory IVF1024,PQ32`` with
    ``--factory was removed; use --set faiss.factory=IVF1024,PQ32``. A ``flag`` takes no value.
    """

    def refuse(ctx, param, value):
        if value is None or value is False:
            return None
        raise click.UsageError(f"{name} was removed; use {replacement.format(value=value)}", ctx=ctx)

    return click.option(name, hidden=True, expose_value=False, is_flag=flag, default=False if flag else None,
                        callback=refuse, help=f"Removed: {replacement.format(value='VALUE')}.")


__all__ = ["eval_settings", "parse_assignments", "removed_option", "set_option", "window_options"]
