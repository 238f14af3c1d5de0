"""Only the asked-for work runs (issue 32): fixed knobs score no validation, fidelity is measured
once per memory and teacher datastore (or skipped), one index per datastore and settings, a
datastore without its index, and every report says where its seconds went."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import SMALL_WINDOWS, invoke

from memdec_core import api as core_api
from memdec_core.interfaces import EvalSettings
from memdec_core.store.cache_dir import cache_folder

WINDOW = EvalSettings(**SMALL_WINDOWS)
KNN = {"k": 16}


@pytest.fixture
def scored_streams(monkeypatch):
    """Every stream the engine ran a model over, with the number of windows: what ran, observed."""
    from memdec_core.engine import scoring

    seen: list[tuple[bytes, int]] = []
    original = scoring._score_windows

    def observed(model, stream, windows, *args):
        seen.append((stream.tobytes(), len(windows)))
        return original(model, stream, windows, *args)

    monkeypatch.setattr(scoring, "_score_windows", observed)
    return seen


def _valid_windows(seen, corpus_dir, base) -> int:
    """Windows of ``seen`` that are the validation split's, as ``base`` tokenises it."""
    valid = core_api.prepare_context(str(corpus_dir), str(base), WINDOW).corpus.streams["valid"].tobytes()
    return sum(count for stream, count in seen if stream == valid)


def test_with_every_knob_fixed_no_validation_window_is_scored(corpus_dir, tiny_gpt2, scored_streams):
    """λ given and one temperature: nothing to tune, so the validation pass (pure cost) is not run,
    and the row says its knobs were given; with a grid, validation is scored as before."""
    fixed = core_api.evaluate(str(corpus_dir), [str(tiny_gpt2)], ["knn-lm"], settings=WINDOW,
                              component_settings={"knn-lm": {**KNN, "temperatures": 10}, "linear": {"lam": 0.25}})
    row = fixed["results"][0]
    assert _valid_windows(scored_streams, corpus_dir, tiny_gpt2) == 0
    assert row["knobs"] == {"temperature": 10.0, "lam": 0.25} and row["details"]["knobs_from"] == "given"
    assert row["valid_ppl"] is None and row["tuning"] == [] and row["test_ppl"] > 1
    from memdec_cli.render import evaluation_rows

    assert evaluation_rows(fixed)[0][5] == "temperature=10 lam=0.25 (given)"  # the table says so too

    scored_streams.clear()
    tuned = core_api.evaluate(str(corpus_dir), [str(tiny_gpt2)], ["knn-lm"], settings=WINDOW,
                              component_settings={"knn-lm": {**KNN, "temperatures": 10}})["results"][0]
    assert _valid_windows(scored_streams, corpus_dir, tiny_gpt2) > 0
    assert tuned["details"]["knobs_from"] == "validation" and tuned["valid_ppl"] > 1
    # The same knobs give the same test number whether given or chosen.
    if tuned["knobs"] == row["knobs"]:
        assert tuned["test_ppl"] == row["test_ppl"]


def test_fidelity_is_measured_once_for_two_bases(corpus_dir, tiny_gpt2, tiny_llama, trained_memory, monkeypatch):
    """One memory, one teacher datastore: the second base reads the figures the first measured."""
    from memdec_decoder import fidelity

    shutil.rmtree(cache_folder("fidelity"), ignore_errors=True)
    measured, measure = [], fidelity._measure
    monkeypatch.setattr(fidelity, "_measure", lambda *args: measured.append(1) or measure(*args))
    rows = core_api.evaluate(str(corpus_dir), [str(tiny_gpt2), str(tiny_llama)], ["memdec"], settings=WINDOW,
                             component_settings={"memdec": {"path": str(trained_memory)}})["results"]
    assert len(measured) == 1 and len(list(cache_folder("fidelity").glob("*.json"))) == 1
    assert rows[0]["memory"]["target_agreement"] == rows[1]["memory"]["target_agreement"] is not None


def test_fidelity_can_be_skipped(corpus_dir, tiny_gpt2, trained_memory, monkeypatch):
    """``memdec.fidelity=false``: no teacher loaded, no teacher datastore opened, no figures."""
    from memdec_decoder import fidelity

    def refuse(*args, **kwargs):
        raise AssertionError("fidelity was measured")

    monkeypatch.setattr(fidelity, "target_fidelity", refuse)
    row = core_api.evaluate(str(corpus_dir), [str(tiny_gpt2)], ["memdec"], settings=WINDOW,
                            component_settings={"memdec": {"path": str(trained_memory),
                                                           "fidelity": "false"}})["results"][0]
    assert "target_agreement" not in row["memory"] and row["memory"]["memory_alone_ppl"] > 1


