"""Hub-ready artifacts: model cards with YAML front matter, references relative to the cache,
LoRA folders that travel, and ``memdec export`` (a merged model, a composite's references)."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import SMALL_WINDOWS, invoke, one_line_error

from memdec_core.api import prepare_context
from memdec_core.inputs.model_cards import model_card_data, read_front_matter, write_readme
from memdec_core.inputs.models import base_reference, referenced_base
from memdec_core.interfaces import EvalSettings
from memdec_core.store.artifacts import MANIFEST, artifact_reference, cache_root, resolve_reference

WINDOW = EvalSettings(**SMALL_WINDOWS)


def front_matter(folder: Path) -> dict:
    text = (Path(folder) / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n"), folder
    metadata = read_front_matter(text)
    assert metadata["library_name"] == "memdec" and "memdec" in metadata["tags"], metadata
    return metadata


def manifest(folder: Path) -> dict:
    return json.loads((Path(folder) / MANIFEST).read_text())


@pytest.fixture(scope="module")
def ctx(corpus_dir, tiny_llama):
    return prepare_context(str(corpus_dir), str(tiny_llama), WINDOW)


@pytest.fixture(scope="module")
def adapted(ctx):
    """``{"lora": folder, "dapt": folder}``, each trained one epoch on the tiny corpus."""
    from memdec_peft.methods import Dapt, Lora

    return {"lora": Path(Lora(rank=2, epochs=1, lrs=(3e-3,)).evaluate(ctx).details["artifact"]),
            "dapt": Path(Dapt(epochs=1, lrs=(1e-3,)).evaluate(ctx).details["artifact"])}


@pytest.fixture(scope="module")
def memory_chain(trained_memory):
    """The trained memory and what made it, found through the references of their manifests."""
    from memdec_decoder.targets import TargetSet

    memory = Path(trained_memory)
    targets = resolve_reference(manifest(memory)["targets"])
    datastore = TargetSet(targets).datastore_folder
    return SimpleNamespace(memory=memory, targets=targets, datastore=datastore,
                           indexes=sorted((datastore / "indexes").iterdir()))


def test_every_artifact_has_a_model_card_whose_front_matter_parses(memory_chain, adapted, ctx):
    from memdec_rag import index as passage_indexes
    from memdec_rag.retrievers import Bm25Retriever

    passages = passage_indexes.PassageIndex.for_corpus(ctx, 16, Bm25Retriever())
    passage_folder = next(folder for folder, opened in passage_indexes._OPENED.items() if opened is passages)
    assert passage_folder.parent == cache_root() / "passage-indexes"
    folders = {"memory": memory_chain.memory, "targets": memory_chain.targets, "datastore": memory_chain.datastore,
               "index": memory_chain.indexes[0], "passage-index": passage_folder, **adapted}
    for kind, folder in folders.items():
        metadata = front_matter(folder)
        assert metadata["tags"][-1] == "tiny-finance", (kind, metadata)  # the domain (the corpus folder's name)
        assert manifest(folder)["domain"] == "tiny-finance", kind


def test_a_dequantised_gguf_folder_gets_a_model_card(tiny_llama, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from memdec_core.inputs import models

    (tmp_path / "tiny.gguf").write_bytes(b"GGUF")  # never read: the GGUF reader is replaced below
    monkeypatch.setattr(models, "_from_pretrained", lambda *args, **kwargs: (
        AutoModelForCausalLM.from_pretrained(tiny_llama), AutoTokenizer.from_pretrained(tiny_llama)))
    converted = Path(models._gguf_as_hf_folder(tmp_path, "tiny.gguf", tmp_path / "cache"))
    assert "gguf" in front_matter(converted)["tags"]
    assert not (converted / MANIFEST).exists()  # a .json file there would change the model's fingerprint


def test_cards_name_a_hub_base_and_its_license(monkeypatch, tmp_path):
    from memdec_core.inputs import models

    card = tmp_path / "README.md"
    card.write_text("---\nlicense: apache-2.0\n---\n# Qwen\n")
    monkeypatch.setattr("huggingface_hub.try_to_load_from_cache", lambda repo, name: str(card))
    metadata = model_card_data(('lora',), 'Qwen/Qwen2.5-0.5B', 'law').to_dict()
    assert metadata == {"library_name": "memdec", "tags": ["memdec", "lora", "law"],
                        "base_model": "Qwen/Qwen2.5-0.5B", "license": "apache-2.0"}
    assert models.hub_id(str(tmp_path)) is None and models.hub_id("memdec-demo-s") is None


def test_a_card_with_awkward_values_reads_back_as_written(monkeypatch, tmp_path):
    """Quotes, colons, unicode, a leading dash and '---' in the body: the hub's own parser
    (ModelCard.load) and memdec's reader get back exactly the values written."""
    from huggingface_hub import ModelCard

    licence = "other: 'custom' \"v2\" — ✓"
    base_card = tmp_path / "base-README.md"
    base_card.write_text(f"---\nlicense: {json.dumps(licence)}\n---\n# base\n", encoding="utf-8")
    monkeypatch.setattr("huggingface_hub.try_to_load_from_cache", lambda repo, name: str(base_card))
    tags = ("lora", 'key: "value"', "- not a list item", "naïve ünïcödé 日本")
    domain = "fin: 'q' # not a comment"
    title = 'A "title": with colons — ü'
    write_readme(tmp_path / "card", title, ["line: one", "---", "# a heading"], tags=tags, base="org/mödel-1",
                 domain=domain)
    path = tmp_path / "card" / "README.md"
    text = path.read_text(encoding="utf-8")
    expected = {"library_name": "memdec", "tags": ["memdec", *tags, domain], "base_model": "org/mödel-1",
                "license": licence}
    assert read_front_matter(text) == expected
    assert ModelCard.load(path).data.to_dict() == expected
    assert f"# {title}\n" in text and "\n---\n# a heading\n" in text
    for broken in ("no front matter", "---\n[a, list]\n---\n", "---\nkey: [unclosed\n---\n", "---\n1: x\n---\n"):
        assert read_front_matter(broken) == {}, broken


