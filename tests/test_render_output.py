"""``memdec compare`` output for papers: tables that never cut a cell, the latency, generation and
memory-fidelity columns, the protocol line, and a figure saved as vector or print-resolution raster."""

import csv
import io

import pytest

from memdec_cli.render import print_comparison, print_table

LONG_KNOB = "temperature_schedule_for_the_whole_grid_search=cosine-from-3.0-to-0.25"


def row(base, method, test_ppl, **extra) -> dict:
    """A result row as ``compare`` writes it, with the keys old reports lack added only when given."""
    return {"base": base, "method": method, "test_ppl": test_ppl, "valid_ppl": None, "general_ppl": 50.0,
            "knobs": {}, "params_added": 0, "bytes_added": 0, "train_seconds": 0.0, "latency_ratio": None,
            "seconds": 1.0, "tuning": [], "details": {}, **extra}


def lam_curve(chosen: float) -> list[dict]:
    return [{"lam": lam, "valid_ppl": 100 + 40 * (lam - chosen) ** 2} for lam in (0.1, 0.3, 0.5, 0.7, 0.9)]


@pytest.fixture
def report() -> dict:
    return {"domain": "finance", "meta": {"protocol": "equal-flops", "measure": {}}, "results": [
        row("org/model-s", "base", 94.1, latency_ratio=1.0, latency_spread=0.03, generation_ratio=1.0),
        row("org/model-s", "knn-lm", 93.2, knobs={"note": LONG_KNOB, "lam": 0.3}, latency_ratio=3.5,
            memory_alone_ppl=191.5, memory_coverage=0.75, tuning=lam_curve(0.3)),
        row("org/model-s", "memdec", 92.7, knobs={"lam": 0.5}, latency_ratio=1.38, latency_spread=0.03,
            generation_ratio=1.21, memory_alone_ppl=120.5, target_agreement=0.632, target_kl=1.234,
            tuning=lam_curve(0.5), details={"teacher": "org/model-l", "init": "org/model-xs"}),
        row("org/model-m", "base", 90.0),  # as an old report has it: no latency, no fidelity
        row("org/model-m", "lora", 91.5, knobs={"lr": 0.002, "rank": 8}),
    ]}


@pytest.fixture
def piped(monkeypatch, capsys):
    """stdout captured (not a terminal) and no $COLUMNS: what ``memdec compare > out.txt`` sees."""
    monkeypatch.delenv("COLUMNS", raising=False)

    def output(report, output_format="table") -> str:
        print_comparison(report, output_format)
        return capsys.readouterr().out

    return output


def line_of(text: str, *cells: str) -> str:
    return next(line for line in text.splitlines() if all(cell in line for cell in cells))


def markdown_rows(text: str, header_start: str) -> list[dict]:
    lines = text.splitlines()
    start = next(index for index, line in enumerate(lines) if line.startswith(header_start))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append([cell.strip() for cell in line.strip("|").split("|")])
    return [dict(zip(table[0], cells)) for cells in table[2:]]


def test_a_piped_table_keeps_every_cell_whole(report, piped):
    text = piped(report)
    assert f"note={LONG_KNOB}" in text and "…" not in text
    assert "org/model-s" in text and "KL(p_kNN‖p_mem)" in text


def test_a_narrow_columns_folds_cells_rather_than_cutting_them(report, piped, monkeypatch):
    monkeypatch.setenv("COLUMNS", "60")
    text = piped(report)
    assert "…" not in text
    assert max(len(line) for line in text.splitlines() if "│" in line) <= 60
    folded = "".join(line.split("│")[5].strip() for line in text.splitlines() if line.count("│") > 5)
    assert LONG_KNOB in folded  # every character is there, over several lines


