"""``memdec datastore build|info``, added to the CLI through ``memdec_register_commands``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from memdec_core.command_kit import eval_settings, parse_assignments, removed_option, set_option, window_options


@click.group()
def datastore():
    """Build and inspect kNN-LM datastores (keys.npy, vals.npy, index.faiss, memdec.json)."""


@datastore.command("build")
@click.option("--domain", required=True, help="A registered domain or a corpus folder (its train split is used).")
@click.option("--base", required=True, help="The model whose hidden states become the keys.")
@click.option("--retriever", default="faiss", show_default=True,
              help="The vectors retriever whose index is built with the datastore (memdec list retrievers).")
@set_option
@click.option("--output", type=click.Path(path_type=Path), default=None,
              help="Write the datastore to this new folder instead of the cache.")
@click.option("--no-index", "no_index", is_flag=True,
              help="Store the keys and values only; the index is built when a search first needs it.")
@window_options
# Removed in 0.1.0 (the retriever's settings moved under --set); the hint goes in the next release.
@removed_option("--factory", "--set faiss.factory={value}")
@removed_option("--nprobe", "--set faiss.nprobe={value}")
@removed_option("--train-size", "--set faiss.train_size={value}")
def build(domain, base, retriever, assignments, output, no_index, context, stride, batch_size, max_train_tokens,
          max_eval_tokens):
    """Run BASE over the train split and store (last_ffn_input → next token) for every position,
    then index the keys with the retriever (unless --no-index).

    Prints the datastore folder on stdout. Without --output the datastore goes to the cache,
    where `memdec eval --method knn-lm` finds it.

    \b
    Examples:
      memdec datastore build --domain finance --base memdec-demo-l
      memdec datastore build --domain law --base ./my-model --set faiss.factory=IVF1024,PQ32 --output law-store
      memdec datastore build --domain finance --base memdec-demo-l --no-index
    """
    from memdec_knn.api import build_datastore

    folder = build_datastore(domain, base, settings=eval_settings(
        context, stride, batch_size, max_train_tokens, max_eval_tokens), output=output,
        retriever=retriever, component_settings=parse_assignments(assignments), index=not no_index)
    click.echo(folder)


@datastore.command("info")
@click.argument("folder", type=click.Path(path_type=Path))
def info(folder):
    """Print a datastore's manifest (memdec.json) after checking its files agree."""
    from memdec_knn.datastore import open_datastore

    click.echo(json.dumps(open_datastore(folder).manifest, indent=2))