def test_references_are_relative_to_the_cache_and_old_absolute_ones_still_read(memory_chain, tmp_path):
    from memdec_decoder.memory import open_memory
    from memdec_decoder.targets import TargetSet

    targets_reference = manifest(memory_chain.memory)["targets"]
    assert not Path(targets_reference).is_absolute() and targets_reference.startswith("targets/")
    assert manifest(memory_chain.targets)["datastore"].startswith("datastores/")
    assert artifact_reference(tmp_path) == str(tmp_path.resolve())  # outside the cache: absolute
    # What memdec wrote before: absolute paths. They still open, and name the same folders.
    for folder, key, target in ((memory_chain.targets, "datastore", memory_chain.datastore),
                                (memory_chain.memory, "targets", memory_chain.targets)):
        old = manifest(folder)
        (folder / MANIFEST).write_text(json.dumps({**old, key: str(target.resolve())}))
        try:
            assert resolve_reference(manifest(folder)[key]) == target.resolve()
            assert TargetSet(memory_chain.targets).datastore_folder.resolve() == memory_chain.datastore.resolve()
            open_memory(memory_chain.memory)
        finally:
            (folder / MANIFEST).write_text(json.dumps(old))


def test_a_lora_folder_carries_its_tokenizer_and_a_portable_base(adapted, ctx, tmp_path):
    from memdec_peft.finetune import _name_base_portably

    folder = adapted["lora"]
    assert (folder / "tokenizer.json").is_file() and (folder / "tokenizer_config.json").is_file()
    reference = manifest(folder)["base"]
    assert reference["fingerprint"] == ctx.base.fingerprint and reference["source"] == "path"
    assert referenced_base(manifest(folder)) == (str(Path(ctx.base.model_id).resolve()), ctx.base.fingerprint)
    old = {key: value for key, value in manifest(folder).items() if key != "base"}  # before the reference
    assert referenced_base(old) == (ctx.base.model_id, ctx.base.fingerprint)
    # A registered or hub base is named as such, in memdec.json and in PEFT's adapter_config.json.
    named = base_reference(SimpleNamespace(model_id="memdec-demo-s", fingerprint="f", tokenizer_fingerprint="t"))
    assert named == {"name": "memdec-demo-s", "source": "registered", "fingerprint": "f", "tokenizer_fingerprint": "t"}
    (tmp_path / "adapter_config.json").write_text((folder / "adapter_config.json").read_text())
    _name_base_portably(tmp_path, named)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] == "memdec-demo-s"


# The exported folder is loaded where memdec cannot be imported at all.
PLAIN_LOAD = """
import sys, torch
for name in ("memdec_core", "memdec_cli", "memdec_peft", "memdec_decoder", "memdec_knn"):
    sys.modules[name] = None
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
with torch.no_grad():
    torch.save(model(input_ids=torch.arange(1, 40)[None]).logits, sys.argv[2])
"""


