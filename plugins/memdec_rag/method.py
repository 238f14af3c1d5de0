"""``rag``: In-Context RALM (Ram et al., 2023) — a retrieved train passage prepended to the context.

Every ``retrieval_stride`` tokens the last ``query_tokens`` tokens of the text become a BM25
query over passages of the train split; the best passage is put in front of the window and only
the next ``retrieval_stride`` tokens are scored. Every position of the split is scored exactly
once, as for the other methods, so the perplexities compare directly. Nothing is tuned: the
validation perplexity is reported for reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from memdec_core.errors import ConfigError
from memdec_core.evaluate import EvalContext, MethodResult, NLLTotal
from memdec_core.interfaces import Method
from memdec_core.progress import progress_bar
from memdec_rag.index import PassageIndex


@dataclass
class RagSettings:
    """The settings of ``rag`` (the paper's: a 32-token query, a new retrieval every 4 tokens)."""

    passage_tokens: int = 128  # train passages are consecutive chunks of this many tokens
    query_tokens: int = 32
    retrieval_stride: int = 4
    batch_size: int = 8  # sequences per forward pass

    def __post_init__(self):
        for name in ("passage_tokens", "query_tokens", "retrieval_stride", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', ' ')} must be at least 1, got {getattr(self, name)}")


class Rag(Method):
    """In-context RAG: BM25 over train passages, the best one prepended every 4 tokens (32-token query)."""

    name = "rag"
    Config = RagSettings

    def evaluate(self, ctx: EvalContext) -> MethodResult:
        if self.config.passage_tokens + self.config.retrieval_stride > ctx.context:
            raise ConfigError(f"rag: passages of {self.config.passage_tokens} tokens leave no room for "
                              f"{self.config.retrieval_stride} scored tokens in windows of {ctx.context}; "
                              f"lower rag.passage_tokens")
        index = PassageIndex.for_corpus(ctx, self.config.passage_tokens)
        valid = self.score(ctx, index, ctx.corpus.streams["valid"], f"rag valid {ctx.base.short_name}")
        test = self.score(ctx, index, ctx.corpus.streams["test"], f"rag test {ctx.base.short_name}")
        return MethodResult(test.perplexity, valid.perplexity, {},
                            {"passages": len(index), "passage_tokens": self.config.passage_tokens,
                             "test_tokens": test.count, "params_added": 0, "bytes_added": 0, "train_seconds": 0.0},
                            scorer=lambda stream, windows, description: self.score(ctx, index, stream, description))

    def score(self, ctx: EvalContext, index: PassageIndex, stream: np.ndarray, description: str) -> NLLTotal:
        """NLL of every position of ``stream`` with retrieval (windows are the method's own)."""
        total = NLLTotal()
        blocks = list(range(0, len(stream) - 1, self.config.retrieval_stride))
        with progress_bar(description, len(blocks), "retrievals") as advance:
            for first in range(0, len(blocks), self.config.batch_size):
                batch = blocks[first:first + self.config.batch_size]
                total.add(self._score_blocks(ctx, index, stream, batch))
                advance(len(batch))
        return total

    @torch.inference_mode()
    def _score_blocks(self, ctx: EvalContext, index: PassageIndex, stream: np.ndarray, starts: list[int]):
        """Log-probs of the gold tokens after positions ``[start, start + stride)`` of each block."""
        settings = self.config
        queries = [stream[max(0, start + 1 - settings.query_tokens):start + 1] for start in starts]
        passages = index.best(ctx.base.tokenizer, queries)
        sequences, scored = [], []
        for start, passage in zip(starts, passages):
            end = min(start + settings.retrieval_stride, len(stream) - 1)  # inputs up to end - 1
            room = ctx.context - len(passage)
            context = stream[max(0, end - room):end]
            sequences.append(np.concatenate([passage, context]))
            scored.append((len(sequences[-1]) - (end - start), end - start, stream[start + 1:end + 1]))
        length = max(len(sequence) for sequence in sequences)
        input_ids = torch.zeros((len(sequences), length), dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, sequence in enumerate(sequences):
            input_ids[row, :len(sequence)] = torch.from_numpy(sequence.astype(np.int64))
            attention_mask[row, :len(sequence)] = 1
        keep = length - min(first for first, _, _ in scored)
        logits = ctx.base.model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep,
                                use_cache=False).logits
        offset = length - logits.shape[1]
        gold = []
        for row, (first, count, targets) in enumerate(scored):
            rows = torch.log_softmax(logits[row, first - offset:first - offset + count].float(), dim=-1)
            gold.append(rows.gather(1, torch.from_numpy(targets.astype(np.int64))[:, None])[:, 0])
        return torch.cat(gold)
