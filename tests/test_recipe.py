"""The memory recipe: settings left at auto are filled by the recipe for the init's size; given ones win."""

import pytest
from conftest import SMALL_WINDOWS, invoke, one_line_error

from memdec_core.errors import ConfigError
from memdec_core.interfaces import EvalSettings
from memdec_decoder import recipe as recipe_module
from memdec_decoder.recipe import AUTO, RECIPES, recipe_for
from memdec_decoder.settings import DecoderSettings

WINDOW = EvalSettings(**SMALL_WINDOWS)


def test_auto_trains_the_whole_init_where_the_compute_allows_it_and_cuts_it_elsewhere():
    small, qwen_05b, qwen_15b = recipe_module.CUT_ABOVE, 494_032_768, 1_543_714_304
    assert recipe_for("auto", small, 10**9) is RECIPES["whole"]  # demo-sized: whole, whatever the split
    # the recipe study's 40k train tokens (160 steps of 1,024 tokens: 4.9e14 FLOPs for the 0.5B)
    assert recipe_for("auto", qwen_05b, 40_000) is RECIPES["paper"]
    assert recipe_for("auto", qwen_15b, 40_000) is RECIPES["cut"]  # 1.5e15 FLOPs: over an hour of a CPU
    assert recipe_for("auto", qwen_15b, 40_000, accelerator=True) is RECIPES["paper"]
    assert recipe_for("auto", qwen_05b, 10**6) is RECIPES["cut"]  # 4 epochs of 1M tokens on a CPU
    assert RECIPES["paper"].training_flops(qwen_05b, 40_000) == 6.0 * qwen_05b * 160 * 1024
    assert recipe_for("whole", 10**10) is RECIPES["whole"]  # a named recipe whatever the size
    assert recipe_module.why_auto(qwen_15b, 40_000, False) == ("the whole init would train for 1.5e+15 FLOPs, "
                                                               "a CPU allows 1e+15")
    with pytest.raises(ConfigError, match="recipe must be auto or one of whole, cut, paper, got 'deep'"):
        recipe_for("deep", 1)


def test_given_settings_win_over_the_recipe_one_by_one():
    cut = RECIPES["cut"]
    resolved = DecoderSettings(lr=2e-3, epochs=6).with_recipe(cut, 512)
    assert (resolved.lr, resolved.epochs) == (2e-3, 6)  # given
    assert (resolved.init_layers, resolved.batch_size) == (cut.init_layers, 1024 // 512)  # the recipe's
    assert resolved.tune_temperature and resolved.recipe == "cut"
    fixed = DecoderSettings(temperature=30.0).with_recipe(cut, 512)
    assert fixed.temperature == 30.0 and not fixed.tune_temperature
    whole = DecoderSettings().with_recipe(RECIPES["whole"], 512)
    assert (whole.init_layers, whole.lr, whole.temperature, whole.epochs, whole.batch_size) == (0, 1e-3, 16.0, 3, 8)
    assert whole.train_settings().lr == 1e-3 and whole.min_steps == 48  # 6 epochs of 32k tokens in 512s
    assert DecoderSettings(epochs=1).with_recipe(RECIPES["whole"], 512).min_steps == 0  # 1 epoch asked, 1 given


def test_the_paper_recipe_trains_the_whole_init_at_the_paper_s_lr_for_qwen():
    paper = DecoderSettings().with_recipe(recipe_for("paper", 10**9), 1024)
    assert (paper.init_layers, paper.lr, paper.tune_temperature) == (0, 1e-4, True)
    assert (paper.batch_size, paper.min_steps) == (1, RECIPES["cut"].min_steps)  # the cut recipe's length


def test_the_cut_recipe_counts_its_length_in_steps_unless_epochs_are_given():
    cut = RECIPES["cut"]
    assert cut.min_steps > 0
    assert DecoderSettings().with_recipe(cut, 512).train_settings().min_steps == cut.min_steps
    assert DecoderSettings(epochs=1).with_recipe(cut, 512).min_steps == 0  # 1 epoch asked, 1 epoch given
    assert DecoderSettings(epochs=1, min_steps=7).with_recipe(cut, 512).min_steps == 7
    assert DecoderSettings(min_steps="0").with_recipe(cut, 512).epochs == cut.epochs


def test_the_cut_recipe_keeps_its_tokens_a_step_whatever_the_window():
    cut = RECIPES["cut"]
    windows = [DecoderSettings().with_recipe(cut, context).batch_size for context in (256, 512, 1024, 4096)]
    assert windows == [4, 2, 1, 1]
    assert DecoderSettings(batch_size=3).with_recipe(cut, 1024).batch_size == 3
    assert DecoderSettings().with_recipe(RECIPES["whole"], 1024).batch_size == 8  # whole counts windows


def test_settings_from_the_command_line_are_numbers_or_auto():
    from memdec_decoder.memory_model import DecoderMemory

    values = DecoderMemory.settings_from_text({"lr": "5e-4", "init_layers": "2", "epochs": "auto"})
    config = DecoderSettings(**values)
    assert (config.lr, config.init_layers, config.epochs) == (5e-4, 2, AUTO)
    for given, message in ((dict(lr="fast"), "lr must be a number or auto"),
                           (dict(init_layers="2.5"), "init_layers must be an integer or auto"),
                           (dict(epochs=0), "epochs"), (dict(lr=-1.0), "lr"), (dict(init_layers=-1), "init_layers"),
                           (dict(recipe="deep"), "recipe must be auto or one of"),
                           (dict(temperature=0.0), "temperature must be positive")):
        with pytest.raises(ConfigError, match=message):
            DecoderSettings(**given)
    with pytest.raises(ConfigError, match="still auto"):
        DecoderSettings().train_settings()


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])  # untied and tied output layers
def test_an_init_above_the_threshold_is_cut_and_its_temperature_tuned(corpus_dir, fixture, monkeypatch, request):
    """The auto recipe end to end, with the threshold lowered so the tiny model counts as large."""
    from memdec_core.api import prepare_context
    from memdec_core.components.plan import Plan
    from memdec_decoder.pipeline import memory_for, planned_parameters
    from memdec_knn.method import KnnLM

    monkeypatch.setattr(recipe_module, "CUT_ABOVE", 0)
    monkeypatch.setitem(recipe_module.PAPER_FLOPS, "cpu", 0)  # and too large for the whole init to train
    monkeypatch.setitem(RECIPES, "cut", recipe_module.Recipe("cut", init_layers=1, lr=3e-3,
                                                             temperature=recipe_module.TUNED, epochs=1, batch_size=4,
                                                             min_steps=40))
    ctx = prepare_context(str(corpus_dir), str(request.getfixturevalue(fixture)), WINDOW, plan=Plan())
    config = DecoderSettings(k=16, vocabulary="restricted")
    planned = planned_parameters(ctx, config)
    memory = memory_for(ctx, config)
    assert planned == memory.parameters  # what LoRA's automatic rank matches, before the memory exists
    assert memory.model.config.num_hidden_layers == 1
    train = memory.manifest["train"]
    assert (train["init_layers"], train["lr"], train["epochs"], train["batch_size"]) == (1, 3e-3, 1, 4)
    assert train["min_steps"] == memory.manifest["train_steps"] == 40  # into a second epoch of the tiny split
    assert memory.manifest["temperature"] == KnnLM(k=16).evaluate(ctx).knobs["temperature"]
    assert memory.manifest["recipe"] == "cut"


