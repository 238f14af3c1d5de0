"""Exports for the hub: an adapted model as one standalone folder, a memory as one portable model,
a composite as its references.

``export_adapted`` takes an artifact whose manifest names its base and whose folder holds either
a PEFT adapter (LoRA: merged into the base with ``merge_and_unload``) or whole weights (DAPT),
and writes a plain Hugging Face model folder — weights, config, tokenizer, a model card and a
``memdec.json`` — that ``AutoModelForCausalLM.from_pretrained`` loads without memdec.
``export_memory`` writes a memory as a plain model that other code mixes with a base (the memory
plugin's ``export_portable``); ``export_composite`` writes a composite model's folder of
references (``save_pretrained``).
Both write atomically: an interrupted export leaves nothing at ``output``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

from memdec_core.errors import ArtifactError, ConfigError, MemdecError, ModelError
from memdec_core.inputs.model_cards import write_readme
from memdec_core.inputs.models import save_model
from memdec_core.store.artifacts import (
    artifact_reference,
    atomic_directory,
    read_manifest,
    read_manifest_type,
    replacing_directory,
    write_manifest,
)

ARTIFACT_TYPE = "exported-model"


def export_adapted(folder: Path | str, output: Path | str, *, base: str | None = None, force: bool = False) -> Path:
    """Write the model of a LoRA or DAPT ``folder`` to ``output`` as a standalone transformers folder.

    ``base`` overrides the base the manifest names (a LoRA's base must have the fingerprint it
    was trained on). An existing ``output`` is refused unless ``force``.
    """
    folder, output = Path(folder).expanduser(), Path(output).expanduser()
    manifest = _adapted_manifest(folder)
    _check_output(output, force, sources=(folder,))
    model, tokenizer, base_name = _merged_model(folder, manifest, base)
    with new_folder(output, force) as temporary:
        save_model(model, temporary)
        tokenizer.save_pretrained(temporary)
        write_manifest(temporary, ARTIFACT_TYPE, source=artifact_reference(folder), source_type=manifest["type"],
                       base_model=base_name, base=manifest.get("base"), domain=manifest.get("domain"),
                       model_fingerprint=manifest.get("model_fingerprint"),
                       tokenizer_fingerprint=manifest.get("tokenizer_fingerprint"), data_hash=manifest.get("data_hash"))
        write_readme(temporary, f"{manifest['type'].upper()} of {base_name}, as one model",
                     _card_lines(folder, manifest), tags=(manifest["type"], "domain-adaptation", "merged"),
                     base=base_name, domain=manifest.get("domain"))
    return output


def _card_lines(folder: Path, manifest: dict) -> list[str]:
    merged = " merged into its base (`merge_and_unload`)" if _is_adapter(folder) else ""
    return [f"- The {manifest['type']} artifact `{artifact_reference(folder)}`{merged}: a plain transformers model, "
            f"trained on the train split of {manifest.get('domain') or 'its domain'} "
            f"(data hash `{manifest.get('data_hash')}`).",
            "- `AutoModelForCausalLM.from_pretrained(THIS_FOLDER)` loads it; memdec is not needed."]


def export_composite(base: str, memory: str, output: Path | str, *, domain: str | None = None,
                     lam: float | None = None, combiner: Any = "linear",
                     component_settings: dict[str, dict[str, Any]] | None = None, force: bool = False) -> Path:
    """Write the composite of ``base`` and ``memory`` (``composite_model``) to ``output`` as a
    folder of references that ``AutoModelForCausalLM.from_pretrained`` rebuilds (memdec installed).
    A ``combiner`` that learns is fitted on ``domain``'s validation split first; the folder keeps its state."""
    from memdec_core.engine.composite import composite_model  # torch: only when a composite is made

    output = Path(output).expanduser()
    # A folder named relative to here would mean another folder wherever the composite is opened.
    base, memory = _absolute_if_folder(base), _absolute_if_folder(memory)
    _check_output(output, force, sources=tuple(Path(spec) for spec in (base, memory) if Path(spec).is_absolute()))
    model = composite_model(base, memory, domain=domain, lam=lam, combiner=combiner,
                            component_settings=component_settings)
    with new_folder(output, force) as temporary:
        temporary.rmdir()  # save_pretrained writes this folder itself (atomically), then it moves into place
        model.save_pretrained(temporary)
    return output


def export_memory(memory: str, output: Path | str, *, lam: float | None = None, force: bool = False) -> Path:
    """Write the memory folder ``memory`` to ``output`` as a portable memory: a plain causal LM of its
    family's full vocabulary (``MemoryModel.export_portable``), with a model card that says how to
    mix it in memdec, in plain transformers and in other Memory Decoder code."""
    from memdec_core.components import registry
    from memdec_core.inputs.context import memory_opener

    output = Path(output).expanduser()
    name, values = memory_opener(memory)
    cls = registry.get("memory-models", name)
    if not values or cls.artifact_setting not in values:
        raise ConfigError(f"--memory {memory} is a memory model's name; a portable memory is exported from its "
                          f"folder (memdec train --output DIR, or a cached one: memdec cache ls)")
    folder = Path(values[cls.artifact_setting])
    _check_output(output, force, sources=(folder,))
    with new_folder(output, force) as temporary:
        lines = cls.export_portable(folder, temporary, lam)
        write_readme(temporary, f"A portable {name} memory", lines, tags=(name, "memory-decoder", "portable"))
    return output


