"""The Memory Decoder: vocabulary restriction, training, reload, resume, evaluation, bad input."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import QUICK_MEMORY as QUICK
from conftest import SMALL_WINDOWS, assert_only_the_rest, checkpoint_step, record_steps

from memdec_core.errors import ArtifactError, ConfigError, ModelError
from memdec_core.interfaces import EvalSettings
from memdec_decoder import api
from memdec_decoder import train as train_module
from memdec_decoder.memory import MemoryDecoder, open_memory
from memdec_decoder.settings import TrainSettings
from memdec_decoder.vocab import Vocabulary, restrict_model

WINDOW = EvalSettings(**SMALL_WINDOWS)


def load_tiny(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def test_a_restricted_model_keeps_the_logits_of_its_tokens(tiny_llama, tmp_path):
    original = load_tiny(tiny_llama)
    restricted = load_tiny(tiny_llama)
    restricted.config.pad_token_id = 3  # outside the kept set: must not survive as an out-of-range id
    kept = np.array([0, 5, 17, 40, 41, 42, 99, 250])
    vocabulary = Vocabulary(kept, original.config.vocab_size)
    restrict_model(restricted, vocabulary)
    assert restricted.get_output_embeddings().weight.shape[0] == len(kept) + 1
    assert restricted.config.pad_token_id is None and restricted.config.eos_token_id == 0
    restricted.save_pretrained(tmp_path / "restricted")
    restricted = load_tiny(tmp_path / "restricted")
    tokens = torch.tensor([[5, 17, 40, 99, 0, 250]])
    with torch.no_grad():
        expected = original(tokens).logits[..., kept]
        got = restricted(vocabulary.inputs(tokens)).logits[..., :len(kept)]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_restricted_memory_gives_zero_outside_its_set_and_the_mixture_sums_to_one(tiny_llama):
    from memdec_combiners.linear import Linear

    model = load_tiny(tiny_llama)
    full_size = model.config.vocab_size
    vocabulary = Vocabulary(np.arange(0, full_size, 3), full_size)
    restrict_model(model, vocabulary)
    memory = MemoryDecoder(model, tiny_llama, {"full_vocab_size": full_size, "tokenizer_fingerprint": "t"},
                           vocabulary)
    tokens = torch.tensor([[1, 4, 7, 10, 2]])  # 1, 4, 2 are outside the set: they share one input row
    logprobs = memory.logprobs(tokens)
    assert logprobs.shape == (1, 5, full_size)
    outside = torch.ones(full_size, dtype=torch.bool)
    outside[vocabulary.kept] = False
    assert torch.isneginf(logprobs[..., outside]).all()
    torch.testing.assert_close(logprobs.exp().sum(-1), torch.ones(1, 5))
    base = torch.log_softmax(torch.randn(1, 5, full_size), dim=-1)
    mixed = Linear(lam=0.4).combine(base, logprobs, {})
    torch.testing.assert_close(mixed.exp().sum(-1), torch.ones(1, 5))
    restricted = memory.restricted_logprobs(memory.forward(tokens).logits)[0]
    gold_tokens = torch.tensor([0, 1, 3, 4, 6])
    gold = memory.gold(restricted, gold_tokens)
    assert torch.equal(gold, logprobs[0, torch.arange(5), gold_tokens])
    assert torch.isneginf(gold[[1, 3]]).all() and torch.isfinite(gold[[0, 2, 4]]).all()


def test_training_writes_a_memory_that_reloads_with_identical_logprobs(trained_memory, tiny_llama):
    first, second = open_memory(trained_memory), open_memory(trained_memory)
    manifest = first.manifest
    assert manifest["teacher"] == str(tiny_llama) and manifest["beta"] == 0.5 and manifest["k"] == 16
    assert [entry["epoch"] for entry in manifest["history"]] == [1, 2]
    assert manifest["best_valid_ppl"] == min(entry["valid_ppl"] for entry in manifest["history"])
    tokens = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(first.logprobs(tokens), second.logprobs(tokens), rtol=0, atol=0)
    # The memory learnt from its init: its weights moved.
    init = load_tiny(tiny_llama)
    assert not torch.equal(init.model.norm.weight, first.model.model.norm.weight) or not torch.equal(
        init.lm_head.weight, first.model.lm_head.weight)


def test_memdec_method_lowers_perplexity_and_reuses_its_memory(corpus_dir, tiny_llama, trained_memory):
    from memdec_core import api as core_api

    report = core_api.evaluate(str(corpus_dir), [str(tiny_llama)], ["base", "memdec"], settings=WINDOW,
                               method_settings={"memdec": {"path": str(trained_memory)}})
    base, memdec = report["results"]
    assert memdec["method"] == "memdec" and 0 < memdec["knobs"]["lam"] <= 1
    assert memdec["test_ppl"] < base["test_ppl"]
    assert memdec["details"]["memory_folder"] == str(trained_memory)
    assert memdec["costs"]["params_added"] == memdec["details"]["memory_parameters"] > 0
    # Trained on first use into the cache, then reused (one memory per domain for every base).
    settings = {"memdec": {"teacher": str(tiny_llama), "init": str(tiny_llama), **QUICK}}
    first = core_api.evaluate(str(corpus_dir), [str(tiny_llama)], ["memdec"], settings=WINDOW,
                              method_settings=settings)["results"][0]
    second = core_api.evaluate(str(corpus_dir), [str(tiny_llama)], ["memdec"], settings=WINDOW,
                               method_settings=settings)["results"][0]
    assert first["details"]["memory_folder"] == second["details"]["memory_folder"]
    assert first["test_ppl"] == second["test_ppl"]


def test_a_memory_refuses_a_base_with_another_tokenizer(trained_memory):
    memory = open_memory(trained_memory)
    stranger = SimpleNamespace(tokenizer_fingerprint="other", model_id="stranger", vocab_size=300)
    with pytest.raises(ModelError, match="another tokenizer"):
        memory.check_compatible(stranger)


def test_training_resumes_after_an_interruption(corpus_dir, tiny_llama, tmp_path, monkeypatch):
    """The rerun starts from the checkpoint the interruption left (3 steps) and takes only the
    steps after it, to the weights of an uninterrupted run."""
    settings = dict(QUICK, save_every=1)
    reference = open_memory(api.train(str(corpus_dir), teacher=str(tiny_llama), init=str(tiny_llama),
                                      output=tmp_path / "reference", settings=WINDOW, **settings))
    real_step, steps = train_module.Trainer._step, []

    def interrupted_step(self, starts):
        if len(steps) == 3:
            raise KeyboardInterrupt
        steps.append(1)
        return real_step(self, starts)

    monkeypatch.setattr(train_module.Trainer, "_step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        api.train(str(corpus_dir), teacher=str(tiny_llama), init=str(tiny_llama), output=tmp_path / "resumed",
                  settings=WINDOW, **settings)
    assert not (tmp_path / "resumed").exists() and (tmp_path / ".resumed.partial" / "checkpoint").is_dir()
    with pytest.raises(ArtifactError, match="other settings .*lr"):
        api.train(str(corpus_dir), teacher=str(tiny_llama), init=str(tiny_llama), output=tmp_path / "resumed",
                  settings=WINDOW, **dict(settings, lr=1e-2))
    monkeypatch.setattr(train_module.Trainer, "_step", real_step)
    done = checkpoint_step(tmp_path / ".resumed.partial")
    assert done == 3
    taken = record_steps(monkeypatch)
    resumed = open_memory(api.train(str(corpus_dir), teacher=str(tiny_llama), init=str(tiny_llama),
                                    output=tmp_path / "resumed", settings=WINDOW, **settings))
    assert not (tmp_path / ".resumed.partial").exists()
    assert_only_the_rest(taken, done)
    assert resumed.manifest["train_steps"] == reference.manifest["train_steps"] == taken[0][1]
    for (name, expected), (_, got) in zip(reference.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=name)


def test_targets_of_other_data_are_refused(corpus_dir, tiny_llama, tmp_path):
    from memdec_core.api import prepare_context
    from memdec_decoder.targets import TargetSet

    targets = TargetSet(api.build_targets(str(corpus_dir), str(tiny_llama), settings=WINDOW, k=16))
    shorter = prepare_context(str(corpus_dir), str(tiny_llama), EvalSettings(context=64, max_train_tokens=500))
    with pytest.raises(ArtifactError, match="other train data"):
        train_module.train_memory(str(tiny_llama), shorter.corpus, targets, tmp_path / "memory", context=64,
                                  stride=32)
    assert not (tmp_path / "memory").exists() and not (tmp_path / ".memory.partial").exists()


@pytest.mark.parametrize("settings, message", [
    (dict(beta=1.5), "beta"), (dict(beta=-0.1), "beta"), (dict(epochs=0), "epochs"), (dict(lr=0), "lr"),
    (dict(vocabulary="tiny"), "vocabulary must be one of"), (dict(init_layers=-1), "init_layers"),
])
def test_bad_training_settings(settings, message):
    with pytest.raises(ConfigError, match=message):
        TrainSettings(**settings)


def test_corrupt_or_foreign_memory_folders(tmp_path, trained_memory):
    with pytest.raises(ArtifactError, match="not found"):
        open_memory(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ArtifactError, match="not a memdec artifact"):
        open_memory(tmp_path / "plain")
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(trained_memory, broken)
    (broken / "model.safetensors").write_bytes(b"not weights")
    with pytest.raises(ArtifactError, match="cannot load the memory model"):
        open_memory(broken)


def invoke(*args):
    from click.testing import CliRunner

    from memdec_cli.main import build_cli

    return CliRunner().invoke(build_cli(), [str(arg) for arg in args])


def test_cli_eval_with_a_trained_memory_and_bad_memory_options(corpus_dir, tiny_llama, trained_memory):
    import json

    window = ["--context", 64, "--stride", 32]
    result = invoke("eval", "--domain", corpus_dir, "--base", tiny_llama, "--method", "memdec",
                    "--set", f"memdec.path={trained_memory}", "--format", "json", *window)
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)["results"][0]
    assert row["method"] == "memdec" and set(row["knobs"]) == {"lam"}
    misplaced = invoke("eval", "--domain", corpus_dir, "--base", tiny_llama, "--method", "base",
                       "--set", f"memdec.path={trained_memory}", *window)
    assert misplaced.exit_code == 1 and "settings given for memdec, which this run does not use" in misplaced.output
    foreign = invoke("eval", "--domain", corpus_dir, "--base", tiny_llama, "--method", "memdec",
                     "--set", f"memdec.path={corpus_dir}", *window)
    assert foreign.exit_code == 1 and "not a memdec artifact" in foreign.output


def test_cli_train_and_targets(corpus_dir, tiny_llama, trained_memory, tmp_path):
    bad_beta = invoke("train", "--domain", corpus_dir, "--teacher", tiny_llama, "--beta", "1.5")
    assert bad_beta.exit_code == 2 and "--beta" in bad_beta.output
    exists = invoke("train", "--domain", corpus_dir, "--teacher", tiny_llama, "--init", tiny_llama,
                    "--output", trained_memory, "--context", 64)
    assert exists.exit_code == 1 and "already exists" in exists.output
    built = invoke("targets", "build", "--domain", corpus_dir, "--teacher", tiny_llama, "--k", 8,
                   "--output", tmp_path / "targets", "--context", 64)
    assert built.exit_code == 0, built.output
    info = invoke("targets", "info", built.stdout.strip())
    assert info.exit_code == 0 and '"k": 8' in info.output
    empty = tmp_path / "empty-train"
    empty.mkdir()
    for split in ("train", "valid", "test"):
        (empty / f"{split}.txt").write_text("" if split == "train" else "Some text.\n")
    no_text = invoke("train", "--domain", empty, "--teacher", tiny_llama, "--init", tiny_llama)
    assert no_text.exit_code == 1 and "train split is empty" in no_text.output


def test_auto_temperature_is_the_one_knn_lm_picks_on_validation(corpus_dir, tiny_llama, tmp_path):
    from memdec_core.api import prepare_context
    from memdec_decoder.targets import TargetSet
    from memdec_knn.method import KnnLM

    built = invoke("targets", "build", "--domain", corpus_dir, "--teacher", tiny_llama, "--k", 16,
                   "--knn-temperature", "auto", "--output", tmp_path / "auto", "--context", 64)
    assert built.exit_code == 0, built.output
    ctx = prepare_context(str(corpus_dir), str(tiny_llama), EvalSettings(context=64))
    chosen = KnnLM(k=16).evaluate(ctx).knobs["temperature"]
    assert TargetSet(tmp_path / "auto").manifest["temperature"] == chosen
    wrong = invoke("targets", "build", "--domain", corpus_dir, "--teacher", tiny_llama, "--knn-temperature", "hot")
    assert wrong.exit_code == 2 and "neither a positive number nor 'auto'" in wrong.output


def test_a_restricted_shallow_memory_trains_reloads_and_mixes(corpus_dir, tiny_llama, tmp_path):
    from memdec_core import api as core_api

    folder = api.train(str(corpus_dir), teacher=str(tiny_llama), init=str(tiny_llama), output=tmp_path / "cut",
                       settings=WINDOW, vocabulary="restricted", init_layers=1, **dict(QUICK, epochs=1))
    memory = open_memory(folder)
    assert memory.manifest["full_vocab_size"] == 300 and memory.manifest["restricted"]
    assert memory.model.config.num_hidden_layers == 1
    logprobs = memory.logprobs(torch.tensor([[5, 17, 40]]))
    assert logprobs.shape[-1] == 300 and torch.isneginf(logprobs).any()
    row = core_api.evaluate(str(corpus_dir), [str(tiny_llama)], ["memdec"], settings=WINDOW,
                            method_settings={"memdec": {"path": str(folder)}})["results"][0]
    assert row["test_ppl"] > 1 and row["details"]["restricted"]


def test_planning_a_memory_s_size_reads_no_weights(corpus_dir, tiny_gpt2, tiny_llama, monkeypatch):
    """LoRA's automatic rank asks every method of the run how many parameters it adds, before any
    method runs: the memory's init is counted on its skeleton (meta device), the same count as the
    loaded model cut the same way, and no weights are read."""
    from memdec_core.inputs.context import prepare_context
    from memdec_core.inputs.models import load_model
    from memdec_decoder import pipeline
    from memdec_decoder.settings import DecoderSettings

    ctx = prepare_context(str(corpus_dir), str(tiny_gpt2), EvalSettings(**SMALL_WINDOWS))
    config = DecoderSettings(teacher=str(tiny_llama), init=str(tiny_llama), init_layers=1)
    loaded = load_model(str(tiny_llama)).model
    vocabulary = pipeline._planned_vocabulary(ctx, pipeline.with_recipe(ctx, config, str(tiny_llama), quiet=True))
    expected = pipeline._memory_parameters(loaded, 1, vocabulary.size if vocabulary else None)

    def no_weights(*args, **kwargs):
        raise AssertionError("planning loaded a model's weights")

    monkeypatch.setattr(pipeline, "load_model", no_weights)
    pipeline._skeleton_facts.cache_clear()
    assert pipeline.planned_parameters(ctx, config) == expected < pipeline._count(loaded)


def wide_family(folder, size: int):
    """The tiny tokenizer padded with never-used tokens to ``size`` ids (it tokenises the text as
    before), and a tiny Llama of that vocabulary."""
    import json

    from memdec_core.testing import save_tiny_model, save_tokenizer

    tokenizer = save_tokenizer(folder / f"tokenizer-{size}")
    spec = json.loads((tokenizer / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    used = 1 + max([*vocab.values(), *(token["id"] for token in spec["added_tokens"])])
    vocab.update({f"unused-{number}": used + number for number in range(size - used)})
    (tokenizer / "tokenizer.json").write_text(json.dumps(spec))
    return save_tiny_model(folder / f"llama-{size}", tokenizer, "llama")


@pytest.mark.parametrize("size, restricted", [(32_768, False), (32_769, True)])
def test_auto_vocabulary_restricts_the_memory_above_32k_tokens(tmp_path, size, restricted):
    """docs/components.md: vocabulary 'auto' is "restricted above 32k tokens" (32,768): a memory
    of a 32,769-token family keeps only the tokens that follow a train position (and one slot for
    the rest), one of 32,768 tokens keeps its whole output layer."""
    from memdec_core.api import prepare_context
    from memdec_core.testing import write_corpus

    corpus = write_corpus(tmp_path / "corpus", sizes=(12, 3, 3))
    model = wide_family(tmp_path, size)
    memory = open_memory(api.train(str(corpus), teacher=str(model), init=str(model), output=tmp_path / "memory",
                                   settings=WINDOW, vocabulary="auto", epochs=1, max_steps=2, batch_size=4, k=8,
                                   temperature=1.0))
    rows = memory.model.get_output_embeddings().weight.shape[0]
    assert memory.manifest["full_vocab_size"] == size and memory.manifest["restricted"] is restricted
    if restricted:
        train = prepare_context(str(corpus), str(model), WINDOW).corpus.streams["train"]
        followers = len(np.unique(train[1:]))
        assert memory.manifest["vocabulary_size"] == followers and rows == followers + 1 < 100
    else:
        assert memory.manifest["vocabulary_size"] == rows == size