def test_the_report_names_the_memory_s_recipe():
    from memdec_cli.render import memory_note

    details = {"teacher": "qwen-1.5b", "init": "qwen-0.5b", "init_layers": 2, "recipe": "cut", "temperature": 300.0}
    report = {"results": [{"method": "memdec", "details": details}, {"method": "memdec", "details": details}]}
    assert memory_note(report) == ("memory decoder: teacher qwen-1.5b, initialised from qwen-0.5b "
                                   "(its first 2 blocks), recipe cut, T = 300")


def test_more_blocks_than_the_init_has_is_refused_before_any_work(corpus_dir, tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("MEMDEC_CACHE", str(tmp_path / "cache"))
    result = invoke("eval", "--domain", corpus_dir, "--base", tiny_llama, "--method", "memdec",
                    "--set", "memdec.init_layers=5", "--context", 64)
    assert "init_layers=5, but the init model" in one_line_error(result) and "has only 2 blocks" in result.stderr
    assert not (tmp_path / "cache" / "datastores").exists()
    trained = invoke("train", "--domain", corpus_dir, "--teacher", tiny_llama, "--init", tiny_llama,
                     "--init-layers", 3, "--output", tmp_path / "memory", "--context", 64)
    assert "has only 2 blocks" in one_line_error(trained) and not (tmp_path / "memory").exists()
    bad = invoke("train", "--domain", corpus_dir, "--teacher", tiny_llama, "--recipe", "deep")
    assert bad.exit_code == 2 and "--recipe" in bad.output


def test_a_teacher_of_another_tokenizer_is_refused(corpus_dir, tiny_llama, tmp_path):
    from memdec_core.testing import save_tiny_model, save_tokenizer

    other = save_tiny_model(tmp_path / "gpt2-400", save_tokenizer(tmp_path / "tokenizer-400", vocab_size=400), "gpt2")
    result = invoke("eval", "--domain", corpus_dir, "--base", tiny_llama, "--method", "memdec",
                    "--set", f"memdec.teacher={other}", "--context", 64)
    assert "has another tokenizer than" in one_line_error(result)


@pytest.mark.parametrize("fixture, final, next_input", [("tiny_llama", "model.norm", "model.layers.1.input_layernorm"),
                                                       ("tiny_gpt2", "transformer.ln_f", "transformer.h.1.ln_1")])
def test_a_cut_model_can_take_its_output_norm_from_the_next_block(fixture, final, next_input, request):
    import torch
    from transformers import AutoModelForCausalLM

    from memdec_decoder.train import keep_first_blocks

    folder = request.getfixturevalue(fixture)
    for choice in (False, True):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        with torch.no_grad():
            for parameter in model.get_submodule(next_input).parameters():
                parameter.uniform_(0.5, 2.0)  # fresh norms are all ones: make the source recognisable
        source = {key: value.clone() for key, value in model.get_submodule(next_input).state_dict().items()}
        before = {key: value.clone() for key, value in model.get_submodule(final).state_dict().items()}
        keep_first_blocks(model, 1, norm_from_next_block=choice)
        after = model.get_submodule(final).state_dict()
        for key, value in (source if choice else before).items():
            torch.testing.assert_close(after[key], value, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="cut_norm must be one of"):
        DecoderSettings(cut_norm="middle")
