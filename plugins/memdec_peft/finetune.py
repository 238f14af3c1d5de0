"""Continued training of a base model on the domain (DAPT, LoRA): the shared part.

Both methods train with cross-entropy on the train split through memdec's training loop, keep
the epoch with the best validation perplexity (scored with the evaluation windows) and stop
early when it stops improving. The learning rate is a knob: every value of the grid is trained
(each run cached by content hash) and the one best on validation is scored on test.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from memdec_core.components.identity import component_identity
from memdec_core.engine.generation import model_generator
from memdec_core.engine.loglikelihood import base_loglikelihood
from memdec_core.engine.scoring import model_scorer, perplexity
from memdec_core.engine.training import LoopSettings, Trainer, next_token_cross_entropy, seeded
from memdec_core.inputs.model_cards import write_readme
from memdec_core.inputs.models import base_reference
from memdec_core.interfaces import Costs, EvalContext, MethodResult
from memdec_core.runtime.distributed import barrier, from_main, sharding
from memdec_core.runtime.progress import log
from memdec_core.store.artifacts import (
    atomic_directory,
    cached_artifact,
    content_key,
    folder_bytes,
    previous_version,
    read_manifest,
    start_or_resume,
    write_manifest,
)
from memdec_core.store.cache_dir import shared_entry_lock
from memdec_peft.settings import FinetuneSettings


def loop_settings(settings: FinetuneSettings, lr: float) -> LoopSettings:
    """The training loop's settings for one learning rate of the grid."""
    return LoopSettings(epochs=settings.epochs, lr=lr, batch_size=settings.batch_size,
                        accumulate=settings.accumulate, max_steps=settings.max_steps, max_tokens=settings.budget_tokens,
                        max_flops=settings.budget_flops, patience=settings.patience, seed=settings.seed)


@dataclass
class Adaptation:
    """How one method adapts a base: what it trains, how it saves and how it is loaded back."""

    kind: str  # artifact type and cache folder, e.g. "lora"
    method: type  # the Method class (its plugin and code are part of the cache key)
    #: base model → a new model to train (the base itself is never modified)
    prepare: Callable[[torch.nn.Module], torch.nn.Module]
    #: (base model, saved folder, trainable) → a new adapted model
    load: Callable[..., torch.nn.Module]
    identity: dict  # what besides data, base and loop settings defines the artifact (e.g. the rank)
    adds_parameters: bool = True  # False when the trained weights replace the base's (DAPT)
    knobs: dict = dataclasses.field(default_factory=dict)  # what the result reports beside the lr


def evaluate_finetuned(ctx: EvalContext, settings: FinetuneSettings, adaptation: Adaptation) -> MethodResult:
    """Train one adapted model per learning rate, keep the best on validation, score test with it."""
    runs = []
    for lr in settings.lrs:
        folder = train_cached(ctx, loop_settings(settings, lr), adaptation)
        runs.append((folder, read_manifest(folder, adaptation.kind), lr))
    folder, state, lr = min(runs, key=lambda run: run[1]["best_valid_ppl"])
    model = adaptation.load(ctx.base.model, folder, trainable=False).eval()
    scorer = model_scorer(model, ctx.settings.batch_size)
    test_ppl = scorer(ctx.corpus.streams["test"], ctx.windows("test"),
                      f"test {ctx.base.short_name} + {adaptation.kind}").perplexity
    trainable = state["trainable_parameters"]
    added = trainable if adaptation.adds_parameters else 0
    costs = Costs(params_added=added, bytes_added=folder_bytes(folder), memory_bytes=4 * added,
                  # the cost of the method includes every learning rate tried
                  train_seconds=round(sum(run_state["train_seconds"] for _, run_state, _ in runs), 1),
                  train_tokens=state["train_tokens"],
                  train_flops=sum(run_state["train_tokens"] * run_state.get("flops_per_token", 0)
                                  for _, run_state, _ in runs))
    details = {"artifact": str(folder), "trained_parameters": trainable, "best_epoch": state["best_epoch"],
               "stopped_early": state["stopped_early"],
               "valid_by_lr": {str(run_lr): run_state["best_valid_ppl"] for _, run_state, run_lr in runs}}
    tuning = [{"lr": run_lr, "valid_ppl": run_state["best_valid_ppl"]} for _, run_state, run_lr in runs]
    return MethodResult(test_ppl, state["best_valid_ppl"], {"lr": lr, **adaptation.knobs}, costs=costs,
                        tuning=tuning, details=details, scorer=scorer,
                        # the model the scorer scores with: DAPT's weights, or the PEFT model for LoRA
                        generator=model_generator(model, ctx.base.tokenizer),
                        loglikelihood=base_loglikelihood(ctx.base, ctx.settings.batch_size, model))


