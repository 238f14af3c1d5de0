"""A trained Memory Decoder on disk and in memory.

On disk it is a plain Hugging Face model folder (config, safetensors weights, the family's
tokenizer) plus ``memdec.json`` (teacher, tokenizer fingerprint, data hash, β, k, T, command)
and, for a vocabulary-restricted memory, ``vocabulary.npy`` (the kept token ids).
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from memdec_core.errors import ArtifactError, ConfigError, MemdecError, ModelError
from memdec_core.inputs.models import autocast, default_device, model_device
from memdec_core.store.artifacts import MANIFEST, read_manifest
from memdec_decoder.vocab import Vocabulary

ARTIFACT_TYPE = "memory-decoder"
_WARNED: set[Path] = set()  # plain memories warned about, once per process


class MemoryDecoder:
    """A loaded memory: next-token log-probs over the full vocabulary of its family."""

    def __init__(self, model, folder: Path, manifest: dict, vocabulary: Vocabulary | None):
        self.model, self.folder, self.manifest, self.vocabulary = model, Path(folder), manifest, vocabulary
        self.model.eval()
        self._takes_cache = "cache" in inspect.signature(self.model.forward).parameters

    @property
    def device(self) -> torch.device:
        return model_device(self.model)

    @property
    def tokenizer_fingerprint(self) -> str:
        return self.manifest["tokenizer_fingerprint"]

    @property
    def full_vocab_size(self) -> int:
        return self.manifest["full_vocab_size"]

    @property
    def parameters(self) -> int:
        return sum(parameter.numel() for parameter in self.model.parameters())

    @property
    def max_positions(self) -> int | None:
        config = self.model.config.get_text_config()
        return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)

    def warn_if_plain(self) -> None:
        """One line for a memory made by other code: memdec cannot say what it learnt from."""
        from memdec_core.runtime.progress import warn

        if self.manifest.get("plain") and self.folder not in _WARNED:
            _WARNED.add(self.folder)
            warn(f"memory {self.folder} has no {MANIFEST} (made by other code): its teacher, data and training "
                 f"are unknown, so it is mixed as it is and its fidelity to a teacher is not measured")

    def check_compatible(self, base, context: int | None = None) -> None:
        """A memory mixes only with a base of the same tokenizer, over windows it can read."""
        if base.tokenizer_fingerprint != self.tokenizer_fingerprint:
            teacher = f" (teacher {self.manifest['teacher']})" if self.manifest.get("teacher") else ""
            raise ModelError(f"memory {self.folder} was trained with another tokenizer{teacher} than "
                             f"{base.model_id}; a Memory Decoder mixes only with bases of its own tokenizer")
        if base.vocab_size < self.full_vocab_size:
            raise ModelError(f"memory {self.folder} predicts {self.full_vocab_size} tokens but "
                             f"{base.model_id} has only {base.vocab_size}")
        if context and self.max_positions and context > self.max_positions:
            raise ConfigError(f"windows of {context} tokens are longer than memory {self.folder}'s "
                              f"{self.max_positions} positions; pass a smaller --context")

    def forward(self, input_ids: torch.Tensor, attention_mask=None, past_key_values=None,
                logits_to_keep: int = 0, position_ids=None):
        """The model's output on full-vocabulary ``input_ids``; restricted logits come out masked."""
        input_ids = input_ids.to(self.device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        if position_ids is not None:
            position_ids = position_ids.to(self.device)
        inputs = self.vocabulary.inputs(input_ids) if self.vocabulary else input_ids
        cache = {}
        if past_key_values is not None:  # transformers ≥ 5.24 renames past_key_values to cache
            cache = {"cache" if self._takes_cache else "past_key_values": past_key_values, "use_cache": True}
        with autocast():
            output = self.model(input_ids=inputs, attention_mask=attention_mask, position_ids=position_ids,
                                logits_to_keep=logits_to_keep, **cache)
        if self.vocabulary:
            self.vocabulary.mask_other(output.logits)
        return output

    def restricted_logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(logits.float(), dim=-1)

    def to_full(self, restricted_logprobs: torch.Tensor, width: int | None = None) -> torch.Tensor:
        """Log-probs over the full vocabulary (``width`` columns, −inf beyond the memory's own)."""
        width = width or self.full_vocab_size
        if self.vocabulary:
            return self.vocabulary.expand(restricted_logprobs, width)
        if restricted_logprobs.shape[-1] == width:
            return restricted_logprobs
        padding = restricted_logprobs.new_full((*restricted_logprobs.shape[:-1], width - restricted_logprobs.shape[-1]),
                                               float("-inf"))
        return torch.cat([restricted_logprobs, padding], dim=-1)

    def gold(self, restricted_logprobs: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """``[N]`` log-probs of full-vocabulary ``token_ids`` (−inf outside a restricted set)."""
        if not self.vocabulary:
            return restricted_logprobs.gather(1, token_ids[:, None])[:, 0]
        restricted = self.vocabulary.inputs(token_ids)
        values = restricted_logprobs.gather(1, restricted[:, None])[:, 0]
        return torch.where(self.vocabulary.contains(token_ids), values, float("-inf"))

    @torch.inference_mode()
    def scored_logprobs(self, input_ids, attention_mask, rows, columns) -> torch.Tensor:
        """Restricted log-probs at ``[rows, columns]`` of a batch of windows (as a base scored it)."""
        keep = input_ids.shape[1] - int(columns.min())
        logits = self.forward(input_ids, attention_mask, logits_to_keep=keep).logits
        offset = input_ids.shape[1] - logits.shape[1]
        return self.restricted_logprobs(logits[rows.to(self.device), (columns - offset).to(self.device)]).cpu()

    @torch.inference_mode()
    def logprobs(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[batch, length, full vocab]`` log-probs of the next token at every position."""
        return self.to_full(self.restricted_logprobs(self.forward(input_ids).logits)).cpu()


def open_memory(folder) -> MemoryDecoder:
    """Load a memory folder written by ``memdec train``, checking its parts (or a plain transformers
    folder of a memory made elsewhere: ``open_plain_memory``)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # memdec shows its own progress
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ArtifactError(f"memory folder not found: {folder}")
    if not (folder / MANIFEST).is_file() and (folder / "config.json").is_file():
        return open_plain_memory(folder)
    manifest = read_manifest(folder, ARTIFACT_TYPE)
    vocabulary = Vocabulary.load(folder, manifest["full_vocab_size"]) if manifest.get("restricted") else None
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(default_device())
    except Exception as error:  # safetensors, json and torch each raise their own kinds
        raise ArtifactError(f"cannot load the memory model in {folder}: {str(error).splitlines()[0]}") from error
    rows = model.get_output_embeddings().weight.shape[0]
    expected = vocabulary.size if vocabulary else manifest["full_vocab_size"]
    if rows != expected:
        raise ArtifactError(f"memory {folder}: the output layer has {rows} rows, the manifest expects {expected}")
    return MemoryDecoder(model, folder, manifest, vocabulary)


def open_plain_memory(folder: Path) -> MemoryDecoder:
    """A memory made by other code: a transformers causal LM folder with its tokenizer and no
    ``memdec.json`` (the official MemoryDecoder's ``save_pretrained``, a hub checkpoint). Its
    tokenizer fingerprint is measured from its own tokenizer files; what it was trained on is unknown."""
    from memdec_core.inputs.models import load_model
    try:
        loaded = load_model(str(folder))
    except MemdecError as error:
        raise ArtifactError(f"{folder} has no {MANIFEST} and does not load as a transformers causal LM with its "
                            f"tokenizer: {error}") from error
    rows = loaded.model.get_output_embeddings().weight.shape[0]
    manifest = {"type": ARTIFACT_TYPE, "plain": True, "tokenizer_fingerprint": loaded.tokenizer_fingerprint,
                "full_vocab_size": rows, "restricted": False}
    return MemoryDecoder(loaded.model.to(default_device()), folder, manifest, None)


class DecoderStepper:
    """The memory in generation and in the composite model, with its own KV cache.

    The cache follows the composite's rows: ``select`` reorders it when beam search does, and
    every call runs only the new tokens, at the positions the attention mask gives them.
    """

    def __init__(self, memory: MemoryDecoder):
        self.memory = memory
        self._cache = None

    @torch.inference_mode()
    def logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, hidden, width: int,
                 keep: int) -> torch.Tensor:
        """``[rows, keep, width]`` full-vocabulary log-probs after the last ``keep`` new tokens."""
        from transformers import DynamicCache

        from memdec_core.engine.composite import positions_from_mask

        if self._cache is None:
            self._cache = DynamicCache(config=self.memory.model.config)
        positions = positions_from_mask(attention_mask)[:, -input_ids.shape[1]:]
        output = self.memory.forward(input_ids, attention_mask, past_key_values=self._cache,
                                     position_ids=positions, logits_to_keep=keep)
        return self.memory.to_full(self.memory.restricted_logprobs(output.logits[:, -keep:]), width)

    def select(self, rows: torch.Tensor) -> None:
        if self._cache is not None and self._cache.get_seq_length() > 0:
            self._cache.reorder_cache(rows.to(self.memory.device))
