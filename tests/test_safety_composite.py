"""Opening a folder that came from elsewhere runs no code and reads nothing outside it: a composite
whose config names a combiner file is refused unless ``trust_remote_code=True`` (transformers' own
rule), and a reference that climbs out of the cache (or the composite's folder) with ``..`` is refused."""

import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from memdec_core import api
from memdec_core.engine.composite import MemdecForCausalLM
from memdec_core.errors import ArtifactError
from memdec_core.inputs.models import referenced_base
from memdec_core.store.artifacts import cache_root, resolve_reference

EVIL = """
from pathlib import Path

from memdec_combiners.linear import Linear

Path({marker!r}).write_text("ran")


class Evil(Linear):
    pass
"""


@pytest.fixture(scope="module")
def saved_composite(tmp_path_factory, tiny_llama, trained_memory) -> Path:
    folder = tmp_path_factory.mktemp("composite") / "composite"
    api.composite_model(str(tiny_llama), str(trained_memory), lam=0.3).save_pretrained(folder)
    return folder


def edited_copy(source: Path, target: Path, **parts) -> Path:
    """A copy of the composite folder ``source`` whose config.json names other ``parts``."""
    target.mkdir()
    for file in source.iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    config = json.loads((target / "config.json").read_text())
    config["parts"].update(parts)
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.fixture
def evil_composite(saved_composite, tmp_path) -> tuple[Path, Path]:
    """A composite folder whose config names its own ``combiner.py``, which writes a marker when run."""
    marker = tmp_path / "marker"
    folder = tmp_path / "downloaded"
    edited_copy(saved_composite, folder, combiner=f"{folder}/combiner.py:Evil")
    (folder / "combiner.py").write_text(EVIL.format(marker=str(marker)))
    return folder, marker


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("load", [AutoModelForCausalLM.from_pretrained, MemdecForCausalLM.from_pretrained])
def test_a_combiner_file_in_a_composite_config_runs_nothing_unless_trusted(evil_composite, load):
    folder, marker = evil_composite
    with pytest.raises(ArtifactError) as error:
        load(folder)
    assert "trust_remote_code" in one_line(error) and "combiner.py" in one_line(error)
    assert not marker.exists()


def test_a_trusted_composite_loads_its_combiner_file(evil_composite):
    folder, marker = evil_composite
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    assert marker.read_text() == "ran"
    assert type(model.combiner).__name__ == "Evil" and model.combiner.config.lam == 0.3


def test_a_registered_combiner_needs_no_trust(saved_composite):
    assert isinstance(AutoModelForCausalLM.from_pretrained(saved_composite), MemdecForCausalLM)


@pytest.mark.parametrize("part", ["memory", "base"])
def test_a_composite_reference_that_climbs_out_is_refused(saved_composite, tmp_path, part):
    folder = edited_copy(saved_composite, tmp_path / "climbing", **{part: "../../etc"})
    with pytest.raises(ArtifactError) as error:
        AutoModelForCausalLM.from_pretrained(folder)
    assert "../../etc" in one_line(error) and "outside" in one_line(error)


@pytest.mark.parametrize("reference", ["../../etc", "datastores/../../etc", "datastores/x/../../../etc"])
def test_a_manifest_reference_that_climbs_out_of_the_cache_is_refused(reference):
    with pytest.raises(ArtifactError) as error:
        resolve_reference(reference)
    assert reference in one_line(error) and "outside" in one_line(error)
    for source in ("path", "hub", "registered"):  # a name that is a path was edited in
        with pytest.raises(ArtifactError):
            referenced_base({"base": {"name": reference, "source": source, "fingerprint": "0"}})


def test_references_inside_the_cache_or_absolute_still_resolve(tmp_path):
    assert resolve_reference("datastores/abc") == cache_root() / "datastores" / "abc"
    assert resolve_reference("datastores/x/../abc") == cache_root() / "datastores" / "x" / ".." / "abc"
    assert resolve_reference(str(tmp_path)) == tmp_path  # a user's own folder, outside the cache
    assert resolve_reference(str(cache_root() / "targets" / "k")) == cache_root() / "targets" / "k"
