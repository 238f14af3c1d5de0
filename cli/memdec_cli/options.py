"""Options shared by commands (and by plugins' commands): windows, budgets, component settings."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from memdec_core.errors import ConfigError
from memdec_core.runs.compare import QUICK_EVAL_TOKENS, QUICK_TRAIN_TOKENS


def window_options(command=None, *, train_default: int = QUICK_TRAIN_TOKENS, eval_default: int = QUICK_EVAL_TOKENS):
    """--context, --stride, --batch-size, --max-train-tokens, --max-eval-tokens.

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
                     callback=_token_cap, help="Use only the first N tokens of the train split; 0: the whole split."),
        click.option("--max-eval-tokens", type=click.IntRange(min=0), default=eval_default, show_default=True,
                     callback=_token_cap,
                     help="Use only the first N tokens of the valid and test splits; 0: the whole splits."),
    ]

    def decorate(function):
        return functools.reduce(lambda cmd, option: option(cmd), reversed(options), function)

    return decorate(command) if command is not None else decorate


def _token_cap(ctx, param, value):
    """0 (the whole split) or at least 2 tokens: one token makes no window (bad usage, exit 2)."""
    if value == 1:
        raise click.BadParameter("0 (the whole split) or at least 2", ctx=ctx, param=param)
    return value


def eval_settings(context, stride, batch_size, max_train_tokens, max_eval_tokens):
    """The EvalSettings of the window options (0 caps nothing: the whole split)."""
    from memdec_core.runs.runconfig import window_settings

    return window_settings(dict(context=context, stride=stride, batch_size=batch_size,
                                max_train_tokens=max_train_tokens, max_eval_tokens=max_eval_tokens))


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


# ----------------------------------------------------------------------------------------------
# --config FILE: a run's options from a YAML or TOML file (memdec_core.runs.runconfig checks it)

#: A config key whose command parameter is named otherwise.
PARAM_NAMES = {"format": "output_format", "settings": "assignments"}
#: Where --config leaves the file's values for run_config (ctx.meta is click's per-invocation scratch).
_CONFIG_VALUES = "memdec.config"


def config_option(command_name: str):
    """--config FILE for ``memdec eval`` / ``memdec compare``: the file's values become the options'
    defaults (click's default_map), so a flag on the command line still wins and click's parameter
    sources tell which one did. Settings are merged in the command (see run_config)."""

    def load(ctx, param, path):
        if path is None:
            return None
        from memdec_core.runs.runconfig import load_run_config

        values = load_run_config(path, command_name)
        ctx.meta[_CONFIG_VALUES] = values
        defaults = {PARAM_NAMES.get(key, key): value for key, value in values.items() if key != "settings"}
        ctx.default_map = {**(ctx.default_map or {}), **defaults}
        return path

    return click.option(
        "--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), default=None, is_eager=True,
        callback=load, help="Take the options from this YAML or TOML file (keys: the option names with "
                            "underscores, `settings:` for --set; see docs/reports.md). Flags given as well win.")


@dataclass
class RunConfig:
    """What a command runs with once --config, its flags and --set are merged."""

    settings: dict[str, dict[str, str]]  # component settings: the file's, with --set over them
    meta: dict[str, Any]  # the report's meta["config"]: {"file", "overridden", "values"}


def run_config(ctx: click.Context) -> RunConfig:
    """Merge --set over the file's settings and describe the run's options for the report."""
    from memdec_core.runs.runconfig import KEYS
    from memdec_core.runtime.progress import log

    file_values = ctx.meta.get(_CONFIG_VALUES, {})
    given = parse_assignments(ctx.params["assignments"])
    settings, overridden = _merge_settings(file_values.get("settings", {}), given)
    overridden = [key for key in file_values if key != "settings" and _from_command_line(ctx, key)] + overridden
    path = ctx.params.get("config_file")
    if overridden:
        log(f"the command line overrides {', '.join(overridden)} of {path}")
    values = {key: _config_value(ctx, key) for key in KEYS[ctx.command.name] if key != "settings"}
    values["settings"] = settings
    return RunConfig(settings, {"file": str(path) if path else None, "overridden": overridden, "values": values})


def _merge_settings(from_file: dict, given: dict) -> tuple[dict[str, dict[str, str]], list[str]]:
    merged = {name: dict(values) for name, values in from_file.items()}
    overridden = []
    for name, values in given.items():
        overridden += [f"settings.{name}.{key}" for key in values if key in merged.get(name, {})]
        merged.setdefault(name, {}).update(values)
    return merged, overridden


def _from_command_line(ctx: click.Context, key: str) -> bool:
    from click.core import ParameterSource

    source = ctx.get_parameter_source(PARAM_NAMES.get(key, key))
    return source in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT, ParameterSource.PROMPT)


def _config_value(ctx: click.Context, key: str) -> Any:
    """An option's effective value, as a config file would write it (lists, text, --budget's text)."""
    from memdec_core.runs.runconfig import budget_from_fields

    value = ctx.params[PARAM_NAMES.get(key, key)]
    if key == "budget":
        return budget_from_fields(value)
    if key == "methods":  # comma-separated on the command line; [] stands for the command's default
        return split_list(value) if value else []
    if key == "bases":
        return list(value)
    return str(value) if isinstance(value, Path) else value


def require_domain(ctx: click.Context, domain: str | None) -> None:
    """--domain is required, but a config file may give it: checked once both are read."""
    if not domain:
        raise click.MissingParameter(ctx=ctx, param=next(p for p in ctx.command.params if p.name == "domain"))


def write_report(path: Path, report: dict) -> None:
    """Write a command's JSON report (atomically); under several processes, the first writes it."""
    from memdec_core.runtime.distributed import world
    from memdec_core.store.artifacts import write_json

    if world().main:
        write_json(path, report)