@pytest.mark.parametrize("first, second", [("Flat", "auto"), ("auto", "Flat")])
def test_one_index_for_a_datastore_whatever_the_factory_is_called(corpus_dir, tiny_llama, monkeypatch, first,
                                                                    second):
    """``factory=auto`` is ``Flat`` for a small store: the second spelling opens the index the
    first built (it used to build an identical second one)."""
    from memdec_knn import api as knn
    from memdec_knn import datastore

    shutil.rmtree(cache_folder("datastores"), ignore_errors=True)
    built, build = [], datastore._build_index
    monkeypatch.setattr(datastore, "_build_index", lambda store, retriever, folder: built.append(folder)
                        or build(store, retriever, folder))
    folder = knn.build_datastore(str(corpus_dir), str(tiny_llama), settings=WINDOW,
                                 component_settings={"faiss": {"factory": first}})
    row = core_api.evaluate(str(corpus_dir), [str(tiny_llama)], ["knn-lm"], settings=WINDOW,
                            component_settings={"knn-lm": KNN, "faiss": {"factory": second}})["results"][0]
    assert len(built) == 1 and row["details"]["datastore"] == folder
    assert [path.name for path in (cache_folder("datastores") / folder.rsplit("/", 1)[1] / "indexes").iterdir()] \
        == [built[0].name]


def test_a_datastore_built_without_its_index_has_the_same_keys_and_is_indexed_on_first_search(
        corpus_dir, tiny_llama, tmp_path):
    from memdec_knn.datastore import open_datastore
    from memdec_knn.index import FaissRetriever

    bare, indexed = tmp_path / "bare", tmp_path / "indexed"
    for folder, flags in ((bare, ["--no-index"]), (indexed, [])):
        result = invoke("datastore", "build", "--domain", corpus_dir, "--base", tiny_llama, "--context", 64,
                        "--stride", 32, "--batch-size", 4, "--output", folder, *flags)
        assert result.exit_code == 0, result.output
    assert not (bare / "indexes").exists() and len(list((indexed / "indexes").iterdir())) == 1
    for name in ("keys.npy", "vals.npy"):
        assert (bare / name).read_bytes() == (indexed / name).read_bytes()
    store = open_datastore(bare).with_index(FaissRetriever())  # on demand
    assert (store.index_folder / "memdec.json").is_file()
    distances, ids = store.search(np.asarray(store.keys[:3], dtype=np.float32), 1)
    assert list(ids[:, 0]) == [0, 1, 2]


def test_indexing_a_stored_datastore_reads_no_weights(corpus_dir, tiny_llama, monkeypatch):
    """``datastore build`` of keys already in the cache builds their index without the base's weights;
    the keys themselves are computed with them, by a base loaded on first use."""
    from memdec_core.inputs import models
    from memdec_knn.api import build_datastore

    shutil.rmtree(cache_folder("datastores"), ignore_errors=True)
    loads = []
    original = models._from_pretrained
    monkeypatch.setattr(models, "_from_pretrained", lambda *args, **kw: loads.append(args[0]) or original(*args, **kw))
    build_datastore(str(corpus_dir), str(tiny_llama), settings=WINDOW, index=False)
    assert len(loads) == 1  # the keys needed the model
    folder = build_datastore(str(corpus_dir), str(tiny_llama), settings=WINDOW)
    assert len(loads) == 1 and len(list((cache_folder("datastores") / folder.rsplit("/", 1)[1] / "indexes")
                                        .iterdir())) == 1


def test_a_lazily_loaded_base_is_the_loaded_one(tiny_llama, tiny_gpt2):
    from memdec_core.inputs.models import load_model

    for name in (tiny_llama, tiny_gpt2):
        lazy, eager = load_model(str(name), lazy=True), load_model(str(name))
        assert lazy._model is None and lazy.max_positions == eager.max_positions  # from config.json, unloaded
        assert (lazy.fingerprint, lazy.tokenizer_fingerprint) == (eager.fingerprint, eager.tokenizer_fingerprint)
        assert lazy.vocab_size == eager.vocab_size and lazy._model is not None  # loaded on first use
        assert all(a.equal(b) for a, b in zip(lazy.model.state_dict().values(), eager.model.state_dict().values()))


def test_every_report_says_where_its_seconds_went(corpus_dir, tiny_gpt2):
    """``meta.timings`` for the run, ``timings`` per row: seconds per stage, stages nested counted once."""
    shutil.rmtree(cache_folder("datastores"), ignore_errors=True)
    report = core_api.evaluate(str(corpus_dir), [str(tiny_gpt2)], ["base", "knn-lm"], settings=WINDOW,
                               component_settings={"knn-lm": KNN})
    timings = report["meta"]["timings"]
    assert {"load", "tokenise", "datastore", "index", "tune", "test", "other"} <= set(timings)
    assert all(value >= 0 for value in timings.values())
    knn_row = report["results"][1]
    assert {"datastore", "index", "tune", "test"} <= set(knn_row["timings"])
    assert sum(knn_row["timings"].values()) == pytest.approx(knn_row["seconds"], abs=0.1)
    assert sum(row["timings"]["test"] for row in report["results"]) <= timings["test"] + 0.02


