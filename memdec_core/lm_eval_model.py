"""lm-evaluation-harness's model type ``memdec``: a base mixed with a memory, as one causal LM.

    memdec-lm-eval --model memdec --model_args base=memdec-demo-m,memory=finance-memory,lam=0.3 \\
        --tasks hellaswag
    memdec-lm-eval --model memdec --model_args base=...,memory=knn-datastore,domain=finance --tasks ...
    memdec-lm-eval --model memdec --model_args base=...,memory=finance-memory,domain=finance,combiner=adaptive ...

A combiner that learns (``combiner=adaptive``) is fitted on ``domain``'s validation split when the
composite is built (``composite_model``; cached, so the next run reads the fit back).

``MemdecLM`` builds the composite model (``memdec_core.api.composite_model``) and hands it to
lm-eval's own ``HFLM``, so batching, ``loglikelihood``, ``loglikelihood_rolling`` and
``generate_until`` are lm-eval's. From Python, pass the composite to ``HFLM`` yourself::

    model = api.composite_model("memdec-demo-m", "finance-memory", lam=0.3)
    lm = HFLM(pretrained=model, tokenizer=model.tokenizer, backend="causal")
    lm_eval.simple_evaluate(model=lm, tasks=[...])

The composite runs where memdec puts models (``MEMDEC_DEVICE``, else the GPU when there is one);
lm-eval's ``--device`` does not move a model it is handed.

Why a console script of our own: lm-eval 0.4.13 resolves ``--model`` against its built-in table
only (``lm_eval.models.MODEL_MAPPING``) and reads no entry points, so an installed package cannot
add a model type to the ``lm_eval`` command. ``memdec-lm-eval`` (or ``python -m
memdec_core.lm_eval_model``) registers ``memdec`` and then runs lm-eval's own command line
unchanged. Releases of lm-eval that read the ``lm_eval.models`` entry-point group, which memdec
declares too, find ``memdec`` from ``lm_eval`` itself.

Only this module imports lm_eval (the ``tasks`` extra: ``pip install 'memdec[tasks]'``).
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from memdec_core.errors import ConfigError, MemdecError

try:
    from lm_eval.models.huggingface import HFLM
except ImportError as error:  # the extra is missing: say how to get it, in one line
    raise ConfigError("lm-evaluation-harness is not installed: pip install 'memdec[tasks]'") from error

MODEL_TYPE = "memdec"
#: What ``--model_args`` sets besides lm-eval's own HFLM options (batch_size, max_length, ...).
MEMDEC_ARGS = ("base", "memory", "domain", "lam", "combiner", "component_settings")


class MemdecLM(HFLM):
    """lm-eval's HFLM over a memdec composite: ``--model_args base=...,memory=...,domain=...,lam=...``.

    A key ``NAME.KEY`` sets a component's setting as ``--set NAME.KEY=VALUE`` does
    (``knn-datastore.temperatures=10``); ``component_settings`` takes them all as a dict (JSON
    model_args: ``{"component_settings": {"knn-datastore": {"k": 64}}}``). The other keys are HFLM's own
    (``batch_size``, ``max_length``, ...).
    """

    def __init__(self, base: str = "", memory: str = "", domain: str | None = None, lam: float | None = None,
                 combiner: str = "linear", component_settings: dict | str | None = None, **options: Any):
        from memdec_core import api

        component_settings, hflm_options = split_options(options, parse_settings(component_settings))
        if not base or not memory:
            raise ConfigError("--model memdec needs --model_args base=MODEL,memory=NAME_OR_FOLDER "
                              "(and domain=DOMAIN for a memory built from one)")
        model = api.composite_model(str(base), str(memory), domain=domain, lam=lam, combiner=combiner,
                                    component_settings=component_settings)
        # lm-eval recognises causal LMs by transformers' built-in model types, which "memdec" is not
        hflm_options.setdefault("backend", "causal")
        super().__init__(pretrained=model, tokenizer=model.tokenizer, **hflm_options)


def split_options(options: dict[str, Any], component_settings: dict | None) -> tuple[dict, dict]:
    """``NAME.KEY`` options into component settings; the rest must be HFLM's options."""
    settings = {name: dict(values) for name, values in (component_settings or {}).items()}
    hflm_options = {}
    for key, value in options.items():
        name, dot, setting_key = key.rpartition(".")
        if dot and name and setting_key:
            settings.setdefault(name, {})[setting_key] = value
        else:
            hflm_options[key] = value
    check_hflm_args(hflm_options)
    return settings, hflm_options


def hflm_args() -> list[str]:
    """The keyword arguments of lm-eval's HFLM (for a model it is handed, it ignores those about
    loading one)."""
    return [name for name, parameter in inspect.signature(HFLM.__init__).parameters.items()
            if name not in ("self", "pretrained", "tokenizer")
            and parameter.kind not in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL)]


