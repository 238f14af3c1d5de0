"""Moving a memory to another tokenizer: row matching, the new model, the budget, resume, bad input."""

import json
import math

import pytest
import torch
from conftest import SMALL_WINDOWS, assert_only_the_rest, checkpoint_step, invoke, one_line_error, record_steps

from memdec_core.errors import ConfigError, ModelError
from memdec_core.inputs.models import load_model
from memdec_core.interfaces import EvalSettings
from memdec_core.testing import save_tiny_model, save_tokenizer
from memdec_decoder import api
from memdec_decoder import train as train_module
from memdec_decoder.memory import open_memory
from memdec_decoder.transfer import _projected, matching_rows, transferred_start

WINDOW = EvalSettings(**SMALL_WINDOWS)
#: The tiny corpus's targets: few neighbours, a temperature that suits random tiny models.
TARGETS = dict(k=16, temperature=1.0)


@pytest.fixture(scope="module")
def other_family(tmp_path_factory):
    """A tiny GPT-2 of another tokenizer (400 tokens, trained on the same text as the 300-token one)."""
    tokenizer = save_tokenizer(tmp_path_factory.mktemp("tokenizer-400"), vocab_size=400)
    return save_tiny_model(tmp_path_factory.mktemp("gpt2-400"), tokenizer, "gpt2", seed=2)


def brute_force_matches(memory_tokenizer, tokenizer):
    """For every token, the lowest memory id that decodes to the same text (whole characters only)."""
    def text(tok, token):
        decoded = tok.decode([token], clean_up_tokenization_spaces=False)
        return decoded if decoded and "\ufffd" not in decoded else None

    memory_texts = [text(memory_tokenizer, token) for token in range(len(memory_tokenizer))]
    expected = {}
    for token in range(len(tokenizer)):
        wanted = text(tokenizer, token)
        for row, memory_text in enumerate(memory_texts):
            if wanted is not None and memory_text == wanted:
                expected[token] = row
                break
    return expected


def test_rows_match_by_text_as_a_brute_force_search_does(trained_memory, other_family):
    from transformers import AutoTokenizer

    memory, family = open_memory(trained_memory), load_model(str(other_family))
    assert memory.vocabulary is None  # the memory's rows are its token ids
    matches = matching_rows(memory, family.tokenizer, family.vocab_size)
    assert matches == brute_force_matches(AutoTokenizer.from_pretrained(trained_memory), family.tokenizer)
    # every whole-character token of the smaller vocabulary (128 of the 256 bytes are partial UTF-8)
    assert 150 < len(matches) < family.vocab_size


def test_the_new_model_keeps_the_blocks_and_takes_the_matched_rows(trained_memory, other_family):
    memory, family = open_memory(trained_memory), load_model(str(other_family))
    start = transferred_start(memory, family, embeddings="strings")
    model = start.build(None)
    assert model.get_output_embeddings().weight.shape[0] == family.vocab_size == model.config.vocab_size
    old = dict(memory.model.named_parameters())
    for name, parameter in model.named_parameters():
        if "embed_tokens" not in name and "lm_head" not in name:
            torch.testing.assert_close(parameter, old[name], rtol=0, atol=0, msg=name)
    matches = matching_rows(memory, family.tokenizer, family.vocab_size)
    new_rows, old_rows = model.get_input_embeddings().weight, memory.model.get_input_embeddings().weight
    for token, row in list(matches.items())[:50]:
        torch.testing.assert_close(new_rows[token], old_rows[row], rtol=0, atol=0)
    assert start.facts["transfer"]["matched_tokens"] == len(matches)
    ids = torch.tensor([family.tokenizer.encode("the bank raised rates")])
    assert torch.isfinite(model(input_ids=ids).logits).all()
    fresh = transferred_start(memory, family, fresh_blocks=True).build(None)
    assert not torch.equal(dict(fresh.named_parameters())["model.layers.0.mlp.up_proj.weight"],
                           old["model.layers.0.mlp.up_proj.weight"])


def test_projected_rows_keep_the_geometry_at_the_memorys_scale():
    torch.manual_seed(0)
    donor = torch.randn(500, 3) @ torch.randn(3, 64) + 0.1 * torch.randn(500, 64)  # rank-3 structure, wide
    reference = 5.0 + 0.2 * torch.randn(300, 8)
    rows = _projected(donor, reference)
    assert rows.shape == (500, 8)
    torch.testing.assert_close(rows.mean(0), reference.mean(0), rtol=0, atol=1e-4)
    assert abs(float((rows - rows.mean(0)).std()) - float((reference - reference.mean(0)).std())) < 1e-4
    # the projection keeps the donor's pairwise distances up to the one scale factor
    scale = (rows[:50, None] - rows[None, :50]).norm(dim=-1) / (donor[:50, None] - donor[None, :50]).norm(dim=-1)
    off_diagonal = scale[~torch.eye(50, dtype=torch.bool)]
    assert float(off_diagonal.std() / off_diagonal.mean()) < 0.05


