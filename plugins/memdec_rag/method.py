"""``rag``: In-Context RALM (Ram et al., 2023) — a retrieved train passage prepended to the context.

Every ``retrieval_stride`` tokens the last ``query_tokens`` tokens of the text become a BM25
query over passages of the train split; the best passage is put in front of the window and the
next ``retrieval_stride`` tokens are scored with it. Every position of the split is scored
exactly once, as for the other methods, so the perplexities compare directly.

Consecutive retrievals often return the same passage (a 32-token query moves by 4 tokens). Such
a run is scored in one forward pass, as a sliding window is: every token sees its passage and
the text before it, back to the window's start — at least half a window of text, since a run is
capped at half the room the passage leaves. Where the window does not need truncating this is
exactly one forward pass per retrieval; elsewhere a token may see up to half a window less of
distant text. It cuts the cost (one pass per 4 tokens) about 2.4× on the demo domains.

Nothing is tuned, so the validation split is not scored (``valid_ppl`` is None).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from memdec_core.errors import ConfigError
from memdec_core.interfaces import Costs, EvalContext, Method, MethodResult, Use, setting

if TYPE_CHECKING:
    import numpy as np

    from memdec_core.engine.scoring import NLLTotal
    from memdec_rag.index import PassageIndex


@dataclass
class RagSettings:
    """The settings of ``rag`` (the paper's: a 32-token query, a new retrieval every 4 tokens)."""

    passage_tokens: int = setting(128, "train passages are consecutive chunks of this many tokens")
    query_tokens: int = setting(32, "the last tokens of the text that form each query")
    retrieval_stride: int = setting(4, "tokens scored per retrieval")
    batch_size: int = setting(8, "sequences per forward pass")
    merge_runs: bool = setting(True, "score consecutive retrievals of the same passage in one pass")
    retriever: str = setting("bm25", "the text retriever over the passages (memdec list retrievers): bm25, or "
                                     "dense (pip install 'memdec[dense]')")

    def __post_init__(self):
        for name in ("passage_tokens", "query_tokens", "retrieval_stride", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', ' ')} must be at least 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class Run:
    """Positions ``[start, end)`` scored after one passage (their gold tokens are ``start+1 … end``)."""

    start: int
    end: int
    passage: int  # index into the passage list; -1: nothing retrieved


class Rag(Method):
    """In-context RAG: BM25 (or dense) over train passages, the best one prepended every 4 tokens (32-token query)."""

    name = "rag"
    Config = RagSettings
    compare_rank = 40

    def uses(self) -> list[Use]:
        return [Use("retrievers", self.config.retriever, f"{self.name}.retriever", accepts=("text",))]

    def evaluate(self, ctx: EvalContext) -> MethodResult:
        from memdec_rag.index import PassageIndex

        if self.config.passage_tokens + self.config.retrieval_stride > ctx.context:
            raise ConfigError(f"rag: passages of {self.config.passage_tokens} tokens leave no room for "
                              f"{self.config.retrieval_stride} scored tokens in windows of {ctx.context}; "
                              f"lower rag.passage_tokens")
        retriever = ctx.create("retrievers", self.config.retriever)
        index = PassageIndex.for_corpus(ctx, self.config.passage_tokens, retriever)
        test = self.score(ctx, index, ctx.corpus.streams["test"], f"rag test {ctx.base.short_name}")
        return MethodResult(test.perplexity, None, {}, costs=Costs(),
                            details={"passages": len(index), "passage_tokens": self.config.passage_tokens,
                                     "retriever": self.config.retriever, "test_tokens": test.count},
                            scorer=lambda stream, windows, description: self.score(ctx, index, stream, description),
                            generator=self.generator(ctx, index), loglikelihood=self.loglikelihood(ctx, index))

    def loglikelihood(self, ctx: EvalContext, index: "PassageIndex"):
        """Continuations scored as In-Context RALM reads text: the best passage for the context's
        last ``query_tokens`` tokens goes in front of the context, which is cut on the left to
        leave the passage and the continuation room in the base's positions."""
        import numpy as np

        from memdec_core.engine.loglikelihood import base_loglikelihood, positions

        score, room = base_loglikelihood(ctx.base, self.config.batch_size), positions(ctx.base)

        def loglikelihood(requests, knobs=None):
            if not requests:
                return []
            contexts = [np.asarray(context, dtype=np.int64) for context, _ in requests]
            found = index.best_ids(ctx.base.tokenizer, [context[-self.config.query_tokens:] for context in contexts])
            with_passages = []
            for context, (_, continuation), passage in zip(contexts, requests, found):
                text_room = max(0, room + 1 - index.length(passage) - len(continuation))
                kept = context[len(context) - min(text_room, len(context)):]
                with_passages.append((np.concatenate([index.passage(passage), kept]).tolist(), continuation))
            return score(with_passages)

        return loglikelihood

    def generator(self, ctx: EvalContext, index: "PassageIndex"):
        """Generation as In-Context RALM does it: ``generator(prompt_ids, n)`` → the new ids ``[1, n]``.

        Every ``retrieval_stride`` tokens the last ``query_tokens`` tokens of the text (prompt and
        tokens generated so far) query the index; the best passage goes in front of the text,
        truncated to fit the window, and the next ``retrieval_stride`` tokens are generated greedily.
        A new passage is a new prefix, so the KV cache is rebuilt from scratch; the same passage
        again continues the cache (unless the window is full, which also forces a new prefix).
        """
        def generate(prompt_ids, new_tokens: int):
            return self._generate(ctx, index, prompt_ids, new_tokens)

        return generate

    def _generate(self, ctx: EvalContext, index: "PassageIndex", prompt_ids, new_tokens: int):
        import numpy as np
        import torch

        from memdec_core.engine.generation import greedy_steps

        settings, eos = self.config, ctx.base.tokenizer.eos_token_id
        text = prompt_ids[0].cpu().numpy().astype(np.int64)
        sequence, cache, current = None, None, None  # what the model has seen, its KV cache, its passage
        while len(text) - prompt_ids.shape[1] < new_tokens:
            steps = min(settings.retrieval_stride, new_tokens - (len(text) - prompt_ids.shape[1]))
            passage = index.best_ids(ctx.base.tokenizer, [text[-settings.query_tokens:]])[0]
            # the model reads the sequence and all but the last of the ``steps`` new tokens
            if passage != current or len(sequence) + steps - 1 > ctx.context:
                # a new prefix: the cache of the old one holds other positions, so it starts empty
                room = ctx.context - index.length(passage) - steps + 1  # ≥ 1: evaluate checked the lengths
                sequence, cache, current = np.concatenate([index.passage(passage), text[-room:]]), None, passage
            ids, cache = greedy_steps(ctx.base.model, torch.from_numpy(sequence.astype(np.int64))[None], steps, eos,
                                      cache=cache)
            new = ids[0].numpy().astype(np.int64)
            text, sequence = np.concatenate([text, new]), np.concatenate([sequence, new])
        return torch.from_numpy(text[prompt_ids.shape[1]:])[None]

    def score(self, ctx: EvalContext, index: "PassageIndex", stream: "np.ndarray", description: str) -> "NLLTotal":
        """NLL of every position of ``stream`` with retrieval (windows are the method's own).

        Under several processes each rank scores every N-th batch of runs and the sums are reduced
        (every rank retrieves for every run: a query is cheap beside a forward pass)."""
        from memdec_core.engine.scoring import NLLTotal, reduce_totals
        from memdec_core.runtime.distributed import sharding
        from memdec_core.runtime.progress import progress_bar

        runs, shard = self.runs(ctx, index, stream), sharding()
        batches = [runs[first:first + self.config.batch_size]
                   for number, first in enumerate(range(0, len(runs), self.config.batch_size)) if shard.owns(number)]
        total = NLLTotal()
        with progress_bar(description, sum(run.end - run.start for batch in batches for run in batch),
                          "tokens") as advance:
            for batch in batches:
                total.add(self._score_runs(ctx, index, stream, batch))
                advance(sum(run.end - run.start for run in batch))
        return reduce_totals([total])[0]

    def runs(self, ctx: EvalContext, index: "PassageIndex", stream: "np.ndarray") -> list[Run]:
        """One retrieval per ``retrieval_stride`` positions; consecutive equal passages merged."""
        settings = self.config
        starts = list(range(0, len(stream) - 1, settings.retrieval_stride))
        queries = [stream[max(0, start + 1 - settings.query_tokens):start + 1] for start in starts]
        found = index.best_ids(ctx.base.tokenizer, queries)
        blocks = [Run(start, min(start + settings.retrieval_stride, len(stream) - 1), passage)
                  for start, passage in zip(starts, found)]
        if not settings.merge_runs:
            return blocks
        runs = [blocks[0]] if blocks else []
        for block in blocks[1:]:
            last = runs[-1]
            room = ctx.context - index.length(block.passage)
            if block.passage == last.passage and block.end - last.start <= room // 2:
                runs[-1] = Run(last.start, block.end, last.passage)
            else:
                runs.append(block)
        return runs

    def _score_runs(self, ctx: EvalContext, index: "PassageIndex", stream: "np.ndarray", runs: list[Run]):
        """Log-probs of the gold tokens of each run, its passage prepended to the text before it."""
        import torch

        with torch.inference_mode():
            return self._forward_runs(ctx, index, stream, runs)

    def _forward_runs(self, ctx: EvalContext, index: "PassageIndex", stream: "np.ndarray", runs: list[Run]):
        import numpy as np
        import torch

        from memdec_core.inputs.models import model_device

        sequences, scored = [], []
        for run in runs:
            passage = index.passage(run.passage)
            room = ctx.context - len(passage)
            sequences.append(np.concatenate([passage, stream[max(0, run.end - room):run.end]]))
            scored.append((len(sequences[-1]) - (run.end - run.start), stream[run.start + 1:run.end + 1]))
        length = max(len(sequence) for sequence in sequences)
        input_ids = torch.zeros((len(sequences), length), dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, sequence in enumerate(sequences):
            input_ids[row, :len(sequence)] = torch.from_numpy(sequence.astype(np.int64))
            attention_mask[row, :len(sequence)] = 1
        keep = length - min(first for first, _ in scored)
        device = model_device(ctx.base.model)
        logits = ctx.base.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                logits_to_keep=keep, use_cache=False).logits.cpu()
        offset = length - logits.shape[1]
        gold = []
        for row, (first, targets) in enumerate(scored):
            rows = torch.log_softmax(logits[row, first - offset:first - offset + len(targets)].float(), dim=-1)
            gold.append(rows.gather(1, torch.from_numpy(targets.astype(np.int64))[:, None])[:, 0])
        return torch.cat(gold)
