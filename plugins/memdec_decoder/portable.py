"""A memory as one plain causal LM over its family's full vocabulary: what other code mixes.

The official MemoryDecoder code (``evaluate_joint.py``) and lmdeploy's Memory Decoder support read
the memory's logits as if row ``i`` were token ``i`` of the base. A full-vocabulary memory already
is that, and is written as it is. A restricted memory (vocab.py) is not: its rows are the kept
tokens, then one shared slot. Exported, token ``t`` gets back row ``t``: a kept token its own
weights, every other token the shared slot's (the input embedding it always had), plus an output
bias so low that its probability is exactly 0 in float32 after the softmax, as in memdec.

transformers' Llama and Qwen2 classes have no output bias, and no config switch adds one. The
export writes such a memory as ``Ernie4_5_MoeForCausalLM`` with ``use_bias``: the same blocks
(RMSNorm, rotary attention, SwiGLU), an output layer with a bias (checked: transformers 4.55.4
and 5.25 load it). Each layer's MLP is the single expert of a router that can only pick it (softmax over
one expert: weight 1.0 exactly); 4.x builds no Ernie 4.5 model without a router, and 5.x reads
the per-expert names of 4.x checkpoints. Its rotary embedding pairs channels (2i, 2i+1) where
Llama pairs (i, i + d/2), so the rows of q and k are reordered within each head (attention scores
are unchanged); the attention biases Llama lacks are zeros, and the experts' (which 5.x does not
have) too.

The config carries ``rope_theta`` beside transformers 5's ``rope_parameters`` (4.x reads only the
former, and would otherwise use its default base), and the tokenizer names a class 4.x has.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from memdec_core.errors import ArtifactError
from memdec_decoder.memory import MemoryDecoder

#: Architectures whose blocks Ernie 4.5's compute exactly (restricted memories only).
BIASED_FORMS = ("llama", "qwen2")
#: How far below the best kept logit a missing token's logit is put, at least: exp(−200) is 0 in float32.
UNDERFLOW_MARGIN = 200.0
#: Tokenizer classes of transformers 5 that 4.x lacks, and the 4.x class that reads the same tokenizer.json.
TOKENIZER_CLASSES_4X = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def write_portable(memory: MemoryDecoder, output: Path) -> dict:
    """Write ``memory`` into the (empty) folder ``output``; returns what the model card says of it."""
    if memory.vocabulary is None:
        _save_as_is(memory, output)
        architecture = memory.model.config.architectures[0] if memory.model.config.architectures else None
        bias = None
    else:
        architecture, bias = _save_full_vocabulary(memory, output), True
    make_config_portable(output / "config.json")
    _save_tokenizer(memory, output)
    return {"architecture": architecture, "full_vocab_size": memory.full_vocab_size, "output_bias": bias}


def _save_as_is(memory: MemoryDecoder, output: Path) -> None:
    from memdec_core.inputs.models import save_model

    save_model(memory.model, output)


# ----------------------------------------------------------------------------------------------
# A restricted memory over the full vocabulary


def full_vocabulary_rows(memory: MemoryDecoder) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(input embedding, output weight or None when tied, output bias)`` over the full vocabulary."""
    vocabulary = memory.vocabulary
    rows = vocabulary.to_restricted  # a kept token's own row, every other token the shared slot
    model = memory.model
    embedding = model.get_input_embeddings().weight.detach().float()
    output = model.get_output_embeddings()
    tied = output.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    weight = output.weight.detach().float()
    bias = torch.zeros(vocabulary.full_size, dtype=torch.float32)
    if output.bias is not None:
        bias = output.bias.detach().float()[rows].clone()
    outside = rows == vocabulary.other
    bias[outside] = -_logit_gap(memory, weight)
    return embedding[rows].clone(), None if tied else weight[rows].clone(), bias


