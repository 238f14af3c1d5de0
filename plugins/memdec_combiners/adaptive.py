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
#: The gate's threshold is chosen on scores predicted out of fold: blocks of this many consecutive
#: positions (they share context), dealt into this many folds.
GATE_BLOCK = 128
GATE_FOLDS = 5


@dataclass
class AdaptiveConfig:
    hidden: int = setting(16, "width of the MLP's hidden layer (0: a logistic regression on the features)")
    steps: int = setting(1000, "full-batch Adam steps at most (early stopping on held-out validation positions)")
    lr: float = setting(0.01, "Adam's learning rate")
    weight_decay: float = setting(1e-3, "L2 penalty on the MLP's weights (not its biases)")
    gate: float = setting(0.0, "adaptive retrieval: the held-out perplexity increase allowed for skipping a "
                               "skippable memory (kNN search) where a base-only predictor of the weight is low "
                               "(0: no gate; 0.01: at most 1 % on held-out validation positions)")
    gate_ridge: float = setting(1000.0, "the gate's ridge penalty (its predictor reads the base's hidden state: "
                                        "hundreds of inputs fitted on a few thousand positions)")

    def __post_init__(self):
        if not 0 <= self.gate < 1 or self.gate_ridge < 0:
            raise ConfigError(f"adaptive: gate must be in [0, 1) and gate_ridge ≥ 0, "
                              f"got {self.gate}, {self.gate_ridge}")
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

    def gate(self, base_features):
        """Where the memory is needed: the base-only predictor of the weight at or above the
        threshold chosen on held-out validation positions (None: no gate was fitted)."""
        parameters = self.parameters or {}
        if "gate_w" not in parameters or float(parameters["gate_threshold"]) == -math.inf:
            return None
        if base_features.shape[-1] != len(parameters["gate_mean"]):
            raise ConfigError(f"combiner 'adaptive': its gate was fitted on {len(parameters['gate_mean'])} base-only "
                              f"features, given {base_features.shape[-1]}: fit it with this base and memory")
        return gate_scores(parameters, base_features.float()) >= parameters["gate_threshold"]

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
    facts = {"heldout_nll": best, "constant_heldout_nll": constant, "constant_lam": 1 / (1 + math.exp(-z0)),
             "steps": best_step, "steps_run": step, "train_positions": n_train, "heldout_positions": int(held.sum()),
             "flops": float(3 * per_position * n_train * step)}
    if config.gate > 0 and data.skippable:
        gate, facts["gate"] = fit_gate(combiner.parameters, data, config.gate, config.gate_ridge)
        combiner.parameters.update(gate)
    return facts


def _frozen(trained: dict) -> dict:
    return {name: tensor.detach().clone() for name, tensor in trained.items()}


def gate_terms(parameters: dict, base_features):
    """``[N, 6 (+ dim)]`` the gate's inputs: the standardised entropy and top log-prob of the base,
    their squares and product (the weight is not monotone in the entropy), its hidden state where
    there is one, and a constant."""
    import torch

    x = torch.nan_to_num((base_features - parameters["gate_mean"]) / parameters["gate_std"], nan=0.0,
                         posinf=0.0, neginf=0.0)
    h, t = x[:, 0], x[:, 1]
    return torch.cat([torch.stack([h, t, h * h, t * t, h * t], dim=1), x[:, 2:], torch.ones_like(h)[:, None]], dim=1)


def gate_scores(parameters: dict, base_features):
    """``[N]`` the gate's predicted logit of the weight, from base-only features."""
    return gate_terms(parameters, base_features) @ parameters["gate_w"]


