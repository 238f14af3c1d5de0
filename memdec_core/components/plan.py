"""The plan of a run: the user's settings per component name, and the tree of components it uses.

``--set NAME.KEY=VALUE`` reaches any registered component by name: a method, the memory it
mixes, the retriever that memory searches with, the combiner, the domain. Before any work starts
the plan walks what each method uses (``Component.uses()``), so that an unknown name, a
retriever of the wrong kind, a component whose plugin dependency is disabled, or a setting for a
component that takes no part in the run is a one-line error rather than a failure an hour in.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

from memdec_core.components import registry
from memdec_core.errors import ConfigError, PluginError
from memdec_core.interfaces import Component, Use


class Plan:
    """Settings by component name (``component_settings``: typed values, or strings from the command
    line), and the run's base models (a memory trained for the run picks its teacher and init among them)."""

    def __init__(self, component_settings: dict[str, dict[str, Any]] | None = None, bases: Iterable[str] = ()):
        self.component_settings = {name: dict(values) for name, values in (component_settings or {}).items()}
        self.bases = tuple(bases)

    def create(self, kind: str, name: str, *, config: Any = None, **extra: Any) -> Component:
        """The component ``name`` of ``kind``: its settings from this plan, or the given ``config``."""
        cls = registry.get(kind, name)
        check_requirements(cls)
        if config is not None:
            return cls(config, **extra)
        values = {}
        for source in (*cls.shares_settings_with, name):
            values.update(cls.settings_from_text(self.component_settings.get(source, {}), given_as=source))
        return cls(**{**values, **extra})

    def resolve(self, roots: Iterable[Component]) -> list[tuple[str, Component]]:
        """Every component the roots use, recursively, as ``(kind, component)``; checks each use."""
        found: list[tuple[str, Component]] = []
        pending = [(kind_of(root), root) for root in roots]
        while pending:
            kind, component = pending.pop(0)
            found.append((kind, component))
            for use in component.uses():
                pending.append((use.kind, self.create_use(use)))
        return found

    def create_use(self, use: Use) -> Component:
        from memdec_core.errors import UnknownComponentError

        try:
            cls = registry.get(use.kind, use.name)
        except UnknownComponentError as error:
            raise UnknownComponentError(error.kind, error.name, error.available,
                                        hint=f"set by {use.setting}{_disabled_hint()}") from None
        if use.accepts and getattr(cls, "kind", None) not in use.accepts:
            fitting = [name for name, other in registry.components(use.kind).items()
                       if getattr(other, "kind", None) in use.accepts]
            raise ConfigError(f"{use.setting}={use.name}: {use.name!r} is a {cls.kind} retriever; this needs one "
                              f"of kind {' or '.join(use.accepts)} ({', '.join(sorted(fitting)) or 'none installed'})")
        return self.create(use.kind, use.name, config=use.config)

    def check_all_used(self, components: Iterable[Component], also: Iterable[str] = ()) -> None:
        """Refuse settings for a name that no component of the run answers to."""
        names = {component.name for component in components} | set(also)
        for component in components:
            names.update(component.shares_settings_with)
        unused = sorted(set(self.component_settings) - names)
        if unused:
            raise ConfigError(f"settings given for {', '.join(unused)}, which this run does not use "
                              f"(it uses: {', '.join(sorted(names))})")


def set_by_shorthand(component_settings: dict[str, dict[str, Any]], cls: type[Component], key: str, value: Any,
                     given_as: str) -> dict[str, dict[str, Any]]:
    """A copy of ``component_settings`` with ``cls``'s setting ``key`` set to ``value``, which the
    option ``given_as`` gave (``--lam`` for the combiner's λ). The same setting given by name as
    well (``--set linear.lam=0.2``) must agree with it: two values are refused rather than one of
    them silently winning."""
    name = cls.name or ""
    settings = {component: dict(values) for component, values in component_settings.items()}
    given = settings.setdefault(name, {})
    if key in given and cls.settings_from_text({key: given[key]})[key] != value:
        raise ConfigError(f"{name}.{key} is given twice: {given_as}={value} and {name}.{key}={given[key]}; "
                          f"give it once")
    given[key] = value
    return settings


def kind_of(component: Component) -> str:
    """The registry kind of a component instance (methods, retrievers, ...)."""
    for kind in registry.KINDS.values():
        if isinstance(component, kind.base):
            return kind.name
    raise ConfigError(f"{component!r} is not a memdec component")


def check_requirements(cls: type) -> None:
    """A component that needs another plugin fails clearly when that plugin is not loaded."""
    if not cls.requires:
        return
    status = {record.name: record.status for record in registry.plugin_records()}
    for plugin in cls.requires:
        if status.get(plugin) != "loaded":
            state = status.get(plugin, "not installed")
            how = " (MEMDEC_DISABLE_PLUGINS)" if state == "disabled" else ""
            raise PluginError(f"{cls.name} (plugin {cls.plugin}) needs plugin {plugin!r}, which is {state}{how}")


def identity(resolved: list[tuple[str, Component]]) -> list[dict[str, Any]]:
    """What made a result: every component's kind, name, code identity and settings."""
    from memdec_core.components.identity import component_identity

    return [{"kind": kind, "name": component.name, "code": component_identity(type(component)),
             "settings": dataclasses.asdict(component.config)} for kind, component in resolved]


def _disabled_hint() -> str:
    from memdec_core.components.plugins import disabled_plugin_names

    disabled = sorted(disabled_plugin_names())
    return f"; disabled plugins: {', '.join(disabled)}" if disabled else ""
