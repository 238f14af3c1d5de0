"""The rough edges of issue 31: a knob given NaN, a knob given twice, ``cache rm`` beside a running
job or given a path, duplicate bases and methods, a GGUF file of garbage, a corpus folder with a
symlink loop or a file given as ``--domain``, the LoRA export's FutureWarning. Each is one clear
line, or the run a user meant, never a traceback or a blame on the wrong part."""

import dataclasses

import pytest
from conftest import SMALL_WINDOWS, invoke, one_line_error

from memdec_core.components import registry
from memdec_core.errors import ConfigError

WINDOWS = ("--context", SMALL_WINDOWS["context"], "--stride", SMALL_WINDOWS["stride"])


# ----------------------------------------------------------------------------------------------
# A knob that is NaN, infinite or out of range is refused up front, naming the knob


def float_settings():
    """(kind, component name, setting) for every setting a registered component declares a float
    (a float default, a tuple of floats, or a type that names float such as ``float | str``)."""
    found = []
    for kind in registry.KINDS:
        for name, cls in sorted(registry.components(kind).items()):
            for item in dataclasses.fields(cls.Config):
                default = cls.Config.__dataclass_fields__[item.name].default
                if isinstance(default, (float, tuple)) or "float" in str(item.type):
                    found.append((kind, name, item.name))
    return found


def test_the_components_declare_float_settings():
    """Guards the test below against passing on an empty list."""
    names = {f"{name}.{key}" for _, name, key in float_settings()}
    assert {"knn-datastore.temperatures", "linear.lam", "memdec.lr", "memdec.beta"} <= names


@pytest.mark.parametrize("text", ["nan", "inf", "-inf"])
def test_every_float_setting_refuses_a_number_that_is_not_finite(text):
    """Every float knob of every component: ``--set NAME.KEY=nan`` (or inf) is a ConfigError naming
    NAME.KEY at the one place settings are read, not a NaN blamed on a memory later."""
    for kind, name, key in float_settings():
        cls = registry.get(kind, name)
        with pytest.raises(ConfigError, match=f"{name}.{key} must be a finite number"):
            cls.settings_from_text({key: text})
        with pytest.raises(ConfigError, match=f"{name}.{key} must be a finite number"):
            cls(**{key: float(text)})  # from Python too


def test_a_knob_outside_its_declared_bounds_is_refused_naming_it():
    linear = registry.get("combiners", "linear")
    with pytest.raises(ConfigError, match=r"linear.lam must be in \[0, 1\], got 1.5"):
        linear.settings_from_text({"lam": "1.5"})


@pytest.mark.parametrize("value", ["nan", "inf", "3,nan"])
def test_nan_temperatures_are_one_line_before_any_work(value, corpus_dir, tiny_gpt2, monkeypatch):
    """The issue's ``--set knn-datastore.temperatures=nan``: refused before the datastore is built,
    under the name the user gave (knn-lm takes knn-datastore's settings)."""
    from memdec_core.runs import prepare

    monkeypatch.setattr(prepare, "load_corpus", lambda *a, **k: pytest.fail("the corpus was loaded"))
    line = one_line_error(invoke("eval", "--domain", corpus_dir, "--base", tiny_gpt2, "--method", "knn-lm",
                                 "--set", f"knn-datastore.temperatures={value}", *WINDOWS))
    assert "knn-datastore.temperatures must be a finite number" in line, line


# ----------------------------------------------------------------------------------------------
# --lam and --set linear.lam: one knob given twice


@pytest.mark.parametrize("command", ["eval", "compare"])
def test_lam_and_a_set_of_another_lam_are_one_error(command, corpus_dir, tiny_gpt2):
    """``--set linear.lam=0.2 --lam 0.3`` ran 0.2 silently."""
    line = one_line_error(invoke(command, "--domain", corpus_dir, "--base", tiny_gpt2, "--method", "base",
                                 "--set", "linear.lam=0.2", "--lam", "0.3", *WINDOWS))
    assert "linear.lam is given twice: --lam=0.3 and linear.lam=0.2" in line, line


def test_lam_and_a_set_of_the_same_lam_are_fine(corpus_dir, tiny_gpt2):
    result = invoke("eval", "--domain", corpus_dir, "--base", tiny_gpt2, "--method", "base",
                    "--set", "linear.lam=0.30", "--lam", "0.3", *WINDOWS)
    assert result.exit_code == 0, result.output


def test_generate_s_lam_and_a_set_of_another_are_one_error(tiny_gpt2):
    line = one_line_error(invoke("generate", "--base", tiny_gpt2, "--memory", "knn-datastore", "--lam", "0.3",
                                 "--set", "linear.lam=0.2", "the bank"))
    assert "linear.lam is given twice" in line, line


def test_the_composite_refuses_lam_and_another_lam_in_its_settings(tiny_gpt2):
    from memdec_core.engine.composite import composite_model

    with pytest.raises(ConfigError, match="linear.lam is given twice: lam=0.3 and linear.lam=0.2"):
        composite_model(str(tiny_gpt2), "knn-datastore", lam=0.3, component_settings={"linear": {"lam": "0.2"}})


# ----------------------------------------------------------------------------------------------
# A base or method given twice is measured once, with a note


