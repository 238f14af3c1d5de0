"""``dapt`` (full-parameter continued training) and ``lora`` (PEFT adapters) as methods."""

from __future__ import annotations

import copy
from dataclasses import dataclass

from memdec_core.errors import ConfigError, ModelError
from memdec_core.evaluate import EvalContext, MethodResult
from memdec_core.interfaces import Method
from memdec_core.models import model_device
from memdec_peft.finetune import Adaptation, FinetuneSettings, evaluate_finetuned

#: model_type → modules LoRA adapts: the attention projections and the MLP of every block.
LORA_TARGETS = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],  # fused Conv1D layers: fan_in_fan_out=True
    **{family: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
       for family in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")},
}


@dataclass
class DaptSettings(FinetuneSettings):
    """The settings of ``dapt``."""

    lrs: tuple = (1e-4, 5e-4)


class Dapt(Method):
    """DAPT: continued training of every weight of the base on the train split; lr tuned, early stopping."""

    name = "dapt"
    Config = DaptSettings

    def evaluate(self, ctx: EvalContext) -> MethodResult:
        return evaluate_finetuned(ctx, self.config, Adaptation("dapt", prepare=copy.deepcopy, load=_load_dapt,
                                                               identity={}, adds_parameters=False))


def _load_dapt(base_model, folder, trainable: bool = False):
    """The continued-trained weights stand alone: the base is not needed to load them."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(model_device(base_model))


@dataclass
class LoraSettings(FinetuneSettings):
    """The settings of ``lora``."""

    lrs: tuple = (5e-4, 2e-3)
    rank: int = 0  # 0: auto, matched to the parameters of the domain's Memory Decoder (as the paper does)
    alpha: float = 0.0  # 0: twice the rank

    def __post_init__(self):
        super().__post_init__()
        if self.rank < 0 or self.alpha < 0:
            raise ConfigError(f"rank and alpha must be 0 (auto) or positive, got {self.rank} and {self.alpha}")


class Lora(Method):
    """LoRA: low-rank adapters on attention and MLP, rank matched to the Memory Decoder; lr tuned."""

    name = "lora"
    Config = LoraSettings

    def evaluate(self, ctx: EvalContext) -> MethodResult:
        targets = lora_targets(ctx.base.model)
        rank = self.config.rank or auto_rank(ctx, targets)
        alpha = self.config.alpha or 2.0 * rank
        fused = ctx.base.model.config.model_type == "gpt2"

        def prepare(base_model):
            from peft import LoraConfig, get_peft_model

            config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets,
                                fan_in_fan_out=fused, task_type="CAUSAL_LM")
            return get_peft_model(copy.deepcopy(base_model), config)

        def load(base_model, folder, trainable: bool = False):
            from peft import PeftModel

            return PeftModel.from_pretrained(copy.deepcopy(base_model), folder, is_trainable=trainable)

        return evaluate_finetuned(ctx, self.config, Adaptation("lora", prepare, load, {"rank": rank, "alpha": alpha}))


def lora_targets(model) -> list[str]:
    model_type = model.config.model_type
    if model_type not in LORA_TARGETS:
        raise ModelError(f"LoRA does not know the attention and MLP modules of a {model_type!r} model "
                         f"(known: {', '.join(sorted(LORA_TARGETS))})")
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [name for name in LORA_TARGETS[model_type] if name not in present]
    if missing:
        raise ModelError(f"this {model_type} model has no {', '.join(missing)} modules for LoRA to adapt")
    return LORA_TARGETS[model_type]


def auto_rank(ctx: EvalContext, targets: list[str]) -> int:
    """The rank whose adapters hold as many parameters as the domain's Memory Decoder."""
    per_rank, smallest = 0, None
    for name, module in ctx.base.model.named_modules():
        if name.rsplit(".", 1)[-1] in targets and hasattr(module, "weight"):
            rows, columns = module.weight.shape
            per_rank += rows + columns
            smallest = min(smallest or min(rows, columns), min(rows, columns))
    rank = round(memory_parameters(ctx) / per_rank)
    return max(1, min(rank, smallest))


def memory_parameters(ctx: EvalContext) -> int:
    """Parameters of the Memory Decoder that ``memdec`` would train for this base."""
    from memdec_decoder.method import MemoryDecoderMethod

    _, init = MemoryDecoderMethod().teacher_and_init(ctx.base)
    if init == ctx.base.model_id:
        return sum(parameter.numel() for parameter in ctx.base.model.parameters())
    from memdec_core.models import load_model

    return sum(parameter.numel() for parameter in load_model(init).model.parameters())
