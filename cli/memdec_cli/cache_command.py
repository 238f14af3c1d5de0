"""``memdec cache ls|du|rm``: see and clean the artifact cache (thin commands over ``memdec_core.store.cache``)."""

from __future__ import annotations

import datetime as dt
import json

import click

from memdec_core.errors import ArtifactError, ConfigError
from memdec_core.store import cache as cache_lib
from memdec_core.store.cache_dir import cache_root

KIND_HELP = "Only this kind (top-level folder): datastores, targets, memories, lora, dapt, results, models, hub, ..."


@click.group("cache")
def cache():
    """See and clean the artifact cache ($MEMDEC_CACHE, default ~/.cache/memdec).

    \b
    Every datastore, memory, adapter and compare row memdec builds is kept there under
    <kind>/<key>, so reruns are fast. Killed jobs leave hidden left-overs beside them:
    stale .tmp folders (safe to remove) and .partial work folders (a rerun resumes them).
    \b
    Examples:
      memdec cache ls                         every entry: kind, key, type, size, created, status
      memdec cache du                         bytes per kind and in total
      memdec cache rm --stale                 the left-overs of killed jobs
      memdec cache rm --kind lora --older-than 30d --dry-run
    """


@cache.command("ls")
@click.option("--kind", help=KIND_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (sizes in bytes) instead of a table.")
def ls(kind: str | None, as_json: bool):
    """List the cache's entries, by kind then creation time.

    \b
    Status: complete; partial (an interrupted build or training that a rerun resumes);
    in progress (a running job is writing it); stale (a killed job's left-over, or a
    folder whose manifest is missing or corrupt: remove with `memdec cache rm --stale`).
    \b
    Examples:
      memdec cache ls --kind datastores
      memdec cache ls --json | jq '.[] | select(.status == "stale") | .key'
    """
    entries = cache_lib.cache_entries(kind)
    if as_json:
        click.echo(json.dumps([entry.as_dict() for entry in entries], indent=2, ensure_ascii=False))
        return
    if not entries:
        click.echo(f"No {kind + ' ' if kind else ''}entries in the cache {cache_root()}.")
        return
    from rich.markup import escape

    from memdec_cli.render import print_table

    total = cache_lib.human_bytes(sum(entry.bytes for entry in entries))
    rows = [[entry.kind, entry.key, entry.type or "-", cache_lib.human_bytes(entry.bytes),
             _local_time(entry.created), entry.made_by, entry.status] for entry in entries]
    print_table(escape(f"Cache {cache_root()}: {_count(len(entries))}, {total}"),
                ["kind", "key", "type", "size", "created", "made by", "status"],
                [[escape(str(cell)) for cell in row] for row in rows])


@cache.command("du")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def du(as_json: bool):
    """Show how much room each kind of artifact takes, and the total.

    \b
    Examples:
      memdec cache du
      memdec cache du --json
    """
    usage = cache_lib.disk_usage(cache_lib.cache_entries())
    if as_json:
        click.echo(json.dumps({"root": str(cache_root()), **usage}, indent=2))
        return
    from rich.markup import escape

    from memdec_cli.render import print_table

    rows = [[escape(row["kind"]), row["entries"], cache_lib.human_bytes(row["bytes"]), row["bytes"]]
            for row in [*usage["kinds"], {"kind": "total", **usage["total"]}]]
    print_table(escape(f"Cache {cache_root()}"), ["kind", "entries", "size", "bytes"], rows)


def _age(ctx, param, value):
    if value is None:
        return None
    try:
        return cache_lib.parse_age(value)
    except ConfigError as error:
        raise click.BadParameter(str(error), ctx=ctx, param=param) from error


@cache.command("rm")
@click.argument("keys", nargs=-1)
@click.option("--kind", help=KIND_HELP)
@click.option("--older-than", "older_than", callback=_age, metavar="AGE",
              help="Only entries created longer ago than AGE: 30m, 12h, 7d, 2w.")
@click.option("--stale", is_flag=True, help="Only stale left-overs of killed jobs (never a running job's).")
@click.option("--partial", is_flag=True, help="Only .partial work folders of interrupted jobs (a rerun would resume "
                                             "them); one whose job still runs is skipped.")
@click.option("--dry-run", is_flag=True, help="List what would be removed; remove nothing.")
def rm(keys: tuple[str, ...], kind: str | None, older_than: dt.timedelta | None, stale: bool, partial: bool,
       dry_run: bool):
    """Remove the selected entries from the cache; prints each one and the bytes freed.

    KEY is a key from `memdec cache ls`, a unique prefix of one (6 characters or more) or
    KIND/KEY. Selectors combine: only entries matching all of them go. Entries chosen by
    --kind or --older-than alone are complete or stale ones; .partial work folders go only
    with --partial or by KEY, and a running job's folder never. With no selector at all,
    nothing is removed.

    \b
    Examples:
      memdec cache rm 3f2a9c41d0                       one entry, by key prefix
      memdec cache rm --stale                          left-overs of killed jobs
      memdec cache rm --kind datastores --older-than 7d --dry-run
    """
    if not (keys or kind or older_than is not None or stale or partial):
        raise click.UsageError("say what to remove: KEY..., --kind, --older-than, --stale or --partial "
                               "(see memdec cache rm --help)")
    chosen = cache_lib.select_entries(cache_lib.cache_entries(kind), keys, kind=kind, older_than=older_than,
                                      stale=stale, partial=partial)
    if not chosen:
        click.echo("Nothing to remove.")
        return
    if dry_run:
        _dry_run(chosen)
        return
    removal = cache_lib.remove_entries(chosen)
    for entry in removal.removed:
        click.echo(f"removed {_describe(entry)}")
    for entry, reason in removal.skipped:
        click.echo(f"skipped {entry.name}: {reason}")
    click.echo(f"Freed {cache_lib.human_bytes(removal.freed)} ({_count(len(removal.removed))}).")
    if removal.failed:
        entry, reason = removal.failed[0]
        more = f" (and {len(removal.failed) - 1} more)" if len(removal.failed) > 1 else ""
        raise ArtifactError(f"could not remove {entry.name}: {reason}{more}")


def _dry_run(chosen: list[cache_lib.CacheEntry]) -> None:
    """What ``rm`` would do: a running job's work folder is skipped, as ``remove_entries`` would."""
    running = [entry for entry in chosen if entry.status == cache_lib.IN_PROGRESS]
    going = [entry for entry in chosen if entry.status != cache_lib.IN_PROGRESS]
    for entry in going:
        click.echo(f"would remove {_describe(entry)}")
    for entry in running:
        click.echo(f"would skip {entry.name}: {entry.made_by}")
    freed = cache_lib.human_bytes(sum(entry.bytes for entry in going))
    click.echo(f"Would free {freed} ({_count(len(going))}); nothing removed (--dry-run).")


def _describe(entry: cache_lib.CacheEntry) -> str:
    return f"{entry.name}  {cache_lib.human_bytes(entry.bytes)}  ({entry.status})"


def _count(entries: int) -> str:
    return f"{entries} entr{'y' if entries == 1 else 'ies'}"


def _local_time(moment: dt.datetime) -> str:
    return moment.astimezone().strftime("%Y-%m-%d %H:%M")
