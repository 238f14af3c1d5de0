"""``adaptive``: the memory's weight learned per token, λ(t) = σ(g(features(t))).

g is a small MLP over the features every base and memory provide (``memdec_core.engine.features``:
each one's entropy and top log-prob, their agreement, the memory's own facts such as a kNN
store's nearest distance). It is fitted on validation to minimise the mixture's NLL

    −log((1 − λ(t))·p_base(gold) + λ(t)·p_memory(gold)),

starting from the best fixed λ (g's last layer zero, its bias logit(λ*)), with full-batch Adam and
early stopping on the validation positions it holds out: where the features say nothing, it stays
the fixed λ; it can only move away from it where the held-out positions agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from memdec_core.errors import ConfigError
from memdec_core.interfaces import Combiner, setting

#: Held-out NLL is checked every this many steps; the fit stops after ``PATIENCE`` checks
#: without a new best, and keeps the best.
CHECK_EVERY = 10
PATIENCE = 10


@dataclass
class AdaptiveConfig:
    hidden: int = setting(16, "width of the MLP's hidden layer (0: a logistic regression on the features)")
    steps: int = setting(1000, "full-batch Adam steps at most (early stopping on held-out validation positions)")
    lr: float = setting(0.01, "Adam's learning rate")
    weight_decay: float = setting(1e-3, "L2 penalty on the MLP's weights (not its biases)")

    def __post_init__(self):
        if self.hidden < 0 or self.steps < 0:
            raise ConfigError(f"adaptive: hidden and steps must be ≥ 0, got {self.hidden}, {self.steps}")
        if not self.lr > 0 or self.weight_decay < 0:
            raise ConfigError(f"adaptive: lr must be > 0 and weight_decay ≥ 0, got {self.lr}, {self.weight_decay}")


class Adaptive(Combiner):
    """A per-token λ = σ(MLP(features)) fitted on validation; starts at, and falls back to, the best fixed λ."""

    name = "adaptive"
    Config = AdaptiveConfig
    elementwise = True
    learns = True

    def __init__(self, config=None, **overrides):
        super().__init__(config, **overrides)
        self.parameters: dict | None = None

    def combine(self, base_logprobs, memory_logprobs, context):
        import torch
        import torch.nn.functional as F

        logit = self._logits(context).to(base_logprobs.device).reshape(*base_logprobs.shape[:-1], 1)
        return torch.logaddexp(base_logprobs + F.logsigmoid(-logit), memory_logprobs + F.logsigmoid(logit))

    def weights(self, context):
        import torch

        return torch.sigmoid(self._logits(context))

    def _logits(self, context):
        if self.parameters is None:
            raise ConfigError("combiner 'adaptive' is not fitted: it learns its weights on a domain's validation "
                              "split (give --domain), or load a fitted state")
        features = context.get("features")
        if features is None:
            raise ConfigError("combiner 'adaptive' needs the positions' features (context['features'])")
        if features.shape[-1] != len(self.parameters["mean"]):
            raise ConfigError(f"combiner 'adaptive' was fitted on {len(self.parameters['mean'])} features, "
                              f"given {features.shape[-1]}: fit it with this memory")
        return mlp_logits(self.parameters, features.float())

    def fit(self, data):
        return fit_adaptive(self, data)

    def state_dict(self):
        return dict(self.parameters or {})

    def load_state_dict(self, state):
        import torch

        missing = {"mean", "std", "b2"} - set(state)
        if missing:
            raise ConfigError(f"combiner 'adaptive': a fitted state lacks {', '.join(sorted(missing))}")
        self.parameters = {name: torch.as_tensor(value).float() for name, value in state.items()}


def mlp_logits(parameters: dict, features):
    """z = w2 · tanh(W1 x̂ + b1) + b2 (or w2 · x̂ + b2 without a hidden layer), x̂ standardised."""
    import torch

    x = torch.nan_to_num((features - parameters["mean"]) / parameters["std"], nan=0.0, posinf=0.0, neginf=0.0)
    if "w1" in parameters:
        x = torch.tanh(x @ parameters["w1"].T + parameters["b1"])
    return x @ parameters["w2"] + parameters["b2"]


def mixture_nll(logits, base_gold, memory_gold):
    """Mean −log((1−σ(z))·p_base + σ(z)·p_memory) over the positions."""
    import torch
    import torch.nn.functional as F

    return -torch.logaddexp(base_gold + F.logsigmoid(-logits), memory_gold + F.logsigmoid(logits)).mean()


def best_constant_logit(base_gold, memory_gold, low: float = -12.0, high: float = 12.0, steps: int = 80) -> float:
    """The logit of the best fixed λ on these positions: golden-section search (the NLL is
    convex in λ, so unimodal in its logit)."""
    import torch

    def loss(z: float) -> float:
        return float(mixture_nll(torch.full_like(base_gold, z), base_gold, memory_gold))

    ratio = (math.sqrt(5) - 1) / 2
    a, b = low, high
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = loss(c), loss(d)
    for _ in range(steps):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = loss(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = loss(d)
    return (a + b) / 2


def fit_adaptive(combiner: Adaptive, data) -> dict:
    """Fit ``combiner`` on ``data`` (``FitData``); returns its facts (held-out NLL, steps, FLOPs)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tensors this small: one thread is 20x faster than two (measured)
    try:
        return _fit(combiner, data)
    finally:
        torch.set_num_threads(threads)