def fit_gate(parameters: dict, data, allowance: float, ridge: float) -> tuple[dict, dict]:
    """A base-only predictor of the fitted weight (ridge regression on its logit, from
    ``gate_features``: the base's entropy, top log-prob and hidden state), and the largest
    threshold on it whose skipping keeps the validation NLL within log(1 + ``allowance``) of the
    ungated one (a skipped position: the base's log-prob). The threshold is chosen on scores
    predicted out of fold (``GATE_FOLDS`` folds of blocks of positions), so on every validation
    position rather than the held-out fifth alone; the predictor kept is then fitted on them all.
    Returns its tensors and its facts."""
    import torch

    from memdec_core.engine.features import GATE_FEATURES

    columns = [data.feature_names.index(name) for name in GATE_FEATURES]
    base_features = data.features[:, columns].float()
    if data.hidden is not None:
        base_features = torch.cat([base_features, data.hidden.float()], dim=1)
    mean, std = base_features.mean(0), base_features.std(0)
    gate = {"gate_mean": mean, "gate_std": torch.where(std > 1e-6, std, torch.ones_like(std))}
    logits = mlp_logits(parameters, data.features.float()).clamp(-12, 12)
    terms, target = gate_terms(gate, base_features).double(), logits.double()
    folds = (data.positions // GATE_BLOCK) % GATE_FOLDS
    scores = torch.empty(len(terms), dtype=torch.float64)
    for fold in range(GATE_FOLDS):
        rows = folds == fold
        if rows.any():
            scores[rows] = terms[rows] @ _ridge(terms[~rows], target[~rows], ridge)
    gate["gate_w"] = _ridge(terms, target, ridge).float()
    base_gold = data.base_gold.double()
    mixed = -mixture_nll_each(logits, base_gold, data.memory_gold.double())
    threshold, skipped = choose_threshold(scores, mixed, base_gold, math.log1p(allowance))
    gated = torch.where(scores >= threshold, mixed, base_gold)
    # The share found safe out of fold is what the predictor kept skips: its threshold is the
    # score below which that share of the validation positions falls (the fold predictors'
    # scores spread wider than its own, so their threshold would skip less).
    gate["gate_threshold"] = torch.tensor(share_threshold(gate_scores(gate, base_features).double(), skipped))
    return gate, {"allowance": allowance, "threshold_weight": float(torch.sigmoid(gate["gate_threshold"])),
                  "valid_skipped_share": skipped, "valid_ppl": math.exp(-float(gated.mean())),
                  "valid_ppl_ungated": math.exp(-float(mixed.mean())), "inputs": base_features.shape[1]}


def share_threshold(scores, share: float) -> float:
    """The threshold below which ``share`` of ``scores`` falls (−inf: none, +inf: all)."""
    count = round(share * len(scores))
    if count == 0:
        return -math.inf
    if count >= len(scores):
        return math.inf
    ordered = scores.sort().values
    return float((ordered[count - 1] + ordered[count]) / 2)


def _ridge(terms, target, ridge: float):
    """The ridge regression's weights (the last column, the constant, not shrunk)."""
    import torch

    penalty = torch.eye(terms.shape[1], dtype=torch.float64) * ridge
    penalty[-1, -1] = 0.0
    return torch.linalg.solve(terms.T @ terms + penalty, terms.T @ target)


def mixture_nll_each(logits, base_gold, memory_gold):
    """``[N]`` −log((1−σ(z))·p_base + σ(z)·p_memory) per position."""
    import torch
    import torch.nn.functional as F

    logits = logits.to(base_gold.dtype)
    return -torch.logaddexp(base_gold + F.logsigmoid(-logits), memory_gold + F.logsigmoid(logits))


def choose_threshold(scores, mixed_gold, base_gold, allowed_nll: float) -> tuple[float, float]:
    """``(threshold, share skipped)``: the largest threshold t such that skipping the positions
    whose score is below t (their log-prob: the base's) raises the mean NLL by at most
    ``allowed_nll``; −inf (skip none) when no threshold does, +inf when every position may go."""
    import torch

    order = torch.argsort(scores)
    ordered = scores[order]
    increase = torch.cat([torch.zeros(1, dtype=torch.float64),
                          torch.cumsum((mixed_gold - base_gold)[order], 0)]) / len(scores)
    # Skipping the first j sorted positions is a threshold only between two different scores.
    boundary = torch.ones(len(scores) + 1, dtype=torch.bool)
    boundary[1:-1] = ordered[1:] > ordered[:-1]
    allowed = (increase <= allowed_nll) & boundary
    j = int(allowed.nonzero()[-1])  # j = 0 is always allowed
    if j == 0:
        return -math.inf, 0.0
    if j == len(scores):
        return math.inf, 1.0
    return float((ordered[j - 1] + ordered[j]) / 2), j / len(scores)
