"""The settings of a Memory Decoder: of ``memdec train``, the ``memory-decoder`` memory and ``memdec``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from memdec_core.errors import ConfigError
from memdec_core.interfaces import setting

VOCABULARY_CHOICES = ("auto", "full", "restricted")


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
    temperature: float = setting(16.0, "T of the targets' weights softmax(−d/T) (the paper's 16)")
    tune_temperature: bool = setting(False, "instead of temperature: the T the teacher's kNN-LM picks on validation")
    beta: float = setting(0.5, "weight of KL(p_kNN ‖ p_mem); 1 − β weighs the cross-entropy on the gold token")
    epochs: int = setting(3, "passes over the train split (unless a budget decides)")
    lr: float = setting(1e-3, "AdamW learning rate, decayed linearly to 0 (the paper: 1e-3 small, 1e-4 Qwen)")
    batch_size: int = setting(8, "windows per training forward pass")
    accumulate: int = setting(1, "forward passes per optimizer step")
    vocabulary: str = setting("auto", "full, restricted (the output layer covers the datastore's values only), "
                                      "or auto: restricted above 32k tokens")
    init_layers: int = setting(0, "keep only the first N blocks of the init model (0: all)")
    from_scratch: bool = setting(False, "the init model's architecture with freshly initialised weights")
    max_steps: int = setting(0, "a budget in optimizer steps (0: the epochs decide)")
    budget_tokens: int = setting(0, "a budget in training tokens, replacing epochs (memdec compare --budget)")
    budget_flops: float = setting(0.0, "or a budget in training FLOPs (6 × the memory's parameters per token)")
    save_every: int = setting(100, "optimizer steps between checkpoints (does not change the memory)", build=False)
    seed: int = setting(0, "seed of the epoch order and of fresh weights")

    def __post_init__(self):
        if self.path and (self.teacher or self.init):
            raise ConfigError("path names a trained memory; teacher and init apply only to training one")
        self.target_settings()
        self.train_settings()

    def target_settings(self):
        from memdec_decoder.targets import TargetSettings

        return TargetSettings(k=self.k, temperature=self.temperature)

    def train_settings(self):
        from memdec_decoder.train import TrainSettings

        names = {item.name for item in dataclasses.fields(TrainSettings)}
        return TrainSettings(**{key: value for key, value in dataclasses.asdict(self).items() if key in names})
