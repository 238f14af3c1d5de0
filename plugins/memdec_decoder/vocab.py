"""Vocabulary-restricted memories: an output layer over the tokens a kNN target can name.

A kNN target only puts mass on datastore values (tokens that follow some train position), so a
memory whose output layer covers just those tokens loses nothing on the KL term. For a family
with a 150k vocabulary and a domain that uses a few thousand tokens, that cuts the output layer
(the costliest part of a small LM) by one or two orders of magnitude.

Layout of a restricted model: token ``kept[i]`` is row ``i`` of the embedding and output layers;
one extra last row is the shared embedding of every other input token. Its output logit is
masked to −inf, so the memory gives probability exactly 0 outside ``kept`` — the base model
still covers those tokens in the mixture.
"""

from __future__ import annotations

import numpy as np
import torch

from memdec_core.errors import ArtifactError

VOCABULARY_FILE = "vocabulary.npy"


class Vocabulary:
    """The kept token ids (sorted) and the map from full ids to restricted ids."""

    def __init__(self, kept: np.ndarray, full_size: int):
        kept = np.unique(np.asarray(kept, dtype=np.int64))
        if len(kept) == 0 or kept[0] < 0 or kept[-1] >= full_size:
            raise ArtifactError(f"a restricted vocabulary needs token ids in [0, {full_size}), got "
                                f"{len(kept)} ids" + (f" up to {kept[-1]}" if len(kept) else ""))
        self.kept = torch.from_numpy(kept)
        self.full_size = full_size
        self.other = len(kept)  # the shared input slot of every token outside the set
        self.to_restricted = torch.full((full_size,), self.other, dtype=torch.long)
        self.to_restricted[self.kept] = torch.arange(len(kept))

    @property
    def size(self) -> int:
        """Rows of the restricted embedding: the kept tokens and the shared slot."""
        return len(self.kept) + 1

    def inputs(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.to_restricted.to(input_ids.device)[input_ids]

    def contains(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.to_restricted.to(token_ids.device)[token_ids.clamp(min=0)] != self.other

    def mask_other(self, logits: torch.Tensor) -> torch.Tensor:
        """−inf at the shared slot, in place (its output row must never win mass)."""
        logits[..., self.other] = float("-inf")
        return logits

    def expand(self, restricted_logprobs: torch.Tensor, width: int) -> torch.Tensor:
        """``[..., size]`` restricted log-probs → ``[..., width]`` full-vocabulary log-probs."""
        full = restricted_logprobs.new_full((*restricted_logprobs.shape[:-1], width), float("-inf"))
        full[..., self.kept.to(full.device)] = restricted_logprobs[..., :self.other]
        return full

    def save(self, folder) -> None:
        np.save(folder / VOCABULARY_FILE, self.kept.numpy().astype(np.int32))

    @classmethod
    def load(cls, folder, full_size: int) -> "Vocabulary":
        try:
            kept = np.load(folder / VOCABULARY_FILE, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise ArtifactError(f"corrupt or missing {folder / VOCABULARY_FILE}: {error}") from error
        return cls(kept, full_size)


def restrict_model(model, vocabulary: Vocabulary) -> None:
    """Cut ``model``'s embedding and output layers to ``vocabulary`` in place.

    Kept rows are copied; the shared slot's embedding is the mean of the dropped rows (a neutral
    "some other token"). Tied embeddings stay tied.
    """
    embedding = model.get_input_embeddings().weight.detach()
    dropped = torch.ones(len(embedding), dtype=torch.bool)
    dropped[vocabulary.kept] = False
    other = embedding[dropped].mean(dim=0, keepdim=True) if dropped.any() else embedding.mean(dim=0, keepdim=True)
    new_embedding = torch.nn.Embedding(vocabulary.size, embedding.shape[1])
    new_embedding.weight.data = torch.cat([embedding[vocabulary.kept], other]).clone()
    output = model.get_output_embeddings()
    tied = output.weight is model.get_input_embeddings().weight
    model.set_input_embeddings(new_embedding)
    new_output = torch.nn.Linear(embedding.shape[1], vocabulary.size, bias=output.bias is not None)
    if tied:
        new_output.weight = new_embedding.weight
    else:
        new_output.weight.data = torch.cat([output.weight.detach()[vocabulary.kept],
                                            torch.zeros(1, output.weight.shape[1])]).clone()
    if output.bias is not None:
        new_output.bias.data = torch.cat([output.bias.detach()[vocabulary.kept], torch.zeros(1)]).clone()
    model.set_output_embeddings(new_output)
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.vocab_size = vocabulary.size
        _remap_special_tokens(config, vocabulary)
    if getattr(model, "generation_config", None) is not None:
        _remap_special_tokens(model.generation_config, vocabulary)


def _remap_special_tokens(config, vocabulary: Vocabulary) -> None:
    """pad/bos/eos ids in restricted numbering; a special token outside the set becomes None
    (an out-of-range pad id would not even let the model be built again)."""
    def remap(token_id):
        if isinstance(token_id, int) and 0 <= token_id < vocabulary.full_size:
            restricted = int(vocabulary.to_restricted[token_id])
            return restricted if restricted != vocabulary.other else None
        return None

    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(config, key, None)
        if isinstance(value, list):
            value = [mapped for mapped in map(remap, value) if mapped is not None] or None
        elif value is not None:
            value = remap(value)
        setattr(config, key, value)
