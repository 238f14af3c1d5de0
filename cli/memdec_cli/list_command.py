"""``memdec list KIND``: the components that the installed plugins provide."""

from __future__ import annotations

import json

import click

from memdec_core.registry import KINDS


@click.command("list")
@click.argument("kind", type=click.Choice(sorted(KINDS)))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def list_components(kind: str, as_json: bool):
    """List the methods, retrievers, memory-models, combiners, domains or models available.

    Each row shows the component's settings with their defaults: change a method's with
    `memdec eval --set METHOD.KEY=VALUE`.
    """
    from memdec_core import registry

    rows = registry.describe(kind)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    from memdec_cli.render import print_table

    print_table(kind.capitalize(), ["name", "plugin", "description", "settings (defaults)"],
                [[row["name"], row["plugin"], row["description"], _settings_text(row["settings"])]
                 for row in rows])


def _settings_text(settings: dict) -> str:
    return ", ".join(f"{key}={value}" for key, value in settings.items()) or "-"
