"""``dapt`` (full-parameter continued training) and ``lora`` (PEFT adapters) as methods."""

from __future__ import annotations

import copy
import dataclasses
from typing import TYPE_CHECKING

from memdec_core.errors import ModelError
from memdec_core.interfaces import Method
from memdec_peft.settings import FALLBACK_RANK, DaptSettings, LoraSettings

if TYPE_CHECKING:
    from memdec_core.interfaces import EvalContext, MethodResult

#: model_type → modules LoRA adapts: the attention projections and the MLP of every block.
LORA_TARGETS = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],  # fused Conv1D layers: fan_in_fan_out=True
    **{family: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
       for family in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")},
}


class Dapt(Method):
    """DAPT: continued training of every weight of the base on the train split; lr tuned, early stopping."""

    name = "dapt"
    Config = DaptSettings
    compare_rank = 10

    def evaluate(self, ctx: "EvalContext") -> "MethodResult":
        from memdec_peft.finetune import Adaptation, evaluate_finetuned

        return evaluate_finetuned(ctx, self.config, Adaptation("dapt", Dapt, prepare=copy.deepcopy, load=_load_dapt,
                                                               identity={}, adds_parameters=False))


def _load_dapt(base_model, folder, trainable: bool = False):
    """The continued-trained weights stand alone: the base is not needed to load them."""
    import torch
    from transformers import AutoModelForCausalLM

    from memdec_core.inputs.models import model_device

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(model_device(base_model))


class Lora(Method):
    """LoRA: low-rank adapters on attention and MLP, rank matched to the run's memory; lr tuned."""

    name = "lora"
    Config = LoraSettings
    compare_rank = 20

    def with_parameter_target(self, parameters: int) -> "Lora":
        """An automatic rank with nothing given to match takes the run's largest memory's size."""
        if self.config.rank or self.config.match_parameters:
            return self
        return Lora(dataclasses.replace(self.config, match_parameters=parameters))

    def evaluate(self, ctx: "EvalContext") -> "MethodResult":
        from memdec_peft.finetune import Adaptation, evaluate_finetuned

        targets = lora_targets(ctx.base.model)
        rank = self.config.rank or auto_rank(ctx.base.model, targets, self.config.match_parameters)
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

        knobs = {"rank": rank, **({"alpha": alpha} if self.config.alpha else {})}
        return evaluate_finetuned(ctx, self.config, Adaptation("lora", Lora, prepare, load,
                                                               {"rank": rank, "alpha": alpha}, knobs=knobs))


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


def auto_rank(model, targets: list[str], match_parameters: int) -> int:
    """The rank whose adapters hold ``match_parameters`` parameters (capped by the smallest width)."""
    if not match_parameters:
        return FALLBACK_RANK
    per_rank, smallest = 0, None
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in targets and hasattr(module, "weight"):
            rows, columns = module.weight.shape
            per_rank += rows + columns
            smallest = min(smallest or min(rows, columns), min(rows, columns))
    return max(1, min(round(match_parameters / per_rank), smallest))
