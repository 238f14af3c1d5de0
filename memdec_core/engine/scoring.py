"""Token-weighted sliding-window perplexity, of a base model alone or mixed with a memory.

The engine runs the base model once per split over batches of windows and hands each batch's
scored positions (gold targets, logits, optionally the ``last_ffn_input`` hidden states) to the
caller. A mixture method evaluates its whole knob grid on each validation batch in that single
pass, picks the best setting on validation only, and scores the test split with it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch

from memdec_core.engine.features import GENERIC_FEATURES, feature_names, gate_features, token_features
from memdec_core.engine.grids import extend, numeric_knobs
from memdec_core.errors import ConfigError, MemdecError, ModelError, PluginError, ResultError
from memdec_core.inputs.data import Window
from memdec_core.inputs.models import ForwardStopped, autocast, capture_last_ffn_input, model_device
from memdec_core.interfaces import Combiner, EvalContext, MemoryModel, Scorer
from memdec_core.runtime.distributed import World, is_fully_sharded, sharding, sum_across
from memdec_core.runtime.progress import log, progress_bar
from memdec_core.runtime.timings import timed

__all__ = ["ScoredBatch", "NLLTotal", "tune_on_validation", "iter_scored_batches", "nll_total", "perplexity",
           "model_scorer", "format_knobs", "bits_per_byte", "scored_bytes"]


@dataclass
class ScoredBatch:
    """The scored positions of a batch of windows, flattened in stream order."""

    positions: torch.Tensor  # [N] global position p (predicting token p + 1)
    targets: torch.Tensor  # [N] gold next-token ids
    logits: torch.Tensor | None  # [N, vocab] base model logits, fp32 (None when not asked for)
    hidden: torch.Tensor | None = None  # [N, dim] last_ffn_input, when captured
    #: The padded batch the base saw, and where each scored row sits in it: a memory model runs
    #: the same windows and reads its predictions at ``[rows, columns]``.
    input_ids: torch.Tensor | None = None  # [windows, length]
    attention_mask: torch.Tensor | None = None
    rows: torch.Tensor | None = None  # [N] window of each scored position
    columns: torch.Tensor | None = None  # [N] column of each scored position in input_ids
    _gold: torch.Tensor | None = field(default=None, repr=False)
    _logprobs: torch.Tensor | None = field(default=None, repr=False)

    def logprobs(self) -> torch.Tensor:
        """``[N, vocab]`` the base's log-probs; computed once per batch."""
        if self._logprobs is None:
            self._logprobs = torch.log_softmax(self.logits, dim=-1)
        return self._logprobs

    def head(self, count: int) -> "ScoredBatch":
        """The first ``count`` scored positions, with only the windows they sit in."""
        windows = int(self.rows[:count].max()) + 1 if self.rows is not None else None

        def cut(tensor, rows=count):
            return None if tensor is None else tensor[:rows]

        return ScoredBatch(self.positions[:count], self.targets[:count], cut(self.logits), cut(self.hidden),
                           cut(self.input_ids, windows), cut(self.attention_mask, windows), cut(self.rows),
                           cut(self.columns))

    def select(self, keep: torch.Tensor) -> "ScoredBatch":
        """The scored positions where ``keep`` (``[N]`` bool) is True, in the same windows (a
        skippable memory runs on these only)."""

        def cut(tensor):
            return None if tensor is None else tensor[keep]

        return ScoredBatch(self.positions[keep], self.targets[keep], cut(self.logits), cut(self.hidden),
                           self.input_ids, self.attention_mask, cut(self.rows), cut(self.columns),
                           cut(self._gold), cut(self._logprobs))

    def gold_logprobs(self) -> torch.Tensor:
        """``[N]`` log p(gold); computed once per batch, however many knob settings read it."""
        if self._gold is None:
            gold = self.logits.gather(1, self.targets[:, None]).squeeze(1)
            self._gold = gold - torch.logsumexp(self.logits, dim=-1)
        return self._gold


class NLLTotal:
    """Token-weighted negative log-likelihood: perplexity = exp(sum / count)."""

    def __init__(self):
        self.total, self.count = 0.0, 0

    def add(self, gold_logprobs: torch.Tensor) -> None:
        self.total -= float(gold_logprobs.double().sum())
        self.count += int(gold_logprobs.numel())

    @property
    def perplexity(self) -> float:
        return math.exp(self.total / self.count) if self.count else float("nan")


