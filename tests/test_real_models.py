"""Slow checks on real models fetched by benchmarks/fetch_models.py (run: pytest -m slow).

Skipped when the model is not in the local model cache, so a machine without it stays green.
"""

import os
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

MODELS = Path(os.environ.get("MEMDEC_MODELS", Path.home() / ".cache" / "memdec-models")).expanduser()
SMOLLM = MODELS / "smollm2-135m" / "model.gguf"


@pytest.mark.skipif(not SMOLLM.exists(), reason="run: python benchmarks/fetch_models.py smollm2-135m")
def test_gguf_base_loads_once_converted_and_gives_the_same_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    from memdec_core.inputs.models import load_model

    first = load_model(str(SMOLLM), cache_dir=tmp_path)
    again = load_model(str(SMOLLM), cache_dir=tmp_path)  # from the converted safetensors folder
    direct = AutoModelForCausalLM.from_pretrained(str(SMOLLM.parent), gguf_file=SMOLLM.name, dtype=torch.float32)
    ids = first.tokenizer("The Regulation shall enter into force on the twentieth day", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = direct(ids).logits
        assert torch.allclose(first.model(ids).logits, expected, atol=1e-4)
        assert torch.allclose(again.model(ids).logits, expected, atol=1e-4)
    assert first.tokenizer_fingerprint == again.tokenizer_fingerprint
    assert len(list((tmp_path / "models").iterdir())) == 1
