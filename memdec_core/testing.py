"""A kit for plugin authors: fixtures and the contracts every memdec component passes.

In a plugin's test suite::

    # conftest.py
    pytest_plugins = ["memdec_core.testing"]

    # test_contracts.py
    from memdec_core.testing import MemoryModelContract, RetrieverContract

    class TestMyRetriever(RetrieverContract):
        component = "my-retriever"            # its registered name

    class TestMyMemory(MemoryModelContract):
        component = "my-memory"
        settings = {"my-memory": {"size": 8}}  # --set style settings, small for speed

The fixtures build a tiny byte-level BPE tokenizer, two tiny models of different families that
share it (GPT-2 and Llama, random weights) and a tiny finance-flavoured corpus, in-process: no
downloads. memdec's own suite runs the same contracts over every registered component.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
from pathlib import Path
from typing import Any, ClassVar

import pytest

from memdec_core.interfaces import RETRIEVER_KINDS, Costs, MethodResult, check_name

WORDS = ("the bank raised rates market shares fell investors sold bonds inflation rose "
         "quarterly earnings beat revenue growth slowed central policy tax credit loans").split()
#: Windows small enough for the tiny corpus.
TINY_CONTEXT, TINY_STRIDE = 64, 32


def synthetic_documents(n_documents: int, seed: int) -> list[str]:
    """Repetitive finance-flavoured sentences: enough structure that retrieval and memories help."""
    rng = random.Random(seed)
    phrases = [" ".join(rng.choice(WORDS) for _ in range(5)) for _ in range(12)]
    documents = []
    for _ in range(n_documents):
        sentences = [rng.choice(phrases).capitalize() + "." for _ in range(rng.randint(4, 9))]
        documents.append(" ".join(sentences))
    return documents


def save_tokenizer(folder: Path, vocab_size: int = 300) -> Path:
    """A byte-level BPE tokenizer of ``vocab_size`` tokens trained on the synthetic text, as a HF
    folder (another size is another tokenizer: a family to transfer a memory to)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(synthetic_documents(200, seed=1), trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>",
                                      bos_token="<|endoftext|>", unk_token="<|endoftext|>")
    wrapped.save_pretrained(folder)
    return folder


def tiny_config(family: str, vocab_size: int):
    """A two-block model of hidden size 32 of ``family`` (gpt2, llama, gemma3_text, qwen2, ...)."""
    from transformers import AutoConfig

    if family == "gpt2":
        return AutoConfig.for_model("gpt2", vocab_size=vocab_size, n_positions=256, n_embd=32,
                                    n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=0, eos_token_id=0)
    if family == "gemma3_text":
        return AutoConfig.for_model("gemma3_text", head_dim=16, sliding_window=64, **common)
    return AutoConfig.for_model(family, **common)


def save_tiny_model(folder: Path, tokenizer_dir: Path, family: str = "gpt2", seed: int = 0) -> Path:
    """A randomly initialised tiny model of ``family`` with the tiny tokenizer, as a HF folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, len(tokenizer)))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_corpus(folder: Path, sizes=(60, 8, 8), fmt: str = "txt") -> Path:
    """A corpus folder with train/valid/test splits of synthetic documents (.txt or .jsonl)."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, seed in zip(("train", "valid", "test"), sizes, (10, 11, 12)):
        documents = synthetic_documents(n, seed)
        if fmt == "jsonl":
            text = "".join(json.dumps({"text": doc}) + "\n" for doc in documents)
        else:
            text = "\n\n".join(documents) + "\n"
        (folder / f"{split}.{fmt}").write_text(text)
    return folder


# ----------------------------------------------------------------------------------------------
# Fixtures (prefixed memdec_ so that they never shadow a plugin's own)


@pytest.fixture(scope="session")
def memdec_tokenizer_dir(tmp_path_factory) -> Path:
    return save_tokenizer(tmp_path_factory.mktemp("memdec-tokenizer"))


@pytest.fixture(scope="session")
def memdec_tiny_gpt2(tmp_path_factory, memdec_tokenizer_dir) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("memdec-gpt2"), memdec_tokenizer_dir, "gpt2")


@pytest.fixture(scope="session")
def memdec_tiny_llama(tmp_path_factory, memdec_tokenizer_dir) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("memdec-llama"), memdec_tokenizer_dir, "llama", seed=1)


