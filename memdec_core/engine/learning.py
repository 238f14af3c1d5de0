"""Combiners that learn: fitted on validation positions, one fit per setting of the memory's knobs.

One pass of the base over the validation split gathers, for every memory setting, each
position's features and the gold token's log-prob under base and memory (``FitData``). The
combiner is fitted on each; the setting whose fit does best on the positions it held out wins.
The fitted tensors are kept in the cache (``combiners/<key>.safetensors``), keyed by the base,
the memory, the validation tokens, the windows and the combiner's code and settings, so a later
run (or ``memdec generate``) reads them back without another validation pass. The test split
is never read here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import torch

from memdec_core.components.identity import component_identity
from memdec_core.engine.features import feature_names
from memdec_core.engine.scoring import batch_features, call_component, iter_scored_batches
from memdec_core.errors import ConfigError, ResultError
from memdec_core.interfaces import Combiner, EvalContext, FitData, MemoryModel
from memdec_core.runtime.progress import log
from memdec_core.store.artifacts import atomic_file, cached_artifact, content_key

#: Held-out positions come in blocks of this many consecutive positions; one block in
#: ``HOLDOUT_EVERY`` is held out (neighbouring tokens share context: they stay on one side).
HOLDOUT_BLOCK = 128
HOLDOUT_EVERY = 5
#: Memory settings fitted (the best under a fixed λ); the rest are not.
FIT_CANDIDATES = 3


@dataclass
class Fitted:
    """The fitted combiner of each memory setting, the facts of each fit, and the best one."""

    combiners: list[Combiner]
    facts: list[dict[str, Any]]
    best: int
    seconds: float = 0.0  # of the fit when it was made (a cached fit took no time now)
    cached: bool = False


def fit_combiners(ctx: EvalContext, memory: MemoryModel, settings: list[tuple[dict, Any]]) -> Fitted:
    """A fitted combiner for each (memory knobs, combiner config) of ``settings``, from the cache
    when the same fit was made before; the best one has the lowest held-out NLL."""
    import time

    path = cached_artifact("combiners", fit_key(ctx, memory, settings) + ".safetensors")
    combiners = [ctx.combiner(config) for _, config in settings]
    facts = _read_fit(path, combiners)
    started = time.perf_counter()
    cached = facts is not None
    if not cached:
        data = collect_fit_data(ctx, memory, [knobs for knobs, _ in settings])
        scores = [fixed_lambda_nll(one.base_gold, one.memory_gold) for one in data]
        candidates = set(_candidates(scores))
        facts = [_fit_one(combiner, one) if number in candidates else _not_fitted(scores[number])
                 for number, (combiner, one) in enumerate(zip(combiners, data))]
        seconds = time.perf_counter() - started  # the validation pass and every fit
        facts = [{**one, "seconds": seconds, "positions": len(data[0])} for one in facts]
        _write_fit(path, combiners, facts)
    best = min((i for i in range(len(facts)) if facts[i].get("fitted", True)), key=lambda i: facts[i]["heldout_nll"])
    return Fitted(combiners, facts, best, float(facts[best]["seconds"]), cached)


def fitted_combiner(ctx: EvalContext, memory: MemoryModel, knobs: dict, combiner: Combiner) -> Combiner:
    """``combiner`` (one that learns) fitted for the memory's one setting ``knobs`` on ``ctx``'s
    validation split, where nothing is tuned (generation, a composite): the same fit, and the same
    cache entry, as an evaluation whose grid is that one setting."""
    if ctx.corpus is None:
        raise ConfigError(f"combiner {combiner.name!r} learns its weights on a domain's validation split; "
                          f"give the domain to fit it on (--domain DOMAIN)")
    fitted = fit_combiners(ctx, memory, [(knobs, combiner.config)])
    facts = fitted.facts[fitted.best]
    log(f"{ctx.base.model_id}: {combiner.name} fitted on {ctx.corpus.corpus.name}'s validation split"
        f"{' (cached)' if fitted.cached else ''}: held-out ppl {math.exp(facts['heldout_nll']):.3f}")
    return fitted.combiners[fitted.best]


def _candidates(scores: list[float]) -> list[int]:
    """The memory settings worth fitting: the ``FIT_CANDIDATES`` best under the best fixed λ of
    each (``scores``: ``fixed_lambda_nll``, the paper's mixture). A learned weight refines a
    mixture; it does not rescue a memory setting that mixes badly at every fixed weight."""
    return sorted(range(len(scores)), key=lambda i: scores[i])[:FIT_CANDIDATES]


def fixed_lambda_nll(base_gold: torch.Tensor, memory_gold: torch.Tensor) -> float:
    """The lowest mean NLL of a fixed-λ mixture on these positions (λ on a fine grid)."""
    lams = torch.linspace(0.0, 1.0, 101, dtype=torch.float64)[1:-1, None]
    mixed = torch.logaddexp(base_gold.double() + torch.log1p(-lams), memory_gold.double() + torch.log(lams))
    return float(-mixed.mean(dim=1).max())


def _not_fitted(fixed_nll: float) -> dict[str, Any]:
    """The facts of a setting not fitted (never chosen): its best fixed λ's NLL on all positions."""
    return {"heldout_nll": None, "fitted": False, "fixed_lambda_nll": fixed_nll}


def _fit_one(combiner: Combiner, data: FitData) -> dict[str, Any]:
    facts = {"fitted": True, **(call_component(combiner, "combiner", combiner.fit, data) or {})}
    nll = facts.get("heldout_nll")
    if not isinstance(nll, (int, float)) or not math.isfinite(nll):
        raise ResultError(f"combiner {combiner.name!r} fit gave no finite heldout_nll ({nll!r}); "
                          f"fit() must return it")
    return facts


def collect_fit_data(ctx: EvalContext, memory: MemoryModel, memory_settings: list[dict],
                     split: str = "valid") -> list[FitData]:
    """Per memory setting, every validation position's features and gold log-probs (one pass)."""
    if split == "test":
        raise ResultError("a combiner is never fitted on the test split")
    stream, windows = ctx.corpus.streams[split], ctx.windows(split)
    names = feature_names(memory)
    parts: list[list[tuple]] = [[] for _ in memory_settings]
    batches = iter_scored_batches(ctx.base.model, stream, windows, batch_size=ctx.settings.batch_size,
                                  capture_hidden=memory.needs_hidden, description=f"fit {ctx.base.short_name}")
    for batch in batches:
        state = call_component(memory, "memory", memory.score, batch)
        base_gold = batch.gold_logprobs()
        for number, knobs in enumerate(memory_settings):
            features = batch_features(memory, state, batch, knobs)
            memory_gold = call_component(memory, "memory", memory.gold_logprobs, state, batch, knobs).float()
            parts[number].append((features, base_gold, memory_gold, torch.as_tensor(batch.positions), batch.hidden))
    return [_fit_data(part, names, ctx.settings.seed, memory.skippable) for part in parts]


def _fit_data(parts: list[tuple], names: tuple[str, ...], seed: int, skippable: bool) -> FitData:
    columns = list(zip(*parts))
    features, base_gold, memory_gold, positions = (torch.cat(column) for column in columns[:4])
    hidden = torch.cat(columns[4]) if skippable and columns[4][0] is not None else None
    train = (positions // HOLDOUT_BLOCK) % HOLDOUT_EVERY != HOLDOUT_EVERY - 1
    return FitData(features, names, base_gold, memory_gold, positions, train, seed, skippable, hidden)


def fit_key(ctx: EvalContext, memory: MemoryModel, settings: list[tuple[dict, Any]]) -> str:
    """What a fit depends on: the base, the memory (its build and prepared artifact), the
    validation tokens and windows, the combiner's code and every setting fitted, the seed."""
    # A combiner with fixed knobs (an instance, ``--set adaptive.gate=...``) is a subclass made in
    # components/combiner_files: the key names the class that defines ``combine``, whose code the fit is.
    combiner = next((cls for cls in ctx.combiner.__mro__ if "combine" in vars(cls)), ctx.combiner)
    return content_key("combiner-fit", ctx.base.fingerprint, memory.name, component_identity(type(memory)),
                       memory.build_settings(), memory.describe_prepared(), ctx.corpus.hashes["valid"],
                       ctx.context, ctx.stride, ctx.settings.batch_size, ctx.settings.seed,
                       f"{combiner.__module__}.{combiner.__qualname__}", component_identity(combiner),
                       repr(settings), HOLDOUT_BLOCK, HOLDOUT_EVERY)


def _write_fit(path, combiners: list[Combiner], facts: list[dict]) -> None:
    from safetensors.torch import save_file

    tensors = {f"{number}.{name}": tensor.detach().contiguous().cpu()
               for number, combiner in enumerate(combiners) for name, tensor in combiner.state_dict().items()}
    with atomic_file(path) as temporary:
        save_file(tensors, str(temporary), metadata={"facts": json.dumps(facts)})


def _read_fit(path, combiners: list[Combiner]) -> list[dict] | None:
    """The facts of a cached fit, its tensors loaded into ``combiners``; None when there is none
    (or it cannot be read: it is fitted again)."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as handle:
            facts = json.loads(handle.metadata()["facts"])
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        if not isinstance(facts, list) or len(facts) != len(combiners):
            return None
        for number, combiner in enumerate(combiners):
            if not facts[number].get("fitted", True):
                continue
            prefix = f"{number}."
            combiner.load_state_dict({name[len(prefix):]: tensor for name, tensor in tensors.items()
                                      if name.startswith(prefix)})
    except Exception as error:  # a corrupt or foreign file (safetensors' own errors too): fit again
        log(f"ignoring the unreadable fit {path} ({error}); fitting again")
        return None
    return facts
