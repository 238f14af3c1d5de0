"""``memdec datastore build|info``, added to the CLI through ``memdec_register_commands``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from memdec_cli.options import eval_settings, window_options


@click.group()
def datastore():
    """Build and inspect kNN-LM datastores (keys.npy, vals.npy, index.faiss, memdec.json)."""


@datastore.command("build")
@click.option("--domain", required=True, help="A registered domain or a corpus folder (its train split is used).")
@click.option("--base", required=True, help="The model whose hidden states become the keys.")
@click.option("--factory", default="auto", show_default=True,
              help='faiss index factory string, e.g. "Flat" (exact) or "IVF1024,PQ32"; "auto" is exact '
                   'up to 100k keys, then an inverted file (with PQ codes above 2M keys).')
@click.option("--nprobe", type=click.IntRange(min=1), default=32, show_default=True,
              help="IVF lists searched per query.")
@click.option("--train-size", type=click.IntRange(min=1), default=100_000, show_default=True,
              help="Keys sampled (seeded) to train an IVF/PQ index.")
@click.option("--output", type=click.Path(path_type=Path), default=None,
              help="Write the datastore to this new folder instead of the cache.")
@window_options
def build(domain, base, factory, nprobe, train_size, output, context, stride, batch_size,
          max_train_tokens, max_eval_tokens):
    """Run BASE over the train split and store (last_ffn_input → next token) for every position.

    Prints the datastore folder on stdout. Without --output the datastore goes to the cache,
    where `memdec eval --method knn-lm` finds it.
    """
    from memdec_knn.api import build_datastore

    folder = build_datastore(domain, base, settings=eval_settings(
        context, stride, batch_size, max_train_tokens, max_eval_tokens), output=output,
        factory=factory, nprobe=nprobe, train_size=train_size)
    click.echo(folder)


@datastore.command("info")
@click.argument("folder", type=click.Path(path_type=Path))
def info(folder):
    """Print a datastore's manifest (memdec.json) after checking its files agree."""
    from memdec_knn.datastore import open_datastore

    click.echo(json.dumps(open_datastore(folder).manifest, indent=2))