def train_cached(ctx: EvalContext, loop: LoopSettings, adaptation: Adaptation) -> Path:
    """The adapted model's folder, trained on first use (an interrupted run resumes)."""
    identity = {"kind": adaptation.kind, "base": ctx.base.fingerprint, "train": ctx.corpus.data_hash("train"),
                "valid": ctx.corpus.data_hash("valid"), "context": ctx.context, "stride": ctx.stride,
                "code": component_identity(adaptation.method), **dataclasses.asdict(loop), **adaptation.identity}
    identity.pop("save_every")
    folder = cached_artifact(adaptation.kind, content_key(identity))
    with shared_entry_lock(folder):  # a second run sharing the cache waits, then reuses it; ranks train together
        if folder.exists():
            log(f"reusing {adaptation.kind} {folder}")
            return folder
        return _train(ctx, loop, adaptation, identity, folder)


def _train(ctx: EvalContext, loop: LoopSettings, adaptation: Adaptation, identity: dict, folder: Path) -> Path:
    """Train (or resume training) the adapted model and write it to ``folder``."""
    log(f"training {adaptation.kind} for {ctx.base.model_id} (lr {loop.lr:g}) in {folder}")
    work = folder.parent / f".{folder.name}.partial"
    resuming = from_main(start_or_resume(work, identity, f"{adaptation.kind} training") if sharding().main else None)
    checkpoint = previous_version(work / "checkpoint") if resuming else None
    with seeded(loop.seed):  # adapters are initialised at random (LoRA's A matrices)
        model = (adaptation.load(ctx.base.model, checkpoint, trainable=True) if checkpoint
                 else adaptation.prepare(ctx.base.model))
    model.train()
    valid, valid_windows = ctx.corpus.streams["valid"], ctx.windows("valid")

    def validate(trained) -> tuple[float, dict]:
        trained.eval()
        return perplexity(trained, valid, valid_windows, batch_size=ctx.settings.batch_size,
                          description=f"valid {adaptation.kind}"), {}

    trainer = Trainer(model, ctx.corpus.streams["train"], ctx.context, loop, work, loss=next_token_cross_entropy,
                      validate=validate, description=f"{adaptation.kind} {ctx.base.short_name}")
    if checkpoint:
        trainer.restore(checkpoint)
    state = trainer.run()
    if sharding().main:  # under several processes, rank 0 writes the folder the others then open
        _write_adapted(ctx, model, loop, adaptation, state, work, folder)
        shutil.rmtree(work, ignore_errors=True)
    barrier()
    return folder


def _write_adapted(ctx: EvalContext, model, loop: LoopSettings, adaptation: Adaptation, state: dict, work: Path,
                   folder: Path) -> None:
    trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    with atomic_directory(folder) as temporary:
        shutil.copytree(previous_version(work / "best"), temporary, dirs_exist_ok=True)
        ctx.base.tokenizer.save_pretrained(temporary)  # the folder opens (and exports) without the base's files
        reference = base_reference(ctx.base)
        _name_base_portably(temporary, reference)
        write_manifest(temporary, adaptation.kind, base_model=ctx.base.model_id, model_fingerprint=ctx.base.fingerprint,
                       base=reference, domain=ctx.corpus.corpus.name,
                       tokenizer_fingerprint=ctx.base.tokenizer_fingerprint, data_hash=ctx.corpus.data_hash("train"),
                       trainable_parameters=trainable, **{key: state[key] for key in (
                           "best_valid_ppl", "best_epoch", "history", "train_seconds", "train_tokens",
                           "flops_per_token", "stopped_early", "parallel")}, loop=loop, **adaptation.identity)
        write_readme(temporary, f"{adaptation.kind.upper()} of {ctx.base.model_id}", [
            f"- Trained on the train split (data hash `{ctx.corpus.data_hash('train')}`) with cross-entropy, "
            f"lr {loop.lr:g}, {trainable:,} trainable parameters.",
            f"- Best epoch {state['best_epoch']}: validation perplexity {state['best_valid_ppl']:.3f}.",
            "- `memdec export THIS_FOLDER --output DIR` writes it as a standalone transformers model."],
            tags=(adaptation.kind, "domain-adaptation"), base=ctx.base.model_id, domain=ctx.corpus.corpus.name)


def _name_base_portably(folder: Path, reference: dict) -> None:
    """PEFT records the base as the path it was loaded from; a registered name or hub id finds it elsewhere too."""
    config = folder / "adapter_config.json"
    if config.is_file() and reference["source"] != "path":
        values = json.loads(config.read_text())
        values["base_model_name_or_path"] = reference["name"]
        config.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