def test_print_table_is_not_cut_at_80_columns_in_a_pipe(capsys, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    print_table("Plugins", ["name", "description"], [["knn", "x" * 150]])
    text = capsys.readouterr().out
    assert "x" * 150 in text and "…" not in text


def test_the_new_columns_and_dashes_for_missing_figures(report, piped):
    text = piped(report)
    assert "1.38 ±3%" in line_of(text, "memdec", "92.700") and "1.21" in line_of(text, "memdec", "92.700")
    assert "1.00 ±3%" in line_of(text, "org/model-s", "base")
    old = line_of(text, "base", "90.000").split("│")
    assert [cell.strip() for cell in old[-3:-1]] == ["-", "-"]  # latency ×, gen ×
    fidelity = line_of(text, "memdec", "120.500")
    assert "63.2%" in fidelity and "1.234" in fidelity
    assert "memory fidelity" in text and "top-1 agreement" in text
    assert "191.500 (75% of tokens)" in line_of(text, "knn-lm", "191.500")  # a kNN-LM alone names 75 %


def test_a_knob_at_the_edge_of_its_grid_is_noted_under_the_table(report, piped):
    note = "temperature=30000 was the top of its grid; also tried 90000, 270000, 810000: best now temperature=90000"
    report["results"][1]["details"] = {"grid_edges": [note]}
    assert f"grid edge: knn-lm on org/model-s: {note}" in piped(report)


def test_no_fidelity_table_for_a_report_without_memories(report, piped):
    report["results"] = [r for r in report["results"] if r["method"] not in ("memdec", "knn-lm")]
    text = piped(report)
    assert "memory fidelity" not in text and "120.500" not in text


@pytest.mark.parametrize("protocol, expected", [
    ("equal-flops", "every method that trains gets the Memory Decoder's FLOPs (the paper's protocol)"),
    ("tokens", "the same 24,576 training tokens"),
    ("own-schedule", "each method's own schedule"),
])
def test_the_protocol_line(report, piped, protocol, expected):
    report["meta"] = {"protocol": protocol, "measure": {"budget_tokens": 24576}}
    text = piped(report)
    assert expected in line_of(text, "training compute:")
    assert "teacher org/model-l" in text and "initialised from org/model-xs" in text


def test_an_old_report_has_no_protocol_line(report, piped):
    report["meta"] = {}
    assert "training compute" not in piped(report)


def test_markdown_has_the_new_columns(report, piped):
    text = piped(report, "markdown")
    main = {(r["base"], r["method"]): r for r in markdown_rows(text, "| base | method | test ppl")}
    assert main["org/model-s", "memdec"]["latency ×"] == "1.38 ±3%"
    assert main["org/model-s", "memdec"]["gen ×"] == "1.21"
    assert main["org/model-m", "base"]["latency ×"] == main["org/model-m", "base"]["gen ×"] == "-"
    assert text.count("**") == 4  # the best cell of each base, and nothing else in bold
    fidelity = markdown_rows(text, "| base | method | memory alone")
    assert [(r["method"], r["top-1 agreement with kNN targets ↑"]) for r in fidelity] == [("knn-lm", "-"),
                                                                                      ("memdec", "63.2%")]
    assert "training compute: every method that trains" in text


def test_csv_has_the_new_columns_raw(report, piped):
    rows = list(csv.DictReader(io.StringIO(piped(report, "csv"))))
    memdec = next(r for r in rows if r["method"] == "memdec")
    assert (memdec["latency_spread"], memdec["generation_ratio"], memdec["target_agreement"]) == ("0.03", "1.21",
                                                                                                 "0.632")
    old = next(r for r in rows if r["base"] == "org/model-m" and r["method"] == "base")
    assert old["latency_ratio"] == old["memory_alone_ppl"] == old["target_kl"] == ""
    assert "training compute" not in "".join(r["base"] for r in rows)  # csv stays rows only


@pytest.mark.parametrize("suffix, magic", [(".svg", b"<?xml"), (".pdf", b"%PDF-"), (".png", b"\x89PNG")])
def test_the_plot_is_saved_in_the_format_of_its_name(report, tmp_path, suffix, magic):
    pytest.importorskip("matplotlib")
    from memdec_cli.plot import plot_comparison

    path = tmp_path / f"figure{suffix}"
    plot_comparison(report, path)
    assert path.read_bytes()[:len(magic)] == magic
    if suffix == ".svg":
        assert b"<svg" in path.read_bytes()[:2000]
    assert [file.name for file in tmp_path.iterdir()] == [path.name]  # no temporary file left


def test_the_bars_axis_shows_the_differences(report):
    pytest.importorskip("matplotlib")
    from memdec_cli.plot import comparison_figure

    figure = comparison_figure(report)
    bars, curves = figure.axes[:2]
    lower, upper = bars.get_ylim()
    assert 0 < lower < 90.0 and upper > 94.1  # all values near 90: the axis starts just under the smallest
    assert "not 0" in bars.get_ylabel()
    assert {text.get_text() for text in bars.texts} >= {"94.1", "92.7", "90.0"}  # values on the bars
    base_lines = [c for c in bars.collections if c.get_label() == "base model (reference)"]
    assert len(base_lines) == 1 and len(base_lines[0].get_segments()) == 2  # one per base group
    stars = [line for line in curves.lines if line.get_marker() == "*" and len(line.get_xdata())]
    assert sorted(line.get_xdata()[0] for line in stars) == [0.3, 0.5]  # each mixture's chosen λ
    assert curves.get_xlabel() == "λ"


def test_bits_per_byte_leads_the_table_when_the_bases_have_different_tokenizers(report, piped):
    report["results"][0]["test_bpb"], report["results"][3]["test_bpb"] = 1.2345, 1.111
    same = markdown_rows(piped(report, "markdown"), "| base")
    assert "test bits/byte ↓" not in same[0]  # one tokenizer: perplexities compare, the table is as before
    report["meta"]["contexts"] = {"org/model-s": {"tokenizer": "aaaa"}, "org/model-m": {"tokenizer": "bbbb"}}
    mixed = markdown_rows(piped(report, "markdown"), "| base")
    assert list(mixed[0])[2] == "test bits/byte ↓"
    assert mixed[0]["test bits/byte ↓"].strip("*") == "1.2345"
    assert mixed[3]["test bits/byte ↓"].strip("*") == "1.1110" and mixed[1]["test bits/byte ↓"] == "-"
    assert "1.2345" in piped(report)  # the terminal table too