def test_a_datastore_pass_ends_at_the_keys_and_stores_the_full_passs_hidden_states(corpus_dir, tiny_llama, tmp_path):
    """The keys are the last MLP's input: the pass stops there (that MLP never runs), and the keys
    are those of a full pass, bit for bit."""
    import torch

    from memdec_core.engine.scoring import iter_scored_batches
    from memdec_core.inputs.data import make_windows
    from memdec_core.inputs.models import last_block_mlp
    from memdec_knn.datastore import build_datastore

    ctx = core_api.prepare_context(str(corpus_dir), str(tiny_llama), WINDOW)
    stream = ctx.corpus.streams["train"][:300]
    calls = []
    handle = last_block_mlp(ctx.base.model).register_forward_hook(lambda *args: calls.append(1))
    try:
        store = build_datastore(ctx.base, stream, tmp_path / "store", context=64, stride=32, batch_size=4,
                                data_hash="test")
        assert calls == []
        full = torch.cat([batch.hidden for batch in iter_scored_batches(
            ctx.base.model, stream, make_windows(len(stream), 64, 32), batch_size=4, capture_hidden=True)])
        assert calls  # the full pass does run it
    finally:
        handle.remove()
    assert np.array_equal(np.asarray(store.keys), full.numpy().astype(np.float16))


@pytest.mark.parametrize("bad, word", [(float("nan"), "NaN"), (float("inf"), "−inf"), (float("-inf"), "−inf")])
def test_non_finite_logits_are_still_refused_and_huge_finite_ones_are_not(bad, word):
    """The one-reduction check of the base's logits: a NaN or an infinity is still found; finite
    values whose sum overflows fall through to the full scan and pass."""
    import torch

    from memdec_core.engine.scoring import _check_finite
    from memdec_core.errors import ResultError

    _check_finite(torch.full((4, 8), 3e38), "the base", "test")  # the sum overflows; every value is finite
    values = torch.zeros(4, 8)
    values[2, 5] = bad
    with pytest.raises(ResultError, match=word):
        _check_finite(values, "the base", "test")