def test_a_transferred_memory_serves_the_new_family(trained_memory, other_family, corpus_dir, tmp_path):
    original = open_memory(trained_memory)
    folder = api.transfer(trained_memory, str(other_family), str(corpus_dir), tmp_path / "moved", fraction=0.5,
                          settings=WINDOW, **TARGETS)
    moved = open_memory(folder)
    family = load_model(str(other_family))
    moved.check_compatible(family)
    assert moved.tokenizer_fingerprint == family.tokenizer_fingerprint != original.tokenizer_fingerprint
    facts = moved.manifest["transfer"]
    assert facts["embeddings"] == "strings" and facts["memory_tokenizer_fingerprint"] == original.tokenizer_fingerprint
    budget = math.ceil(0.5 * original.manifest["train_tokens"])
    assert moved.manifest["train"]["budget_tokens"] == budget
    tokens_per_step = moved.manifest["train"]["batch_size"] * moved.manifest["train"]["accumulate"] * 64
    assert moved.manifest["history"][-1]["step"] == budget // tokens_per_step  # whole steps within the budget
    assert 0 < moved.manifest["train_tokens"] <= budget
    assert moved.manifest["train"]["lr"] == original.manifest["train"]["lr"]  # the original's recipe
    assert api.transfer(trained_memory, str(other_family), str(corpus_dir), tmp_path / "moved", fraction=0.5,
                        settings=WINDOW, **TARGETS) == folder  # a rerun finds it done

    result = invoke("eval", "--domain", corpus_dir, "--base", other_family, "--method", "base,memdec",
                    "--set", f"memdec.path={folder}", "--format", "json", "--context", 64, "--stride", 32)
    assert result.exit_code == 0, result.output
    rows = {row["method"]: row for row in json.loads(result.stdout)["results"]}
    assert math.isfinite(rows["memdec"]["test_ppl"]) and math.isfinite(rows["memdec"]["test_bpb"])
    assert rows["memdec"]["test_ppl"] < rows["base"]["test_ppl"]  # a random tiny base gains from any memory
    text = api.generate(str(other_family), folder, "The bank", lam=0.5, max_new_tokens=6)
    assert isinstance(text, str) and text


