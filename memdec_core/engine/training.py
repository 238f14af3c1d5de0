"""A resumable training loop over a token stream, shared by every method that trains weights.

The train split is cut into consecutive chunks of ``context`` positions (every position is
trained once per epoch); chunks are shuffled per epoch with a seeded order, so a resumed run
sees exactly the batches the interrupted one would have. AdamW, the learning rate decayed to
zero linearly (or along a half cosine, or held constant) without warmup (transformers' schedules), gradient clipping and
accumulation. After every epoch the caller's ``validate`` scores the model, the best epoch is
kept, and training stops early after ``patience`` epochs without improvement.

The caller gives the loss (cross-entropy for continued training, the kNN objective for a Memory
Decoder). Work happens in a folder holding ``checkpoint/`` (weights, optimizer, torch's RNG
state, progress; rewritten every ``save_every`` steps and at each epoch end) and ``best/``.

Under several processes (``memdec_core.runtime.distributed``) each rank runs every N-th window of each
micro-batch and the gradients are summed before every rank takes the same step; rank 0 writes
the checkpoints. The step is the one process's, up to the order of float sums (dropout masks
differ: each rank draws its own). With ``memdec --fsdp`` a full-parameter model is sharded over
the ranks by FSDP2 instead of copied to each: every decoder block is a unit whose weights are
gathered for its own pass, and each rank keeps its shard of the weights, gradients and AdamW
state. The batches, the loss and the step are those above; checkpoints hold the whole model and
optimizer in one process's format, so a run resumes with or without FSDP, with any number of ranks.

Randomness (dropout) draws from torch's generator seeded with the run's seed inside
``torch.random.fork_rng`` — the caller's global RNG is untouched — and a resumed run restores
the generator's state from the checkpoint, so resumed or not, the same seed gives the same bits.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.utils.checkpoint

from memdec_core.errors import ArtifactError, ConfigError
from memdec_core.inputs.models import autocast, compute_dtype, model_device, save_model
from memdec_core.runtime.distributed import (
    barrier,
    fsdp_requested,
    is_fully_sharded,
    sharding,
    sum_across,
    sum_gradients,
)
from memdec_core.runtime.progress import log, progress_bar
from memdec_core.runtime.timings import timed
from memdec_core.store.artifacts import replacing_directory

#: The learning rate over the optimizer steps, by transformers' schedule names: decayed to zero
#: linearly or along a half cosine, or held constant. No warmup: a memory starts from a trained
#: model's blocks, and DAPT/LoRA from a trained model.
SCHEDULES = ("linear", "cosine", "constant")


@dataclass(frozen=True)
class LoopSettings:
    """The optimisation recipe; a resumed run must use the same one."""

    epochs: int = 3
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 8  # windows per forward pass
    accumulate: int = 1  # forward passes per optimizer step
    clip: float = 1.0
    min_steps: int = 0  # at least this many optimizer steps: more epochs over a small train split (0: none)
    max_steps: int = 0  # a budget in optimizer steps (0: the epochs decide)
    max_tokens: int = 0  # a budget in training tokens; replaces epochs, the same for every method (0: none)
    max_flops: float = 0.0  # a budget in training FLOPs, turned into tokens for the model trained (0: none)
    patience: int = 0  # stop after this many epochs without a better validation score (0: never)
    schedule: str = "linear"  # the learning rate over the steps: one of SCHEDULES
    save_every: int = 100  # optimizer steps between checkpoints
    seed: int = 0

    def __post_init__(self):
        if not self.lr > 0 or self.weight_decay < 0 or not self.clip > 0:
            raise ConfigError(f"lr and clip must be positive and weight decay non-negative "
                              f"(got lr={self.lr}, clip={self.clip}, weight_decay={self.weight_decay})")
        for name in ("epochs", "batch_size", "accumulate", "save_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', ' ')} must be at least 1, got {getattr(self, name)}")
        if min(self.min_steps, self.max_steps, self.patience, self.max_tokens, self.max_flops) < 0:
            raise ConfigError("min_steps, max_steps, max_tokens, max_flops and patience must be 0 (no limit) or "
                              "positive")
        if self.max_tokens and self.max_flops:
            raise ConfigError("give a budget in tokens or in FLOPs, not both")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")


def training_flops_per_token(model: torch.nn.Module) -> int:
    """Matmul FLOPs of one training token: 2N forward, 2N for the activation gradients and 2 per
    trainable weight for its gradient — 6N for full training, about 4N for adapters (N counts the
    weights used in matmuls: every parameter but an input embedding not tied to the output)."""
    embedding = model.get_input_embeddings().weight if hasattr(model, "get_input_embeddings") else None
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    lookup_only = embedding is not None and (output is None or output.weight is not embedding)

    def in_matmuls(parameter) -> bool:
        return not (lookup_only and parameter is embedding)

    used = sum(parameter.numel() for parameter in model.parameters() if in_matmuls(parameter))
    trained = sum(parameter.numel() for parameter in model.parameters()
                  if parameter.requires_grad and in_matmuls(parameter))
    return 4 * used + 2 * trained


@dataclass
class TrainBatch:
    """Chunks of the stream as model inputs; ``positions[i]`` sits at ``[rows[i], columns[i]]``."""

    positions: torch.Tensor  # [N] global position p, predicting token p + 1
    rows: torch.Tensor
    columns: torch.Tensor
    input_ids: torch.Tensor  # [chunks, length], right-padded
    attention_mask: torch.Tensor
    gold: torch.Tensor  # [N] the next token at each position

    def to(self, device) -> "TrainBatch":
        """The model's inputs on ``device``; ``positions`` stay on the CPU (they index numpy targets)."""
        return TrainBatch(self.positions, *(tensor.to(device) for tensor in (
            self.rows, self.columns, self.input_ids, self.attention_mask, self.gold)))


