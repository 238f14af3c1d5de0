"""``memdec``: a Memory Decoder mixed with the base, λ tuned on validation.

Without ``memory=DIR`` the domain's memory is made on first use and cached by content hash:
the teacher's datastore over the train split (shared with ``knn-lm``), its kNN targets, then
training from the init model. The memory depends on teacher, init, data and settings — not on
the base — so one memory per domain serves every base of the family.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from memdec_core import registry
from memdec_core.artifacts import cached_artifact, content_key, folder_bytes
from memdec_core.errors import ConfigError, ModelError
from memdec_core.evaluate import EvalContext, MethodResult, ScoredBatch, evaluate_mixture, tune_on_validation
from memdec_core.interfaces import Method
from memdec_core.models import LoadedModel, load_model, model_fingerprint
from memdec_core.progress import log
from memdec_decoder.memory import MemoryDecoder, open_memory
from memdec_decoder.train import TrainSettings, train_memory
from memdec_knn.method import KnnLM
from memdec_knn.targets import TargetSet, TargetSettings, build_targets


@dataclass
class DecoderSettings:
    """The settings of ``memdec`` (also the defaults of ``memdec train``)."""

    memory: str = ""  # a trained memory folder; empty: train (or reuse) the domain's memory in the cache
    teacher: str = ""  # default: the largest default model of the base's tokenizer (else the base)
    init: str = ""  # default: the smallest default model of the base's tokenizer (else the base)
    k: int = 1024
    temperature: float = 16.0  # of the kNN targets (the paper's)
    tune_temperature: bool = False  # instead: the T the teacher's kNN-LM picks on validation
    beta: float = 0.5
    epochs: int = 3
    lr: float = 1e-3
    batch_size: int = 8
    accumulate: int = 1
    vocabulary: str = "auto"
    init_layers: int = 0
    from_scratch: bool = False
    max_steps: int = 0
    budget_tokens: int = 0  # a budget in training tokens, replacing epochs (memdec compare --budget)
    budget_flops: float = 0.0  # or a budget in training FLOPs (6 × the memory's parameters per token)
    save_every: int = 100  # optimizer steps between checkpoints (does not change the memory)
    seed: int = 0

    def __post_init__(self):
        if self.memory and (self.teacher or self.init):
            raise ConfigError("memdec.memory names a trained memory; teacher and init apply only to training one")
        self.target_settings()
        self.train_settings()

    def target_settings(self) -> TargetSettings:
        return TargetSettings(k=self.k, temperature=self.temperature)

    def train_settings(self) -> TrainSettings:
        names = {field.name for field in dataclasses.fields(TrainSettings)}
        return TrainSettings(**{key: value for key, value in dataclasses.asdict(self).items() if key in names})


class MemoryDecoderMethod(Method):
    """Memory Decoder: a small LM trained to imitate the teacher's kNN-LM, mixed with any base; λ tuned."""

    name = "memdec"
    Config = DecoderSettings

    def evaluate(self, ctx: EvalContext) -> MethodResult:
        memory = self.memory_for(ctx)
        memory.check_compatible(ctx.base, ctx.context)
        result = evaluate_mixture(ctx, DecoderMixture(memory))
        result.details.update(memory=str(memory.folder), memory_parameters=memory.parameters,
                              teacher=memory.manifest.get("teacher"), restricted=memory.manifest.get("restricted"),
                              params_added=memory.parameters, bytes_added=folder_bytes(memory.folder),
                              train_seconds=memory.manifest.get("train_seconds"),
                              train_tokens=memory.manifest.get("train_tokens"),
                              train_flops=memory.manifest.get("train_tokens", 0) * memory.manifest.get("flops_per_token", 0))
        return result

    def memory_for(self, ctx: EvalContext) -> MemoryDecoder:
        """The given memory, or the domain's cached one, made on first use."""
        if self.config.memory:
            return _open_cached(Path(self.config.memory).expanduser())
        teacher_name, init_name = self.teacher_and_init(ctx.base)
        teacher = ctx.base if teacher_name == ctx.base.model_id else load_model(teacher_name)
        if teacher.tokenizer_fingerprint != ctx.base.tokenizer_fingerprint:
            raise ModelError(f"teacher {teacher_name} has another tokenizer than {ctx.base.model_id}")
        teacher_ctx = dataclasses.replace(ctx, base=teacher)
        teacher_ctx.context, teacher_ctx.stride = ctx.settings.resolve_window(teacher)
        folder = cached_artifact("memories", memory_key(teacher, init_name, teacher_ctx, self.config))
        if folder.exists():
            log(f"reusing memory {folder}")
            return _open_cached(folder)
        targets = self.targets_for(teacher_ctx)
        log(f"training a memory from {init_name} in {folder}")
        memory = train_memory(init_name, ctx.corpus, targets, folder, context=teacher_ctx.context,
                              stride=teacher_ctx.stride, settings=self.config.train_settings(),
                              teacher=teacher.model_id, eval_batch_size=ctx.settings.batch_size)
        _OPENED[folder] = memory
        return memory

    def targets_for(self, teacher_ctx: EvalContext) -> TargetSet:
        """The teacher's kNN targets over the train split (its datastore is shared with knn-lm)."""
        store = KnnLM(k=self.config.k).datastore_for(teacher_ctx)
        settings = self.target_settings_for(teacher_ctx, store)
        folder = cached_artifact("targets", content_key("targets", store.manifest["data_hash"],
                                                         store.manifest["model_fingerprint"],
                                                         store.folder.name, dataclasses.asdict(settings)))
        if folder.exists():
            log(f"reusing kNN targets {folder}")
            return TargetSet(folder)
        log(f"computing kNN targets in {folder}")
        return build_targets(store, folder, settings)

    def target_settings_for(self, teacher_ctx: EvalContext, store) -> TargetSettings:
        """k and T of the targets; T tuned on validation when ``tune_temperature`` is set."""
        settings = self.config.target_settings()
        if self.config.tune_temperature:
            settings = dataclasses.replace(settings, temperature=tuned_temperature(teacher_ctx, store, self.config.k))
        return settings

    def teacher_and_init(self, base: LoadedModel) -> tuple[str, str]:
        """The configured teacher and init, else the largest / smallest default model sharing the
        base's tokenizer (the paper: the largest family member teaches, the smallest learns)."""
        family = _default_family(base.tokenizer_fingerprint)
        teacher = self.config.teacher or (family[-1] if family else base.model_id)
        init = self.config.init or (family[0] if family else base.model_id)
        if not family and not (self.config.teacher and self.config.init):
            log(f"no default family shares {base.model_id}'s tokenizer: the memory uses {teacher} as teacher "
                f"and {init} as init (set memdec.teacher / memdec.init to choose)")
        return teacher, init


