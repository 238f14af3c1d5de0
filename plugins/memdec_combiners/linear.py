"""The paper's combiner: a mixture of the two distributions, computed in log space."""

from __future__ import annotations

import math
from dataclasses import dataclass

from memdec_core.errors import ConfigError
from memdec_core.interfaces import Combiner, setting

#: λ values tried on validation. Small values matter: a strong base wants 0.05–0.15; a memory far
#: better than a weak base on its domain wants 0.9 or more.
LAMBDA_GRID = (0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def check_lambda(lam: float) -> float:
    if not isinstance(lam, (int, float)) or not 0.0 <= lam <= 1.0:
        raise ConfigError(f"λ (lam) must be in [0, 1], got {lam}")
    return float(lam)


class Linear(Combiner):
    """Linear interpolation log((1−λ)·p_base + λ·p_memory), λ tuned on validation."""

    name = "linear"
    elementwise = True
    knob_bounds = {"lam": (0.0, 1.0)}

    @dataclass
    class Config:
        lam: float = setting(0.25, "λ, the weight of the memory; tuned on validation unless fixed")

        def __post_init__(self):
            self.lam = check_lambda(self.lam)

    @classmethod
    def grid(cls):
        return [cls.Config(lam) for lam in LAMBDA_GRID]

    def combine(self, base_logprobs, memory_logprobs, context):
        import torch

        lam = self.config.lam
        if lam == 0.0:  # log(0) would turn -inf memory entries into NaN
            return base_logprobs
        if lam == 1.0:
            return memory_logprobs
        return torch.logaddexp(base_logprobs + math.log1p(-lam), memory_logprobs + math.log(lam))
