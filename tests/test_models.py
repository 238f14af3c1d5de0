"""Model loading, tokenizer fingerprints and last_ffn_input capture."""

import http.server
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
from conftest import save_tiny_model

from memdec_core.errors import ConfigError, ModelError, UnknownComponentError
from memdec_core.inputs.models import capture_last_ffn_input, last_block_mlp, load_model, tokenizer_fingerprint


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2", "gemma3_text"])
def test_last_ffn_input_is_captured_for_each_family(family, tmp_path, tokenizer_dir):
    loaded = load_model(str(save_tiny_model(tmp_path / family, tokenizer_dir, family)))
    mlp = last_block_mlp(loaded.model)
    seen = {}
    handle = mlp.register_forward_hook(lambda module, args, out: seen.update(inp=args[0]))
    input_ids = torch.arange(1, 11)[None]
    with capture_last_ffn_input(loaded.model) as captured, torch.no_grad():
        loaded.model(input_ids)
    handle.remove()
    assert captured["hidden"].shape == (1, 10, loaded.model.config.hidden_size)
    assert torch.equal(captured["hidden"], seen["inp"])
    assert not mlp._forward_pre_hooks  # the capture hook is removed afterwards


def test_unsupported_architecture(tmp_path, tokenizer_dir):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("gpt_neox", vocab_size=300, hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=64)
    with pytest.raises(ModelError, match="'gpt_neox' is not supported.*supported: .*gpt2.*llama"):
        last_block_mlp(AutoModelForCausalLM.from_config(config))


