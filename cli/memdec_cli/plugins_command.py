"""``memdec plugins``: which plugins are installed, and which failed to load."""

from __future__ import annotations

import dataclasses
import json

import click


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def plugins(as_json: bool):
    """List installed plugins (entry-point group "memdec"): name, package, hooks, status.

    A plugin that fails to import is shown as failed, with its error, and skipped.
    Block plugins with MEMDEC_DISABLE_PLUGINS=name1,name2.
    """
    from memdec_core.components.registry import plugin_records

    records = [dataclasses.asdict(record) for record in plugin_records()]
    if as_json:
        click.echo(json.dumps(records, indent=2))
        return
    from memdec_cli.render import print_table

    rows = [[r["name"], f"{r['distribution'] or '-'} {r['version'] or ''}".strip(), r["status"],
             ", ".join(h.removeprefix("memdec_register_") for h in r["hooks"]) or (r["error"] or "")]
            for r in records]
    print_table("Plugins", ["name", "package", "status", "provides"], rows)