def _fit(combiner: Adaptive, data) -> dict:
    import torch

    config = combiner.config
    train, held = data.train, ~data.train
    if int(train.sum()) < 2 or int(held.sum()) < 1:
        raise ConfigError(f"combiner 'adaptive' needs more validation positions to fit on (got {len(data)})")
    features = data.features.float()
    mean = features[train].mean(0)
    std = features[train].std(0)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))  # a constant feature reads 0
    z0 = best_constant_logit(data.base_gold[train].double(), data.memory_gold[train].double())
    generator = torch.Generator().manual_seed(data.seed)
    width = features.shape[1]
    parameters = {"mean": mean, "std": std}
    trained = {"w2": torch.zeros(config.hidden or width), "b2": torch.tensor(float(z0))}
    if config.hidden:
        trained["w1"] = torch.randn(config.hidden, width, generator=generator) / math.sqrt(width)
        trained["b1"] = torch.zeros(config.hidden)
    for tensor in trained.values():
        tensor.requires_grad_(True)
    # The two sides, cut once: each step reads contiguous tensors.
    sides = {name: (features[rows], data.base_gold[rows].float(), data.memory_gold[rows].float())
             for name, rows in (("train", train), ("held", held))}

    def nll(side):
        x, base_gold, memory_gold = sides[side]
        return mixture_nll(mlp_logits({**parameters, **trained}, x), base_gold, memory_gold)

    optimizer = torch.optim.Adam(trained.values(), lr=config.lr)
    decayed = [trained[name] for name in ("w1", "w2") if name in trained]
    with torch.no_grad():
        constant = best = float(nll("held"))
    best_state, best_step, checks_since = _frozen(trained), 0, 0
    step = 0
    for step in range(1, config.steps + 1):
        optimizer.zero_grad()
        loss = nll("train") + config.weight_decay * sum((w * w).sum() for w in decayed)
        loss.backward()
        optimizer.step()
        if step % CHECK_EVERY:
            continue
        with torch.no_grad():
            current = float(nll("held"))
        if current < best - 1e-7:
            best, best_state, best_step, checks_since = current, _frozen(trained), step, 0
        else:
            checks_since += 1
            if checks_since >= PATIENCE:
                break
    combiner.parameters = {name: tensor.float() for name, tensor in {**parameters, **best_state}.items()}
    n_train = int(train.sum())
    per_position = 2 * width * config.hidden + 2 * (config.hidden or width) + 10
    return {"heldout_nll": best, "constant_heldout_nll": constant, "constant_lam": 1 / (1 + math.exp(-z0)),
            "steps": best_step, "steps_run": step, "train_positions": n_train, "heldout_positions": int(held.sum()),
            "flops": float(3 * per_position * n_train * step)}


def _frozen(trained: dict) -> dict:
    return {name: tensor.detach().clone() for name, tensor in trained.items()}