def test_tokenizer_fingerprint_is_stable_and_discriminating(tiny_gpt2, tiny_llama, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    gpt2, llama = load_model(str(tiny_gpt2)), load_model(str(tiny_llama))
    assert gpt2.tokenizer_fingerprint == llama.tokenizer_fingerprint  # same tokenizer files
    assert gpt2.tokenizer_fingerprint == tokenizer_fingerprint(gpt2.tokenizer)
    other = Tokenizer(models.BPE())
    other.pre_tokenizer = pre_tokenizers.ByteLevel()
    other.train_from_iterator(["something else entirely"] * 10, trainers.BpeTrainer(vocab_size=280))
    assert tokenizer_fingerprint(PreTrainedTokenizerFast(tokenizer_object=other)) != gpt2.tokenizer_fingerprint
    assert gpt2.fingerprint != llama.fingerprint


def test_missing_paths_are_clear_errors(tmp_path):
    with pytest.raises(ModelError, match="model path not found"):
        load_model(str(tmp_path / "no-such-model"))
    with pytest.raises(ModelError, match="model file not found"):
        load_model(str(tmp_path / "model.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="not a model folder"):
        load_model(str(tmp_path / "empty"))


def test_unknown_hub_name_fails_fast_offline(monkeypatch):
    """huggingface_hub's offline switch (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE when the process
    started) is obeyed without opening a socket: memdec once probed huggingface.co:443 itself,
    reading HF_HUB_OFFLINE only."""
    import socket

    from huggingface_hub import constants

    def no_network(*args, **kwargs):
        raise AssertionError("a socket was opened in offline mode")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what TRANSFORMERS_OFFLINE=1 at start-up gives
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for name in ("create_connection", "getaddrinfo"):
        monkeypatch.setattr(socket, name, no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(UnknownComponentError, match="unknown model 'no-such-model-xyz'.*HF_HUB_OFFLINE is set"):
        load_model("no-such-model-xyz")


class _Hub(http.server.BaseHTTPRequestHandler):
    """A hub mirror that has no model at all, and notes what it was asked."""

    asked: list = []

    def do_HEAD(self):
        self.asked.append(self.path)
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.end_headers()

    do_GET = do_HEAD

    def log_message(self, *args):
        pass


def _resolve_in_a_fresh_process(name: str, endpoint: str, tmp_path) -> str:
    """The error of resolve_model_location(name) in a process started with HF_ENDPOINT=endpoint
    (huggingface_hub reads its settings when imported)."""
    env = {key: value for key, value in os.environ.items() if key not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf"), NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")
    code = ("from memdec_core.inputs.models import resolve_model_location\n"
            "try:\n    resolve_model_location(%r)\nexcept Exception as error:\n    print(error)" % name)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60).stdout


def test_the_hub_asked_is_hf_endpoint_and_a_closed_one_fails_at_once(tmp_path):
    """HF_ENDPOINT (a mirror) is the hub memdec asks, not huggingface.co; a mirror that cannot be
    reached is named in one line, without waiting out a long timeout."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        mirror = f"http://127.0.0.1:{server.server_address[1]}"
        message = _resolve_in_a_fresh_process("some-org/no-such-model", mirror, tmp_path)
    finally:
        server.shutdown()
        server.server_close()
    assert "/some-org/no-such-model/resolve/main/config.json" in _Hub.asked, _Hub.asked
    assert f"{mirror} has no such model" in message, message

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    started = time.monotonic()
    message = _resolve_in_a_fresh_process("some-org/no-such-model", closed, tmp_path)
    assert f"the hub ({closed}) is unreachable" in message and "HF_HUB_OFFLINE=1" in message, message
    assert len(message.strip().splitlines()) == 1 and time.monotonic() - started < 30


def test_a_copied_model_keeps_its_fingerprint_and_new_weights_change_it(tiny_llama, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_llama, copy)
    assert load_model(str(copy)).fingerprint == load_model(str(tiny_llama)).fingerprint
    model = load_model(str(copy)).model
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    model.save_pretrained(copy)
    assert load_model(str(copy)).fingerprint != load_model(str(tiny_llama)).fingerprint


def test_the_device_comes_from_memdec_device_or_the_gpu(monkeypatch, tiny_llama):
    from memdec_core.inputs.models import default_device, model_device

    monkeypatch.delenv("MEMDEC_DEVICE", raising=False)
    assert default_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setenv("MEMDEC_DEVICE", "cpu")
    assert model_device(load_model(str(tiny_llama)).model) == torch.device("cpu")
    monkeypatch.setenv("MEMDEC_DEVICE", "gpu0")
    with pytest.raises(ConfigError, match="is not a torch device"):
        default_device()
    if not torch.cuda.is_available():
        monkeypatch.setenv("MEMDEC_DEVICE", "cuda")
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            default_device()


def test_the_precision_is_checked_against_the_device_and_runs_the_passes_under_autocast(monkeypatch, tiny_llama):
    import numpy as np

    from memdec_core.engine.scoring import iter_scored_batches
    from memdec_core.inputs import models
    from memdec_core.inputs.data import make_windows

    monkeypatch.setenv("MEMDEC_DEVICE", "cpu")
    monkeypatch.delenv("MEMDEC_DTYPE", raising=False)
    assert models.compute_dtype() == "fp32"  # auto on a CPU
    for name in ("bf16", "fp16"):
        monkeypatch.setenv("MEMDEC_DTYPE", name)
        with pytest.raises(ConfigError, match=f"--dtype {name} needs a GPU"):
            models.compute_dtype()
    monkeypatch.setenv("MEMDEC_DTYPE", "fp8")
    with pytest.raises(ConfigError, match="not one of auto, fp32, bf16, fp16"):
        models.compute_dtype()
    monkeypatch.setenv("MEMDEC_DTYPE", "fp32")

    # What a GPU run does, on the CPU: bf16 passes under autocast, fp32 out (logits, then mixtures, in fp32)
    with models.autocast("bf16"):
        assert torch.is_autocast_enabled("cpu")
    assert not torch.is_autocast_enabled("cpu")
    model = load_model(str(tiny_llama)).model
    stream, windows = np.arange(300) % 300, make_windows(300, 64, 32)
    plain = [batch.logits for batch in iter_scored_batches(model, stream, windows, batch_size=4)]
    monkeypatch.setattr(models, "compute_dtype", lambda: "bf16")
    halved = [batch.logits for batch in iter_scored_batches(model, stream, windows, batch_size=4)]
    assert all(logits.dtype == torch.float32 for logits in halved)
    assert not all(torch.equal(a, b) for a, b in zip(plain, halved))  # it really ran in bf16
    for a, b in zip(plain, halved):
        torch.testing.assert_close(b, a, rtol=0.05, atol=0.05)
