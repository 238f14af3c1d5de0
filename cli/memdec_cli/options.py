"""The CLI's own options: --config files merged with the flags and --set, lists, reports.

The options plugins' commands share with these (window options, --set) are memdec_core.command_kit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from memdec_core.command_kit import parse_assignments
from memdec_core.errors import ConfigError

#: ``--memory NAME|FOLDER`` of eval, compare and tasks, as on generate, export and transfer.
memory_option = click.option(
    "--memory", default=None, metavar="NAME|FOLDER",
    help="The memory the run's mixing methods use: a folder (a memory from `memdec train` or any transformers "
         "causal LM of the base's tokenizer, a datastore) or a memory model's name; the same as --set "
         "memdec.path=FOLDER / mixture.memory=NAME (give one). With --method base alone, the memory's method "
         "(memdec, knn-lm or mixture) is added.")


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
        defaults = {PARAM_NAMES.get(key, key): _option_value(key, value) for key, value in values.items()
                    if key != "settings"}
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


def _option_value(key: str, value: Any) -> Any:
    """A config file's value as its option takes it: a list of combiners as --combiner's comma-separated text."""
    return ",".join(value) if key == "combiner" and isinstance(value, list) else value


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
    if key == "combiner":  # one name, or the list of a head-to-head
        names = split_list((value,))
        return names[0] if len(names) == 1 else names
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
