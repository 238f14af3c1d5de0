"""``memdec targets`` and ``memdec train``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from memdec_core.command_kit import eval_settings, parse_assignments, set_option, window_options
from memdec_decoder.recipe import RECIPES, described

_domain = click.option("--domain", required=True,
                       help="A registered domain or a corpus folder (its train split is used).")
_k = click.option("--k", type=click.IntRange(min=1), default=1024, show_default=True,
                  help="Neighbours per position (the query's own entry is excluded by id).")


def _parse_temperature(context, parameter, value: str):
    """A positive number, or "auto" (what the teacher's kNN-LM picks on validation); None when not given."""
    if value is None or value == "auto":
        return value
    try:
        number = float(value)
    except ValueError:
        number = 0.0
    if not number > 0:
        raise click.BadParameter(f"{value!r} is neither a positive number nor 'auto'")
    return number


_retriever = click.option("--retriever", default="faiss", show_default=True,
                          help="The vectors retriever that searches the teacher's datastore (memdec list retrievers); "
                               "its settings with --set NAME.KEY=VALUE.")
_temperature = click.option("--knn-temperature", "temperature", default="16", show_default=True,
                            callback=_parse_temperature, metavar="T|auto",
                            help="T of the kNN weights softmax(−d/T). The paper's 16 suits the demo family; "
                                 "'auto' takes the T the teacher's kNN-LM picks on validation (other "
                                 "families' distances differ by orders of magnitude).")


@click.group()
def targets():
    """kNN targets: the teacher's sparse next-token distribution at every train position."""


@targets.command("build")
@_domain
@click.option("--teacher", required=True, help="The model whose datastore makes the targets.")
@_k
@_temperature
@_retriever
@set_option
@click.option("--output", type=click.Path(path_type=Path), default=None,
              help="Write the targets to this new folder instead of the cache.")
@window_options
def targets_build(domain, teacher, k, temperature, retriever, assignments, output, context, stride, batch_size,
                  max_train_tokens, max_eval_tokens):
    """Search k + 1 neighbours of every train position in TEACHER's datastore, drop the position's own
    entry, and store the resulting distributions sparse (ids int32, probabilities fp16).

    Builds the teacher's datastore first when it is not cached. An interrupted build resumes
    from its last finished shard. Prints the targets folder.
    """
    from memdec_decoder.api import build_targets

    click.echo(build_targets(domain, teacher, k=k, temperature=temperature, output=output, retriever=retriever,
                             component_settings=parse_assignments(assignments),
                             settings=eval_settings(context, stride, batch_size, max_train_tokens, max_eval_tokens)))


@targets.command("info")
@click.argument("folder", type=click.Path(path_type=Path))
def targets_info(folder):
    """Print a targets folder's manifest."""
    from memdec_decoder.targets import TargetSet

    click.echo(json.dumps(TargetSet(folder).manifest, indent=2))


@click.command("train")
@_domain
@click.option("--teacher", default="", help="Model whose kNN-LM the memory imitates [default: the largest demo model].")
@click.option("--init", default="", help="Model the memory starts from: a name, folder, .gguf or hub id "
              "[default: the smallest demo model].")
@click.option("--from-scratch", is_flag=True, help="Use --init's architecture with freshly initialised weights.")
@click.option("--recipe", type=click.Choice(["auto", *RECIPES]), default="auto", show_default=True,
              help=f"What fills the settings not given. {described()}.")
@click.option("--init-layers", type=click.IntRange(min=0), default=None,
              help="Keep only the first N blocks of --init (0: all) [default: the recipe's].")
@click.option("--vocabulary", type=click.Choice(["auto", "full", "restricted"]), default="auto", show_default=True,
              help="restricted: the output layer covers only tokens that occur as datastore values (exact for "
                   "the KL term; every other token gets probability 0 from the memory). auto: restricted "
                   "above 32k tokens.")
@click.option("--beta", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Weight of KL(p_kNN ‖ p_mem); 1 − β weighs the cross-entropy on the gold token.")
@click.option("--distill", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Share of the KL term given to the teacher's own next-token distribution (its top 64 tokens, "
                   "computed once and cached) instead of the kNN targets; 0: the paper's objective.")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="[default: the recipe's]")
@click.option("--min-steps", type=click.IntRange(min=0), default=None,
              help="Train at least N optimizer steps: more epochs over a small train split (0: the epochs "
                   "decide) [default: the recipe's; 0 when --epochs is given].")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="AdamW learning rate at the first step [default: the recipe's].")
