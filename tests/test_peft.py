"""DAPT and LoRA: they lower domain perplexity, leave the base untouched, cache their artifacts."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import SMALL_WINDOWS, assert_only_the_rest, checkpoint_step, record_steps

from memdec_core import api
from memdec_core.engine.training import LoopSettings, Trainer
from memdec_core.errors import ConfigError, ModelError
from memdec_core.interfaces import EvalSettings
from memdec_peft.methods import lora_targets
from memdec_peft.settings import LoraSettings

WINDOW = EvalSettings(**SMALL_WINDOWS)


def run(corpus_dir, model, method, **settings):
    report = api.evaluate(str(corpus_dir), [str(model)], ["base", method], settings=WINDOW,
                          method_settings={method: settings})
    return report["results"]


@pytest.mark.parametrize("family", ["tiny_gpt2", "tiny_llama"])
def test_lora_lowers_perplexity_and_counts_its_parameters(corpus_dir, family, request):
    model = request.getfixturevalue(family)
    base, lora = run(corpus_dir, model, "lora", rank=4, epochs=2, lrs=(3e-3,))
    assert lora["test_ppl"] < base["test_ppl"]
    assert lora["knobs"] == {"lr": 3e-3, "rank": 4}
    # 2 blocks of hidden size 32: rank 4 adds 4 · (fan_in + fan_out) per adapted matrix.
    per_block = {"tiny_gpt2": (32 + 96) + (32 + 32) + (32 + 128) + (128 + 32),  # c_attn, attn c_proj, c_fc, mlp c_proj
                 "tiny_llama": 4 * (32 + 32) + 3 * (32 + 64)}[family]
    assert lora["costs"]["params_added"] == 2 * 4 * per_block
    assert lora["costs"]["bytes_added"] > 0 and lora["costs"]["train_seconds"] > 0


def test_dapt_lowers_perplexity_is_cached_and_leaves_the_base_untouched(corpus_dir, tiny_llama):
    from memdec_core.api import prepare_context
    from memdec_peft.methods import Dapt

    ctx = prepare_context(str(corpus_dir), str(tiny_llama), WINDOW)
    before = {name: tensor.clone() for name, tensor in ctx.base.model.state_dict().items()}
    first = Dapt(epochs=2, lrs=(1e-3, 3e-3)).evaluate(ctx)
    assert set(first.details["valid_by_lr"]) == {"0.001", "0.003"}
    assert first.valid_ppl == min(first.details["valid_by_lr"].values())
    again = Dapt(epochs=2, lrs=(1e-3, 3e-3)).evaluate(ctx)
    assert again.test_ppl == first.test_ppl and again.details["artifact"] == first.details["artifact"]
    for name, tensor in ctx.base.model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    base = run(corpus_dir, tiny_llama, "base")[0]
    assert first.test_ppl < base["test_ppl"] and first.costs.params_added == 0


def test_lora_refuses_unknown_architectures_and_bad_settings():
    stranger = SimpleNamespace(config=SimpleNamespace(model_type="bert"), named_modules=lambda: [])
    with pytest.raises(ModelError, match="does not know"):
        lora_targets(stranger)
    with pytest.raises(ConfigError, match="rank, alpha and match_parameters"):
        LoraSettings(rank=-1)
    with pytest.raises(ConfigError, match="learning rates must be positive"):
        LoraSettings(lrs=(0.0,))


class Linear(torch.nn.Module):
    """A bigram model with the HF calling convention, for testing the training loop alone."""

    def __init__(self, vocab: int = 16):
        super().__init__()
        self.table = torch.nn.Embedding(vocab, vocab)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return SimpleNamespace(logits=self.table(input_ids))

    def save_pretrained(self, folder):
        torch.save(self.state_dict(), f"{folder}/weights.pt")


def test_the_loop_stops_early_and_keeps_the_best_epoch(tmp_path):
    stream = np.random.default_rng(0).integers(0, 16, 400)
    scores = iter([5.0, 4.0, 4.5, 4.2, 3.0])  # best at epoch 2, then two epochs without improvement

    def loss(model, batch):
        logits = model(batch.input_ids).logits
        return torch.nn.functional.cross_entropy(logits[batch.rows, batch.columns], batch.gold)

    trainer = Trainer(Linear(), stream, 32, LoopSettings(epochs=5, patience=2, batch_size=4), tmp_path,
                      loss=loss, validate=lambda model: (next(scores), {}))
    state = trainer.run()
    assert state["stopped_early"] and state["best_epoch"] == 2 and len(state["history"]) == 4
    assert state["train_tokens"] == 4 * (len(stream) - 1)  # every position once per epoch
    assert (tmp_path / "best" / "weights.pt").is_file()


def test_an_interrupted_lora_run_resumes_to_the_same_adapter(corpus_dir, tiny_llama, monkeypatch, tmp_path):
    """Interrupted two steps into epoch 2, the rerun starts from epoch 1's checkpoint and takes only
    the steps after it, to the adapter of an uninterrupted run."""
    from pathlib import Path

    from memdec_core.api import prepare_context
    from memdec_core.engine import training
    from memdec_core.store.artifacts import read_manifest
    from memdec_peft.methods import Lora

    ctx = prepare_context(str(corpus_dir), str(tiny_llama), WINDOW)
    settings = dict(rank=3, epochs=2, lrs=(2e-3,), seed=1)
    monkeypatch.setenv("MEMDEC_CACHE", str(tmp_path / "reference"))
    reference = Lora(**settings).evaluate(ctx)
    monkeypatch.setenv("MEMDEC_CACHE", str(tmp_path / "interrupted"))
    real_step = training.Trainer._step

    def interrupted(self, starts):
        if self.state["global_step"] == self.steps_per_epoch + 2:  # the first epoch's checkpoint is on disk
            raise KeyboardInterrupt
        return real_step(self, starts)

    monkeypatch.setattr(training.Trainer, "_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        Lora(**settings).evaluate(ctx)
    work, = (tmp_path / "interrupted" / "lora").glob(".*.partial")
    monkeypatch.setattr(training.Trainer, "_step", real_step)
    done = checkpoint_step(work)
    taken = record_steps(monkeypatch)
    resumed = Lora(**settings).evaluate(ctx)
    assert_only_the_rest(taken, done)
    history = read_manifest(Path(resumed.details["artifact"]), "lora")["history"]
    expected = read_manifest(Path(reference.details["artifact"]), "lora")["history"]
    assert done == expected[0]["step"] and taken[0][1] == expected[-1]["step"]  # epoch 1 came from the checkpoint
    assert history[0] == expected[0] and len(history) == len(expected) == 2
    assert resumed.test_ppl == pytest.approx(reference.test_ppl, rel=1e-6)
    assert not list((tmp_path / "interrupted" / "lora").glob(".*.partial"))


def test_a_token_budget_replaces_the_epochs(tmp_path):
    stream = np.random.default_rng(0).integers(0, 16, 400)  # 13 chunks of 32: 4 steps of 4 chunks per epoch
    settings = LoopSettings(epochs=1, batch_size=4, max_tokens=9 * 4 * 32)  # 9 steps: into the third epoch
    trainer = Trainer(Linear(), stream, 32, settings, tmp_path, validate=lambda model: (1.0, {}),
                      loss=lambda model, batch: model(batch.input_ids).logits.mean())
    state = trainer.run()
    assert state["global_step"] == 9 and len(state["history"]) == 3
    with pytest.raises(ConfigError, match="less than one optimizer step"):
        Trainer(Linear(), stream, 32, LoopSettings(batch_size=4, max_tokens=100), tmp_path / "x",
                validate=lambda model: (1.0, {}), loss=lambda model, batch: model(batch.input_ids).logits.mean())


def test_a_minimum_of_steps_stretches_the_epochs_over_a_small_split(tmp_path):
    stream = np.random.default_rng(0).integers(0, 16, 400)  # 13 chunks of 32: 4 steps of 4 chunks per epoch

    def steps(**settings):
        trainer = Trainer(Linear(), stream, 32, LoopSettings(batch_size=4, **settings), tmp_path / str(settings),
                          validate=lambda model: (1.0, {}),
                          loss=lambda model, batch: model(batch.input_ids).logits.mean())
        state = trainer.run()
        return state["global_step"], len(state["history"])

    assert steps(epochs=1, min_steps=10) == (10, 3)  # into the third epoch
    assert steps(epochs=3, min_steps=5) == (12, 3)  # the epochs already give more
    assert steps(epochs=1, min_steps=10, max_steps=6) == (6, 2)  # a budget in steps still caps
    assert steps(epochs=1, min_steps=10, max_tokens=2 * 4 * 32) == (2, 1)  # a token budget replaces both
    with pytest.raises(ConfigError, match="min_steps"):
        LoopSettings(min_steps=-1)


@pytest.mark.parametrize("schedule, factor", [("linear", lambda progress: 1 - progress),
                                              ("cosine", lambda progress: 0.5 * (1 + math.cos(math.pi * progress))),
                                              ("constant", lambda progress: 1.0)])
def test_each_step_uses_the_learning_rate_of_its_schedule(tmp_path, schedule, factor):
    stream = np.random.default_rng(0).integers(0, 16, 400)  # 13 chunks of 32: 4 steps of 4 chunks per epoch
    used = []

    def loss(model, batch):
        used.append(trainer.optimizer.param_groups[0]["lr"])
        return model(batch.input_ids).logits.mean()

    trainer = Trainer(Linear(), stream, 32, LoopSettings(epochs=2, lr=0.1, batch_size=4, schedule=schedule),
                      tmp_path, loss=loss, validate=lambda model: (1.0, {}))
    trainer.run()
    assert used == pytest.approx([0.1 * factor(step / 8) for step in range(8)], abs=1e-12)
    with pytest.raises(ConfigError, match="schedule must be one of linear, cosine, constant, got 'warm'"):
        LoopSettings(schedule="warm")


#: The factors memdec computed by hand before it took transformers' schedules (issue 31).
HAND_WRITTEN = {"linear": lambda progress: max(0.0, 1.0 - progress),
                "cosine": lambda progress: 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))),
                "constant": lambda progress: 1.0}


@pytest.mark.parametrize("schedule", HAND_WRITTEN)
def test_transformers_schedules_give_the_hand_written_learning_rates(tmp_path, schedule):
    """At every step of runs of 1 to 400 steps, transformers' schedule gives the learning rate the
    hand-written one gave: the same bits for cosine and constant; for linear within one unit in the
    last place of a double (transformers computes (T - s) / T, memdec computed 1 - s / T), far below
    what an fp32 update can tell apart. A checkpoint's scheduler state written by the old LambdaLR
    resumes."""
    stream = np.random.default_rng(0).integers(0, 16, 400)
    lr = 0.1
    for total in (*range(1, 40), 97, 400):
        trainer = Trainer(Linear(), stream, 32, LoopSettings(epochs=10**4, max_steps=total, lr=lr, batch_size=1,
                                                             schedule=schedule), tmp_path,
                          loss=lambda model, batch: 0.0, validate=lambda model: (1.0, {}))
        used = []
        for _ in range(total + 1):
            used.append(trainer.optimizer.param_groups[0]["lr"])
            trainer.optimizer.step()  # no gradients: nothing changes but the step count
            trainer.scheduler.step()
        expected = [lr * HAND_WRITTEN[schedule](step / total) for step in range(total + 1)]
        if schedule == "linear":
            assert max(abs(a - b) for a, b in zip(used, expected)) <= lr * 2.0 ** -51, total
        else:
            assert used == expected, total
    old = torch.optim.lr_scheduler.LambdaLR(torch.optim.AdamW(Linear().parameters(), lr=lr),
                                            lambda step: HAND_WRITTEN[schedule](step / 400))
    for _ in range(123):
        old.optimizer.step()
        old.step()
    trainer.scheduler.load_state_dict(old.state_dict())  # as Trainer.restore reads a checkpoint
    assert trainer.scheduler.get_last_lr() == old.get_last_lr() and trainer.scheduler.last_epoch == 123
    trainer.optimizer.step()
    trainer.scheduler.step()
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(lr * HAND_WRITTEN[schedule](124 / 400), rel=1e-14)


def test_a_flops_budget_counts_six_n_for_full_training_and_about_four_n_for_adapters(tiny_llama, tmp_path):
    from peft import LoraConfig, get_peft_model

    from memdec_core.engine.training import training_flops_per_token
    from memdec_core.inputs.models import load_model

    model = load_model(str(tiny_llama)).model
    embedding = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight is embedding
    used = sum(p.numel() for p in model.parameters()) - (0 if tied else embedding.numel())
    assert training_flops_per_token(model) == 6 * used
    adapted = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    adapters = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    assert training_flops_per_token(adapted) == 4 * (used + adapters) + 2 * adapters

    stream = np.random.default_rng(0).integers(0, 16, 400)
    flops_per_token = training_flops_per_token(Linear())
    settings = LoopSettings(epochs=1, batch_size=4, max_flops=9 * 4 * 32 * flops_per_token + 1)
    trainer = Trainer(Linear(), stream, 32, settings, tmp_path, validate=lambda model: (1.0, {}),
                      loss=lambda model, batch: model(batch.input_ids).logits.mean())
    assert trainer.run()["global_step"] == 9  # the same 9 steps as a budget of 9 × 4 × 32 tokens
    with pytest.raises(ConfigError, match="tokens or in FLOPs, not both"):
        LoopSettings(max_tokens=10, max_flops=10.0)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3_text"])
@pytest.mark.parametrize("adapted", [False, True])
def test_chunked_cross_entropy_equals_the_full_logits_one(family, adapted):
    """The loss of continued training runs the output layer a chunk at a time; its value and
    gradients must be those of cross-entropy on the full logits (gemma3 caps its logits, so it
    takes the full path, and must give the same too)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from memdec_core.engine.training import TrainBatch, next_token_cross_entropy
    from memdec_core.testing import tiny_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family, 300)).double().eval()  # no dropout: equal bits
    if adapted:
        targets = lora_targets(model)
        model = get_peft_model(model, LoraConfig(r=2, target_modules=targets, fan_in_fan_out=family == "gpt2"))
    input_ids = torch.randint(0, 300, (3, 11))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 7:] = 0  # a shorter last chunk, right-padded as the trainer pads
    rows, columns = attention_mask[:, :-1].nonzero(as_tuple=True)
    gold = input_ids[rows, columns + 1]
    batch = TrainBatch(torch.arange(len(rows)), rows, columns, input_ids, attention_mask, gold)

    def loss_and_gradients(loss):
        model.zero_grad(set_to_none=True)
        value = loss()
        value.backward()
        return value.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}

    def full():
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return torch.nn.functional.cross_entropy(logits[rows, columns].float(), gold)  # as memdec scores

    reference, reference_grads = loss_and_gradients(full)
    chunked, chunked_grads = loss_and_gradients(lambda: next_token_cross_entropy(model, batch, chunk=4))
    torch.testing.assert_close(chunked, reference, rtol=1e-6, atol=1e-7)
    assert chunked_grads.keys() == reference_grads.keys()
    for name, grad in reference_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