def _logit_gap(memory: MemoryDecoder, weight: torch.Tensor) -> float:
    """A bias under which no input lets a missing token come within ``UNDERFLOW_MARGIN`` of a kept one.

    The output layer reads the final RMSNorm: ``g ⊙ x / rms(x)``, whose norm is at most
    ``max|g| · sqrt(d)``; two rows ``a``, ``b`` differ by at most ``(|a| + |b|)`` times that.
    """
    norm = memory.model.get_decoder().norm.weight.detach().float()
    largest_input = float(norm.abs().max()) * math.sqrt(norm.numel())
    largest_row = float(weight.norm(dim=1).max())
    output = memory.model.get_output_embeddings()
    spread = float(output.bias.detach().abs().max()) * 2 if output.bias is not None else 0.0
    return 2 * largest_row * largest_input + spread + UNDERFLOW_MARGIN


def _save_full_vocabulary(memory: MemoryDecoder, output: Path) -> str:
    from safetensors.torch import save_file

    config = memory.model.config.get_text_config()
    if config.model_type not in BIASED_FORMS:
        raise ArtifactError(f"memory {memory.folder} is a restricted {config.model_type!r} model; memdec writes "
                            f"restricted memories over the full vocabulary for {', '.join(BIASED_FORMS)} only")
    embedding, weight, bias = full_vocabulary_rows(memory)
    tensors = _ernie_tensors(memory.model, config)
    tensors["model.embed_tokens.weight"] = embedding
    if weight is not None:
        tensors["lm_head.weight"] = weight
    tensors["lm_head.bias"] = bias
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(output / "model.safetensors"),
              metadata={"format": "pt"})
    (output / "config.json").write_text(json.dumps(_ernie_config(memory, config, tied=weight is None), indent=2))
    return "Ernie4_5_MoeForCausalLM"


def _ernie_tensors(model, config) -> dict[str, torch.Tensor]:
    """The blocks' weights under Ernie 4.5's names, q and k reordered for its rotary layout."""
    head_dim = _head_dim(config)
    order = interleaved_order(head_dim)
    tensors: dict[str, torch.Tensor] = {}
    for index, layer in enumerate(model.get_decoder().layers):
        prefix = f"model.layers.{index}."
        attention, mlp = layer.self_attn, layer.mlp
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            linear = getattr(attention, name)
            weight = linear.weight.detach().float()
            bias = linear.bias.detach().float() if linear.bias is not None else torch.zeros(weight.shape[0])
            if name in ("q_proj", "k_proj"):
                weight, bias = _per_head(weight, order, head_dim), _per_head(bias, order, head_dim)
            tensors[f"{prefix}self_attn.{name}.weight"] = weight.clone()
            tensors[f"{prefix}self_attn.{name}.bias"] = bias.clone()
        if any(getattr(mlp, name).bias is not None for name in ("gate_proj", "up_proj", "down_proj")):
            raise ArtifactError("a restricted memory whose MLP has biases has no portable form in memdec")
        # The MLP as the one expert of a router that always picks it, with weight exactly 1:
        # transformers 4.x refuses an Ernie 4.5 model without any router, and 5.x's experts have no bias.
        tensors[f"{prefix}mlp.gate.weight"] = torch.zeros(1, config.hidden_size)
        tensors[f"{prefix}mlp.moe_statics.e_score_correction_bias"] = torch.zeros(1, 1)
        for name in ("gate_proj", "up_proj", "down_proj"):
            weight = getattr(mlp, name).weight.detach().float()
            tensors[f"{prefix}mlp.experts.0.{name}.weight"] = weight.clone()
            tensors[f"{prefix}mlp.experts.0.{name}.bias"] = torch.zeros(weight.shape[0])  # 4.x has them
        tensors[f"{prefix}input_layernorm.weight"] = layer.input_layernorm.weight.detach().float().clone()
        tensors[f"{prefix}post_attention_layernorm.weight"] = \
            layer.post_attention_layernorm.weight.detach().float().clone()
    tensors["model.norm.weight"] = model.get_decoder().norm.weight.detach().float().clone()
    return tensors