# the names of memdec_core.engine.training.SCHEDULES, written out: --help must not import torch
@click.option("--schedule", type=click.Choice(["linear", "cosine", "constant"]), default="linear", show_default=True,
              help="The learning rate over the optimizer steps: decayed to 0 linearly or along a half cosine, "
                   "or held constant.")
@click.option("--train-batch", type=click.IntRange(min=1), default=None,
              help="Windows per training forward pass [default: the recipe's].")
@click.option("--accumulate", type=click.IntRange(min=1), default=1, show_default=True,
              help="Forward passes per optimizer step.")
@click.option("--max-steps", type=click.IntRange(min=0), default=0, show_default=True,
              help="Stop after N optimizer steps (a budget; 0: the epochs decide).")
@_k
@click.option("--knn-temperature", "temperature", default=None, callback=_parse_temperature, metavar="T|auto",
              help="T of the kNN weights softmax(−d/T); 'auto': the T the teacher's kNN-LM picks on validation "
                   "[default: the recipe's: 16 for whole, auto for cut].")
@_retriever
@set_option
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--output", type=click.Path(path_type=Path), default=None,
              help="Write the memory to this new folder instead of the cache. Rerunning the same command "
                   "after an interruption resumes from the last checkpoint.")
@window_options
def train(domain, teacher, init, from_scratch, recipe, init_layers, vocabulary, beta, distill, epochs, min_steps, lr,
          schedule, train_batch, accumulate, max_steps, k, temperature, retriever, assignments, seed, output, context,
          stride, batch_size, max_train_tokens, max_eval_tokens):
    """Train a Memory Decoder: a small LM that imitates TEACHER's kNN-LM on the domain.

    Builds (or reuses) the teacher's datastore and kNN targets, then trains with
    β·KL(p_kNN ‖ p_mem) + (1−β)·CE, evaluating the memory on the validation split after every
    epoch and keeping the best. Prints the memory folder: a plain HF model folder plus
    memdec.json, usable with `memdec eval --method memdec --set memdec.path=DIR` and `memdec generate --memory DIR`.

    \b
    Example (the offline demo family):
      memdec train --domain finance --teacher memdec-demo-l --init memdec-demo-s --output finance-memory
    """
    from memdec_decoder.api import train as train_memory

    given = {key: value for key, value in dict(init_layers=init_layers, epochs=epochs, min_steps=min_steps, lr=lr,
                                               batch_size=train_batch).items() if value is not None}
    click.echo(train_memory(domain, teacher=teacher, init=init, output=output, from_scratch=from_scratch,
                            recipe=recipe, vocabulary=vocabulary, beta=beta, distill=distill, schedule=schedule,
                            accumulate=accumulate,
                            max_steps=max_steps, k=k, retriever=retriever,
                            component_settings=parse_assignments(assignments), **given,
                            **(_temperature_settings(temperature) if temperature is not None else {}), seed=seed,
                            settings=eval_settings(context, stride, batch_size, max_train_tokens, max_eval_tokens)))


@click.command("transfer")
@click.option("--memory", "memory", required=True, type=click.Path(path_type=Path),
              help="A trained memory folder (memdec train) of another tokenizer than --teacher's.")
