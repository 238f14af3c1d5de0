"""Run config files: everything ``memdec eval`` or ``memdec compare`` takes, in one YAML or TOML file.

    domain: finance
    bases: [memdec-demo-s, memdec-demo-m]
    methods: [base, knn-lm]
    max_train_tokens: 0          # 0: the whole split
    settings:
      knn-lm: {k: 256}           # as --set knn-lm.k=256

Keys are the commands' option names with underscores (``--max-train-tokens`` → ``max_train_tokens``;
``--base`` and ``--method`` are the lists ``bases`` and ``methods``). A file is checked whole before
any work starts: an unknown or ill-typed key is a one-line ConfigError naming the key and the file
(a value is shown cut short). A YAML file whose aliases expand to more than MAX_VALUES values
(a "billion laughs") is refused before anything walks it.
Values under ``settings`` reach the components as ``--set`` text does, so each component types
(and checks) its own. The CLI merges its flags over a file (``memdec_cli.options``); from Python:

    values = load_run_config("run.yaml", "eval")
    api.evaluate(values["domain"], values.get("bases", ()), values.get("methods", ("base",)),
                 settings=window_settings(values), method_settings=values.get("settings"))

This module imports neither click nor torch.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from memdec_core.errors import ConfigError, shorten

SUFFIXES = (".yaml", ".yml", ".toml")
#: ``--format`` of each command (the commands' click.Choice reads them from here).
FORMATS = {"eval": ("table", "json", "markdown"), "compare": ("table", "json", "markdown", "csv")}
#: The window options, in the order EvalSettings takes them.
WINDOW_KEYS = ("context", "stride", "batch_size", "max_train_tokens", "max_eval_tokens")
#: The most values (keys, scalars, lists, mappings) a YAML file may hold with its aliases expanded
#: where they stand; a run config holds a few dozen.
MAX_VALUES = 10_000
#: How much of a key an error message shows (of a value: errors.shorten's 60 characters).
NAME_WIDTH = 24


#: What ``memdec compare`` uses unless told otherwise: sized so that the embedded default (three
#: demo bases × six methods on finance) runs cold in under 10 minutes on 2 CPU cores. ``0`` for the
#: token caps means the whole split; the library's ``compare`` applies no cap unless given one.
QUICK_TRAIN_TOKENS = 32_768
QUICK_EVAL_TOKENS = 4_096


#: ``--budget`` for the paper's protocol: every method that trains gets the Memory Decoder's FLOPs.
EQUAL_COMPUTE = "equal"


def parse_budget(text: str) -> dict[str, Any]:
    """``equal`` (the paper's protocol), ``0`` (each method's own schedule), ``65536``, ``64k``,
    ``2M`` (training tokens) or ``3e12flops``, ``2.5TFLOPs`` (FLOPs) → CompareSettings fields."""
    import re

    if text.strip().lower() == EQUAL_COMPUTE:
        return {"equal_compute": True}
    # the number's digits split one way only: overlapping runs backtrack quadratically on long text
    number = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:e[0-9]+)?"
    match = re.fullmatch(rf"\s*({number})\s*([kmgtp]?)\s*(flops?|tokens?)?\s*", text.lower())
    if not match:
        raise ConfigError(f"budget {shorten(repr(text))} is not 'equal', 0, a number of tokens (65536, 64k, 2M) "
                          f"or FLOPs (3e12flops, 2TFLOPs)")
    number, prefix, unit = match.groups()
    value = float(number) * 1000 ** "_kmgtp".index(prefix or "_")
    if value == 0:
        return {"equal_compute": False}
    if unit and unit.startswith("flop"):
        return {"budget_flops": value, "equal_compute": False}
    if value != int(value):
        raise ConfigError(f"a budget in tokens must be a whole number, got {shorten(repr(text))}")
    return {"budget_tokens": int(value), "equal_compute": False}


@dataclass(frozen=True)
class Key:
    """What one key of a config file must hold."""

    expected: str  # for the error message: "must be <expected>"
    check: Callable[[Any], bool]
    nullable: bool = False  # null (YAML's ~) stands for the option's default


def _integer(minimum: int) -> Callable[[Any], bool]:
    # bool is an int in Python; `context: true` is a mistake, not 1
    return lambda value: isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _token_cap(value: Any) -> bool:
    return _integer(0)(value) and value != 1  # 0 is the whole split; a window needs two tokens


def _fraction(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0


def _text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _texts(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(_text(item) for item in value)


def _one_of(choices: tuple[str, ...]) -> Callable[[Any], bool]:
    return lambda value: value in choices


def _budget(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return False
    try:
        parse_budget(budget_text(value))
    except ConfigError:
        return False
    return True


_COMMON = {
    "domain": Key("a domain name or a corpus folder", _text),
    "bases": Key("a list of base model names", _texts),
    "methods": Key("a list of method names", _texts),
    "memory": Key("a memory model name or a memory folder", _text, nullable=True),
    "combiner": Key("a combiner name or path/to/file.py:Name, or a list of them (a row per combiner)",
                    lambda value: _text(value) or _texts(value)),
    "lam": Key("a number from 0 to 1", _fraction, nullable=True),
    "context": Key("an integer of at least 2", _integer(2), nullable=True),
    "stride": Key("an integer of at least 1", _integer(1), nullable=True),
    "batch_size": Key("an integer of at least 1", _integer(1)),
    "max_train_tokens": Key("0 (the whole split) or an integer of at least 2", _token_cap),
    "max_eval_tokens": Key("0 (the whole split) or an integer of at least 2", _token_cap),
    "output": Key("a file path", _text, nullable=True),
    "settings": Key("a mapping NAME → {KEY: VALUE}", lambda value: isinstance(value, dict)),
}
#: The keys a config file of each command may hold (``settings`` is checked further by _settings).
KEYS: dict[str, dict[str, Key]] = {
    "eval": {**_COMMON, "format": Key(f"one of {', '.join(FORMATS['eval'])}", _one_of(FORMATS["eval"]))},
    "compare": {
        **_COMMON,
        "format": Key(f"one of {', '.join(FORMATS['compare'])}", _one_of(FORMATS["compare"])),
        "budget": Key("'equal', 0, a number of tokens (65536, '64k') or FLOPs ('3e12flops')", _budget),
        "general_tokens": Key("an integer of at least 2", _integer(2)),
        "latency_tokens": Key("an integer of at least 2", _integer(2)),
        "fresh": Key("true or false", lambda value: isinstance(value, bool)),
        "plot": Key("a file path", _text, nullable=True),
    },
}


def load_run_config(path: str | Path, command: str = "eval") -> dict[str, Any]:
    """The options in the config file ``path`` for ``command`` ("eval" or "compare"), checked.

    Returns only the keys the file holds, with ``budget`` as text and ``settings`` as
    ``{NAME: {KEY: text}}`` (what ``--set NAME.KEY=VALUE`` gives).
    """
    path = Path(path)
    data = read_config_file(path)
    keys = KEYS[command]
    values = {}
    for key, value in data.items():
        key = str(key)  # YAML allows `1: x`; it is still an unknown key
        if key not in keys:
            raise ConfigError(f"config file {path}: {_unknown(key, command)}")
        spec = keys[key]
        if not ((value is None and spec.nullable) or (value is not None and spec.check(value))):
            raise ConfigError(f"config file {path}: {key} must be {spec.expected}, got {_shown(value)}")
        values[key] = value
    if "settings" in values:
        values["settings"] = _settings(values["settings"], path)
    if "budget" in values:
        values["budget"] = budget_text(values["budget"])
    return values


def read_config_file(path: Path) -> dict[str, Any]:
    """The mapping a .yaml, .yml or .toml file holds (an empty YAML file holds none)."""
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ConfigError(f"config file {path}: must be YAML (.yaml, .yml) or TOML (.toml)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read config file {path}: {getattr(error, 'strerror', None) or error}") from None
    language = "TOML" if suffix == ".toml" else "YAML"
    try:
        data = _parse_toml(text) if language == "TOML" else _parse_yaml(text)
    except _TooManyValues:
        raise ConfigError(f"config file {path}: holds more than {MAX_VALUES:,} values once its YAML aliases "
                          f"(*name) are expanded; a run config needs far fewer") from None
    except RecursionError:  # both parsers recurse once per level of [ or {
        raise ConfigError(f"config file {path}: lists or mappings nested too deeply") from None
    except ValueError as error:
        raise ConfigError(f"config file {path}: not valid {language}: {shorten(_one_line(error), 160)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: must hold a mapping of option names to values, "
                          f"not a {type(data).__name__}")
    return data


class _TooManyValues(Exception):
    """A YAML file whose aliases expand past MAX_VALUES."""


def _parse_yaml(text: str) -> Any:
    """yaml.safe_load in its two steps, with the expanded size checked between them.

    Composing keeps one node per anchor however often it is aliased, so it is as cheap as the text;
    but a list of ten aliases of a list of ten aliases ... is 10**9 values to whatever walks what
    was built (a check, a repr in an error, merge keys): 93 s and 12 GB from a few hundred bytes.
    """
    import yaml

    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:  # an empty file
            return None
        if _expands_past(node, MAX_VALUES):
            raise _TooManyValues
        return loader.construct_document(node)
    except yaml.YAMLError as error:
        raise ValueError(str(error)) from None
    finally:
        loader.dispose()


def _expands_past(root: Any, limit: int) -> bool:
    """Whether the YAML node ``root`` holds more than ``limit`` nodes with each alias counted where it
    stands. A walk, not a recursion (an alias may even point at its own parent); it stops at ``limit``,
    so a bomb costs ``limit`` steps, not a billion."""
    count, stack = 0, [root]
    while stack:
        node = stack.pop()
        count += 1
        if count > limit:
            return True
        if node.id == "sequence":
            stack.extend(node.value)
        elif node.id == "mapping":
            stack.extend(item for pair in node.value for item in pair)
    return False


def _parse_toml(text: str) -> dict[str, Any]:
    try:
        import tomllib
    except ImportError:  # Python 3.10: the same parser, as a package
        import tomli as tomllib
    return tomllib.loads(text)  # TOMLDecodeError is a ValueError


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def _shown(value: Any) -> str:
    """A value as an error shows it: its repr, cut short."""
    return shorten(repr(value))


def _name(key: Any) -> str:
    """A key of the file as an error names it, cut shorter than a value (a message may name two)."""
    return shorten(str(key), NAME_WIDTH)


def _unknown(key: str, command: str) -> str:
    other = next((name for name in KEYS if name != command and key in KEYS[name]), None)
    if other:
        return f"{key} is an option of memdec {other}, not of memdec {command}"
    message = f"unknown key {shorten(repr(key), NAME_WIDTH)}"
    close = difflib.get_close_matches(key.replace("-", "_"), list(KEYS[command]), n=1, cutoff=0.6)
    if close:
        message += f"; did you mean {close[0]!r}?"
    return f"{message} (keys: {', '.join(KEYS[command])})"


def _settings(mapping: dict, path: Path) -> dict[str, dict[str, str]]:
    """``{NAME: {KEY: VALUE}}`` with every VALUE as the text --set would give for it."""
    settings: dict[str, dict[str, str]] = {}
    for name, values in mapping.items():
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path}: settings.{_name(name)} must be a mapping of setting names "
                              f"to values, got {_shown(values)}")
        settings[str(name)] = {}
        for key, value in values.items():
            text = setting_text(value)
            if text is None:
                raise ConfigError(f"config file {path}: settings.{_name(name)}.{_name(key)} must be a string, "
                                  f"a number, true/false or a list of those, got {_shown(value)}")
            settings[str(name)][str(key)] = text
    return settings


def setting_text(value: Any) -> str | None:
    """A setting's value as ``--set`` text (lists comma-separated), or None for what text cannot say."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return str(value)
    if isinstance(value, list) and value:
        items = [setting_text(item) for item in value if not isinstance(item, list)]
        return ",".join(items) if len(items) == len(value) and None not in items else None
    return None