def check_hflm_args(given: dict[str, Any]) -> None:
    """An unknown ``--model_args`` key is one line with a did-you-mean, not HFLM's TypeError."""
    known = [*MEMDEC_ARGS, *hflm_args()]
    for key in given:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"--model memdec: unknown model_args key {key!r}{hint} (memdec's: "
                              f"{', '.join(MEMDEC_ARGS)}, NAME.KEY for a component's setting; or an HFLM option)")


def parse_settings(settings: dict | str | None) -> dict | None:
    if not isinstance(settings, str):
        return settings
    try:
        parsed = json.loads(settings)
    except ValueError as error:
        raise ConfigError(f"--model memdec: component_settings must be JSON, e.g. "
                          f"component_settings={{\"knn-datastore\": {{\"k\": 64}}}} ({error})") from error
    if not isinstance(parsed, dict):
        raise ConfigError("--model memdec: component_settings must be a JSON object of component settings")
    return parsed


def register() -> None:
    """Make ``memdec`` a model type of lm-eval (``simple_evaluate(model="memdec", ...)``)."""
    from lm_eval.api import registry

    if MODEL_TYPE not in registry.MODEL_REGISTRY:  # an lm-eval that read memdec's entry point has it
        registry.register_model(MODEL_TYPE)(MemdecLM)


# ----------------------------------------------------------------------------------------------
# Local task files, checked before any model is loaded: lm-eval reads them only after it built
# the model, and reports a missing field as a bare TypeError deep in its task code.

#: What a task needs from its YAML (or the files it includes) for lm-eval to run it.
TASK_FIELDS = ("doc_to_text", "doc_to_target")


def check_local_tasks(argv: list[str]) -> None:
    """Check the YAML files under ``--include_path`` that define a task of ``--tasks``."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--tasks", "-t", nargs="+", default=[])
    parser.add_argument("--include_path", default=None)
    options, _ = parser.parse_known_args(argv)
    if not options.include_path:
        return
    wanted = set(re.split(r"[,\s]+", " ".join(options.tasks)))
    for path in sorted(Path(options.include_path).expanduser().rglob("*.yaml")):
        config = read_task_yaml(path)
        if config.get("task") in wanted:
            check_task(path, config)


def read_task_yaml(path: Path) -> dict:
    """A task YAML with the files it includes merged in (its own keys win); ``!function`` tags
    are kept as text, never imported."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    try:
        config = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)  # noqa: S506 (a SafeLoader)
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"task file {path}: {str(error).splitlines()[0]}") from error
    if not isinstance(config, dict):
        return {}
    includes = config.pop("include", [])
    merged: dict = {}
    for include in includes if isinstance(includes, list) else [includes]:
        merged.update(read_task_yaml(path.parent / include))
    return {**merged, **config}


def check_task(path: Path, config: dict) -> None:
    """A missing field or data file of a local task is one line naming the file."""
    needed = [*TASK_FIELDS, *(["doc_to_choice"] if config.get("output_type") == "multiple_choice" else [])]
    if "custom_dataset" not in config:
        needed.insert(0, "dataset_path")
    missing = [key for key in needed if key not in config]
    if not config.get("test_split") and not config.get("validation_split"):
        missing.append("test_split (or validation_split)")
    if missing:
        raise ConfigError(f"task {config['task']!r} ({path}) lacks {', '.join(missing)}")
    files = (config.get("dataset_kwargs") or {}).get("data_files") or []
    for name in _listed(files):
        if not any(mark in name for mark in ("*", "?", "[", "://")) and not Path(name).expanduser().exists():
            raise ConfigError(f"task {config['task']!r} ({path}): data file {name} not found "
                              f"(data_files are read from the working directory, {Path.cwd()})")


def _listed(files) -> list[str]:
    """The paths of a ``data_files`` value: a path, a list, or a split → path(s) mapping."""
    if isinstance(files, dict):
        return [name for value in files.values() for name in _listed(value)]
    return [files] if isinstance(files, str) else [str(name) for name in files]


def main(argv: list[str] | None = None) -> None:
    """``memdec-lm-eval``: lm-eval's command line with the ``memdec`` model type registered.

    A memdec error (a bad model_args value, a memory that does not fit the base) is one line and
    exit status 1, as in ``memdec``; ``MEMDEC_DEBUG=1`` shows the traceback.
    """
    from lm_eval.__main__ import cli_evaluate

    register()
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    try:
        check_local_tasks(sys.argv[1:])
        cli_evaluate()
    except MemdecError as error:
        if os.environ.get("MEMDEC_DEBUG"):
            raise
        print(f"Error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