def _absolute_if_folder(spec: str) -> str:
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def _adapted_manifest(folder: Path) -> dict:
    """The manifest of an exportable artifact: one that names its base and holds an adapter or whole weights."""
    if not folder.is_dir():
        raise ArtifactError(f"folder not found: {folder}")
    manifest = read_manifest(folder, read_manifest_type(folder))
    if not (manifest.get("base") or manifest.get("base_model")) or not (
            _is_adapter(folder) or (folder / "config.json").is_file()):
        raise ArtifactError(f"{folder} holds a {manifest.get('type')!r} artifact, neither a LoRA adapter nor a "
                            f"DAPT model; a memory exports as a composite: memdec export --base NAME --memory "
                            f"{folder} --output DIR")
    return manifest


def _is_adapter(folder: Path) -> bool:
    return (folder / "adapter_config.json").is_file()


def _merged_model(folder: Path, manifest: dict, base: str | None):
    """``(model, tokenizer, base name)``: the adapter merged into its base, or the whole weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from memdec_core.inputs.models import referenced_base

    named, fingerprint = referenced_base(manifest)
    base_name = base or named
    has_tokenizer = (folder / "tokenizer_config.json").is_file()  # older LoRA folders have none
    if not _is_adapter(folder):
        model = _reading(folder, lambda: AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32))
        return model, _reading(folder, lambda: AutoTokenizer.from_pretrained(folder)), base_name
    loaded = _load_base(base_name, fingerprint, folder)
    merged = _reading(folder, lambda: _merge_lora(loaded.model, folder))
    tokenizer = _reading(folder, lambda: AutoTokenizer.from_pretrained(folder)) if has_tokenizer else loaded.tokenizer
    return merged, tokenizer, base_name


def _merge_lora(model, folder: Path):
    """``model`` with the LoRA adapter of ``folder`` merged into its weights.

    Through peft's LoRA tuner (``LoraModel``), not ``PeftModel.from_pretrained``: PeftModel's
    constructor reads the model's ``is_gradient_checkpointing``, which transformers 5 deprecates
    for ``is_activation_checkpointing``, so every export printed its FutureWarning. The tuner is
    what PeftModel wraps; the weights it loads are checked to be all of the adapter's."""
    from peft import LoraConfig, LoraModel, PeftConfig, load_peft_weights, set_peft_model_state_dict

    config = PeftConfig.from_pretrained(str(folder))
    if not isinstance(config, LoraConfig):
        raise ArtifactError(f"{folder} holds a {config.peft_type} adapter; memdec merges LoRA adapters")
    tuner = LoraModel(model, config, "default")
    result = set_peft_model_state_dict(tuner.model, load_peft_weights(str(folder)))
    missing = [key for key in result.missing_keys if "lora_" in key]
    if missing or result.unexpected_keys:
        raise ArtifactError(f"{folder}'s adapter does not fit its base: missing {missing[:2]}, "
                            f"unexpected {list(result.unexpected_keys)[:2]}")
    return tuner.merge_and_unload()


def _reading(folder: Path, load):
    """``load()``, a broken file of ``folder`` being one line that names it."""
    try:
        return load()
    except Exception as error:  # safetensors, json, peft and tokenizers each raise their own kinds
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ArtifactError(f"cannot load {folder}: {first_line}") from error


def _load_base(name: str | None, fingerprint: str | None, folder: Path):
    """The base an adapter was trained on, checked by fingerprint: another model would merge into nonsense."""
    from memdec_core.inputs.models import load_model

    if not name:
        raise ArtifactError(f"{folder}/memdec.json names no base model; pass --base")
    try:
        loaded = load_model(name)
    except MemdecError as error:
        raise ModelError(f"the base of {folder} cannot be loaded ({error}); pass --base with the same model") \
            from error
    if fingerprint and loaded.fingerprint != fingerprint:
        raise ModelError(f"{name} is not the base {folder} was trained on (fingerprint {loaded.fingerprint}, "
                         f"the manifest says {fingerprint}); pass --base with that model")
    return loaded


def _check_output(output: Path, force: bool, sources: tuple[Path, ...] = ()) -> None:
    """Refuse, before any work, an output that exists (unless ``force``), or one whose replacement
    would delete what the export reads or the folder it runs in (``_refuse_holding``)."""
    for source in sources:
        _refuse_holding(output, source, "the folder being exported" if len(sources) == 1 else "what is exported")
    _refuse_holding(output, Path.cwd(), "the current folder")
    if output.exists() and not force:
        raise ConfigError(f"output folder already exists: {output} (pass --force to replace it)")
    if output.exists() and not output.is_dir():
        raise ConfigError(f"--output {output} is a file, not a folder")


def _refuse_holding(output: Path, folder: Path, what: str) -> None:
    """ConfigError when ``output`` is ``folder`` or holds it: the output is written beside itself and
    swapped in, which would delete ``folder`` with the older output (or fail on the current folder)."""
    output, folder = output.expanduser().resolve(), folder.expanduser().resolve()
    if output == folder or output in folder.parents:
        held = "is" if output == folder else f"holds {folder},"
        raise ConfigError(f"--output {output} {held} {what}; choose another")


@contextlib.contextmanager
def new_folder(output: Path, force: bool) -> Iterator[Path]:
    """A temporary folder that becomes ``output`` when the block succeeds, replacing it with ``force``."""
    if force and output.exists():
        with replacing_directory(output) as temporary:
            yield temporary
    else:
        with atomic_directory(output) as temporary:
            yield temporary
