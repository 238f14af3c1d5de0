"""``memdec export``: a LoRA or DAPT folder as one standalone model, or a composite as its references."""

from __future__ import annotations

from pathlib import Path

import click

from memdec_core.command_kit import parse_assignments, set_option


@click.command("export")
@click.argument("folder", required=False, type=click.Path(path_type=Path))
@click.option("--output", required=True, type=click.Path(path_type=Path),
              help="The folder to write (refused if it exists, unless --force).")
@click.option("--force", is_flag=True, help="Replace --output if it exists.")
@click.option("--base", default=None, help="With --memory: the composite's base (a name, folder, .gguf file or hub "
                                           "id). With FOLDER: the LoRA's base, when the one its manifest names is "
                                           "not found here (it must be the same model: checked by fingerprint).")
@click.option("--memory", default=None, metavar="NAME|FOLDER",
              help="Alone: export this memory folder as a portable memory (a plain causal LM over the family's "
                   "full vocabulary). With --base: a composite of both (a memory model or a folder one opens).")
@click.option("--domain", default=None, help="With --memory: the domain a memory named by its name is built for.")
@click.option("--combiner", default="linear", show_default=True,
              help="With --base and --memory: how the composite mixes them, a registered name (one that learns, "
                   "adaptive, is fitted on --domain's validation split and its state saved in the folder).")
@click.option("--lam", type=click.FloatRange(0, 1), default=None,
              help="With --memory: the combiner's λ (the memory's weight) [default: the combiner's]; for a "
                   "portable memory, the λ its model card suggests [default: tune it].")
@set_option
def export(folder, output, force, base, memory, domain, combiner, lam, assignments):
    """Write FOLDER (a LoRA or DAPT artifact) to --output as a standalone transformers model;
    --memory FOLDER alone as a portable memory; with --base and --memory, a composite model's
    folder of references.

    \b
    A LoRA is merged into its base (found by the registered name or hub id its manifest names,
    and checked by fingerprint); DAPT's weights are whole already. The output holds the weights,
    config, tokenizer, a model card (README.md with hub metadata) and memdec.json, and loads with
    AutoModelForCausalLM.from_pretrained(DIR) without memdec: ready to upload to the hub.
    A portable memory is one plain causal LM over the family's full vocabulary (a restricted
    memory's other tokens get probability 0), readable by transformers 4.4x and 5.x: the official
    MemoryDecoder code and lmdeploy mix it as they mix their own; its card says how.
    A composite folder holds no weights: memdec rebuilds it from its parts when it is loaded.
    Writes are atomic; prints the folder written.

    \b
    Examples:
      memdec cache ls --kind lora                    the cached adapters; a compare row's details.artifact
      memdec export ~/.cache/memdec/lora/KEY --output finance-lora-merged
      memdec export dapt-run --output finance-dapt --force
      memdec export --memory finance-memory --output finance-memory-portable
      memdec export --base memdec-demo-m --memory finance-memory --lam 0.6 --output finance-composite
      memdec export --base memdec-demo-l --memory knn-datastore --domain finance \\
                    --set knn-datastore.temperatures=10 --output finance-knn-composite
      memdec export --base memdec-demo-m --memory finance-memory --combiner adaptive --domain finance \\
                    --output finance-adaptive-composite
    """
    from memdec_core.runs import export as exports

    if memory is None:
        _check_adapted_usage(folder, domain, lam, assignments, combiner)
        written = exports.export_adapted(folder, output, base=base, force=force)
    elif base is None and folder is None:
        if domain is not None or assignments or combiner != "linear":
            raise click.UsageError("--domain, --combiner and --set apply to a composite (--base and --memory), "
                                   "not to a portable memory")
        written = exports.export_memory(memory, output, lam=lam, force=force)
    else:
        if folder is not None or base is None:
            raise click.UsageError("a composite is exported with --base NAME --memory FOLDER_OR_NAME, without FOLDER; "
                                   "a portable memory with --memory FOLDER alone")
        written = exports.export_composite(base, memory, output, domain=domain, lam=lam, combiner=combiner, force=force,
                                           component_settings=parse_assignments(assignments))
    click.echo(str(written))


def _check_adapted_usage(folder, domain, lam, assignments, combiner) -> None:
    if folder is None:
        raise click.UsageError("give a LoRA or DAPT FOLDER, or --base and --memory for a composite "
                               "(see memdec export --help)")
    if domain is not None or lam is not None or assignments or combiner != "linear":
        raise click.UsageError("--domain, --combiner, --lam and --set apply to a composite (--memory), not to FOLDER")