#: Positions whose logits exist at once in ``next_token_cross_entropy``: 1,024 rows of a
#: 152k vocabulary are 620 MB, where a batch of 8 windows of 512 holds 2.5 GB per copy.
HEAD_CHUNK = 1024
#: Config fields that make the logits more than ``output_layer(hidden)``; such models take the plain path.
_SCALED_LOGITS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def next_token_cross_entropy(model, batch: "TrainBatch", chunk: int = HEAD_CHUNK) -> torch.Tensor:
    """Mean cross-entropy of ``batch.gold`` under a causal LM (or a PEFT model around one).

    The output layer runs on ``chunk`` scored positions at a time under activation checkpointing,
    so a large vocabulary's logits never exist for the whole batch, in the forward pass or the
    backward one (one LoRA step of a 2-block model of Qwen2.5's vocabulary on 8 windows of 512:
    peak RSS 11.4 GB with full logits, 3.7 GB chunked; benchmarks/train_memory_check.py). The value and
    the gradients are those of the full logits; models whose logits are scaled or capped after
    the output layer take the full path, and so do models FSDP shards.
    """
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, head = causal_lm.get_decoder(), causal_lm.get_output_embeddings()
    config = causal_lm.config.get_text_config()
    if (decoder is causal_lm or head is None or any(getattr(config, name, None) for name in _SCALED_LOGITS)
            or is_fully_sharded(model)):  # FSDP gathers the root's weights (head, embeddings) in its own pass only
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        return torch.nn.functional.cross_entropy(logits[batch.rows, batch.columns].float(), batch.gold)
    hidden = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     use_cache=False).last_hidden_state[batch.rows, batch.columns]

    def summed_nll(rows: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(head(rows).float(), gold, reduction="sum")

    total = sum(torch.utils.checkpoint.checkpoint(summed_nll, hidden[start:start + chunk],
                                                  batch.gold[start:start + chunk], use_reentrant=False)
                for start in range(0, len(hidden), chunk))
    return total / len(hidden)


#: loss(model, batch) → mean loss over the batch's positions (a scalar tensor with gradients).
LossFunction = Callable[[torch.nn.Module, TrainBatch], torch.Tensor]
#: validate(model) → (perplexity on validation, extra facts for the history).
ValidateFunction = Callable[[torch.nn.Module], tuple[float, dict]]


class Trainer:
    """The optimisation loop, its checkpoints and the per-epoch validation."""

    def __init__(self, model, stream: np.ndarray, context: int, settings: LoopSettings, work: Path, *,
                 loss: LossFunction, validate: ValidateFunction, description: str = "training"):
        self.model, self.settings, self.context, self.work = model, settings, context, Path(work)
        self.loss, self.validate, self.description = loss, validate, description
        self.dtype = compute_dtype()
        if self.dtype == "fp16":
            raise ConfigError("training in fp16 needs loss scaling, which memdec does not do; use --dtype bf16")
        self.fsdp = sharding().size > 1 and fsdp_requested()
        if fsdp_requested() and sharding().size == 1:
            log(f"{description}: FSDP asked for, but this run has one process: nothing to shard over")
        if self.fsdp and not all(parameter.requires_grad for parameter in model.parameters()):
            log(f"{description}: FSDP shards full-parameter training only; these adapters train data-parallel")
            self.fsdp = False
        if self.fsdp:
            units = shard_weights(model)  # before the optimizer, which then holds each rank's shards
            log(f"{description}: weights sharded over {sharding().size} ranks by FSDP2 ({units} units)")
        self.stream = torch.from_numpy(stream.astype(np.int64))
        self.chunk_starts = np.arange(0, len(stream) - 1, context)
        self.chunks_per_step = settings.batch_size * settings.accumulate
        self.flops_per_token = training_flops_per_token(model)
        self.steps_per_epoch = math.ceil(len(self.chunk_starts) / self.chunks_per_step)
        self.total_steps = self._budget_steps(settings)
        self.epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=settings.weight_decay)
        from transformers import get_scheduler

        self.scheduler = get_scheduler(settings.schedule, self.optimizer, num_warmup_steps=0,
                                       num_training_steps=self.total_steps)
        self.state = {"global_step": 0, "epoch": 0, "best_valid_ppl": None, "best_epoch": None, "history": [],
                      "train_seconds": 0.0, "train_tokens": 0, "stopped_early": False,
                      "flops_per_token": self.flops_per_token}
        self.rng_states: dict | None = None  # torch generators' states from a checkpoint

    def _budget_steps(self, settings: LoopSettings) -> int:
        """Optimizer steps: the epochs (at least min_steps), or the token budget (which may span more
        epochs), capped by max_steps."""
        steps = max(settings.epochs * self.steps_per_epoch, settings.min_steps)
        budget = settings.max_tokens or int(settings.max_flops / self.flops_per_token)
        if settings.max_tokens or settings.max_flops:
            tokens_per_step = self.chunks_per_step * self.context
            steps = budget // tokens_per_step
            if steps < 1:
                given = (f"{settings.max_tokens:,} training tokens" if settings.max_tokens else
                         f"{settings.max_flops:.3g} FLOPs ({budget:,} tokens for this model)")
                raise ConfigError(f"a budget of {given} is less than one optimizer step "
                                  f"({tokens_per_step:,} tokens: batch × accumulate × context)")
        return min(steps, settings.max_steps) if settings.max_steps else steps

    @property
    def finished(self) -> bool:
        return self.state["global_step"] >= self.total_steps or self.state["stopped_early"]

    def restore(self, checkpoint: Path) -> None:
        try:
            saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
            self._load_optimizer_state(saved["optimizer"])
            self.scheduler.load_state_dict(saved["scheduler"])
            self.state = json.loads((checkpoint / "trainer_state.json").read_text())
            self.rng_states = load_rng_states(checkpoint / RNG_FILE)
        except (OSError, RuntimeError, ValueError, KeyError) as error:
            raise ArtifactError(f"corrupt training checkpoint {checkpoint}: {error}; "
                                f"delete {checkpoint.parent} to start over") from error
        log(f"resuming {self.description} at step {self.state['global_step']} of {self.total_steps} "
            f"(epoch {self.state['epoch'] + 1})")

    @timed("train")
    def run(self) -> dict:
        """Train until the budget is spent or validation stops improving; returns the state."""
        with torch.random.fork_rng(devices=cuda_devices()):
            if self.rng_states is None:
                torch.manual_seed(self.settings.seed)
            else:
                set_rng_states(self.rng_states)
            return self._run()

    def _run(self) -> dict:
        # How the last stretch ran (a resumed run may have another number of ranks).
        self.state["parallel"] = {"ranks": sharding().size, "fsdp": self.fsdp}
        started = time.perf_counter() - self.state["train_seconds"]
        with progress_bar(self.description, self.total_steps, "steps") as advance:
            advance(self.state["global_step"])
            tokens, clock = 0, time.perf_counter()
            while not self.finished:
                epoch = self.state["epoch"]
                step_in_epoch = self.state["global_step"] - epoch * self.steps_per_epoch
                order = np.random.default_rng(self.settings.seed + epoch).permutation(len(self.chunk_starts))
                chunks = order[step_in_epoch * self.chunks_per_step:(step_in_epoch + 1) * self.chunks_per_step]
                loss, n_tokens = self._step(self.chunk_starts[chunks])
                self.state["global_step"] += 1
                self.state["train_tokens"] += n_tokens
                tokens += n_tokens
                speed = tokens / max(time.perf_counter() - clock, 1e-9)
                advance(1, note=f"epoch {epoch + 1}/{self.epochs} loss {loss:.3f} {speed:,.0f} tok/s")
                self.state["train_seconds"] = time.perf_counter() - started
                epoch_done = self.state["global_step"] % self.steps_per_epoch == 0
                if epoch_done or self.state["global_step"] == self.total_steps:
                    self._end_epoch(loss)
                elif self.state["global_step"] % self.settings.save_every == 0:
                    self._save_checkpoint()
        return self.state

    def _step(self, starts: np.ndarray) -> tuple[float, int]:
        """One optimizer step over the chunks starting at ``starts``; returns (loss, tokens)."""
        n_total = int(sum(min(start + self.context, len(self.stream) - 1) - start for start in starts))
        self.optimizer.zero_grad(set_to_none=True)
        total_loss = 0.0
        device = model_device(self.model)
        ranks = sharding()
        # FSDP averages the gradients over the ranks; the shares below sum to 1 over all of them.
        scale = ranks.size if self.fsdp else 1
        for first in range(0, len(starts), self.settings.batch_size):
            micro_batch = starts[first:first + self.settings.batch_size]
            mine, counts = micro_batch[ranks.rank::ranks.size], 1.0
            if not len(mine):
                if not self.fsdp:
                    continue
                mine, counts = micro_batch[:1], 0.0  # FSDP: every rank joins every pass; this one adds nothing
            batch = self._batch(mine).to(device)
            share = counts * len(batch.positions) / n_total  # token-weighted mean over the whole step (of all ranks)
            with autocast(self.dtype):  # the passes in --dtype; the weights and the optimizer stay fp32
                loss = self.loss(self.model, batch)
            (loss * share * scale).backward()
            total_loss += float(loss.detach()) * share
        if self.fsdp:
            total_loss = sum_across([total_loss])[0]
        elif ranks.size > 1:
            total_loss = sum_gradients(list(self.model.parameters()), [total_loss])[0]
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.clip)
        self.optimizer.step()
        self.scheduler.step()
        return total_loss, n_total

    def _batch(self, starts: np.ndarray) -> TrainBatch:
        """Chunks of positions ``[start, start + context)``, each predicting the next token."""
        ends = [min(start + self.context, len(self.stream) - 1) for start in starts]
        length = max(end - start for start, end in zip(starts, ends))
        input_ids = torch.zeros((len(starts), length), dtype=torch.long)
        attention_mask = torch.zeros((len(starts), length), dtype=torch.long)
        positions, rows, columns = [], [], []
        for row, (start, end) in enumerate(zip(starts, ends)):
            input_ids[row, :end - start] = self.stream[start:end]
            attention_mask[row, :end - start] = 1
            positions.append(torch.arange(start, end))
            rows.append(torch.full((end - start,), row))
            columns.append(torch.arange(end - start))
        positions = torch.cat(positions)
        return TrainBatch(positions, torch.cat(rows), torch.cat(columns), input_ids, attention_mask,
                          self.stream[positions + 1])

    def _end_epoch(self, last_loss: float) -> None:
        valid_ppl, facts = self.validate(self.model)
        self.model.train()
        epoch = self.state["epoch"] + 1
        self.state["history"].append({"epoch": epoch, "step": self.state["global_step"], "train_loss": last_loss,
                                      "valid_ppl": valid_ppl, **facts})
        log(f"epoch {epoch}: valid ppl {valid_ppl:.3f}")
        if self.state["best_valid_ppl"] is None or valid_ppl < self.state["best_valid_ppl"]:
            self.state["best_valid_ppl"], self.state["best_epoch"] = valid_ppl, epoch
            weights = self._whole_weights()
            if sharding().main:  # every rank holds the same weights (or their shards, gathered above)
                with replacing_directory(self.work / "best") as temporary:
                    save_model(self.model, temporary, state_dict=weights)
        elif self.settings.patience and epoch - self.state["best_epoch"] >= self.settings.patience:
            log(f"stopping early: no better validation perplexity for {self.settings.patience} epoch(s)")
            self.state["stopped_early"] = True
        self.state["epoch"] = epoch
        self._save_checkpoint()

    def _save_checkpoint(self) -> None:
        """Rank 0 writes it (every rank holds the same weights and state, or under FSDP their shards,
        which every rank gathers first); the others wait, so a rank killed after the barrier leaves a
        checkpoint every rank agrees with."""
        weights, optimizer = self._whole_weights(), self._optimizer_state()  # FSDP: gathered by every rank
        if sharding().main:
            with replacing_directory(self.work / "checkpoint") as temporary:
                save_model(self.model, temporary, state_dict=weights)
                torch.save({"optimizer": optimizer, "scheduler": self.scheduler.state_dict()},
                           temporary / "optimizer.pt")
                save_rng_states(temporary / RNG_FILE)
                (temporary / "trainer_state.json").write_text(json.dumps(self.state, indent=2))
        barrier()

    def _whole_weights(self) -> dict | None:
        """Under FSDP the whole model's weights, gathered from the ranks' shards (every rank calls
        it; rank 0 gets them); None otherwise (the model holds them)."""
        if not self.fsdp:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _trainable_names(self) -> list[str]:
        """The optimizer's parameters in its order (FSDP keeps the names of the unsharded model)."""
        return [name for name, parameter in self.model.named_parameters() if parameter.requires_grad]

    def _optimizer_state(self) -> dict:
        """The optimizer's state as one process holds it (parameters numbered in order), so that a
        checkpoint resumes with or without FSDP. Under FSDP every rank calls it; rank 0 gets it."""
        if not self.fsdp:
            return self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        whole = get_optimizer_state_dict(self.model, self.optimizer,
                                         options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not whole:
            return {}  # a rank other than 0
        number = {name: index for index, name in enumerate(self._trainable_names())}
        return {"state": {number[name]: value for name, value in whole["state"].items()},
                "param_groups": [{**group, "params": [number[name] for name in group["params"]]}
                                 for group in whole["param_groups"]]}

    def _load_optimizer_state(self, saved: dict) -> None:
        if not self.fsdp:
            self.optimizer.load_state_dict(saved)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        names = self._trainable_names()
        whole = {"state": {names[int(number)]: value for number, value in saved["state"].items()},
                 "param_groups": [{**group, "params": [names[int(number)] for number in group["params"]]}
                                  for group in saved["param_groups"]]}
        set_optimizer_state_dict(self.model, self.optimizer, whole, options=StateDictOptions(full_state_dict=True))


def shard_weights(model) -> int:
    """FSDP2 over the ranks: each decoder block its own unit, the rest (embeddings, final norm,
    output layer) the root's; returns the number of units. Architectures whose blocks memdec does
    not know are one unit."""
    from torch.distributed.fsdp import fully_shard

    from memdec_core.errors import ModelError
    from memdec_core.inputs.models import decoder_blocks

    try:
        blocks = list(decoder_blocks(model))
    except ModelError:
        blocks = []
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    return len(blocks) + 1


RNG_FILE = "rng.safetensors"


def cuda_devices() -> list[int]:
    """The GPUs whose generators ``fork_rng`` saves and restores (none on a CPU machine)."""
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def save_rng_states(path: Path) -> None:
    """torch's CPU generator state (and every GPU's), as safetensors: no pickle."""
    from safetensors.torch import save_file

    states = {"cpu": torch.get_rng_state()}
    states.update({f"cuda:{device}": torch.cuda.get_rng_state(device) for device in cuda_devices()})
    save_file(states, str(path))


def load_rng_states(path: Path) -> dict | None:
    """The states ``save_rng_states`` wrote; None for a checkpoint written before they were kept."""
    from safetensors.torch import load_file

    return load_file(str(path)) if path.is_file() else None


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["cpu"])
    for device in cuda_devices():
        if f"cuda:{device}" in states:
            torch.cuda.set_rng_state(states[f"cuda:{device}"], device)


def seeded(seed: int):
    """A block whose torch randomness (a fresh model's weights) depends on ``seed`` only; the
    global generator is restored afterwards."""
    import contextlib

    @contextlib.contextmanager
    def block():
        with torch.random.fork_rng(devices=cuda_devices()):
            torch.manual_seed(seed)
            yield

    return block()