def scored_bytes(tokenizer, stream: np.ndarray) -> int:
    """UTF-8 bytes of the text a split's perplexity scores: every token of ``stream`` but the first
    (each window predicts the token after each position), decoded at once; the documents'
    separators count no bytes. Remembered (``store.memo``) by the tokenizer's ``tokenization_key``
    and the stream's tokens: ``tokenizer`` may be a ``TokenizerRef``, loaded only the first time."""
    from memdec_core.inputs.data import TokenizerRef
    from memdec_core.store.memo import remembered

    ref = TokenizerRef.of(tokenizer)

    def decoded_bytes() -> int:
        text = ref.load().decode(stream[1:].tolist(), skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return len(text.encode("utf-8"))

    tokens = hashlib.sha256(np.ascontiguousarray(stream, dtype=np.int64).tobytes()).hexdigest()
    return int(remembered(f"bytes-{hashlib.sha256(f'{ref.key}|{tokens}'.encode()).hexdigest()[:32]}.json",
                          decoded_bytes))


def bits_per_byte(perplexity: float | None, tokenizer, stream: np.ndarray) -> float | None:
    """The NLL of the scored tokens of ``stream`` in bits per UTF-8 byte of their text: the one
    scale on which models of different tokenizers compare (perplexity per token does not)."""
    if perplexity is None or math.isnan(perplexity) or len(stream) < 2:
        return None
    n_bytes = scored_bytes(tokenizer, stream)
    return math.log2(perplexity) * (len(stream) - 1) / n_bytes if n_bytes else None


def reduce_totals(totals: list[NLLTotal]) -> list[NLLTotal]:
    """Each total summed over the ranks that shared its batches (one collective for them all)."""
    values = sum_across([value for total in totals for value in (total.total, total.count)])
    for number, total in enumerate(totals):
        total.total, total.count = values[2 * number], int(round(values[2 * number + 1]))
    return totals


def iter_scored_batches(model, stream: np.ndarray, windows: list[Window], *, batch_size: int,
                        capture_hidden: bool = False, with_logits: bool = True, sharded: bool = False,
                        description: str = "scoring") -> Iterator[ScoredBatch]:
    """Run ``model`` over the windows in batches; yield the scored positions of each batch.

    ``with_logits=False`` skips the output layer (a datastore needs only hidden states).
    ``sharded``: under several processes, this rank's batches only (every N-th: the batches, so
    the numbers, are those of one process); the caller reduces what it sums (``reduce_totals``).
    """
    shard = sharding() if sharded else World()
    firsts = range(0, len(windows), batch_size)
    starts = [first for number, first in enumerate(firsts) if shard.owns(number)]
    n_scored = sum(window.n_scored for first in starts for window in windows[first:first + batch_size])
    with progress_bar(description, n_scored, "tokens") as advance, torch.inference_mode():
        for first in starts:
            batch_windows = windows[first:first + batch_size]
            batch = _score_windows(model, stream, batch_windows, capture_hidden, with_logits)
            advance(len(batch.targets))
            yield batch
        if shard.size > 1 and is_fully_sharded(model):
            # FSDP: a rank with one batch fewer still joins the last pass's weight gathers.
            for _ in range(math.ceil(len(firsts) / shard.size) - len(starts)):
                _score_windows(model, stream, windows[:batch_size], capture_hidden, with_logits)


def _score_windows(model, stream: np.ndarray, windows: list[Window], capture_hidden: bool,
                   with_logits: bool) -> ScoredBatch:
    input_ids, attention_mask = _pad(stream, windows)
    # Keep logits from the earliest scored column of any window to the end of the batch.
    keep = input_ids.shape[1] - min(window.score_from - window.start for window in windows)
    device = model_device(model)
    # Keys alone: the pass ends at the last MLP's input (not under FSDP, whose ranks gather every block's weights).
    stop = capture_hidden and not with_logits and not is_fully_sharded(model)
    with capture_last_ffn_input(model, stop) if capture_hidden else contextlib.nullcontext({}) as captured, autocast():
        logits = _forward(model, input_ids.to(device), attention_mask.to(device), keep, with_logits)
    rows, columns, positions = _scored_indices(windows, input_ids.shape[1], keep)
    targets = torch.from_numpy(stream[positions + 1].astype(np.int64))
    # What is scored comes back to the CPU (a no-op there), where combiners and kNN work.
    scored_hidden = (captured["hidden"][rows.to(device), (columns + (input_ids.shape[1] - keep)).to(device)]
                     .float().cpu() if capture_hidden else None)
    scored_logits = logits[rows.to(device), columns.to(device)].float().cpu() if logits is not None else None
    return ScoredBatch(torch.from_numpy(positions), targets, scored_logits, scored_hidden,
                       input_ids, attention_mask, rows, columns + (input_ids.shape[1] - keep))


def _pad(stream: np.ndarray, windows: list[Window]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad windows to one length; position ids are unaffected by right padding."""
    length = max(window.end - window.start for window in windows)
    input_ids = np.zeros((len(windows), length), dtype=np.int64)
    attention_mask = np.zeros((len(windows), length), dtype=np.int64)
    for row, window in enumerate(windows):
        size = window.end - window.start
        input_ids[row, :size] = stream[window.start:window.end]
        attention_mask[row, :size] = 1
    return torch.from_numpy(input_ids), torch.from_numpy(attention_mask)


def _forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: int,
             with_logits: bool) -> torch.Tensor | None:
    """Logits of the last ``keep`` columns only: the output layer is the costly part for big vocabularies."""
    if not with_logits:  # the decoder alone: hidden-state hooks still fire, the output layer is skipped
        try:
            model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except ForwardStopped:
            pass  # the hidden states asked for are captured; the rest of the pass was not needed
        return None
    output = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep, use_cache=False)
    logits = output.logits
    return logits[:, -keep:] if logits.shape[1] > keep else logits


def _scored_indices(windows: list[Window], length: int, keep: int):
    """Row, column (into the kept logits) and global position of every scored prediction."""
    rows, columns, positions = [], [], []
    offset = length - keep
    for row, window in enumerate(windows):
        local = np.arange(window.score_from, window.end - 1) - window.start  # column in the window
        rows.append(np.full(len(local), row))
        columns.append(local - offset)
        positions.append(np.arange(window.score_from, window.end - 1))
    return (torch.from_numpy(np.concatenate(rows)), torch.from_numpy(np.concatenate(columns)),
            np.concatenate(positions).astype(np.int64))


def nll_total(model, stream: np.ndarray, windows: list[Window], *, batch_size: int,
              description: str = "perplexity") -> NLLTotal:
    """Token-weighted NLL of ``model`` alone over the windows."""
    total = NLLTotal()
    for batch in iter_scored_batches(model, stream, windows, batch_size=batch_size, sharded=True,
                                     description=description):
        total.add(batch.gold_logprobs())
    return reduce_totals([total])[0]


def perplexity(model, stream: np.ndarray, windows: list[Window], *, batch_size: int,
               description: str = "perplexity") -> float:
    """Token-weighted perplexity of ``model`` alone over the windows."""
    return nll_total(model, stream, windows, batch_size=batch_size, description=description).perplexity


def model_scorer(model, batch_size: int) -> Scorer:
    """The scorer of a plain causal LM (the base, or a base with adapted weights)."""
    return lambda stream, windows, description: nll_total(model, stream, windows, batch_size=batch_size,
                                                          description=description)


def knob_settings(ctx: EvalContext, memory: MemoryModel) -> list[tuple[dict, Any]]:
    """Every (memory knobs, combiner config) to try: the memory's grid × the combiner's."""
    return [(mem, comb) for mem in memory.grid() for comb in ctx.combiner.grid()]


@timed("tune")
def tune_on_validation(ctx: EvalContext, memory: MemoryModel,
                       edges: list[str] | None = None) -> tuple[list, list[NLLTotal], int]:
    """Every (memory knobs, combiner config) scored on validation in one pass; and the best one's index.

    A numeric knob whose best value is an edge of its grid is tried once beyond it
    (``memdec_core.engine.grids``); what happened is appended to ``edges`` and logged.
    """
    settings = knob_settings(ctx, memory)
    valid = _score_mixture(ctx, memory, "valid", settings)
    best = _best(valid)
    extensions, extra = _edge_settings(ctx, memory, settings, best)
    if extra:
        settings, valid = settings + extra, valid + _score_mixture(ctx, memory, "valid", extra)
        best = _best(valid)
        notes = [_edge_note(ctx, memory, extension, settings[best]) for extension in extensions]
        for note in notes:
            log(f"{ctx.base.model_id}: {note}")
        if edges is not None:
            edges.extend(notes)
    return settings, valid, best


def _best(valid: list[NLLTotal]) -> int:
    return min(range(len(valid)), key=lambda i: valid[i].perplexity)


def _setting_knobs(ctx: EvalContext, setting: tuple) -> tuple[dict, dict]:
    memory_knobs, combiner_config = setting
    return memory_knobs, ctx.combiner(combiner_config).knobs()


def _edge_settings(ctx: EvalContext, memory: MemoryModel, settings: list, best: int):
    """The extensions of every knob whose best value is an edge of its grid, as new settings:
    the best setting with that one knob moved (memory knobs and combiner knobs alike)."""
    best_memory, best_combiner = _setting_knobs(ctx, settings[best])
    known = {repr(_setting_knobs(ctx, setting)) for setting in settings}
    extensions, extra = [], []
    owners = ((memory, [mem for mem, _ in settings], best_memory),
              (ctx.combiner, [_setting_knobs(ctx, setting)[1] for setting in settings], best_combiner))
    for owner, points, best_knobs in owners:
        for knob, values in numeric_knobs(points).items():
            extension = extend(knob, values, best_knobs[knob], owner.knob_bounds.get(knob))
            if extension is None:
                continue
            new = [_moved(settings[best], owner is memory, knob, value) for value in extension.values]
            new = [setting for setting in new if repr(_setting_knobs(ctx, setting)) not in known]
            if new:
                extensions.append(extension)
                extra.extend(new)
    return extensions, extra


def _moved(setting: tuple, in_memory: bool, knob: str, value) -> tuple:
    memory_knobs, combiner_config = setting
    if in_memory:
        return {**memory_knobs, knob: value}, combiner_config
    return memory_knobs, dataclasses.replace(combiner_config, **{knob: value})


def _edge_note(ctx: EvalContext, memory: MemoryModel, extension, best_setting: tuple) -> str:
    memory_knobs, combiner_knobs = _setting_knobs(ctx, best_setting)
    chosen = {**memory_knobs, **combiner_knobs}[extension.knob]
    note = f"{extension.describe()}: best now {extension.knob}={chosen:g}"
    farthest = max(extension.values) if extension.edge == "top" else min(extension.values)
    if chosen == farthest:
        owner = memory.name if extension.knob in memory_knobs else _name(ctx.combiner)
        note += f", still the edge of the extended grid (widen it: memdec list {owner})"
    return note


class MemoryAlone:
    """The memory on its own: NLL over the positions it names (a finite log-prob), and their share.

    A kNN-LM or a restricted-vocabulary memory gives probability 0 to some tokens, so its own
    perplexity is infinite; over the tokens it can name it says how sharp it is.
    """

    def __init__(self):
        self.named, self.positions = NLLTotal(), 0

    def add(self, gold_logprobs: torch.Tensor) -> None:
        self.named.add(gold_logprobs[torch.isfinite(gold_logprobs)])
        self.positions += int(gold_logprobs.numel())

    def reduce(self) -> None:
        """Summed over the ranks that shared the batches."""
        reduce_totals([self.named])
        self.positions = int(round(sum_across([self.positions])[0]))

    def facts(self) -> dict:
        if not self.positions:
            return {}
        return {"memory_alone_ppl": self.named.perplexity if self.named.count else None,
                "memory_coverage": self.named.count / self.positions}


def check_memory_matches(memory: MemoryModel, ctx: EvalContext) -> None:
    """A memory mixes only with a base of its own tokenizer: anything else is nonsense, loudly refused."""
    if memory.tokenizer_fingerprint != ctx.base.tokenizer_fingerprint:
        raise ModelError(f"memory {memory.name!r} uses another tokenizer (fingerprint "
                         f"{memory.tokenizer_fingerprint or 'none'}) than {ctx.base.model_id} "
                         f"({ctx.base.tokenizer_fingerprint}); a memory mixes only with bases of its own tokenizer")


def _score_mixture(ctx: EvalContext, memory: MemoryModel, split: str, settings: list) -> list[NLLTotal]:
    return score_stream(ctx, memory, ctx.corpus.streams[split], ctx.windows(split), settings, split,
                         f"{split} {ctx.base.short_name}")


def score_stream(ctx: EvalContext, memory: MemoryModel, stream: np.ndarray, windows: list[Window],
                  settings: list, split: str, description: str, alone: MemoryAlone | None = None,
                  combiners: list[Combiner] | None = None, weights: "WeightStats | None" = None,
                  gate: "GateStats | None" = None) -> list[NLLTotal]:
    """NLL of the mixture under each (memory knobs, combiner config) of ``settings``, in one pass;
    and the memory alone under the first setting's knobs, into ``alone`` when given.

    ``combiners``: the combiner of each setting, already made (a fitted one); default: made from
    the settings' configs. ``weights`` gathers the first combiner's per-position weights (at the
    positions the memory ran on). A combiner's ``gate`` lets a ``skippable`` memory skip positions:
    it runs on those some combiner needs, and a combiner's mixture is the base's exactly where its
    gate says no; ``gate`` counts the positions skipped.
    """
    totals = [NLLTotal() for _ in settings]
    combiners = combiners or [ctx.combiner(config) for _, config in settings]
    learns = any(combiner.learns for combiner in combiners)
    batches = iter_scored_batches(ctx.base.model, stream, windows, batch_size=ctx.settings.batch_size,
                                  capture_hidden=memory.needs_hidden, sharded=True, description=description)
    for number, whole in enumerate(batches):
        _check_finite(whole.logits, f"the base {ctx.base.model_id}", split)
        needed = _gates(memory, combiners, whole)
        batch = whole if needed is None else whole.select(needed[0])
        if gate is not None:
            gate.add(len(whole.targets), len(batch.targets))
        state = call_component(memory, "memory", memory.score, batch) if len(batch.targets) else None
        if number == 0 and ctx.combiner.elementwise and len(batch.targets):
            check_elementwise_claim(combiners[0], memory, batch, settings[0][0])
        by_memory_knobs: dict[str, tuple[torch.Tensor, dict]] = {}
        for index, (total, combiner, (memory_knobs, _)) in enumerate(zip(totals, combiners, settings)):
            if not len(batch.targets):  # every search skipped: the base's numbers
                total.add(whole.gold_logprobs())
                continue
            key = repr(sorted(memory_knobs.items()))
            if key not in by_memory_knobs:
                rows = _memory_rows(memory, state, batch, memory_knobs, ctx.combiner.elementwise)
                _check_not_nan(rows, f"memory {memory.name!r} ({format_knobs(memory_knobs) or 'its settings'})", split)
                context = mixing_context(batch, split, memory, state, memory_knobs, learns)
                by_memory_knobs[key] = rows, context
                if alone is not None and len(by_memory_knobs) == 1:
                    alone.add(_gold_of(rows, batch))
            rows, context = by_memory_knobs[key]
            gold = _mixed_gold(combiner, batch, rows, context)
            _check_finite(gold, f"combiner {_name(combiner)!r} ({format_knobs(combiner.knobs())})", split)
            total.add(gold if needed is None else _ungated(whole, needed, index, gold))
            if weights is not None and index == 0:
                weights.add(call_component(combiner, "combiner", combiner.weights, context), context)
    if alone is not None:
        alone.reduce()
    return reduce_totals(totals)


def _gates(memory: MemoryModel, combiners: list[Combiner], batch: ScoredBatch) -> torch.Tensor | None:
    """``[1 + settings, N]`` bool: the positions the memory runs on (needed by any combiner), then
    each combiner's own; None when no gate applies (the memory is not skippable, or no combiner gates)."""
    # A combiner without a gate of its own costs nothing here (no full-vocabulary log-softmax).
    if not memory.skippable or all(type(combiner).gate is Combiner.gate for combiner in combiners):
        return None
    features = gate_features(batch.logprobs(), batch.hidden)
    masks = []
    for combiner in combiners:
        mask = call_component(combiner, "combiner", combiner.gate, features)
        if mask is not None and tuple(mask.shape) != (len(batch.targets),):
            raise PluginError(f"combiner {_name(combiner)!r}: gate() gave shape {tuple(mask.shape)}, "
                              f"not [{len(batch.targets)}]")
        masks.append(torch.ones(len(batch.targets), dtype=torch.bool) if mask is None else mask.bool().cpu())
    if all(mask.all() for mask in masks):
        return None
    return torch.stack([torch.stack(masks).any(dim=0), *masks])


def _ungated(whole: ScoredBatch, needed: torch.Tensor, index: int, gold: torch.Tensor) -> torch.Tensor:
    """``[N]`` the gold log-probs of setting ``index`` over every position: the mixture's where its
    gate needs the memory, the base's exactly elsewhere."""
    mixed = whole.gold_logprobs().clone()
    searched = needed[0]
    own = needed[1 + index][searched]  # of the searched positions, those this combiner mixes
    mixed[searched.nonzero()[:, 0][own]] = gold[own]
    return mixed


class GateStats:
    """How many positions a retrieval gate let the memory skip."""

    def __init__(self):
        self.positions = self.searched = 0

    def add(self, positions: int, searched: int) -> None:
        self.positions += positions
        self.searched += searched

    def facts(self) -> dict[str, Any]:
        """``{"positions", "searched", "skipped_share"}`` summed over the ranks."""
        positions, searched = (int(round(value)) for value in sum_across([self.positions, self.searched]))
        return {"positions": positions, "searched": searched,
                "skipped_share": 1 - searched / positions if positions else 0.0}


def mixing_context(batch: ScoredBatch, split: str, memory: MemoryModel | None = None, state: Any = None,
                   knobs: dict | None = None, with_features: bool = False) -> dict[str, Any]:
    """What ``Combiner.combine`` is given besides the log-probs: the rows' positions and split, and
    for a combiner that learns, their features (``memdec_core.engine.features``)."""
    context = {"positions": batch.positions, "split": split}
    if with_features:
        context["features"] = batch_features(memory, state, batch, knobs or {})
        context["feature_names"] = feature_names(memory)
    return context


def batch_features(memory: MemoryModel, state: Any, batch: ScoredBatch, knobs: dict) -> torch.Tensor:
    """``[N, F]`` the features of every scored position under the memory's ``knobs``: from its
    sparse support where it keeps one, else from its whole rows; then its own features."""
    own = call_component(memory, "memory", memory.features, state, batch)
    support = call_component(memory, "memory", memory.support, state, batch, knobs)
    if support is not None:
        return token_features(batch.logprobs(), support=support, own=own)
    rows = call_component(memory, "memory", memory.logprobs, state, batch, knobs)
    return token_features(batch.logprobs(), rows, own=own)


class WeightStats:
    """The memory's weight per position, as a combiner applies it: its mean and spread for the
    report, and (weight, base entropy) pairs for ``--plot`` (a sample: every position, up to a cap)."""

    SAMPLE = 1000  # enough points for a scatter plot; a report stays small

    def __init__(self):
        self.sum = self.sum_squares = 0.0
        self.count = 0
        self.sample: list[tuple[float, float]] = []

    def add(self, weights: torch.Tensor | None, context: dict) -> None:
        if weights is None:
            return
        weights = weights.double().reshape(-1)
        self.sum += float(weights.sum())
        self.sum_squares += float((weights * weights).sum())
        self.count += len(weights)
        features = context.get("features")
        if features is not None and len(self.sample) < self.SAMPLE:
            entropy = features[:, GENERIC_FEATURES.index("base_entropy")]
            room = self.SAMPLE - len(self.sample)
            self.sample.extend(zip(weights[:room].tolist(), entropy[:room].tolist()))

    def facts(self) -> dict[str, Any]:
        """``{"weight_mean", "weight_std", "weight_sample"}``; empty when no weights were given."""
        values = sum_across([self.sum, self.sum_squares, self.count])
        total, squares, count = values[0], values[1], int(round(values[2]))
        if not count:
            return {}
        mean = total / count
        return {"weight_mean": mean, "weight_std": math.sqrt(max(squares / count - mean * mean, 0.0)),
                "weight_sample": [[round(w, 4), round(h, 4)] for w, h in self.sample]}


def _name(component) -> str:
    return component.name or type(component).__name__


def call_component(component, role: str, function, *args):
    """A plugin's code that raises is named in one line, not a traceback through memdec."""
    try:
        return function(*args)
    except MemdecError:
        raise
    except Exception as error:
        raise PluginError(f"{role} {_name(component)!r} (plugin {component.plugin or 'none'}) raised "
                          f"{type(error).__name__}: {error}") from error


def _check_not_nan(values: torch.Tensor, who: str, split: str) -> None:
    if torch.isnan(values).any():
        raise ResultError(f"{who} gave NaN log-probs on the {split} split: a result must be a number")


def _check_finite(values: torch.Tensor, who: str, split: str) -> None:
    """NaN anywhere, or a gold token given probability 0 (log-prob −inf, an infinite perplexity)."""
    if torch.isfinite(values.sum()):
        return  # one reduction: a NaN or an infinity anywhere makes the sum one (an overflow falls through)
    if not torch.isfinite(values).all():
        bad = "NaN" if torch.isnan(values).any() else "−inf (probability 0 for a token that occurs)"
        raise ResultError(f"{who} gave {bad} on the {split} split: a result must be a finite number")


def check_elementwise_claim(combiner: Combiner, memory: MemoryModel, batch: ScoredBatch, knobs: dict,
                            rows: int = 8) -> None:
    """A combiner that declares ``elementwise`` must give the gold entry of its whole-row output
    from the gold columns alone; checked on a few rows of the first batch (a wrong claim would
    report a perplexity of the unnormalised values)."""
    few = batch.head(rows)
    base = few.logprobs()
    state = call_component(memory, "memory", memory.score, few)
    memory_rows = call_component(memory, "memory", memory.logprobs, state, few, knobs)
    gold = few.targets[:, None]
    context = mixing_context(few, "check", memory, state, knobs, combiner.learns)
    whole = call_component(combiner, "combiner", combiner.combine, base, memory_rows, context).gather(1, gold)
    columns = call_component(combiner, "combiner", combiner.combine, base.gather(1, gold),
                             memory_rows.gather(1, gold), context)
    if not torch.allclose(whole, columns, atol=1e-4, rtol=1e-4, equal_nan=True):
        raise ConfigError(f"combiner {_name(combiner)!r} declares elementwise = True, but its output at a token "
                          f"depends on the other tokens (off by {float((whole - columns).abs().max()):.3g}); "
                          f"set elementwise = False")


def _memory_rows(memory, state, batch, knobs, elementwise: bool) -> torch.Tensor:
    if elementwise:
        return call_component(memory, "memory", memory.gold_logprobs, state, batch, knobs)[:, None]
    return call_component(memory, "memory", memory.logprobs, state, batch, knobs)


def _gold_of(memory_rows: torch.Tensor, batch: ScoredBatch) -> torch.Tensor:
    """The gold token's log-prob from memory rows (already gathered when elementwise)."""
    if memory_rows.shape[1] == 1:
        return memory_rows[:, 0]
    return memory_rows.gather(1, batch.targets[:, None])[:, 0]


def _mixed_gold(combiner: Combiner, batch: ScoredBatch, memory_rows: torch.Tensor, context: dict) -> torch.Tensor:
    if memory_rows.shape[1] == 1:  # elementwise: only the gold column is needed
        return call_component(combiner, "combiner", combiner.combine, batch.gold_logprobs()[:, None], memory_rows,
                     context)[:, 0]
    mixed = call_component(combiner, "combiner", combiner.combine, batch.logprobs(), memory_rows, context)
    total_mass = torch.logsumexp(mixed, dim=-1).abs().max()
    if total_mass > 1e-3:
        raise ConfigError(f"combiner {combiner.name!r} returned log-probs that do not sum to 1 "
                          f"(off by {float(total_mass):.3g} in log space); renormalise in combine()")
    return mixed.gather(1, batch.targets[:, None])[:, 0]


def format_knobs(knobs: dict) -> str:
    """``{"temperature": 30.0, "lam": 0.4}`` → ``temperature=30 lam=0.4``."""
    return " ".join(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"
                    for key, value in knobs.items())
