"""Options shared by commands (and by plugins' commands): windows, budgets, component settings."""

from __future__ import annotations

import functools

import click

from memdec_core.errors import ConfigError


def window_options(command=None, *, train_default: int | None = None, eval_default: int | None = None):
    """--context, --stride, --batch-size, --max-train-tokens, --max-eval-tokens.

    With defaults for the token caps (``memdec compare``), 0 means the whole split.
    """
    whole = " 0: the whole split." if train_default else ""
    options = [
        click.option("--context", type=click.IntRange(min=2), default=None,
                     help="Window length in tokens [default: min(1024, the model's maximum)]."),
        click.option("--stride", type=click.IntRange(min=1), default=None,
                     help="New tokens scored per window [default: context / 2, as in the paper]."),
        click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True,
                     help="Windows per forward pass."),
        click.option("--max-train-tokens", type=click.IntRange(min=0 if train_default else 2),
                     default=train_default, show_default=bool(train_default),
                     help="Use only the first N tokens of the train split (quick runs on a CPU)." + whole),
        click.option("--max-eval-tokens", type=click.IntRange(min=0 if eval_default else 2),
                     default=eval_default, show_default=bool(eval_default),
                     help="Use only the first N tokens of the valid and test splits." + whole),
    ]

    def decorate(function):
        return functools.reduce(lambda cmd, option: option(cmd), reversed(options), function)

    return decorate(command) if command is not None else decorate


def eval_settings(context, stride, batch_size, max_train_tokens, max_eval_tokens):
    from memdec_core.evaluate import EvalSettings

    return EvalSettings(context=context, stride=stride, batch_size=batch_size,
                        max_train_tokens=max_train_tokens or None, max_eval_tokens=max_eval_tokens or None)


set_option = click.option(
    "--set", "assignments", multiple=True, metavar="NAME.KEY=VALUE",
    help="A setting of any component of the run by its name — method, memory model, retriever, combiner or "
         "domain: --set knn-lm.k=256 --set faiss.nprobe=64 --set linear.lam=0.3 --set finance.source=hub "
         "(`memdec list KIND` shows every setting, its default and what it does).")


def parse_assignments(assignments: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """``("knn-lm.k=64",)`` → ``{"knn-lm": {"k": "64"}}`` (values stay text: each component types its own)."""
    parsed: dict[str, dict[str, str]] = {}
    for assignment in assignments:
        target, equals, value = assignment.partition("=")
        name, dot, key = target.partition(".")
        if not (equals and dot and name and key):
            raise click.BadParameter(f"{assignment!r} is not NAME.KEY=VALUE", param_hint="--set")
        parsed.setdefault(name, {})[key] = value
    return parsed


def split_list(values: tuple[str, ...]) -> list[str]:
    """Repeated and comma-separated values, in order: ("base,knn-lm", "x") → [base, knn-lm, x]."""
    items = [item.strip() for value in values for item in value.split(",") if item.strip()]
    if not items:
        raise ConfigError("empty list")
    return items
