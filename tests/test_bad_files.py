"""Broken input files are one clear line and exit 1, never a traceback or a silent exit; bad usage exits 2.

Corpora (truncated or corrupt gzip, binary text), base models (a truncated safetensors, a renamed
or reshaped tensor), combiner files that exit at import, and a malformed ``compare --budget``.
The shared fixture folders are copied into ``tmp_path`` before anything is broken.
"""

import gzip
import os
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from memdec_cli.main import build_cli
from memdec_core.components.combiner_files import resolve_combiner
from memdec_core.errors import ConfigError, DataError, ModelError
from memdec_core.inputs.data import read_documents


def invoke(*args):
    return CliRunner().invoke(build_cli(), [str(arg) for arg in args])


def run_memdec(*args, env=None):
    environment = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "memdec_cli.main", *map(str, args)], capture_output=True,
                          text=True, env=environment, timeout=300)


def one_line_error(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), stderr
    return lines[0]


def eval_args(domain, base):
    return ["eval", "--domain", domain, "--base", base, "--context", "64", "--method", "base"]


def gzipped(text: str) -> bytes:
    return gzip.compress(text.encode())


TEXT = "First document.\n\nSecond document.\n"


# ----------------------------------------------------------------------------------------------
# read_documents


@pytest.mark.parametrize("name", ["test.txt.gz", "test.jsonl.gz"])
def test_a_truncated_gzip_file_is_named_as_truncated(tmp_path, name):
    whole = gzipped('{"text": "one"}\n' * 200 if "jsonl" in name else TEXT * 200)
    path = tmp_path / name
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=rf"{name} is truncated"):
        read_documents(path)
    path.write_bytes(whole[:-4])  # only the trailer (CRC, size) is cut off
    with pytest.raises(DataError, match=rf"{name} is truncated"):
        read_documents(path)


@pytest.mark.parametrize("content", [
    b"\x1f\x8b\x08\x00" + b"garbage" * 20,  # a gzip header, then no deflate stream
    b"plain text in a .gz name",            # no gzip header at all
], ids=["corrupt-stream", "not-gzip"])
def test_a_corrupt_gzip_file_is_not_valid_gzip(tmp_path, content):
    path = tmp_path / "train.txt.gz"
    path.write_bytes(content)
    with pytest.raises(DataError, match=r"train\.txt\.gz is not valid gzip"):
        read_documents(path)


def test_a_gzip_file_with_a_wrong_checksum_is_not_valid_gzip(tmp_path):
    data = bytearray(gzipped(TEXT))
    data[-8] ^= 0xFF  # the CRC32 of the trailer
    path = tmp_path / "valid.txt.gz"
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"valid\.txt\.gz is not valid gzip \(CRC check failed"):
        read_documents(path)


@pytest.mark.parametrize("name", ["test.txt", "test.jsonl", "test.txt.gz"])
def test_nul_bytes_look_binary(tmp_path, name):
    path = tmp_path / name
    content = b"\x00" * 20_000
    path.write_bytes(gzip.compress(content) if name.endswith(".gz") else content)
    with pytest.raises(DataError, match=rf"{name} looks binary, not text"):
        read_documents(path)
    if not name.endswith(".gz"):
        path.write_bytes(b"Some text.\n\nMore\x00text.\n")  # one NUL in otherwise fine text
        with pytest.raises(DataError, match="looks binary"):
            read_documents(path)


@pytest.mark.parametrize("name", ["test.txt", "test.txt.gz"])
def test_bytes_that_are_not_utf8_are_named(tmp_path, name):
    content = b"caf\xe9 au lait\n"
    path = tmp_path / name
    path.write_bytes(gzip.compress(content) if name.endswith(".gz") else content)
    with pytest.raises(DataError, match=rf"{name} .*UTF-8 text.*byte 0xe9 at offset 3"):
        read_documents(path)


