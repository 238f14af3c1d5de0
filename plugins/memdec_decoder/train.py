"""Training a Memory Decoder on kNN targets: β·KL(p_kNN ‖ p_mem) + (1−β)·CE(gold) per token.

The loop is memdec's shared one (``memdec_core.engine.training``: AdamW, linear decay without warmup
(or the ``schedule`` chosen), clipping, accumulation — the paper's recipe — seeded epoch order,
checkpoints, best epoch on validation). This module supplies the objective, the memory's
construction (init model, first blocks, restricted vocabulary) and the output folder.

Work happens in ``.NAME.partial`` beside the output folder: ``settings.json`` (what the run
is; a resume must match it), ``checkpoint/`` and ``best/``. The output folder appears only when
training is complete.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from memdec_core.engine.scoring import NLLTotal, iter_scored_batches, reduce_totals
from memdec_core.engine.training import TrainBatch, Trainer, seeded
from memdec_core.errors import ArtifactError, ConfigError, DataError, ModelError
from memdec_core.inputs.data import TokenizedCorpus, make_windows
from memdec_core.inputs.model_cards import write_readme
from memdec_core.inputs.models import BLOCK_PATHS, LoadedModel, decoder_blocks, default_device, load_model
from memdec_core.runtime.distributed import barrier, from_main, sharding, sum_across
from memdec_core.runtime.progress import log
from memdec_core.store.artifacts import (
    artifact_reference,
    atomic_directory,
    content_key,
    previous_version,
    start_or_resume,
    write_manifest,
)
from memdec_decoder.loss import memory_decoder_loss
from memdec_decoder.memory import ARTIFACT_TYPE, MemoryDecoder, open_memory
from memdec_decoder.settings import TrainSettings
from memdec_decoder.targets import TargetSet
from memdec_decoder.vocab import Vocabulary, restrict_model

#: ``vocabulary="auto"`` restricts the output layer for vocabularies larger than this.
AUTO_RESTRICT_ABOVE = 32_768


@dataclass
class MemoryStart:
    """What a memory's weights start from, and the family it serves.

    ``family`` is a model of the memory's tokenizer: the tokenizer is saved beside the memory and
    fingerprinted in its manifest, and its output layer sets the full vocabulary. ``build`` makes
    the model to train for a vocabulary (None: the full one). ``facts`` go into the manifest.
    """

    family: LoadedModel
    name: str  # the manifest's "init"
    fingerprint: str  # changes whenever the start weights would
    build: Callable[[Vocabulary | None], torch.nn.Module]
    facts: dict = field(default_factory=dict)


def init_model_start(init: LoadedModel, settings: TrainSettings) -> MemoryStart:
    """The usual start: the init model (its first blocks, or its architecture with fresh weights)."""
    return MemoryStart(init, init.model_id, init.fingerprint,
                       lambda vocabulary: build_memory_model(init, settings, vocabulary))


def train_memory(init: str | MemoryStart, corpus: TokenizedCorpus, targets: TargetSet, output: Path, *,
                 context: int, stride: int, settings: TrainSettings = TrainSettings(), teacher: str = "",
                 eval_batch_size: int = 8, teacher_targets: TargetSet | None = None) -> MemoryDecoder:
    """Train a memory starting from ``init`` (a model name, or a start) on ``targets``; write it to ``output``.

    ``teacher_targets``: the teacher's own distributions (``teacher_targets``), needed when
    ``settings.distill`` > 0."""
    output = Path(output).expanduser()
    stream = corpus.streams["train"]
    check_targets_match(targets, corpus)
    if settings.distill:
        if teacher_targets is None:
            raise ConfigError(f"distill={settings.distill} needs the teacher's distributions (teacher targets)")
        check_targets_match(teacher_targets, corpus)
    start = init if isinstance(init, MemoryStart) else init_model_start(load_model(init), settings)
    family = start.family
    if family.tokenizer_fingerprint != targets.manifest["tokenizer_fingerprint"]:
        raise ModelError(f"{start.name} has another tokenizer than the teacher whose targets these are; "
                         f"a memory must share its family's tokenizer")
    full_vocab_size = family.vocab_size  # read now: building the memory may cut the init's layers in place
    for signal in (targets, teacher_targets if settings.distill else None):
        if signal is not None:
            signal.check_token_range(full_vocab_size)
    vocabulary = choose_vocabulary(settings.vocabulary, stream, full_vocab_size)
    identity = training_identity(start.fingerprint, targets, settings, vocabulary, full_vocab_size, context, stride,
                                 teacher_targets if settings.distill else None)
    if output.exists():
        return _already_trained(output, identity)
    work = output.parent / f".{output.name}.partial"
    resuming = from_main(start_or_resume(work, identity, "training") if sharding().main else None)
    checkpoint = previous_version(work / "checkpoint") if resuming else None
    model = _load_checkpoint_model(checkpoint) if checkpoint else start.build(vocabulary)
    valid = corpus.streams["valid"]
    valid_windows = make_windows(len(valid), context, stride)

    def validate(trained) -> tuple[float, dict]:
        valid_ppl, outside = memory_perplexity(trained, vocabulary, valid, valid_windows, eval_batch_size)
        return valid_ppl, {"valid_tokens_outside_vocabulary": outside}

    trainer = Trainer(model, stream, context, settings.loop(), work, validate=validate,
                      loss=decoder_loss(targets, vocabulary, settings.beta, teacher_targets, settings.distill),
                      description="training memory")
    if checkpoint:
        trainer.restore(checkpoint)
    trainer.run()
    return _finish(work, output, start, full_vocab_size, vocabulary, targets, trainer, settings, teacher=teacher,
                   context=context, identity=identity, domain=corpus.corpus.name,
                   teacher_targets=teacher_targets if settings.distill else None)


def training_identity(start_fingerprint: str, targets: TargetSet, settings: TrainSettings, vocabulary,
                      full_vocab_size: int, context: int, stride: int,
                      teacher_targets: TargetSet | None = None) -> dict:
    """Every input that shapes the trained weights: a resumed run must match all of them.

    (``distill`` = 0 is left out, so memories trained before it existed keep their identity.)"""
    manifest = targets.manifest
    identity = {"init": start_fingerprint, "teacher": manifest.get("model_fingerprint"),
                "targets": manifest["data_hash"], "targets_folder": targets.folder.name, "k": manifest["k"],
                "temperature": manifest["temperature"], "retriever": manifest.get("retriever"), "context": context,
                "stride": stride, "vocabulary": vocabulary.size if vocabulary else full_vocab_size,
                **{key: value for key, value in dataclasses.asdict(settings).items()
                   if key != "save_every" and not (key == "distill" and not value)}}
    if teacher_targets is not None:
        identity["teacher_targets"] = {"folder": teacher_targets.folder.name, "top": teacher_targets.manifest["top"],
                                       "model": teacher_targets.manifest["model_fingerprint"]}
    return identity


def _already_trained(output: Path, identity: dict) -> MemoryDecoder:
    """A rerun onto a finished memory: the memory when it was made the same way, else a clear error."""
    from memdec_core.store.artifacts import read_manifest

    manifest = read_manifest(output, ARTIFACT_TYPE) if (output / "memdec.json").is_file() else {}
    if manifest.get("identity") != content_key(identity):
        raise ConfigError(f"output folder already exists: {output} (not a memory trained with these settings); "
                          f"choose another --output or delete it")
    log(f"already trained: {output}")
    return open_memory(output)


def check_targets_match(targets: TargetSet, corpus: TokenizedCorpus) -> None:
    """Targets are usable only for the exact token stream they were computed on."""
    stream = corpus.streams["train"]
    if len(stream) < 2:
        raise DataError(f"corpus {corpus.corpus.name!r}: the train split is empty")
    if targets.manifest["data_hash"] != corpus.data_hash("train") or len(targets) != len(stream) - 1:
        raise ArtifactError(f"targets {targets.folder} were computed on other train data "
                            f"(data hash {targets.manifest['data_hash']}, {len(targets)} positions) than "
                            f"{corpus.corpus.name!r} (data hash {corpus.data_hash('train')}, {len(stream) - 1})")
    if targets.manifest["tokenizer_fingerprint"] != corpus.tokenizer_fingerprint:
        raise ArtifactError(f"targets {targets.folder} were made with another tokenizer than the corpus")


def choose_vocabulary(choice: str, stream: np.ndarray, full_size: int) -> Vocabulary | None:
    """The restricted vocabulary (the datastore's values: every token that follows a train
    position), or None for the full one."""
    if choice == "full" or (choice == "auto" and full_size <= AUTO_RESTRICT_ABOVE):
        return None
    return Vocabulary(np.unique(stream[1:]), full_size)


def build_memory_model(init: LoadedModel, settings: TrainSettings, vocabulary: Vocabulary | None):
    """The init model (or its architecture, fresh), optionally cut to its first blocks and vocabulary."""
    from transformers import AutoModelForCausalLM

    model = init.model.cpu()  # cut on the CPU, then moved to where it trains
    if settings.from_scratch:
        with seeded(settings.seed):
            model = AutoModelForCausalLM.from_config(init.model.config)
    if settings.init_layers:
        keep_first_blocks(model, settings.init_layers, norm_from_next_block=settings.cut_norm == "next")
    if vocabulary:
        restrict_model(model, vocabulary)
    return model.float().to(default_device()).train()


def keep_first_blocks(model, n_blocks: int, norm_from_next_block: bool = False) -> None:
    """Drop all but the first ``n_blocks`` decoder blocks (a shallower memory, same embeddings).

    ``norm_from_next_block``: the output norm takes the weights of the first dropped block's input
    norm, the one that in the whole model normalises exactly what the last kept block outputs
    (the whole model's final norm was trained on its last block's output instead)."""
    blocks = decoder_blocks(model)
    if n_blocks > len(blocks):
        raise ConfigError(f"init_layers={n_blocks}, but the init model has only {len(blocks)} blocks")
    if norm_from_next_block and n_blocks < len(blocks):
        copy_input_norm_to_final(model, blocks[n_blocks])
    *parents, attribute = BLOCK_PATHS[model.config.model_type].split(".")
    owner = model
    for name in parents:
        owner = getattr(owner, name)
    setattr(owner, attribute, torch.nn.ModuleList(list(blocks)[:n_blocks]))
    config = model.config.get_text_config()
    for key in ("num_hidden_layers", "n_layer"):
        if hasattr(config, key):
            setattr(config, key, n_blocks)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:n_blocks]


#: Per architecture: the final norm's name beside the blocks, and a block's input norm.
NORM_NAMES = {"gpt2": ("ln_f", "ln_1")}
DEFAULT_NORM_NAMES = ("norm", "input_layernorm")


def copy_input_norm_to_final(model, block) -> None:
    final_name, input_name = NORM_NAMES.get(model.config.model_type, DEFAULT_NORM_NAMES)
    owner = model
    for name in BLOCK_PATHS[model.config.model_type].split(".")[:-1]:
        owner = getattr(owner, name)
    final, source = getattr(owner, final_name, None), getattr(block, input_name, None)
    if final is None or source is None or type(final) is not type(source):
        raise ModelError(f"cannot take the output norm of a cut {model.config.model_type!r} model from its next "
                         f"block; use cut_norm=final")
    final.load_state_dict(source.state_dict())


def _load_checkpoint_model(checkpoint: Path):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).to(default_device()).train()
    except Exception as error:  # safetensors, json and torch each raise their own kinds
        raise ArtifactError(f"corrupt training checkpoint {checkpoint}: {str(error).splitlines()[0]}; "
                            f"delete {checkpoint.parent} to start over") from error


def decoder_loss(targets: TargetSet, vocabulary: Vocabulary | None, beta: float,
                 teacher_targets: TargetSet | None = None, distill: float = 0.0):
    """β·KL(p_kNN ‖ p_mem) + (1−β)·CE at every position of a batch, in the memory's numbering
    (part of the KL on the teacher's own distribution when ``distill`` > 0)."""
    def loss(model, batch: TrainBatch) -> torch.Tensor:
        input_ids = vocabulary.inputs(batch.input_ids) if vocabulary else batch.input_ids
        logits = model(input_ids=input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        positions = batch.positions.numpy()
        target_ids, target_probs = sparse_rows(targets, positions, vocabulary, logits.device)
        teacher = sparse_rows(teacher_targets, positions, vocabulary, logits.device) if distill else None
        gold = batch.gold
        if vocabulary:
            vocabulary.mask_other(logits)
            gold = vocabulary.inputs(gold)
        return memory_decoder_loss(logits[batch.rows, batch.columns], gold, target_ids, target_probs, beta,
                                   teacher=teacher, distill=distill)

    return loss


def sparse_rows(targets: TargetSet, positions: np.ndarray, vocabulary: Vocabulary | None, device):
    """Padded sparse rows in the memory's numbering. Under a restricted vocabulary the entries of
    tokens it cannot name (only the teacher's own distribution has any: kNN targets name datastore
    values) are dropped, and the rows that lost some are renormalised over the rest."""
    token_ids, probs = (tensor.to(device) for tensor in targets.padded(positions))
    if vocabulary is None:
        return token_ids, probs
    named = (token_ids >= 0) & vocabulary.contains(token_ids)
    dropped = ((token_ids >= 0) & ~named).any(dim=1, keepdim=True)
    kept = torch.where(named, probs, 0.0)
    probs = torch.where(dropped, kept / kept.sum(dim=1, keepdim=True).clamp(min=1e-30), kept)
    return torch.where(named, vocabulary.inputs(token_ids.clamp(min=0)), -1), probs


def memory_perplexity(model, vocabulary: Vocabulary | None, stream: np.ndarray, windows,
                      batch_size: int) -> tuple[float, int]:
    """The memory's own perplexity over ``windows``; tokens it cannot name are counted, not scored."""
    model.eval()
    tokens = torch.from_numpy(stream.astype(np.int64))
    mapped = (vocabulary.inputs(tokens) if vocabulary else tokens).numpy()
    total, outside = NLLTotal(), 0
    for batch in iter_scored_batches(model, mapped, windows, batch_size=batch_size, sharded=True,
                                     description="valid memory"):
        logits = vocabulary.mask_other(batch.logits) if vocabulary else batch.logits
        gold = torch.log_softmax(logits, dim=-1).gather(1, batch.targets[:, None])[:, 0]
        named = batch.targets != vocabulary.other if vocabulary else torch.ones_like(batch.targets, dtype=torch.bool)
        total.add(gold[named])
        outside += int((~named).sum())
    reduce_totals([total])
    return total.perplexity, int(round(sum_across([outside])[0]))


def _finish(work: Path, output: Path, start: MemoryStart, full_vocab_size: int, vocabulary: Vocabulary | None,
            targets: TargetSet, trainer: Trainer, settings: TrainSettings, *, teacher: str, context: int,
            identity: dict, domain: str, teacher_targets: TargetSet | None = None) -> MemoryDecoder:
    if sharding().main:  # under several processes, rank 0 writes the folder the others then open
        # (only rank 0 looks into the work folder: it deletes it, perhaps before another rank got here)
        best = previous_version(work / "best")
        if best is None:
            raise ArtifactError(f"training in {work} ended without a validated checkpoint")
        _write_memory(best, output, start, full_vocab_size, vocabulary, targets, trainer, settings, teacher=teacher,
                      context=context, identity=identity, domain=domain, teacher_targets=teacher_targets)
        shutil.rmtree(work, ignore_errors=True)
    barrier()
    return open_memory(output)


def _write_memory(best: Path, output: Path, start: MemoryStart, full_vocab_size: int, vocabulary: Vocabulary | None,
                  targets: TargetSet, trainer: Trainer, settings: TrainSettings, *, teacher: str, context: int,
                  identity: dict, domain: str, teacher_targets: TargetSet | None = None) -> None:
    state = trainer.state
    parameters = sum(parameter.numel() for parameter in trainer.model.parameters())
    with atomic_directory(output) as temporary:
        shutil.copytree(best, temporary, dirs_exist_ok=True)
        start.family.tokenizer.save_pretrained(temporary)
        if vocabulary:
            vocabulary.save(temporary)
        write_manifest(temporary, ARTIFACT_TYPE, teacher=teacher, init=start.name,
                       init_fingerprint=start.fingerprint, tokenizer_fingerprint=start.family.tokenizer_fingerprint,
                       full_vocab_size=full_vocab_size, restricted=vocabulary is not None,
                       vocabulary_size=vocabulary.size - 1 if vocabulary else full_vocab_size,
                       data_hash=targets.manifest["data_hash"], beta=settings.beta, k=targets.manifest["k"],
                       temperature=targets.manifest["temperature"], targets=artifact_reference(targets.folder),
                       domain=domain, context=context,
                       parameters=parameters, train=dataclasses.asdict(settings),
                       best_epoch=state["best_epoch"], best_valid_ppl=state["best_valid_ppl"],
                       history=state["history"], train_seconds=round(state["train_seconds"], 1),
                       train_tokens=state["train_tokens"], train_steps=state["global_step"],
                       flops_per_token=state["flops_per_token"], parallel=state.get("parallel"),
                       identity=content_key(identity), **start.facts,
                       **({"teacher_targets": artifact_reference(teacher_targets.folder)} if teacher_targets else {}))
        write_readme(temporary, f"Memory Decoder (teacher {teacher or 'unknown'})", _readme_lines(
            start.name, vocabulary, targets, settings, state, parameters), tags=("memory-decoder", "knn-lm"),
            base=start.family.model_id, domain=domain)


def _readme_lines(init_name: str, vocabulary, targets, settings, state, parameters) -> list[str]:
    lines = [
        f"- A causal LM of {parameters:,} parameters initialised from `{init_name}`, trained to imitate "
        f"a kNN-LM: β·KL(p_kNN ‖ p_mem) + (1−β)·CE with β = {settings.beta}"
        + (f", a share {settings.distill} of the KL on the teacher's own distribution." if settings.distill else "."),
        f"- kNN targets: k = {targets.manifest['k']}, T = {targets.manifest['temperature']}, "
        f"train data hash `{targets.manifest['data_hash']}`.",
        f"- Best epoch {state['best_epoch']} of {len(state['history'])} ({state['global_step']} optimizer steps): "
        f"validation perplexity of the memory alone "
        f"{state['best_valid_ppl']:.3f}.",
        "- Use: `memdec eval --method memdec --set memdec.path=THIS_FOLDER` or "
        "`memdec generate --base MODEL --memory THIS_FOLDER \"prompt\"`.",
    ]
    if vocabulary:
        lines.append(f"- Vocabulary restricted to {vocabulary.size - 1:,} of {vocabulary.full_size:,} tokens "
                     f"(`vocabulary.npy`); row i of the embedding and output layers is token `vocabulary[i]`, the "
                     f"last row is the shared embedding of every other token. Load it through memdec.")
    return lines