def test_repeated_bases_and_methods_are_measured_once_with_a_note(corpus_dir, tiny_gpt2, monkeypatch):
    """``--base M --base M --method base,base`` computed (and printed) every row twice; a base
    named by another spelling of its folder is the same base."""
    import json
    import os

    monkeypatch.setenv("MEMDEC_NO_PROGRESS", "0")  # the note is a log line
    monkeypatch.chdir(tiny_gpt2.parent)
    result = invoke("eval", "--domain", corpus_dir, "--base", tiny_gpt2, "--base", os.path.join(".", tiny_gpt2.name),
                    "--method", "base,base", "--method", "base", "--format", "json", *WINDOWS)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["results"]
    assert [(row["base"], row["method"]) for row in rows] == [(str(tiny_gpt2), "base")]
    said = " ".join(result.stderr.split())
    assert "methods given more than once are measured once: base" in said, said
    assert f"bases given more than once are measured once: ./{tiny_gpt2.name}" in said, said


# ----------------------------------------------------------------------------------------------
# A GGUF file of garbage after its magic


def gguf_header(tmp_path, tokens: int = 50):
    """A GGUF file as llama.cpp's gguf package writes it: strings, arrays of strings and numbers."""
    import numpy as np

    gguf = pytest.importorskip("gguf")
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"tok{i}é" for i in range(tokens)])
    writer.add_token_types([1] * tokens)
    writer.add_float32("llama.rope.freq_base", 10000.0)
    writer.add_tensor("token_embd.weight", np.zeros((tokens, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_gguf_file_with_garbage_after_its_magic_is_one_line(tmp_path, corpus_dir):
    """It said "'utf-8' codec can't decode byte 0xff in position 0"."""
    import struct

    path = tmp_path / "garbage.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQQ", 3, 1, 1, 4) + b"\xff\xfe\x80\x81" + bytes(64))
    line = one_line_error(invoke("eval", "--domain", corpus_dir, "--base", path, "--method", "base", *WINDOWS))
    assert f"{path} is not a valid GGUF file: a metadata key at byte 24 is not UTF-8 text" in line, line


def test_gguf_headers_valid_and_cut_short(tmp_path):
    from memdec_core.errors import ModelError
    from memdec_core.inputs.gguf import check_gguf_file

    path = gguf_header(tmp_path)
    check_gguf_file(path)  # a real header passes
    whole = path.read_bytes()
    for cut, reason in ((40, r"ends before the 5 items counted at byte 16 \(cut short"), (20, "ends inside its header"),
                        (3, "does not start with the GGUF magic")):
        broken = tmp_path / f"cut-{cut}.gguf"
        broken.write_bytes(whole[:cut])
        with pytest.raises(ModelError, match=f"is not a valid GGUF file: it {reason}"):
            check_gguf_file(broken)
    path.write_bytes(whole[:4] + (7).to_bytes(4, "little") + whole[8:])
    with pytest.raises(ModelError, match="version 7, where GGUF files are v2 or v3"):
        check_gguf_file(path)


# ----------------------------------------------------------------------------------------------
# --domain: a symlink loop, a file, a name too long for a path


@pytest.fixture
def two_splits(tmp_path, corpus_dir):
    """A corpus folder with train and valid files, its test split left to each test."""
    import shutil

    folder = tmp_path / "corpus"
    folder.mkdir()
    for split in ("train", "valid"):
        shutil.copy(corpus_dir / f"{split}.txt", folder)
    return folder


def test_a_split_that_is_a_symlink_loop_names_the_loop(two_splits):
    """It said "has no test split"."""
    from memdec_core.errors import DataError
    from memdec_core.inputs.data import load_corpus

    (two_splits / "test.txt").symlink_to("other.txt")
    (two_splits / "other.txt").symlink_to("test.txt")
    with pytest.raises(DataError, match=f"{two_splits / 'test.txt'} is a symbolic link loop: "
                                        f"{two_splits / 'test.txt'} → other.txt → test.txt$"):
        load_corpus(str(two_splits))


def test_a_split_that_links_to_nothing_says_so(two_splits):
    from memdec_core.errors import DataError
    from memdec_core.inputs.data import load_corpus

    (two_splits / "test.jsonl").symlink_to("gone.jsonl")
    with pytest.raises(DataError, match="test.jsonl is a symbolic link to gone.jsonl, which does not exist"):
        load_corpus(str(two_splits))


def test_a_corpus_folder_that_is_a_symlink_loop_names_the_loop(tmp_path):
    from memdec_core.errors import DataError
    from memdec_core.inputs.data import load_corpus

    (tmp_path / "loop").symlink_to("loop")
    with pytest.raises(DataError, match=f"the corpus folder {tmp_path / 'loop'} is a symbolic link loop"):
        load_corpus(str(tmp_path / "loop"))


def test_a_file_given_as_the_domain_says_what_a_domain_is(corpus_dir):
    """It said "corpus folder not found" of a file that is there."""
    line = one_line_error(invoke("eval", "--domain", corpus_dir / "train.txt", "--method", "base", *WINDOWS))
    assert f"{corpus_dir / 'train.txt'} is a file, not a corpus folder; a domain is a registered domain" in line
    assert "folder holding train, valid and test files (.jsonl, .jsonl.gz, .txt, .txt.gz)" in line


@pytest.mark.parametrize("prefix", ["", "/tmp/"])
def test_a_domain_too_long_for_a_path_is_one_short_line(prefix):
    """A 5,000-character --domain was an ``OSError: File name too long`` traceback from is_dir()."""
    line = one_line_error(invoke("eval", "--domain", prefix + "x" * 5000, "--method", "base", *WINDOWS))
    assert "5,00" in line and "characters)" in line and len(line) < 400, line
