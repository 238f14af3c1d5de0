"""Name → component class, built from the plugins' registration hooks.

Lists of components always come from here at run time, never from a hand-written list.
"""

from __future__ import annotations

from dataclasses import dataclass

from memdec_core.errors import DuplicateComponentError, PluginError, UnknownComponentError
from memdec_core.interfaces import (Combiner, Component, Domain, MemoryModel, Method,
                                    ModelSource, Retriever, check_name)


@dataclass(frozen=True)
class Kind:
    """One kind of component: its CLI name, singular noun, hook and base class."""

    name: str
    noun: str
    hook: str
    base: type


KINDS = {kind.name: kind for kind in (
    Kind("methods", "method", "memdec_register_methods", Method),
    Kind("retrievers", "retriever", "memdec_register_retrievers", Retriever),
    Kind("memory-models", "memory model", "memdec_register_memory_models", MemoryModel),
    Kind("combiners", "combiner", "memdec_register_combiners", Combiner),
    Kind("domains", "domain", "memdec_register_domains", Domain),
    Kind("models", "model", "memdec_register_models", ModelSource),
)}

_tables: dict[str, dict[str, type]] = {}


def clear_cache() -> None:
    _tables.clear()


def components(kind: str) -> dict[str, type]:
    """All registered classes of one kind, by name."""
    if kind not in KINDS:
        raise UnknownComponentError("component kind", kind, list(KINDS))
    if kind not in _tables:
        _tables[kind] = _collect(KINDS[kind])
    return _tables[kind]


def get(kind: str, name: str) -> type:
    """The class registered under ``name``; an unknown name raises with a did-you-mean."""
    table = components(kind)
    if name not in table:
        raise UnknownComponentError(KINDS[kind].noun, name, list(table))
    return table[name]


def names(kind: str) -> list[str]:
    return sorted(components(kind))


def _collect(kind: Kind) -> dict[str, type]:
    from memdec_core.plugins import get_plugin_manager

    manager = get_plugin_manager()
    table: dict[str, type] = {}
    for implementation in getattr(manager.hook, kind.hook).get_hookimpls():
        for component in implementation.function() or []:
            _add(table, kind, component, implementation.plugin_name)
    return table


def _add(table: dict[str, type], kind: Kind, component: type, plugin_name: str) -> None:
    if not (isinstance(component, type) and issubclass(component, kind.base)):
        raise PluginError(f"plugin {plugin_name!r} registered {component!r} as a {kind.noun}, "
                          f"but it is not a subclass of {kind.base.__name__}")
    check_name(component.name)
    if component.name in table:
        other = table[component.name].plugin
        raise DuplicateComponentError(f"{kind.noun} name {component.name!r} is already used by "
                                      f"plugin {other!r}; plugin {plugin_name!r} registers it again")
    component.plugin = plugin_name
    table[component.name] = component


def describe(kind: str) -> list[dict]:
    """Rows for ``memdec list KIND``: name, plugin and one-line description."""
    return [{"name": name, "plugin": cls.plugin, "description": cls.describe(), **cls.info()}
            for name, cls in sorted(components(kind).items())]


__all__ = ["KINDS", "components", "get", "names", "describe", "clear_cache", "Component"]
