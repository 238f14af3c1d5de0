"""``memory-decoder``: a trained Memory Decoder as a memory model.

With ``path`` it is a folder from ``memdec train``; without, the domain's memory is made on
first use and cached by content hash (the teacher's datastore, its kNN targets, training from
the init model). The memory depends on teacher, init, data and settings — not on the base —
so one memory per domain serves every base of the family.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from memdec_core.errors import ConfigError
from memdec_core.interfaces import Costs, MemoryModel, Use
from memdec_decoder.settings import DecoderSettings

if TYPE_CHECKING:
    from memdec_core.interfaces import EvalContext
    from memdec_decoder.memory import MemoryDecoder


class DecoderMemory(MemoryModel):
    """A small causal LM trained to imitate a kNN-LM; runs beside the base on the same tokens."""

    name = "memory-decoder"
    Config = DecoderSettings
    artifact_type = "memory-decoder"
    artifact_setting = "path"
    opens_plain_models = True  # a memory trained by the official code: save_pretrained, no memdec.json
    requires = ("knn", "combiners")  # the teacher's datastore; the linear kNN-LM that picks T

    def __init__(self, config=None, **overrides):
        super().__init__(config, **overrides)
        self.memory: MemoryDecoder | None = None

    def uses(self) -> list[Use]:
        if self.config.path:
            return []
        return [Use("retrievers", self.config.retriever, f"{self.name}.retriever", accepts=("vectors",))]

    def prepare(self, ctx: "EvalContext") -> None:
        from memdec_decoder.pipeline import memory_for

        self.memory = memory_for(ctx, self.config)
        self.memory.check_compatible(ctx.base, ctx.context)
        self.memory.warn_if_plain()
        self.tokenizer_fingerprint = self.memory.tokenizer_fingerprint

    @classmethod
    def export_portable(cls, folder, output, lam):
        from memdec_decoder.portable import export_portable

        return export_portable(folder, output, lam)

    def _loaded(self) -> "MemoryDecoder":
        if self.memory is None:
            raise ConfigError("memory-decoder: prepare() was not called")
        return self.memory

    def score(self, batch):
        return self._loaded().scored_logprobs(batch.input_ids, batch.attention_mask, batch.rows, batch.columns)

    def gold_logprobs(self, state, batch, knobs: dict):
        return self._loaded().gold(state, batch.targets)

    def logprobs(self, state, batch, knobs: dict):
        return self._loaded().to_full(state, batch.logits.shape[1])

    def stepper(self, knobs: dict):
        from memdec_decoder.memory import DecoderStepper

        return DecoderStepper(self._loaded())

    @property
    def max_positions(self) -> int | None:
        return self.memory.max_positions if self.memory is not None else None

    def costs(self) -> Costs:
        from memdec_core.store.artifacts import folder_bytes

        memory = self._loaded()
        manifest = memory.manifest
        tokens = manifest.get("train_tokens") or 0
        return Costs(params_added=memory.parameters, bytes_added=folder_bytes(memory.folder),
                     memory_bytes=sum(p.numel() * p.element_size() for p in memory.model.parameters()),
                     train_seconds=float(manifest.get("train_seconds") or 0), train_tokens=tokens,
                     train_flops=float(tokens * (manifest.get("flops_per_token") or 0)))

    def describe_prepared(self) -> dict:
        memory = self._loaded()
        manifest = memory.manifest
        return {"memory_folder": str(memory.folder), "memory_parameters": memory.parameters,
                "teacher": manifest.get("teacher"), "init": manifest.get("init"),
                "init_layers": (manifest.get("train") or {}).get("init_layers"), "recipe": manifest.get("recipe"),
                "temperature": manifest.get("temperature"), "restricted": manifest.get("restricted")}

    def fidelity(self, ctx: "EvalContext", knobs: dict) -> dict:
        from memdec_decoder.fidelity import target_fidelity

        memory = self._loaded()
        if ctx.corpus is None or not self.config.fidelity or memory.manifest.get("plain"):
            return {}  # no domain, skipped by the user, or a memory made elsewhere (it names no teacher)
        return target_fidelity(ctx, self.config, memory)

    def planned_parameters(self, ctx: "EvalContext") -> int | None:
        from memdec_decoder.pipeline import planned_parameters

        return planned_parameters(ctx, self.config)
