"""A combiner that learns, in one file: a logistic-regression router on two features.

The memory's weight at each token is λ(t) = σ(a·x̂₁ + b·x̂₂ + c), where x̂ are two of the
features memdec computes for every position (``memdec_core.engine.features``), standardised on
the positions it trains on: the base's entropy (an unsure base leans on the memory) and the
memory's top log-prob (a sure memory is trusted). It is fitted with L-BFGS on the validation
positions ``FitData.train`` marks, and reports its NLL on the rest, which memdec uses to choose
among the memory's settings. Nothing here is random, so every fit gives the same bits.

    memdec eval --domain finance --base memdec-demo-s --method knn-lm \\
        --combiner examples/learned_router.py:LogisticRouter

``memdec_core.testing.CombinerContract`` is its test (tests/test_learned_combiners.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from memdec_core.errors import ConfigError
from memdec_core.interfaces import Combiner, setting

#: The features the router reads, by name (``context["feature_names"]``, ``FitData.feature_names``).
FEATURES = ("base_entropy", "memory_top")


@dataclass
class RouterConfig:
    iterations: int = setting(100, "L-BFGS iterations at most")

    def __post_init__(self):
        if self.iterations < 1:
            raise ConfigError(f"logistic-router: iterations must be ≥ 1, got {self.iterations}")


class LogisticRouter(Combiner):
    """The memory's weight per token from the base's entropy and the memory's top log-prob (logistic regression)."""

    name = "logistic-router"
    Config = RouterConfig
    elementwise = True  # a mixture of two distributions: the gold column alone gives the gold entry
    learns = True

    def __init__(self, config=None, **overrides):
        super().__init__(config, **overrides)
        self.state: dict[str, torch.Tensor] = {}

    def combine(self, base_logprobs, memory_logprobs, context):
        logit = self._logits(context).to(base_logprobs.device).reshape(*base_logprobs.shape[:-1], 1)
        return torch.logaddexp(base_logprobs + F.logsigmoid(-logit), memory_logprobs + F.logsigmoid(logit))

    def weights(self, context):
        return torch.sigmoid(self._logits(context))

    def fit(self, data):
        x = columns(data.features, data.feature_names)
        train, held = data.train, ~data.train
        mean, std = x[train].mean(0), x[train].std(0).clamp(min=1e-6)
        x = (x - mean) / std
        coef = torch.zeros(3, requires_grad=True)  # λ = ½ everywhere to start
        optimizer = torch.optim.LBFGS([coef], max_iter=self.config.iterations, line_search_fn="strong_wolfe")

        def nll(rows):
            logit = x[rows] @ coef[:2] + coef[2]
            return -torch.logaddexp(data.base_gold[rows].float() + F.logsigmoid(-logit),
                                    data.memory_gold[rows].float() + F.logsigmoid(logit)).mean()

        def closure():
            optimizer.zero_grad()
            loss = nll(train)
            loss.backward()
            return loss

        optimizer.step(closure)
        self.state = {"coef": coef.detach().clone(), "mean": mean, "std": std}
        with torch.no_grad():
            heldout = float(nll(held))
        return {"heldout_nll": heldout, "coef": self.state["coef"].tolist(),
                "flops": float(20 * int(train.sum()) * self.config.iterations)}

    def state_dict(self):
        return dict(self.state)

    def load_state_dict(self, state):
        missing = {"coef", "mean", "std"} - set(state)
        if missing:
            raise ConfigError(f"logistic-router: a fitted state lacks {', '.join(sorted(missing))}")
        self.state = {name: torch.as_tensor(value).float() for name, value in state.items()}

    def _logits(self, context):
        if not self.state:
            raise ConfigError("logistic-router is not fitted: it learns on a domain's validation split")
        x = (columns(context["features"], context["feature_names"]) - self.state["mean"]) / self.state["std"]
        return x @ self.state["coef"][:2] + self.state["coef"][2]


def columns(features: torch.Tensor, names) -> torch.Tensor:
    """The router's two columns of ``features`` (``[N, F]``, named by ``names``)."""
    names = list(names)
    missing = [name for name in FEATURES if name not in names]
    if missing:
        raise ConfigError(f"logistic-router reads the features {', '.join(FEATURES)}; missing {', '.join(missing)}")
    return features.float()[:, [names.index(name) for name in FEATURES]]