def budget_text(value: Any) -> str:
    """A budget as ``--budget`` text: 0 → "0", 2e12 → "2000000000000" (parse_budget takes no "e+12")."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def budget_from_fields(fields: dict[str, Any]) -> str:
    """``parse_budget``'s CompareSettings fields back to ``--budget`` text (for a report's config)."""
    if fields.get("budget_tokens"):
        return str(fields["budget_tokens"])
    if fields.get("budget_flops"):
        return f"{budget_text(float(fields['budget_flops']))}flops"
    return "equal" if fields.get("equal_compute", True) else "0"


def window_settings(values: dict[str, Any]):
    """The EvalSettings of a config's window options, with the CLI's defaults: the quick caps of
    ``memdec compare`` (QUICK_TRAIN_TOKENS, QUICK_EVAL_TOKENS) where a cap is not given, 0 the whole split."""
    from memdec_core.interfaces import EvalSettings

    train = values.get("max_train_tokens", QUICK_TRAIN_TOKENS)
    evaluation = values.get("max_eval_tokens", QUICK_EVAL_TOKENS)
    return EvalSettings(context=values.get("context"), stride=values.get("stride"),
                        batch_size=values.get("batch_size") or EvalSettings.batch_size,
                        max_train_tokens=train or None, max_eval_tokens=evaluation or None)


def window_values(settings) -> dict[str, Any]:
    """EvalSettings as a config's window options (no cap: 0), the inverse of ``window_settings``."""
    return {"context": settings.context, "stride": settings.stride, "batch_size": settings.batch_size,
            "max_train_tokens": settings.max_train_tokens or 0, "max_eval_tokens": settings.max_eval_tokens or 0}


__all__ = ["FORMATS", "KEYS", "WINDOW_KEYS", "budget_from_fields", "load_run_config", "read_config_file",
           "window_settings", "window_values"]