def tuned_temperature(teacher_ctx: EvalContext, store, k: int) -> float:
    """The temperature with which the teacher's kNN-LM (linear λ) scores best on validation.

    Squared-L2 distances between hidden states differ by orders of magnitude between families
    (T ≈ 10–30 for the demo family, ≈ 300–1000 for Qwen), so a fixed T can make every target
    one-hot or flat.
    """
    from memdec_combiners.linear import Linear
    from memdec_knn.method import TEMPERATURE_GRID, KnnMemory

    ctx = dataclasses.replace(teacher_ctx, combiner=Linear)
    settings, valid, best = tune_on_validation(ctx, KnnMemory(store, k, TEMPERATURE_GRID))
    temperature = settings[best][0]["temperature"]
    log(f"target temperature: T = {temperature:g} (teacher's kNN-LM on validation, ppl {valid[best].perplexity:.3f})")
    return temperature


def memory_key(teacher: LoadedModel, init_name: str, teacher_ctx: EvalContext, config: DecoderSettings) -> str:
    ignored = ("memory", "teacher", "init", "save_every")  # named by the other parts, or no effect on the result
    settings = {key: value for key, value in dataclasses.asdict(config).items() if key not in ignored}
    return content_key("memory", teacher.fingerprint, model_fingerprint(init_name),
                       teacher.tokenizer_fingerprint, teacher_ctx.corpus.data_hash("train"),
                       teacher_ctx.corpus.data_hash("valid"), teacher_ctx.context, teacher_ctx.stride, settings)


def _default_family(tokenizer_fingerprint: str) -> list[str]:
    """Default models (smallest first) whose tokenizer matches."""
    return [name for name, cls in registry.components("models").items()
            if cls.default and _tokenizer_of(name) == tokenizer_fingerprint]


@functools.lru_cache(maxsize=None)
def _tokenizer_of(model_name: str) -> str | None:
    return registry.get("models", model_name).info().get("tokenizer_fingerprint")


#: Memories opened in this process: one memory serves every base of a compare run.
_OPENED: dict[Path, MemoryDecoder] = {}


def _open_cached(folder: Path) -> MemoryDecoder:
    if folder not in _OPENED:
        _OPENED[folder] = open_memory(folder)
    return _OPENED[folder]


class DecoderMixture:
    """The memory as a mixture memory: it runs the windows the base ran, nothing to tune but λ."""

    capture_hidden = False

    def __init__(self, memory: MemoryDecoder):
        self.memory = memory

    def grid(self) -> list[dict]:
        return [{}]

    def prepare(self, batch: ScoredBatch) -> torch.Tensor:
        return self.memory.scored_logprobs(batch.input_ids, batch.attention_mask, batch.rows, batch.columns)

    def gold_logprobs(self, state: torch.Tensor, batch: ScoredBatch, knobs: dict) -> torch.Tensor:
        return self.memory.gold(state, batch.targets)

    def logprobs(self, state: torch.Tensor, batch: ScoredBatch, knobs: dict) -> torch.Tensor:
        return self.memory.to_full(state, batch.logits.shape[1])