def interleaved_order(head_dim: int) -> torch.Tensor:
    """Channel ``order[j]`` of a Llama head is channel ``j`` of an interleaved-rotary head:
    Llama rotates (i, i + d/2) together, Ernie (2i, 2i + 1)."""
    half = head_dim // 2
    return torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).flatten()


def _per_head(tensor: torch.Tensor, order: torch.Tensor, head_dim: int) -> torch.Tensor:
    shape = tensor.shape
    heads = tensor.reshape(shape[0] // head_dim, head_dim, *shape[1:])
    return heads[:, order].reshape(shape)


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _ernie_config(memory: MemoryDecoder, config, *, tied: bool) -> dict:
    rope = _rope_theta(config)
    tokenizer = _tokenizer(memory)
    layers = config.num_hidden_layers
    return {
        "architectures": ["Ernie4_5_MoeForCausalLM"], "model_type": "ernie4_5_moe",
        "vocab_size": memory.full_vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": layers,
        "num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads,
        "head_dim": _head_dim(config), "hidden_act": config.hidden_act,
        "max_position_embeddings": config.max_position_embeddings, "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": tied, "use_bias": True, "use_cache": True,
        "rope_theta": rope, "rope_parameters": {"rope_theta": rope, "rope_type": "default"},
        # every layer's MLP is the one expert of its layer (see _ernie_tensors)
        "moe_layer_start_index": 0, "moe_layer_end_index": layers - 1, "moe_layer_interval": 1,
        "moe_num_experts": 1, "moe_k": 1, "moe_num_shared_experts": 0,
        "moe_intermediate_size": config.intermediate_size,
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id, "torch_dtype": "float32", "dtype": "float32",
    }


def _rope_theta(config) -> float:
    """The rotary base, refusing scaled variants (the Ernie form is checked for plain rotary only)."""
    parameters = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = parameters.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise ArtifactError(f"a restricted memory with {kind!r} rotary scaling has no portable form in memdec")
    return float(parameters.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0)


# ----------------------------------------------------------------------------------------------
# Files that transformers 4.x reads as 5.x does


def make_config_portable(path: Path) -> None:
    """``rope_theta`` at the top as well (4.x ignores ``rope_parameters``) and ``torch_dtype``."""
    config = json.loads(path.read_text())
    for holder in [config, *(value for value in config.values() if isinstance(value, dict) and
                             "rope_parameters" in value)]:
        rope = holder.get("rope_parameters")
        if isinstance(rope, dict) and "rope_theta" in rope and "rope_theta" not in holder:
            holder["rope_theta"] = rope["rope_theta"]
            if rope.get("rope_type", "default") != "default":
                holder["rope_scaling"] = {key: value for key, value in rope.items() if key != "rope_theta"}
    if "dtype" in config and "torch_dtype" not in config:
        config["torch_dtype"] = config["dtype"]
    path.write_text(json.dumps(config, indent=2))


def _tokenizer(memory: MemoryDecoder):
    from transformers import AutoTokenizer

    if not hasattr(memory, "_portable_tokenizer"):
        memory._portable_tokenizer = AutoTokenizer.from_pretrained(memory.folder)
    return memory._portable_tokenizer


def _save_tokenizer(memory: MemoryDecoder, output: Path) -> None:
    _tokenizer(memory).save_pretrained(output)
    make_tokenizer_portable(output / "tokenizer_config.json")


def make_tokenizer_portable(path: Path) -> None:
    """A tokenizer class of transformers 5 that 4.x lacks becomes the 4.x class that reads its files."""
    config = json.loads(path.read_text())
    config["tokenizer_class"] = TOKENIZER_CLASSES_4X.get(config.get("tokenizer_class"),
                                                         config.get("tokenizer_class"))
    path.write_text(json.dumps(config, indent=2))


# ----------------------------------------------------------------------------------------------
# The whole export and its model card


def export_portable(folder: Path, output: Path, lam: float | None) -> list[str]:
    """Write the memory of ``folder`` to ``output`` (files, ``memdec.json``); the card's lines."""
    from memdec_core.store.artifacts import write_manifest
    from memdec_decoder.memory import ARTIFACT_TYPE, open_memory

    memory = open_memory(folder)
    facts = write_portable(memory, output)
    kept = {key: value for key, value in memory.manifest.items()
            if key not in ("type", "format_version", "memdec_version", "created", "command", "restricted")}
    write_manifest(output, ARTIFACT_TYPE, **{**kept, "restricted": False, "portable": True,
                                             "exported_from": str(folder), "export": facts})
    return card_lines(memory, facts, lam)


def card_lines(memory: MemoryDecoder, facts: dict, lam: float | None) -> list[str]:
    """How to mix the memory: in memdec, in plain transformers, in the official code and in lmdeploy."""
    manifest = memory.manifest
    weight = f"{lam:g}" if lam is not None else "LAMBDA"
    tuned = (f"λ = {lam:g} (the memory's weight, given at export)" if lam is not None else
             "λ: tune it per base on validation (`memdec eval --memory THIS_FOLDER --base BASE` prints it in "
             "`knobs.lam`)")
    restricted = ("" if facts["output_bias"] is None else
                  f" It was trained with a restricted output layer; tokens outside it have an output bias that "
                  f"gives them probability exactly 0 in float32, so the mixture equals memdec's. It is stored as "
                  f"`{facts['architecture']}` (each MLP the one expert of its layer), whose output layer has a bias: "
                  f"checked to load in transformers 4.55.4 and 5.25.")
    return [
        f"A Memory Decoder: a causal LM over the full vocabulary ({facts['full_vocab_size']:,} tokens) of its "
        f"family, mixed with any base of the same tokenizer as (1 − λ)·p_base + λ·p_memory.{restricted}",
        "",
        f"- teacher: `{manifest.get('teacher')}`; family: the bases of tokenizer fingerprint "
        f"`{memory.tokenizer_fingerprint}` (memdec checks it); data hash `{manifest.get('data_hash')}`",
        f"- {tuned}",
        "",
        "## In memdec",
        "",
        "```",
        f"memdec eval --domain DOMAIN --base BASE --memory THIS_FOLDER{' --lam ' + weight if lam else ''}",
        'memdec generate --base BASE --memory THIS_FOLDER "A prompt"',
        "```",
        "",
        "## In plain transformers (4.4x or 5.x)",
        "",
        "```python",
        "import torch",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "base = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)  # torch_dtype= on 4.x",
        "memory = AutoModelForCausalLM.from_pretrained(THIS_FOLDER, dtype=torch.float32)",
        "ids = AutoTokenizer.from_pretrained(BASE)(text, return_tensors='pt').input_ids",
        "vocab = memory.config.vocab_size  # the base's padded rows beyond it have no tokens",
        "p_base = torch.log_softmax(base(ids).logits[..., :vocab].float(), -1)",
        "p_memory = torch.log_softmax(memory(ids).logits.float(), -1)",
        f"lam = {weight}",
        "mixed = torch.logaddexp(p_base + torch.log1p(torch.tensor(-lam)), p_memory + torch.log(torch.tensor(lam)))",
        "```",
        "",
        "## In the official MemoryDecoder code",
        "",
        f"`python -m evaluate_joint --do_test --model_name_or_path BASE --knn_generator_path THIS_FOLDER "
        f"--lmbda {weight} --dataset_name DATASET ...` (its `interpolate` is the mixture above).",
        "",
        "## In lmdeploy",
        "",
        "lmdeploy's Memory Decoder support (InternLM/lmdeploy PR #4767) takes the memory as "
        f"`memory_model_path=THIS_FOLDER` with the weight λ = {weight}; the memory already covers the full "
        "vocabulary, so `align_logits_to_base` only pads it to the base's padded rows.",
    ]