def test_the_reported_package_versions_import_none_of_the_packages():
    """``meta.versions`` names peft, faiss and bm25s from their installed metadata: a run that does not
    use them does not import them to ask (peft alone took 0.2 s)."""
    import subprocess
    import sys

    code = ("import sys; from memdec_core.runs.meta import versions; found = versions(); "
            "print([n for n in ('peft', 'faiss', 'bm25s') if n in sys.modules], found['peft'], found['faiss'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    import faiss
    import peft

    assert out == ["[]", peft.__version__, faiss.__version__]


def test_the_validation_pass_is_timed_as_tune(corpus_dir, tiny_gpt2, monkeypatch):
    """The seconds of scoring the knob grid on validation land in ``tune`` (a timer on the grid's
    construction alone reported 0.0 for a pass of minutes)."""
    import time

    from memdec_core.engine import scoring

    real = scoring._score_mixture

    def slow(*args, **kwargs):
        time.sleep(0.3)
        return real(*args, **kwargs)

    monkeypatch.setattr(scoring, "_score_mixture", slow)
    report = core_api.evaluate(str(corpus_dir), [str(tiny_gpt2)], ["knn-lm"], settings=WINDOW,
                               component_settings={"knn-lm": KNN})
    assert report["results"][0]["timings"]["tune"] >= 0.3


def test_a_local_tokenizer_is_loaded_on_first_use_with_the_facts_it_would_give(tiny_llama, tiny_gpt2):
    """The second load of a folder names its tokenizer from remembered facts without loading it;
    those facts are the loaded tokenizer's, and the tokenizer it loads on first use is the same."""
    from memdec_core.inputs.data import tokenization_key
    from memdec_core.inputs.models import TokenizerFacts, load_model

    for name in (tiny_llama, tiny_gpt2):
        load_model(str(name), lazy=True)  # remembers the facts (if no earlier test did)
        base = load_model(str(name), lazy=True)
        assert base._tokenizer is None
        remembered = (base.tokenizer_fingerprint, base.tokenization_key)
        tokenizer = base.tokenizer  # loaded now
        assert base._tokenizer is not None and TokenizerFacts.of(tokenizer).fingerprint == remembered[0]
        assert remembered == (TokenizerFacts.of(tokenizer).fingerprint, tokenization_key(tokenizer))
        eager = load_model(str(name))
        assert eager.tokenizer(["a test"])["input_ids"] == tokenizer(["a test"])["input_ids"]


def test_the_remembered_facts_follow_the_tokenizer_files(tiny_gpt2, tmp_path):
    """Facts are remembered by the folder's contents: a changed tokenizer is loaded again, and a
    damaged memo is recomputed, never trusted."""
    import json

    from memdec_core.inputs.models import TokenizerFacts, load_model, load_tokenizer
    from memdec_core.store.memo import memo_path

    folder = tmp_path / "model"
    shutil.copytree(tiny_gpt2, folder)
    before = load_model(str(folder), lazy=True)
    definition = json.loads((folder / "tokenizer.json").read_text())
    definition["added_tokens"].append({"id": max(load_tokenizer(str(folder)).get_vocab().values()) + 1,
                                       "content": "<added>", "single_word": False, "lstrip": False,
                                       "rstrip": False, "normalized": False, "special": True})
    (folder / "tokenizer.json").write_text(json.dumps(definition))
    after = load_model(str(folder), lazy=True)
    assert after._tokenizer is not None  # not remembered: loaded to learn its facts
    assert after.tokenizer_fingerprint != before.tokenizer_fingerprint
    assert after.tokenization_key != before.tokenization_key
    memos = sorted(memo_path("x").parent.glob("tokenizer-*.json"), key=lambda path: path.stat().st_mtime)
    memos[-1].write_text("{not json")  # the newest: this folder's
    again = load_model(str(folder), lazy=True)
    assert again._tokenizer is not None and again.tokenizer_fingerprint == after.tokenizer_fingerprint
    assert TokenizerFacts(**json.loads(memos[-1].read_text())) == TokenizerFacts.of(again.tokenizer)


def test_a_run_whose_token_streams_are_cached_never_loads_the_tokenizer(corpus_dir, tiny_gpt2, monkeypatch):
    """Streams, fingerprints and bits per byte come from the cache on the second run: its numbers
    are the first run's, and transformers' tokenizer was never loaded."""
    from memdec_core.inputs import models

    knobs = {"knn-lm": {**KNN, "temperatures": 10}, "linear": {"lam": 0.3}}
    first = core_api.evaluate(str(corpus_dir), [str(tiny_gpt2)], ["knn-lm"], settings=WINDOW,
                              component_settings=knobs)
    loads = []
    original = models._tokenizer
    monkeypatch.setattr(models, "_tokenizer", lambda *args: loads.append(args) or original(*args))
    second = core_api.evaluate(str(corpus_dir), [str(tiny_gpt2)], ["knn-lm"], settings=WINDOW,
                               component_settings=knobs)
    assert loads == []
    row, again = first["results"][0], second["results"][0]
    assert (again["test_ppl"], again["test_bpb"]) == (row["test_ppl"], row["test_bpb"]) and row["test_bpb"] > 0


def test_the_bytes_of_a_stream_are_remembered_as_decoded(tiny_gpt2):
    from memdec_core.engine.scoring import scored_bytes
    from memdec_core.inputs.data import TokenizerRef
    from memdec_core.inputs.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_gpt2))
    stream = np.asarray(tokenizer("Prices rose by 4 % in the quarter, and then fell.")["input_ids"], dtype=np.int32)
    text = tokenizer.decode(stream[1:].tolist(), skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert scored_bytes(tokenizer, stream) == len(text.encode("utf-8"))
    never = TokenizerRef(TokenizerRef.of(tokenizer).key, lambda: pytest.fail("the tokenizer was loaded"))
    assert scored_bytes(never, stream) == len(text.encode("utf-8"))  # remembered


def test_indexing_stored_keys_imports_neither_torch_nor_transformers(corpus_dir, tiny_llama):
    """``memdec datastore build`` of keys in the cache: faiss and numpy only (torch alone is 1.2 s)."""
    import os
    import subprocess
    import sys

    args = ["datastore", "build", "--domain", str(corpus_dir), "--base", str(tiny_llama),
            "--context", str(SMALL_WINDOWS["context"]), "--stride", str(SMALL_WINDOWS["stride"])]
    assert invoke(*args, "--no-index").exit_code == 0
    probe = ("import sys; from memdec_cli.main import main\n"
             "try:\n    main(sys.argv[1:])\nexcept SystemExit as stop:\n    code = stop.code\n"
             "print('HEAVY', [m for m in ('torch', 'transformers') if m in sys.modules], code, file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", probe, *args, "--set", "faiss.factory=Flat"], capture_output=True,
                            text=True, timeout=300, env=os.environ)
    assert "HEAVY [] 0" in result.stderr, result.stderr
