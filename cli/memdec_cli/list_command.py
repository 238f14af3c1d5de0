"""``memdec list KIND [NAME]``: the components that the installed plugins provide, and their settings."""

from __future__ import annotations

import json

import click

from memdec_core.components.registry import KINDS


@click.command("list")
@click.argument("kind", type=click.Choice(sorted(KINDS)))
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def list_components(kind: str, name: str | None, as_json: bool):
    """List the methods, retrievers, memory-models, combiners, domains or models available.

    Each row shows the component's settings with their defaults; with NAME, every setting of
    that component with what it does. Change one with `--set NAME.KEY=VALUE` in eval, compare
    and generate.
    """
    from memdec_core.components import registry

    rows = registry.describe(kind)
    if name is not None:
        registry.get(kind, name)  # an unknown name: did-you-mean
        rows = [row for row in rows if row["name"] == name]
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    from memdec_cli.render import print_table

    if name is not None:
        row = rows[0]
        print_table(f"{name} ({row['plugin']}): {row['description']}", ["setting", "default", "what it does"],
                    [[key, _text(value), row["help"].get(key, "")] for key, value in row["settings"].items()])
        return
    print_table(kind.capitalize(), ["name", "plugin", "description", "settings (defaults)"],
                [[row["name"], row["plugin"], row["description"], _settings_text(row["settings"])]
                 for row in rows])


def _text(value) -> str:
    if isinstance(value, tuple):
        return ",".join(f"{item:g}" if isinstance(item, float) else str(item) for item in value)
    return str(value)


def _settings_text(settings: dict) -> str:
    return ", ".join(f"{key}={_text(value)}" for key, value in settings.items()) or "-"
