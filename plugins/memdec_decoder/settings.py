"""The settings of a Memory Decoder: of ``memdec train``, the ``memory-decoder`` memory and ``memdec``.

``DecoderSettings`` declares every knob once, with its help; ``TrainSettings`` is the training
loop's view of it (the knobs that shape the weights, once a recipe has filled those left at auto).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from memdec_core.errors import ConfigError
from memdec_core.interfaces import setting
from memdec_decoder.recipe import (
    AUTO,
    RECIPE_SETTINGS,
    RECIPES,
    apply_recipe,
    check_recipe_name,
    described,
    number_or_auto,
)

VOCABULARY_CHOICES = ("auto", "full", "restricted")
CUT_NORM_CHOICES = ("final", "next")


@dataclass
class DecoderSettings:
    """How the domain's memory is found or made: a trained folder, or teacher → targets → training."""

    path: str = setting("", "a trained memory folder (memdec train); empty: train (or reuse) the domain's memory "
                            "in the cache")
    teacher: str = setting("", "the model whose kNN-LM the memory imitates; default: the largest default model "
                               "of the base's tokenizer (else the base)")
    init: str = setting("", "the model the memory starts from; default: the smallest default model of the "
                            "base's tokenizer (else the base)")
    retriever: str = setting("faiss", "the vectors retriever that searches the teacher's datastore for the targets")
    k: int = setting(1024, "neighbours per train position in the kNN targets (its own entry excluded)")
    recipe: str = setting(AUTO, f"what fills the settings left at auto: {described()} "
                                f"(measured: benchmarks/RESULTS.md, Memory recipes)")
    temperature: float | str = setting(AUTO, "T of the targets' weights softmax(−d/T); auto: the recipe's (16, the "
                                             "paper's, or tuned)")
    tune_temperature: bool = setting(False, "instead of temperature: the T the teacher's kNN-LM picks on validation")
    beta: float = setting(0.5, "weight of KL(p_kNN ‖ p_mem); 1 − β weighs the cross-entropy on the gold token")
    distill: float = setting(0.0, "share of the KL term given to the teacher's own next-token distribution (its "
                                  "top 64 tokens) instead of the kNN targets: β·[(1−d)·KL(p_kNN ‖ p_mem) + "
                                  "d·KL(p_teacher ‖ p_mem)]; 0: the paper's objective")
    epochs: int | str = setting(AUTO, "passes over the train split, unless a budget decides; auto: the recipe's")
    min_steps: int | str = setting(AUTO, "at least this many optimizer steps: more epochs over a small train split "
                                         "(0: the epochs decide); auto: the recipe's, or 0 when epochs is given")
    lr: float | str = setting(AUTO, "AdamW learning rate at the first step; auto: the recipe's")
    schedule: str = setting("linear", "the learning rate over the optimizer steps: linear (decayed to 0), cosine "
                                      "(decayed to 0 along a half cosine) or constant")
    batch_size: int | str = setting(AUTO, "windows per training forward pass; auto: the recipe's")
    accumulate: int = setting(1, "forward passes per optimizer step")
    vocabulary: str = setting("auto", "full, restricted (the output layer covers the datastore's values only), "
                                      "or auto: restricted above 32k tokens")
    init_layers: int | str = setting(AUTO, "keep only the first N blocks of the init model (0: all); auto: the "
                                           "recipe's")
    cut_norm: str = setting("final", "the output norm of a cut init: final (the whole model's) or next (the input "
                                     "norm of the first dropped block: trained on what the last kept block outputs)")
    from_scratch: bool = setting(False, "the init model's architecture with freshly initialised weights")
    max_steps: int = setting(0, "a budget in optimizer steps (0: the epochs decide)")
    budget_tokens: int = setting(0, "a budget in training tokens, replacing epochs (memdec compare --budget)")
    budget_flops: float = setting(0.0, "or a budget in training FLOPs (6 × the memory's parameters per token)")
    save_every: int = setting(100, "optimizer steps between checkpoints (does not change the memory)", build=False)
    seed: int = setting(0, "seed of the epoch order and of fresh weights")
    fidelity: bool = setting(True, "report the memory's agreement with its kNN teacher on validation (measured "
                                   "once per memory and teacher datastore, then read from the cache); false: skip "
                                   "it, no teacher loaded and no datastore searched", build=False)

    def __post_init__(self):
        if self.path and (self.teacher or self.init):
            raise ConfigError("path names a trained memory; teacher and init apply only to training one")
        check_recipe_name(self.recipe)
        for name, kind in (("temperature", float), ("lr", float), ("epochs", int), ("min_steps", int),
                           ("batch_size", int), ("init_layers", int)):
            setattr(self, name, number_or_auto(getattr(self, name), kind, name))
        self._check_given_values()

    def _check_given_values(self) -> None:
        """The values given are checked now, before any work (those left at auto by the recipe's later)."""
        whole = RECIPES["whole"]
        filled = {name: getattr(whole, name) for name in RECIPE_SETTINGS if getattr(self, name) == AUTO}
        self._train_settings(filled)
        self.target_settings(filled.get("temperature"))

    def with_recipe(self, recipe, context: int) -> "DecoderSettings":
        """These settings with those left at auto taken from ``recipe`` (``memdec_decoder.recipe``),
        for training windows of ``context`` tokens."""
        return apply_recipe(self, recipe, context)

    def target_settings(self, temperature: float | None = None):
        """k and T of the targets (``temperature``: a tuned one, when ``tune_temperature`` asks)."""
        from memdec_decoder.targets import TargetSettings

        temperature = temperature if temperature is not None else self.temperature
        if temperature == AUTO:
            raise ConfigError("the targets' temperature is still auto: apply a recipe first")
        return TargetSettings(k=self.k, temperature=temperature)

    def train_settings(self) -> "TrainSettings":
        """The training settings, once a recipe has filled those left at auto."""
        return self._train_settings({})

    def _train_settings(self, filled: dict) -> "TrainSettings":
        names = {item.name for item in dataclasses.fields(TrainSettings)}
        values = {key: value for key, value in {**dataclasses.asdict(self), **filled}.items() if key in names}
        left = sorted(key for key, value in values.items() if value == AUTO and key != "vocabulary")
        if left:
            raise ConfigError(f"{', '.join(left)} still auto: apply a recipe first")
        return TrainSettings(**values)


