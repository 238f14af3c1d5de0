"""The plugin manager: loads every entry point of the ``memdec`` group, built-ins included.

A plugin that fails to import, or whose registration hook raises when called, is recorded and
skipped (``memdec plugins`` reports it), so one broken third-party package never takes the CLI
down. ``MEMDEC_DISABLE_PLUGINS=a,b`` blocks
plugins by entry-point name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import metadata

import pluggy

from memdec_core import hookspecs
from memdec_core.errors import UnknownComponentError

ENTRY_POINT_GROUP = "memdec"


@dataclass
class PluginRecord:
    """What ``memdec plugins`` shows about one entry point."""

    name: str
    module: str
    distribution: str | None
    version: str | None
    status: str  # "loaded", "disabled" or "failed"
    hooks: list[str] = field(default_factory=list)
    error: str | None = None


_manager: pluggy.PluginManager | None = None
_records: list[PluginRecord] = []
#: Bumped whenever the set of plugins changes, so what was read from their hooks (the registry's
#: tables) is known to be stale without this module calling back up into the registry.
_generation = 0


def disabled_plugin_names() -> set[str]:
    raw = os.environ.get("MEMDEC_DISABLE_PLUGINS", "")
    return {name.strip() for name in raw.split(",") if name.strip()}


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide manager, loading entry points on first use."""
    global _manager
    if _manager is None:
        manager = pluggy.PluginManager("memdec")
        manager.add_hookspecs(hookspecs)
        _records[:] = _load_entry_points(manager)
        _manager = manager
    return _manager


def reset_plugin_manager() -> None:
    """Forget loaded plugins, so newly installed ones or a changed environment take effect."""
    global _manager
    _manager = None
    _records.clear()
    _changed()


def generation() -> int:
    """A number that changes whenever the set of plugins does (the registry's cache is keyed by it)."""
    return _generation


def records() -> list[PluginRecord]:
    """Every entry point (and in-process plugin) as loaded so far. A plugin whose registration hook
    raises shows as failed once that hook was called: ``registry.plugin_records`` calls them all."""
    get_plugin_manager()
    return list(_records)


def mark_failed(name: str, error: str) -> None:
    """Record that plugin ``name`` broke while registering, and unload it: the rest keeps working."""
    manager = get_plugin_manager()
    if manager.get_plugin(name) is not None:
        manager.unregister(name=name)
    for record in _records:
        if record.name == name:
            record.status, record.error, record.hooks = "failed", error, []
    _changed()


def register_plugin(module_or_object, name: str) -> None:
    """Register a plugin object directly (tests, notebooks); it behaves like an entry point."""
    manager = get_plugin_manager()
    manager.register(module_or_object, name=name)
    manager.check_pending()
    _records.append(PluginRecord(name, getattr(module_or_object, "__name__", repr(module_or_object)),
                                 None, None, "loaded", _hook_names(manager, module_or_object)))
    _changed()


def unregister_plugin(name: str) -> None:
    manager = get_plugin_manager()
    manager.unregister(name=name)
    _records[:] = [record for record in _records if record.name != name]
    _changed()


def _changed() -> None:
    global _generation
    _generation += 1


def _load_entry_points(manager: pluggy.PluginManager) -> list[PluginRecord]:
    entry_points = sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)
    disabled = disabled_plugin_names()
    for name in sorted(disabled - {entry_point.name for entry_point in entry_points}):
        # A typo here would silently leave the plugin enabled.
        raise UnknownComponentError("plugin", name, [entry_point.name for entry_point in entry_points],
                                    hint="check MEMDEC_DISABLE_PLUGINS")
    records = []
    for entry_point in entry_points:
        if manager.get_plugin(entry_point.name) is not None:
            continue  # the same distribution seen twice on sys.path
        records.append(_load_one(manager, entry_point, disabled))
    return records


def _load_one(manager, entry_point, disabled: set[str]) -> PluginRecord:
    dist = entry_point.dist
    record = PluginRecord(entry_point.name, entry_point.value,
                          dist.metadata["Name"] if dist else None, dist.version if dist else None,
                          "loaded")
    if entry_point.name in disabled:
        record.status = "disabled"
        return record
    try:
        plugin = entry_point.load()
        manager.register(plugin, name=entry_point.name)
        manager.check_pending()  # a misspelt hook name is an error, not a silent no-op
    except Exception as error:  # a broken plugin is reported and skipped, never fatal
        if manager.get_plugin(entry_point.name) is not None:
            manager.unregister(name=entry_point.name)
        record.status, record.error = "failed", f"{type(error).__name__}: {error}"
        return record
    record.hooks = _hook_names(manager, plugin)
    return record


def _hook_names(manager: pluggy.PluginManager, plugin) -> list[str]:
    return sorted(caller.name for caller in manager.get_hookcallers(plugin) or [])
