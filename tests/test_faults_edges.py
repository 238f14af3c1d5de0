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