def test_good_gzip_reads_like_plain_text_crlf_included(tmp_path):
    crlf = TEXT.replace("\n", "\r\n")
    (tmp_path / "a.txt").write_bytes(crlf.encode())
    (tmp_path / "a.txt.gz").write_bytes(gzipped(crlf))
    expected = ["First document.", "Second document."]
    assert read_documents(tmp_path / "a.txt") == read_documents(tmp_path / "a.txt.gz") == expected


# ----------------------------------------------------------------------------------------------
# Corpora through the CLI


def broken_corpus(corpus_dir, tmp_path, name: str, content: bytes):
    folder = tmp_path / "corpus"
    shutil.copytree(corpus_dir, folder)
    (folder / "test.txt").unlink()
    (folder / name).write_bytes(content)
    return folder


def test_a_truncated_split_is_one_line_not_aborted(corpus_dir, tiny_gpt2, tmp_path):
    whole = gzipped((corpus_dir / "test.txt").read_text())
    folder = broken_corpus(corpus_dir, tmp_path, "test.txt.gz", whole[: len(whole) // 2])
    result = run_memdec(*eval_args(folder, tiny_gpt2), env={"MEMDEC_DEBUG": "0"})
    assert result.returncode == 1 and "Aborted!" not in result.stderr
    message = one_line_error(result.stderr)
    assert "test.txt.gz is truncated" in message and result.stdout == ""
    debug = run_memdec(*eval_args(folder, tiny_gpt2), env={"MEMDEC_DEBUG": "1"})
    assert debug.returncode != 0 and "Aborted!" not in debug.stderr
    assert "Traceback" in debug.stderr and "DataError" in debug.stderr and "is truncated" in debug.stderr


@pytest.mark.parametrize("name, content, words", [
    ("test.txt.gz", b"\x1f\x8b\x08\x00" + b"garbage" * 20, "test.txt.gz is not valid gzip"),
    ("test.txt.gz", b"not gzip", "test.txt.gz is not valid gzip"),
    ("test.txt", b"\x00" * 20_000, "test.txt looks binary, not text"),
    ("test.txt.gz", gzip.compress(b"\x00" * 20_000), "test.txt.gz looks binary, not text"),
], ids=["corrupt-gzip", "not-gzip", "nul-bytes", "gzipped-nul-bytes"])
def test_a_corrupt_or_binary_split_is_one_line(corpus_dir, tiny_gpt2, tmp_path, name, content, words):
    result = invoke(*eval_args(broken_corpus(corpus_dir, tmp_path, name, content), tiny_gpt2))
    assert result.exit_code == 1, result.output
    assert words in one_line_error(result.stderr) and result.stdout == ""


# ----------------------------------------------------------------------------------------------
# Base models


def copied_model(source, tmp_path, name="model"):
    folder = tmp_path / name
    shutil.copytree(source, folder)
    return folder


def edit_weights(folder, change):
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_a_truncated_safetensors_is_one_line(tiny_gpt2, corpus_dir, tmp_path):
    from memdec_core.inputs.models import load_model

    folder = copied_model(tiny_gpt2, tmp_path, "cut")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelError, match="cannot load model .*cut"):
        load_model(str(folder))
    result = invoke(*eval_args(corpus_dir, folder))
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert "cannot load model" in one_line_error(result.stderr)


def test_a_renamed_tensor_is_refused_not_reinitialised(tiny_gpt2, corpus_dir, tmp_path):
    folder = copied_model(tiny_gpt2, tmp_path, "renamed")
    edit_weights(folder, lambda t: t.update({"renamed.weight": t.pop("transformer.h.0.attn.c_attn.weight")}))
    result = run_memdec(*eval_args(corpus_dir, folder))  # a subprocess: transformers' own report goes to stderr
    assert result.returncode == 1, result.stderr
    message = one_line_error(result.stderr)
    assert "cannot load model" in message and "lack transformer.h.0.attn.c_attn.weight" in message


def test_missing_weights_name_three_and_count_the_rest(tiny_llama, tmp_path):
    from memdec_core.inputs.models import load_model

    folder = copied_model(tiny_llama, tmp_path)
    layer = "model.layers.1."
    edit_weights(folder, lambda t: [t.pop(k) for k in list(t) if k.startswith(layer)])
    with pytest.raises(ModelError, match=rf"lack {layer}\S+, {layer}\S+, {layer}\S+ and \d+ more") as caught:
        load_model(str(folder))
    assert "\n" not in str(caught.value)


def test_a_tied_head_may_be_absent_an_untied_one_may_not(tiny_llama, tmp_path):
    import json

    from memdec_core.inputs.models import load_model

    for tied in (True, False):
        folder = copied_model(tiny_llama, tmp_path, f"tied-{tied}")
        config = json.loads((folder / "config.json").read_text())
        config["tie_word_embeddings"] = tied
        (folder / "config.json").write_text(json.dumps(config))
        edit_weights(folder, lambda t: t.pop("lm_head.weight"))
        if tied:
            model = load_model(str(folder)).model
            assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        else:
            with pytest.raises(ModelError, match="lack lm_head.weight"):
                load_model(str(folder))


def test_extra_weights_load_and_wrong_shapes_do_not(tiny_llama, tmp_path):
    import torch

    from memdec_core.inputs.models import load_model

    extra = copied_model(tiny_llama, tmp_path, "extra")
    edit_weights(extra, lambda t: t.update({"extra.weight": torch.zeros(3)}))
    assert load_model(str(extra)).model is not None  # unexpected keys stay a transformers warning
    reshaped = copied_model(tiny_llama, tmp_path, "reshaped")
    edit_weights(reshaped, lambda t: t.update({"model.norm.weight": torch.ones(7)}))
    with pytest.raises(ModelError, match=r"wrong shape: model\.norm\.weight \(\(7,\) in the file, \(32,\)"):
        load_model(str(reshaped))


# ----------------------------------------------------------------------------------------------
# Combiner files


@pytest.mark.parametrize("source, cause", [
    ("import sys\nsys.exit(3)\n", "SystemExit(3)"),
    ("import sys\nsys.exit()\n", "SystemExit()"),
    ("raise SystemExit('bye')\n", "SystemExit('bye')"),
    ("raise ValueError('first\\nsecond')\n", "ValueError: first"),
])
def test_a_combiner_file_that_exits_or_fails_at_import(tmp_path, source, cause):
    path = tmp_path / "exits.py"
    path.write_text(source)
    before = set(sys.modules)
    with pytest.raises(ConfigError, match="cannot import combiner file") as caught:
        resolve_combiner(f"{path}:Mine")
    assert str(caught.value).endswith(f": {cause}") and "\n" not in str(caught.value)
    assert set(sys.modules) == before


def test_a_combiner_file_interrupted_at_import_is_still_an_interrupt(tmp_path):
    path = tmp_path / "interrupts.py"
    path.write_text("raise KeyboardInterrupt\n")
    with pytest.raises(KeyboardInterrupt):
        resolve_combiner(str(path))


def test_a_combiner_file_calling_sys_exit_is_one_line(corpus_dir, tiny_gpt2, tmp_path):
    path = tmp_path / "exits.py"
    path.write_text("import sys\nsys.exit(3)\n")
    result = invoke(*eval_args(corpus_dir, tiny_gpt2), "--combiner", f"{path}:Mine")
    assert result.exit_code == 1, result.output
    message = one_line_error(result.stderr)
    assert "cannot import combiner file" in message and message.endswith("SystemExit(3)")


# ----------------------------------------------------------------------------------------------
# compare --budget


def test_a_malformed_budget_is_bad_usage(corpus_dir):
    result = invoke("compare", "--domain", corpus_dir, "--budget", "garbage")
    assert result.exit_code == 2, result.output
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: Invalid value for '--budget'") and "'garbage'" in last


def test_a_good_budget_passes_the_check(tmp_path):
    result = invoke("compare", "--domain", tmp_path / "no-corpus", "--budget", "2TFLOPs")
    assert result.exit_code == 1 and "corpus folder not found" in one_line_error(result.stderr)