def test_an_interrupted_transfer_resumes_to_the_same_bits(trained_memory, other_family, corpus_dir, tmp_path,
                                                          monkeypatch):
    """The rerun starts from the checkpoint of 2 steps and takes only the steps after it, to the
    bits of an uninterrupted transfer."""
    common = dict(fraction=0.5, settings=WINDOW, save_every=1, **TARGETS)
    reference = open_memory(api.transfer(trained_memory, str(other_family), str(corpus_dir), tmp_path / "reference",
                                         **common))
    real_step, steps = train_module.Trainer._step, []

    def interrupted_step(self, starts):
        if len(steps) == 2:
            raise KeyboardInterrupt
        steps.append(1)
        return real_step(self, starts)

    monkeypatch.setattr(train_module.Trainer, "_step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        api.transfer(trained_memory, str(other_family), str(corpus_dir), tmp_path / "resumed", **common)
    assert not (tmp_path / "resumed").exists() and (tmp_path / ".resumed.partial" / "checkpoint").is_dir()
    monkeypatch.setattr(train_module.Trainer, "_step", real_step)
    done = checkpoint_step(tmp_path / ".resumed.partial")
    assert done == 2
    taken = record_steps(monkeypatch)
    resumed = open_memory(api.transfer(trained_memory, str(other_family), str(corpus_dir), tmp_path / "resumed",
                                       **common))
    assert_only_the_rest(taken, done)
    assert resumed.manifest["train_steps"] == reference.manifest["train_steps"] == taken[0][1]
    for (name, expected), (_, got) in zip(reference.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=name)


def test_transfers_that_cannot_work_are_refused_before_any_work(trained_memory, other_family, tiny_llama,
                                                                corpus_dir, tmp_path, tokenizer_dir):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    def transfer(memory=trained_memory, teacher=other_family, **overrides):
        return api.transfer(memory, str(teacher), str(corpus_dir), tmp_path / "out",
                            **{"settings": WINDOW, **TARGETS, **overrides})

    with pytest.raises(ConfigError, match="already has .* tokenizer: nothing to transfer.*memdec eval"):
        transfer(teacher=tiny_llama)
    # A plain model folder opens as a memory made elsewhere (issue 34), but what it trained on is unknown.
    with pytest.raises(ConfigError, match="does not record how many tokens it trained on"):
        transfer(memory=tiny_llama)
    for fraction in (0, 1.5, -0.1):
        with pytest.raises(ConfigError, match=r"fraction must be in \(0, 1\]"):
            transfer(fraction=fraction)
    with pytest.raises(ConfigError, match="embeddings must be one of"):
        transfer(embeddings="mean")
    with pytest.raises(ConfigError, match="embeddings_from names the model whose rows"):
        transfer(embeddings_from=str(other_family))
    config = AutoConfig.for_model("gpt_neox", vocab_size=400, hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "neox")
    AutoTokenizer.from_pretrained(other_family).save_pretrained(tmp_path / "neox")
    with pytest.raises(ModelError, match="'gpt_neox' is not supported"):
        transfer(teacher=tmp_path / "neox")
    assert not any(tmp_path.glob("*out*"))  # nothing half-written

    window = ["--context", 64, "--stride", 32]
    same = invoke("transfer", "--memory", trained_memory, "--teacher", tiny_llama, "--domain", corpus_dir,
                  "--output", tmp_path / "cli", *window)
    assert "nothing to transfer" in one_line_error(same)
    for fraction in ("0", "1.01"):
        usage = invoke("transfer", "--memory", trained_memory, "--teacher", other_family, "--domain", corpus_dir,
                       "--output", tmp_path / "cli", "--fraction", fraction)
        assert usage.exit_code == 2 and "--fraction" in usage.output


@pytest.mark.parametrize("embeddings", ["model", "fresh"])
def test_transfer_with_model_or_fresh_embeddings_from_the_command_line(trained_memory, other_family, corpus_dir,
                                                                       tmp_path, embeddings):
    """``memdec transfer --embeddings model|fresh`` end to end: the new memory starts from the
    teacher's rows (projected) or fresh ones, no row matched by text, says so in its manifest, and
    serves the new family in ``memdec eval``."""
    moved = invoke("transfer", "--memory", trained_memory, "--teacher", other_family, "--domain", corpus_dir,
                   "--output", tmp_path / "moved", "--fraction", 0.2, "--embeddings", embeddings, "--k", 16,
                   "--knn-temperature", 1, "--context", 64, "--stride", 32)
    assert moved.exit_code == 0, moved.output
    assert moved.stdout.strip() == str(tmp_path / "moved")
    memory = open_memory(tmp_path / "moved")
    facts = memory.manifest["transfer"]
    assert facts["embeddings"] == embeddings and facts["matched_tokens"] == 0
    assert facts["embeddings_model"] == (load_model(str(other_family)).model_id if embeddings == "model" else None)
    assert memory.model.get_input_embeddings().weight.shape[0] == load_model(str(other_family)).vocab_size
    result = invoke("eval", "--domain", corpus_dir, "--base", other_family, "--method", "memdec",
                    "--set", f"memdec.path={tmp_path / 'moved'}", "--format", "json", "--context", 64, "--stride", 32)
    assert result.exit_code == 0, result.output
    assert math.isfinite(json.loads(result.stdout)["results"][0]["test_ppl"])


def test_model_embeddings_start_from_the_teachers_rows_and_fresh_ones_do_not(trained_memory, other_family):
    """The rows each choice starts from: 'model' the teacher's own input rows moved to the memory's
    mean and scale (equal widths: centred, they are proportional), 'fresh' random rows unrelated
    to them."""
    def centred(rows):
        rows = rows.detach().float()
        return (rows - rows.mean(0)).flatten()

    memory, family = open_memory(trained_memory), load_model(str(other_family))
    teacher_rows = centred(family.model.get_input_embeddings().weight)
    for embeddings, related in (("model", True), ("fresh", False)):
        start = transferred_start(memory, family, embeddings=embeddings)
        rows = centred(start.build(None).get_input_embeddings().weight)
        correlation = float(torch.corrcoef(torch.stack([rows, teacher_rows]))[0, 1])
        assert (correlation > 0.999) if related else (abs(correlation) < 0.1), (embeddings, correlation)