@pytest.fixture(scope="session")
def memdec_corpus_dir(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("memdec-corpus") / "tiny-finance")


@pytest.fixture(autouse=True, scope="session")
def memdec_isolated_cache(tmp_path_factory):
    """One artifact cache for the whole run, never ``~/.cache/memdec``; quiet progress bars."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MEMDEC_CACHE", os.environ.get("MEMDEC_TEST_CACHE")
                     or str(tmp_path_factory.getbasetemp() / "memdec-cache"))
        patch.setenv("MEMDEC_NO_PROGRESS", os.environ.get("MEMDEC_NO_PROGRESS", "1"))
        yield


@pytest.fixture(scope="session")
def memdec_context_factory(memdec_corpus_dir, memdec_tiny_llama):
    """``make(settings=None)``: an EvalContext of the tiny Llama on the tiny corpus with a plan."""
    from memdec_core.components.plan import Plan
    from memdec_core.inputs.context import prepare_context
    from memdec_core.interfaces import EvalSettings

    def make(settings: dict | None = None, model: Path | None = None):
        return prepare_context(str(memdec_corpus_dir), str(model or memdec_tiny_llama),
                               EvalSettings(context=TINY_CONTEXT, stride=TINY_STRIDE, batch_size=4),
                               plan=Plan(settings))

    return make


# ----------------------------------------------------------------------------------------------
# Contracts


class ComponentContract:
    """What every component promises: a valid name, a Config with valid defaults and help text."""

    kind: ClassVar[str] = ""
    #: The registered name of the component under test (or the class itself).
    component: ClassVar[Any] = None
    #: ``--set``-style settings for the run, by component name (small values keep tests fast).
    settings: ClassVar[dict[str, dict[str, Any]]] = {}

    @pytest.fixture
    def component_class(self):
        from memdec_core.components import registry

        return registry.get(self.kind, self.component) if isinstance(self.component, str) else self.component

    def make(self, component_class, ctx=None):
        from memdec_core.components.plan import Plan

        plan = ctx.plan if ctx is not None else Plan(self.settings)
        return plan.create(self.kind, component_class.name) if isinstance(self.component, str) else \
            component_class(**component_class.settings_from_text(self.settings.get(component_class.name, {})))

    def test_name_config_and_help(self, component_class):
        check_name(component_class.name)
        assert component_class.describe(), "the class needs a docstring: its first line is the listing"
        assert dataclasses.is_dataclass(component_class.Config)
        component_class.Config()  # the defaults are valid
        json.dumps(component_class.info(), default=str)
        undocumented = [key for key, text in component_class.settings_help().items() if not text]
        assert not undocumented, f"settings without help text (use memdec_core.interfaces.setting): {undocumented}"


class RetrieverContract(ComponentContract):
    """A retriever builds, reloads from its folder and returns the best items first."""

    kind = "retrievers"
    #: The recall@k against brute force a vectors retriever must reach (1.0: exact).
    min_recall: ClassVar[float] = 1.0

    @pytest.fixture
    def items(self, component_class):
        if component_class.kind == "vectors":
            import numpy as np

            return np.random.default_rng(0).normal(size=(300, 16)).astype(np.float16)
        rng = random.Random(0)  # distinct made-up words, so that each text is its own best match
        vocabulary = [f"term{number}" for number in range(400)]
        return [" ".join(rng.sample(vocabulary, 8)) for _ in range(60)]

    @pytest.fixture
    def reopened(self, component_class, items, tmp_path):
        built = self.make(component_class)
        built.build(items, tmp_path)
        again = self.make(component_class)
        again.load(items, tmp_path)  # a fresh instance: everything it needs is on disk or in the items
        return again

    def test_kind_is_declared(self, component_class):
        assert component_class.kind in RETRIEVER_KINDS

    def test_search_shapes_order_and_ids(self, component_class, items, reopened):
        import numpy as np

        queries = items[:7]
        scores, ids = reopened.search(queries, 5)
        scores, ids = np.asarray(scores), np.asarray(ids)
        assert scores.shape == ids.shape == (7, 5)
        assert ((ids >= -1) & (ids < len(items))).all()
        found = ids >= 0
        steps = np.diff(np.where(found, scores, np.nan), axis=1)
        steps = steps[~np.isnan(steps)]
        if component_class.kind == "vectors":
            assert (steps >= -1e-3).all(), "vectors: squared L2 distances, ascending"
            assert (ids[:, 0] == np.arange(7)).all(), "a stored vector is its own nearest neighbour"
        else:
            assert (steps <= 1e-6).all(), "text: relevance scores, descending"
            assert (ids[:, 0] == np.arange(7)).all(), "a stored text is its own best match"

    def test_vectors_match_brute_force(self, component_class, items, reopened):
        import numpy as np

        if component_class.kind != "vectors":
            pytest.skip("text retriever")
        keys = np.asarray(items, dtype=np.float64)
        queries = keys[:20] + np.random.default_rng(1).normal(0, 0.1, (20, keys.shape[1]))
        distances, ids = reopened.search(queries.astype(np.float32), 10)
        exact = np.argsort(((queries[:, None] - keys[None]) ** 2).sum(-1), axis=1)[:, :10]
        recall = np.mean([len(set(ids[row]) & set(exact[row])) / 10 for row in range(20)])
        assert recall >= self.min_recall
        if self.min_recall == 1.0:
            expected = ((queries[:, None] - keys[None]) ** 2).sum(-1)
            np.testing.assert_allclose(distances, np.take_along_axis(expected, ids, 1), rtol=1e-3, atol=1e-2)


class MemoryModelContract(ComponentContract):
    """A memory prepares for a base and domain, gives distributions whose gold entries agree with its
    rows, steps in generation exactly as it scores, and reports typed costs."""

    kind = "memory-models"

    @pytest.fixture
    def memory_and_context(self, component_class, memdec_context_factory):
        ctx = memdec_context_factory(self.settings)
        memory = self.make(component_class, ctx)
        memory.prepare(ctx)
        return memory, ctx

    @pytest.fixture
    def batch(self, memory_and_context):
        from memdec_core.engine.scoring import iter_scored_batches

        memory, ctx = memory_and_context
        return next(iter_scored_batches(ctx.base.model, ctx.corpus.streams["valid"], ctx.windows("valid")[:2],
                                        batch_size=2, capture_hidden=memory.needs_hidden))

    def test_tokenizer_is_the_base_s(self, memory_and_context):
        memory, ctx = memory_and_context
        assert memory.tokenizer_fingerprint == ctx.base.tokenizer_fingerprint

    def test_rows_are_distributions_and_gold_agrees(self, memory_and_context, batch):
        import torch

        memory, _ = memory_and_context
        state = memory.score(batch)
        for knobs in memory.grid()[:3]:
            rows = memory.logprobs(state, batch, knobs)
            assert rows.shape == batch.logits.shape
            torch.testing.assert_close(rows.logsumexp(-1), torch.zeros(len(rows)), atol=1e-4, rtol=0)
            gold = memory.gold_logprobs(state, batch, knobs)
            from_rows = rows.gather(1, batch.targets[:, None])[:, 0]
            assert torch.equal(torch.isfinite(gold), torch.isfinite(from_rows))
            finite = torch.isfinite(gold)
            torch.testing.assert_close(gold[finite], from_rows[finite], atol=1e-4, rtol=1e-4)

    def test_stepping_equals_scoring(self, memory_and_context):
        """The stepper's distributions equal the ones scored over the whole sequence: on a
        left-padded batch (rows of different lengths), one token at a time, and after ``select``
        swaps the rows as beam search may."""
        import torch

        from memdec_core.engine.composite import positions_from_mask
        from memdec_core.engine.scoring import iter_scored_batches
        from memdec_core.inputs.data import make_windows
        from memdec_core.inputs.models import capture_last_ffn_input

        memory, ctx = memory_and_context
        knobs = memory.grid()[0]
        sequence = ctx.corpus.streams["test"][:24]
        batch = next(iter_scored_batches(ctx.base.model, sequence, make_windows(len(sequence), 64, 32),
                                         batch_size=1, capture_hidden=memory.needs_hidden))
        expected = memory.logprobs(memory.score(batch), batch, knobs)
        tokens = torch.from_numpy(sequence.astype("int64"))
        stepper, width, padding = memory.stepper(knobs), batch.logits.shape[1], 3
        # row 0: the sequence; row 1: the sequence shifted right behind `padding` pad tokens
        ids = torch.stack([tokens[:8], torch.cat([torch.zeros(padding, dtype=torch.long), tokens[:8 - padding]])])
        mask = torch.tensor([[1] * 8, [0] * padding + [1] * (8 - padding)])

        def hidden_at_end(ids, mask, keep):
            if not memory.needs_hidden:
                return None
            with capture_last_ffn_input(ctx.base.model) as captured, torch.inference_mode():
                ctx.base.model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask))
            return captured["hidden"][:, -keep:]

        def check(got, lengths):
            for row, length in enumerate(lengths):
                kept = got.shape[1]
                torch.testing.assert_close(got[row], expected[length - kept:length], atol=1e-4, rtol=1e-4)

        got = stepper.logprobs(ids, mask, hidden_at_end(ids, mask, 8 - padding), width, 8 - padding)
        assert got.shape == (2, 8 - padding, width)
        check(got, [8, 8 - padding])
        for _ in range(6):
            lengths = [int(mask[row].sum()) for row in range(2)]
            ids = torch.cat([ids, tokens[lengths][:, None]], 1)
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
            check(stepper.logprobs(ids[:, -1:], mask, hidden_at_end(ids, mask, 1), width, 1), [n + 1 for n in lengths])
        stepper.select(torch.tensor([1, 1]))  # both rows now continue the shorter one, as beam search may
        length = int(mask[1].sum())
        ids = torch.cat([ids[[1, 1]], tokens[[length, length]][:, None]], 1)
        mask = torch.cat([mask[[1, 1]], torch.ones(2, 1, dtype=torch.long)], 1)
        check(stepper.logprobs(ids[:, -1:], mask, hidden_at_end(ids, mask, 1), width, 1), [length + 1] * 2)

    def test_costs_are_typed(self, memory_and_context):
        memory, _ = memory_and_context
        costs = memory.costs()
        assert isinstance(costs, Costs)
        assert all(getattr(costs, item.name) >= 0 for item in dataclasses.fields(costs))

    def test_mixture_evaluates_it(self, memory_and_context):
        from memdec_core.engine.mixture import Mixture

        memory, ctx = memory_and_context
        result = Mixture(memory=memory.name).evaluate(ctx)
        assert math.isfinite(result.test_ppl) and result.test_ppl > 1 and result.tuning


class CombinerContract(ComponentContract):
    """A combiner's every grid point mixes two distributions into a distribution; one that claims
    ``elementwise`` gives the same gold entries from gathered columns as from whole rows. One that
    learns (``learns = True``) is first fitted on validation positions: its fit reports a finite
    held-out NLL, is the same bits for the same seed, and survives ``state_dict`` /
    ``load_state_dict``."""

    kind = "combiners"

    def test_every_grid_point_gives_a_distribution(self, component_class):
        import torch

        generator = torch.Generator().manual_seed(0)
        base = torch.log_softmax(torch.randn(6, 40, generator=generator), -1)
        memory = torch.randn(6, 40, generator=generator)
        memory[:, :5] = float("-inf")  # a memory may give tokens no mass (a kNN-LM, a restricted vocabulary)
        memory = torch.log_softmax(memory, -1)
        gold = torch.arange(6)[:, None] * 7 % 40
        for config in component_class.grid():
            combiner = self.fitted(component_class, config)
            context = self.context(combiner, base, memory, "valid")
            mixed = combiner.combine(base, memory, context)
            assert mixed.shape == base.shape and not torch.isnan(mixed).any()
            torch.testing.assert_close(mixed.logsumexp(-1), torch.zeros(6), atol=1e-4, rtol=0)
            if component_class.elementwise:
                columns = combiner.combine(base.gather(1, gold), memory.gather(1, gold), {**context, "positions": None})
                torch.testing.assert_close(columns, mixed.gather(1, gold), atol=1e-5, rtol=1e-5)

    def test_a_learning_combiner_fits_the_same_bits_and_reloads(self, component_class):
        if not component_class.learns:
            return
        import torch

        first, second = self.fitted(component_class), self.fitted(component_class)
        state = first.state_dict()
        assert state and all(torch.equal(state[name], second.state_dict()[name]) for name in state)
        reloaded = component_class(first.config)
        reloaded.load_state_dict(state)
        base = torch.log_softmax(torch.randn(5, 30), -1)
        memory = torch.log_softmax(torch.randn(5, 30), -1)
        context = self.context(first, base, memory, "test")
        torch.testing.assert_close(reloaded.combine(base, memory, context), first.combine(base, memory, context))

    @staticmethod
    def fit_data(seed: int = 0):
        """Validation positions where the memory is right where the base is unsure: a combiner that
        learns has something to find (``features`` as ``memdec_core.engine.features`` computes them)."""
        import torch

        from memdec_core.engine.features import GENERIC_FEATURES
        from memdec_core.interfaces import FitData

        generator = torch.Generator().manual_seed(1234)
        count = 1200
        features = torch.randn(count, len(GENERIC_FEATURES), generator=generator)
        unsure = features[:, 0] > 0
        base_gold = torch.where(unsure, -4.0, -1.0) + 0.1 * torch.randn(count, generator=generator)
        memory_gold = torch.where(unsure, -0.5, -6.0) + 0.1 * torch.randn(count, generator=generator)
        positions = torch.arange(count)
        return FitData(features, GENERIC_FEATURES, base_gold, memory_gold, positions, (positions // 100) % 5 != 4, seed)

    def fitted(self, component_class, config=None):
        """``component_class(config)``, fitted on ``fit_data()`` when it learns."""
        import math

        combiner = component_class(config)
        if component_class.learns:
            facts = combiner.fit(self.fit_data())
            assert math.isfinite(facts["heldout_nll"]), "fit() must report a finite heldout_nll"
        return combiner

    @staticmethod
    def context(combiner, base, memory, split: str) -> dict:
        """What the engine gives ``combine``: positions and split, and features for one that learns."""
        import torch

        from memdec_core.engine.features import GENERIC_FEATURES, token_features

        context = {"positions": torch.arange(len(base)), "split": split}
        if combiner.learns:
            context.update(features=token_features(base, memory), feature_names=GENERIC_FEATURES)
        return context


class MethodContract(ComponentContract):
    """A method evaluates the tiny domain: a finite perplexity, typed costs, a scorer for other text,
    a generator and a loglikelihood of the right shapes."""

    kind = "methods"

    def test_evaluates_with_typed_costs(self, component_class, memdec_context_factory):
        ctx = memdec_context_factory(self.settings)
        method = self.make(component_class, ctx)
        from memdec_core.runs.prepare import methods_for_base

        method = methods_for_base(ctx, [method])[0]
        result = method.evaluate(ctx)
        assert isinstance(result, MethodResult) and isinstance(result.costs, Costs)
        assert math.isfinite(result.test_ppl) and result.test_ppl > 1
        json.dumps({"knobs": result.knobs, "tuning": result.tuning, "details": result.details}, default=str)
        assert all(getattr(result.costs, item.name) >= 0 for item in dataclasses.fields(result.costs))
        if result.scorer is not None:
            stream = ctx.corpus.streams["test"][:100]
            from memdec_core.inputs.data import make_windows

            assert math.isfinite(result.score(stream, make_windows(len(stream), ctx.context, ctx.stride)).perplexity)
        if result.generator is not None:  # compare times it for the generation latency column
            import torch

            prompt = torch.from_numpy(ctx.corpus.streams["test"][:8].astype("int64"))[None]
            generated = result.generator(prompt, 4)
            assert tuple(generated.shape) == (1, 4)
        if result.loglikelihood is not None:  # memdec tasks and lm-eval read it
            tokens = [int(token) for token in ctx.corpus.streams["test"][:12]]
            requests = [(tokens[:8], tokens[8:10]), (tokens[:8], tokens[8:9]), ([], tokens[:3])]
            values = result.loglikelihood(requests)
            assert len(values) == 3 and all(math.isfinite(value) and value <= 0 for value in values)
            assert values[0] <= values[1] + 1e-6  # a longer continuation is no likelier than its prefix


class DomainContract(ComponentContract):
    """A domain gives the same non-empty documents for every split, every time."""

    kind = "domains"

    def test_splits_are_non_empty_and_deterministic(self, component_class):
        from memdec_core.interfaces import SPLITS

        domain = self.make(component_class)
        for split in SPLITS:
            documents = domain.documents(split)
            assert documents and all(isinstance(text, str) and text.strip() for text in documents)
            assert domain.documents(split) == documents


__all__ = ["ComponentContract", "RetrieverContract", "MemoryModelContract", "CombinerContract", "MethodContract",
           "DomainContract", "synthetic_documents", "save_tokenizer", "save_tiny_model", "write_corpus",
           "tiny_config", "TINY_CONTEXT", "TINY_STRIDE"]
