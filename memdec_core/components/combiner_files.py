"""Combiners from user code: ``path/to/file.py:Name``, a registered name, a class or an instance."""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memdec_core.errors import ConfigError, MemdecError, UnknownComponentError
from memdec_core.interfaces import Combiner

if TYPE_CHECKING:
    from memdec_core.components.plan import Plan


def resolve_combiner(spec: Any) -> type[Combiner]:
    """A Combiner class for ``spec``: a registered name, ``file.py[:Name]``, a class or an instance.

    An instance fixes its knobs: its config is the only one tried on validation.
    """
    if isinstance(spec, Combiner):
        return _fixed(spec)
    if isinstance(spec, type) and issubclass(spec, Combiner):
        return spec
    if combiner_file(spec):
        return load_combiner_file(spec)
    if isinstance(spec, str):
        from memdec_core.components import registry

        return registry.get("combiners", spec)
    raise ConfigError(f"not a combiner: {spec!r} (give a name, file.py:Name, or a Combiner)")


def _fixed(instance: Combiner) -> type[Combiner]:
    config = instance.config
    return type(type(instance).__name__, (type(instance),),
                {"grid": classmethod(lambda cls: [dataclasses.replace(config)])})


def with_fixed_knobs(combiner_class: type[Combiner], values: dict[str, Any]) -> type[Combiner]:
    """``combiner_class`` with some knobs fixed (``--set product.alpha=0.3``); the rest still tuned."""
    grid = []
    for point in combiner_class.grid():
        fixed = dataclasses.replace(point, **values)
        if fixed not in grid:
            grid.append(fixed)
    return type(combiner_class.__name__, (combiner_class,), {"grid": classmethod(lambda cls: list(grid)),
                                                             "__module__": combiner_class.__module__})


def combiner_with_settings(combiner_class: type[Combiner], plan: "Plan") -> type[Combiner]:
    """``--set NAME.KNOB=VALUE`` for the combiner fixes that knob; the others are still tuned."""
    values = plan.component_settings.get(combiner_class.name or "", {})
    return with_fixed_knobs(combiner_class, combiner_class.settings_from_text(values)) if values else combiner_class


def combiner_file(spec: Any) -> str | None:
    """The file a combiner spec names (``file.py`` of ``file.py:Name``): code that resolving it
    runs. None for a registered name, which runs only installed code."""
    if isinstance(spec, str) and (".py" in spec or "/" in spec):
        return spec.partition(":")[0]
    return None


def load_combiner_file(spec: str) -> type[Combiner]:
    """Import ``file.py`` and pick the Combiner named after the colon (or its only one)."""
    path_text, _, wanted = spec.partition(":")
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise ConfigError(f"combiner file not found: {path}")
    candidates = _combiners_in(_import_file(path))
    if wanted:
        by_component_name = {cls.name: cls for cls in candidates.values() if cls.name}
        if wanted not in candidates and wanted not in by_component_name:
            raise UnknownComponentError(f"combiner in {path.name}", wanted, list(candidates))
        return candidates.get(wanted) or by_component_name[wanted]
    if len(candidates) != 1:
        found = ", ".join(sorted(candidates)) or "none"
        raise ConfigError(f"{path} defines {len(candidates)} combiners ({found}); "
                          f"name one as {path}:Name")
    return next(iter(candidates.values()))


def _import_file(path: Path):
    module_name = f"memdec_user_combiner_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up while the file runs
    try:
        spec.loader.exec_module(module)
    except MemdecError:
        sys.modules.pop(module_name, None)
        raise
    except (Exception, SystemExit) as error:  # a file that calls sys.exit() must not end memdec silently
        sys.modules.pop(module_name, None)
        raise ConfigError(f"cannot import combiner file {path}: {_cause(error)}") from error
    return module


def _cause(error: BaseException) -> str:
    """``SystemExit(3)``, ``NameError: name 'x' is not defined``: one line."""
    if isinstance(error, SystemExit):
        return repr(error)
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def _combiners_in(module) -> dict[str, type[Combiner]]:
    """Concrete Combiner classes defined in the module (not imported into it), by attribute name."""
    return {attribute: value for attribute, value in vars(module).items()
            if inspect.isclass(value) and issubclass(value, Combiner) and not inspect.isabstract(value)
            and value.__module__ == module.__name__}