@click.option("--teacher", required=True, help="A model of the new family: its kNN-LM is what the memory learns.")
@_domain
@click.option("--output", required=True, type=click.Path(path_type=Path),
              help="The new memory's folder. Rerunning the same command after an interruption resumes.")
@click.option("--fraction", type=click.FloatRange(0, 1, min_open=True), default=0.1, show_default=True,
              help="Training budget as a fraction of the original memory's training tokens (the paper: 10 %).")
@click.option("--embeddings", type=click.Choice(["strings", "model", "fresh"]), default="strings",
              show_default=True,
              help="Where the new rows start: strings: the memory's row of the token with the same text (fresh "
                   "for the rest); model: --embeddings-from's rows, projected to the memory's width; fresh: "
                   "random at the memory's own scale.")
@click.option("--embeddings-from", default="", help="The model of the new tokenizer whose rows --embeddings "
              "model takes [default: the teacher].")
@click.option("--fresh-blocks", is_flag=True,
              help="The control a transfer is measured against: the same architecture, every weight fresh.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="AdamW learning rate [default: the original memory's].")
@click.option("--beta", type=click.FloatRange(0, 1), default=None, help="β of the objective [default: the original's].")
@click.option("--train-batch", type=click.IntRange(min=1), default=None,
              help="Windows per training forward pass [default: the original's].")
@click.option("--accumulate", type=click.IntRange(min=1), default=None,
              help="Forward passes per optimizer step [default: the original's].")
@click.option("--vocabulary", type=click.Choice(["auto", "full", "restricted"]), default=None,
              help="The new output layer's vocabulary [default: the original's choice, applied to the new "
                   "tokenizer].")
@_k
@click.option("--knn-temperature", "temperature", default="auto", show_default=True,
              callback=_parse_temperature, metavar="T|auto",
              help="T of the new teacher's kNN weights; 'auto' (the T its kNN-LM picks on validation) because "
                   "distances differ by orders of magnitude between families.")
@_retriever
@set_option
@click.option("--seed", type=int, default=None, help="Seed of the new rows and the epoch order [default: the "
              "original's].")
@window_options
def transfer(memory, teacher, domain, output, fraction, embeddings, embeddings_from, fresh_blocks, lr, beta,
             train_batch, accumulate, vocabulary, k, temperature, retriever, assignments, seed, context, stride,
             batch_size, max_train_tokens, max_eval_tokens):
    """Move a trained memory to another model family's tokenizer (the paper's Table 4).

    The memory keeps its transformer blocks, gets embedding and output layers for TEACHER's
    tokenizer, and trains on TEACHER's kNN targets for a fraction of its original training, with
    its original recipe. The result is a memory of the new family, usable with its bases by
    `memdec eval`, `compare` and `generate`. Prints the new memory's folder.

    \b
    Example (the demo family's memory moved to SmolLM2; compare in bits per byte):
      memdec train --domain finance --output finance-memory
      memdec transfer --memory finance-memory --teacher ~/.cache/memdec-models/smollm2-135m/model.gguf \\
          --domain finance --output finance-memory-smollm2
      memdec eval --base ~/.cache/memdec-models/smollm2-135m/model.gguf --method base,memdec \\
          --set memdec.path=finance-memory-smollm2 --domain finance
    """
    from memdec_decoder.api import transfer as transfer_memory

    click.echo(transfer_memory(memory, teacher, domain, output, fraction=fraction, embeddings=embeddings,
                               embeddings_from=embeddings_from, fresh_blocks=fresh_blocks, k=k,
                               temperature=temperature, retriever=retriever,
                               component_settings=parse_assignments(assignments), lr=lr, beta=beta,
                               batch_size=train_batch, accumulate=accumulate, vocabulary=vocabulary, seed=seed,
                               settings=eval_settings(context, stride, batch_size, max_train_tokens,
                                                      max_eval_tokens)))


def _temperature_settings(temperature) -> dict:
    return {"tune_temperature": True} if temperature == "auto" else {"temperature": temperature}
