"""Name → component class, built from the plugins' registration hooks.

Lists of components always come from here at run time, never from a hand-written list.
"""

from __future__ import annotations

from dataclasses import dataclass

from memdec_core.components import plugins
from memdec_core.errors import ConfigError, DuplicateComponentError, PluginError, UnknownComponentError
from memdec_core.interfaces import Combiner, Component, Domain, MemoryModel, Method, ModelSource, Retriever, check_name


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
_tables_generation = -1  # the plugin manager's generation the tables were read in


def components(kind: str) -> dict[str, type]:
    """All registered classes of one kind, by name."""
    global _tables_generation
    if kind not in KINDS:
        raise UnknownComponentError("component kind", kind, list(KINDS))
    plugins.get_plugin_manager()  # loading the entry points is itself a change of generation
    if _tables_generation != plugins.generation():
        _tables.clear()
        _tables_generation = plugins.generation()
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


def collect_all() -> None:
    """Call every registration hook now, so a plugin whose hook raises is known to have failed."""
    for kind in KINDS:
        components(kind)


def plugin_records() -> list[plugins.PluginRecord]:
    """What ``memdec plugins`` shows: every plugin, after every registration hook was called, so a
    plugin whose hook raises shows as failed (the hooks import light modules only: no torch)."""
    collect_all()
    return plugins.records()


def default_bases() -> list[str]:
    """The registered models marked as defaults (the offline demo family), in registration order."""
    defaults = [name for name, cls in components("models").items() if cls.default]
    if not defaults:
        raise ConfigError("no base model given and no default models are installed; pass --base MODEL")
    return defaults


def default_methods() -> list[str]:
    """The methods that declare a place in the default comparison, in that order."""
    ranked = [(cls.compare_rank, name) for name, cls in components("methods").items() if cls.compare_rank is not None]
    return [name for _, name in sorted(ranked)]


def _collect(kind: Kind) -> dict[str, type]:
    manager = plugins.get_plugin_manager()
    table: dict[str, type] = {}
    for implementation in getattr(manager.hook, kind.hook).get_hookimpls():
        try:
            returned = list(implementation.function() or [])
        except Exception as error:  # a plugin's hook that raises is reported and skipped, never fatal
            plugins.mark_failed(implementation.plugin_name, f"{kind.hook} raised {type(error).__name__}: {error}")
            return _collect(kind)  # mark_failed cleared the tables: collect without that plugin
        for component in returned:
            _add(table, kind, component, implementation.plugin_name)
    return table


def _add(table: dict[str, type], kind: Kind, component: type, plugin_name: str) -> None:
    if not (isinstance(component, type) and issubclass(component, kind.base)):
        raise PluginError(f"plugin {plugin_name!r} registered {component!r} as a {kind.noun}, "
                          f"but it is not a subclass of {kind.base.__name__}")
    check_name(component.name)
    if component.name in table:
        first, second = sorted([table[component.name].plugin, plugin_name], key=_built_in_first)
        raise DuplicateComponentError(f"{kind.noun} name {component.name!r} is already used by "
                                      f"plugin {first!r}; plugin {second!r} registers it again")
    component.plugin = plugin_name
    table[component.name] = component


def _built_in_first(plugin_name: str) -> tuple[bool, str]:
    """A third-party plugin reusing a built-in name is the one to blame, whatever the load order."""
    record = next((record for record in plugins.records() if record.name == plugin_name), None)
    return (not (record and record.distribution == "memdec"), plugin_name)


def describe(kind: str) -> list[dict]:
    """Rows for ``memdec list KIND``: name, plugin and one-line description."""
    return [{"name": name, "plugin": cls.plugin, "description": cls.describe(), **_kind_facts(cls), **cls.info()}
            for name, cls in sorted(components(kind).items())]


def _kind_facts(cls: type) -> dict:
    """What each kind declares beside its settings (a retriever's kind, a method's default place)."""
    facts = {}
    for attribute in ("kind", "compare_rank", "needs_hidden", "elementwise"):
        if hasattr(cls, attribute):
            facts[attribute] = getattr(cls, attribute)
    return facts


__all__ = ["KINDS", "components", "get", "names", "describe", "collect_all", "plugin_records", "default_bases",
           "default_methods", "Component"]