def _knob(name: str) -> Any:
    """A field of ``TrainSettings`` that is ``DecoderSettings``' knob ``name``: the same help, and
    the same default, or for a knob the recipe fills the ``whole`` recipe's value."""
    knob = next(item for item in dataclasses.fields(DecoderSettings) if item.name == name)
    default = getattr(RECIPES["whole"], name) if name in RECIPE_SETTINGS else knob.default
    return dataclasses.field(default=default, metadata=knob.metadata)


@dataclass(frozen=True)
class TrainSettings:
    """How a memory is trained: ``DecoderSettings``' knobs that shape the weights, every one a
    number, and two of the loop's own. A resumed run must use the same settings; the manifest
    records them (in this order) under ``train``."""

    beta: float = _knob("beta")
    distill: float = _knob("distill")
    epochs: int = _knob("epochs")
    min_steps: int = _knob("min_steps")
    lr: float = _knob("lr")
    schedule: str = _knob("schedule")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    batch_size: int = _knob("batch_size")
    accumulate: int = _knob("accumulate")
    clip: float = setting(1.0, "the gradients' norm is clipped to this before each optimizer step")
    vocabulary: str = _knob("vocabulary")
    init_layers: int = _knob("init_layers")
    cut_norm: str = _knob("cut_norm")
    from_scratch: bool = _knob("from_scratch")
    max_steps: int = _knob("max_steps")
    budget_tokens: int = _knob("budget_tokens")
    budget_flops: float = _knob("budget_flops")
    save_every: int = _knob("save_every")
    seed: int = _knob("seed")

    def __post_init__(self):
        if not 0.0 <= self.beta <= 1.0:
            raise ConfigError(f"β (beta) must be in [0, 1], got {self.beta}")
        if not 0.0 <= self.distill <= 1.0:
            raise ConfigError(f"distill must be in [0, 1], got {self.distill}")
        if self.init_layers < 0:
            raise ConfigError(f"init_layers must be 0 (all blocks) or positive, got {self.init_layers}")
        if self.cut_norm not in CUT_NORM_CHOICES:
            raise ConfigError(f"cut_norm must be one of {', '.join(CUT_NORM_CHOICES)}, got {self.cut_norm!r}")
        if self.vocabulary not in VOCABULARY_CHOICES:
            raise ConfigError(f"vocabulary must be one of {', '.join(VOCABULARY_CHOICES)}, got {self.vocabulary!r}")
        self.loop()

    def loop(self):
        """The shared training loop's settings (``memdec_core.engine.training.LoopSettings``)."""
        from memdec_core.engine.training import LoopSettings

        names = {item.name for item in dataclasses.fields(LoopSettings)}
        values = {key: value for key, value in dataclasses.asdict(self).items() if key in names}
        return LoopSettings(**values, max_tokens=self.budget_tokens, max_flops=self.budget_flops)