@pytest.mark.parametrize("kind", ["lora", "dapt"])
def test_an_exported_model_loads_with_plain_transformers_and_gives_the_same_logits(adapted, ctx, kind, tmp_path):
    import copy

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    output = tmp_path / "merged"
    result = invoke("export", adapted[kind], "--output", output)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(output)
    assert manifest(output)["type"] == "exported-model" and manifest(output)["source_type"] == kind
    assert kind in front_matter(output)["tags"] and (output / "tokenizer.json").is_file()
    subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(output), str(tmp_path / "logits.pt")], check=True,
                   timeout=300)
    if kind == "lora":
        model = PeftModel.from_pretrained(copy.deepcopy(ctx.base.model), adapted[kind])
    else:
        model = AutoModelForCausalLM.from_pretrained(adapted[kind], dtype=torch.float32)
    with torch.no_grad():
        expected = model.eval()(input_ids=torch.arange(1, 40)[None]).logits
        untrained = ctx.base.model(input_ids=torch.arange(1, 40)[None]).logits
    assert not torch.allclose(expected, untrained, atol=1e-3)  # the training shows in the logits
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, rtol=1e-5, atol=1e-5)


def test_a_lora_export_warns_of_nothing(adapted, tmp_path):
    """Every LoRA export printed transformers' FutureWarning that ``is_gradient_checkpointing`` is
    deprecated: ``PeftModel.from_pretrained`` reads it. The export merges through peft's LoRA tuner."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        result = invoke("export", adapted["lora"], "--output", tmp_path / "merged")
    assert result.exit_code == 0, result.output
    assert "FutureWarning" not in result.stderr


def test_export_refuses_what_it_cannot_write_or_read(adapted, memory_chain, tiny_gpt2, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    assert "already exists" in one_line_error(invoke("export", adapted["dapt"], "--output", taken))
    replaced = invoke("export", adapted["dapt"], "--output", taken, "--force")
    assert replaced.exit_code == 0 and manifest(taken)["type"] == "exported-model"
    assert "folder not found" in one_line_error(invoke("export", tmp_path / "missing", "--output", tmp_path / "a"))
    assert "not a memdec artifact" in one_line_error(invoke("export", tiny_gpt2, "--output", tmp_path / "b"))
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / MANIFEST).write_text("{not json")
    assert "corrupt" in one_line_error(invoke("export", corrupt, "--output", tmp_path / "c"))
    neither = one_line_error(invoke("export", memory_chain.targets, "--output", tmp_path / "d"))
    assert "neither a LoRA adapter nor a DAPT model" in neither
    wrong_base = one_line_error(invoke("export", adapted["lora"], "--base", tiny_gpt2, "--output", tmp_path / "e"))
    assert "is not the base" in wrong_base
    assert not any((tmp_path / name).exists() for name in "abcde")
    assert invoke("export", "--output", tmp_path / "f").exit_code == 2
    assert invoke("export", adapted["lora"], "--lam", "0.5", "--output", tmp_path / "f").exit_code == 2
    # --memory without --base is no longer a usage error: it writes a portable memory (test_portable_memory.py)
    assert invoke("export", adapted["lora"], "--memory", memory_chain.memory, "--output", tmp_path / "f").exit_code == 2
    assert "Examples" in invoke("export", "--help").output


def test_an_exported_composite_rebuilds_from_its_references(tiny_llama, memory_chain, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from memdec_core import api
    from memdec_core.engine.composite import MemdecForCausalLM

    monkeypatch.chdir(memory_chain.memory.parent)  # a memory named relative to here is recorded absolute
    result = invoke("export", "--base", tiny_llama, "--memory", memory_chain.memory.name, "--lam", "0.3",
                    "--output", tmp_path / "composite")
    assert result.exit_code == 0, result.output
    assert manifest(tmp_path / "composite")["parts"]["memory"] == str(memory_chain.memory.resolve())
    assert "memdec" in front_matter(tmp_path / "composite")["tags"]
    monkeypatch.chdir(tmp_path)
    rebuilt = AutoModelForCausalLM.from_pretrained(tmp_path / "composite")
    assert isinstance(rebuilt, MemdecForCausalLM) and rebuilt.combiner.config.lam == 0.3
    direct = api.composite_model(str(tiny_llama), str(memory_chain.memory), lam=0.3)
    ids = torch.arange(1, 30)[None]
    with torch.inference_mode():
        torch.testing.assert_close(rebuilt(input_ids=ids).logits, direct(input_ids=ids).logits)
