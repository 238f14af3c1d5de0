"""The settings of ``dapt`` and ``lora`` (light: no torch, so listing them stays fast)."""

from __future__ import annotations

from dataclasses import dataclass

from memdec_core.errors import ConfigError
from memdec_core.interfaces import setting


@dataclass
class FinetuneSettings:
    """Settings shared by ``dapt`` and ``lora``."""

    lrs: tuple = setting((1e-3,), "learning rates tried (one run each); the best on validation is kept")
    epochs: int = setting(3, "passes over the train split (unless a budget decides)")
    patience: int = setting(1, "epochs without a better validation perplexity before stopping")
    batch_size: int = setting(8, "windows per training forward pass")
    accumulate: int = setting(1, "forward passes per optimizer step")
    max_steps: int = setting(0, "a budget in optimizer steps (0: the epochs decide)")
    budget_tokens: int = setting(0, "a budget in training tokens, replacing epochs (memdec compare --budget)")
    budget_flops: float = setting(0.0, "or in training FLOPs: 6N per token for dapt, about 4N for lora")
    seed: int = setting(0, "seed of the epoch order and of the adapters' initialisation")

    def __post_init__(self):
        if isinstance(self.lrs, (int, float)):
            self.lrs = (self.lrs,)
        self.lrs = tuple(float(lr) for lr in self.lrs)
        if not self.lrs or min(self.lrs) <= 0:
            raise ConfigError(f"learning rates must be positive, got {self.lrs}")
        for name in ("epochs", "batch_size", "accumulate"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', ' ')} must be at least 1, got {getattr(self, name)}")
        if min(self.patience, self.max_steps, self.budget_tokens, self.budget_flops) < 0:
            raise ConfigError("patience, max_steps and budgets must be 0 (none) or positive")
        if self.budget_tokens and self.budget_flops:
            raise ConfigError("give a budget in tokens or in FLOPs, not both")


# One learning rate each by default: the one that won 17 of the 18 two-rate sweeps on the demo
# packs (benchmarks/RESULTS.md). A sweep multiplies a method's compute, and memdec compare gives
# every method the same compute; pass lrs=1e-4,5e-4 to sweep anyway.


@dataclass
class DaptSettings(FinetuneSettings):
    """The settings of ``dapt``."""

    lrs: tuple = setting((5e-4,), "learning rates tried (one run each, each costing the whole budget); the best on "
                                  "validation is kept")


#: The rank of LoRA when it is automatic and the run has nothing to match.
FALLBACK_RANK = 8


@dataclass
class LoraSettings(FinetuneSettings):
    """The settings of ``lora``."""

    lrs: tuple = setting((2e-3,), "learning rates tried (one run each, each costing the whole budget); the best on "
                                  "validation is kept")
    rank: int = setting(0, "adapter rank; 0: auto, as many parameters as match_parameters (the paper matches "
                           f"the Memory Decoder), or {FALLBACK_RANK} when there is nothing to match")
    alpha: float = setting(0.0, "LoRA alpha; 0: twice the rank")
    match_parameters: int = setting(0, "parameters the automatic rank matches; 0: the most any other method of "
                                       "the run plans to add (a memory's size, as in the paper)")

    def __post_init__(self):
        super().__post_init__()
        if self.rank < 0 or self.alpha < 0 or self.match_parameters < 0:
            raise ConfigError(f"rank, alpha and match_parameters must be 0 (auto) or positive, got "
                              f"{self.rank}, {self.alpha} and {self.match_parameters}")
