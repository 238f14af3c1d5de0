"""``memdec compare --plot``: a paper-ready figure of the test perplexity per method per base (bars on an
axis that shows the differences, the base as a reference line), each mixture's validation curve, and,
where a combiner learned its weight, that weight against the base's entropy per test position."""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

from memdec_core.errors import ConfigError

#: Okabe & Ito's colour-blind-safe palette (yellow last: it is faint on white); the base method is grey.
OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000", "#F0E442"]
BASE_COLOUR = "#999999"
BASE_METHOD = "base"
#: Line styles and markers that tell the bases apart on the curves (the colour is the method's).
BASE_STYLES = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D")]
#: Fonts embedded as TrueType in a PDF (publishers reject Type 3) and kept as text in an SVG (editable).
PAPER_STYLE = {"pdf.fonttype": 42, "ps.fonttype": 42, "svg.fonttype": "none", "font.size": 9,
               "axes.titlesize": 10, "axes.spines.top": False, "axes.spines.right": False}
VECTOR_SUFFIXES = {".pdf", ".svg", ".eps", ".ps"}
RASTER_DPI = 300
#: Space left under the smallest bar and over the largest, as a fraction of their difference.
BAR_MARGIN_BELOW, BAR_MARGIN_ABOVE = 0.25, 0.35


def check_plotting() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError("--plot needs matplotlib: pip install 'memdec[plot]' (or pip install matplotlib)") from None


def check_plot_path(path: Path) -> None:
    """ConfigError unless matplotlib can write ``path``: a format it knows, named by the suffix, in a
    folder that exists and is writable. Checked before the run, not after it."""
    from matplotlib.backend_bases import FigureCanvasBase  # only once --plot is given: not at --help

    formats = FigureCanvasBase.get_supported_filetypes()
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in formats:  # no suffix either: the temporary file's ".tmp" would be taken for one
        named = f"cannot write .{suffix} figures" if suffix else "needs a suffix that names the format"
        raise ConfigError(f"{path.name}: matplotlib {named} (supported: "
                          f"{', '.join('.' + name for name in sorted(formats))})")
    folder = path.parent
    if not folder.is_dir():
        raise ConfigError(f"the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"the folder {folder} is not writable")


def scored(tuning: list[dict]) -> list[dict]:
    """The tuning points that have a validation perplexity (a combiner that learns is fitted under a
    few memory settings only: the others are listed with ``valid_ppl`` null)."""
    return [point for point in tuning if _finite([point.get("valid_ppl")])]


def curve_knob(tuning: list[dict]) -> str | None:
    """The knob a method tuned over the most values (at least three), or None: what its curve shows."""
    tuning = scored(tuning)
    counts = {key: len({point[key] for point in tuning}) for key in (tuning[0] if tuning else {})
              if key != "valid_ppl" and all(isinstance(point.get(key), (int, float)) for point in tuning)}
    best = max(counts, key=counts.get, default=None)
    return best if best and counts[best] >= 3 else None


def knob_label(knob: str) -> str:
    from memdec_cli.render import KNOB_LABELS

    return KNOB_LABELS.get(knob, knob)


def _finite(values) -> list[float]:
    return [value for value in values if isinstance(value, (int, float)) and math.isfinite(value)]


def bar_limits(values: list[float]) -> tuple[float, float]:
    """y-limits that make the differences visible: from a little under the smallest bar (not zero, so 94
    and 93 differ by more than a hair) to a little over the largest, leaving room for the values."""
    low, high = min(values), max(values)
    spread = high - low or abs(high) * 0.05 or 1.0
    step = 10 ** math.floor(math.log10(spread))  # a round lower limit: 30 rather than 30.8
    lower = math.floor((low - BAR_MARGIN_BELOW * spread) / step) * step
    return max(0.0, lower), high + BAR_MARGIN_ABOVE * spread


def method_colours(methods: list[str]) -> dict[str, str]:
    others = [method for method in methods if method != BASE_METHOD]
    colours = {method: OKABE_ITO[index % len(OKABE_ITO)] for index, method in enumerate(others)}
    return {**colours, BASE_METHOD: BASE_COLOUR}


def _plot_bars(axis, report: dict, colours: dict[str, str]) -> None:
    results = report["results"]
    bases = list(dict.fromkeys(row["base"] for row in results))
    methods = list(dict.fromkeys(row["method"] for row in results))
    test_ppl = {(row["base"], row["method"]): row.get("test_ppl") for row in results}
    width = 0.8 / len(methods)
    for offset, method in enumerate(methods):
        values = [test_ppl.get((base, method)) for base in bases]
        heights = [value if _finite([value]) else math.nan for value in values]
        bars = axis.bar([index + offset * width for index in range(len(bases))], heights, width, label=method,
                        color=colours[method], edgecolor="white", linewidth=0.5)
        axis.bar_label(bars, labels=[f"{h:.1f}" if math.isfinite(h) else "" for h in heights], padding=2,
                       fontsize=6.5, rotation=90)
    _plot_base_lines(axis, bases, test_ppl, width, len(methods))
    axis.set_xticks([index + 0.4 - width / 2 for index in range(len(bases))], [Path(b).name for b in bases])
    shown = _finite(test_ppl.values())
    if shown:
        lower, upper = bar_limits(shown)
        axis.set_ylim(lower, upper)
        # Bars that do not start at zero: the label says so, as a reader compares their tops, not their lengths.
        axis.set_ylabel("test perplexity ↓" + (f" (axis from {lower:.3g}, not 0)" if lower > 0 else ""))
    axis.set_title(f"{report['domain']}: test perplexity per method")
    axis.legend(ncol=min(len(methods) + 1, 4), fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.1),
                frameon=False)


def _plot_base_lines(axis, bases: list[str], test_ppl: dict, bar_width: float, bars_per_group: int) -> None:
    """A dashed line across each base's group at its unadapted test perplexity: what every method must beat."""
    groups = [(index, test_ppl.get((base, BASE_METHOD))) for index, base in enumerate(bases)]
    groups = [(index - bar_width / 2, value) for index, value in groups if _finite([value])]  # first bar's left
    if groups:
        axis.hlines([value for _, value in groups], [left for left, _ in groups],
                    [left + bar_width * bars_per_group for left, _ in groups], colors="black", linestyles="--",
                    linewidth=0.9, zorder=3, label="base model (reference)")


def _best_by_knob(row: dict, knob: str) -> dict[float, float]:
    """Validation perplexity at each value of ``knob``, the best over the other knobs tuned with it."""
    best: dict[float, float] = {}
    for point in scored(row["tuning"]):
        best[point[knob]] = min(best.get(point[knob], math.inf), point["valid_ppl"])
    return best


def _plot_curves(axis, curves: list[tuple[dict, str]], colours: dict[str, str]) -> None:
    """Each mixture's validation curve over its tuned knob, the value it chose marked with a star."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter

    bases = list(dict.fromkeys(row["base"] for row, _ in curves))
    for row, knob in curves:
        best = _best_by_knob(row, knob)
        values = sorted(best)
        line, marker = BASE_STYLES[bases.index(row["base"]) % len(BASE_STYLES)]
        colour = colours.get(row["method"], "black")
        axis.plot(values, [best[value] for value in values], linestyle=line, marker=marker, markersize=3,
                  color=colour, linewidth=1.2, label=f"{Path(row['base']).name} · {row['method']}")
        chosen = (row.get("knobs") or {}).get(knob)
        if chosen in best:
            axis.plot([chosen], [best[chosen]], marker="*", markersize=11, color=colour, markeredgecolor="black",
                      markeredgewidth=0.6, linestyle="none", zorder=4)
    # A perplexity is exp(loss): on a log axis the far end of a grid (λ near 1) does not squash the minimum.
    axis.set_yscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:g}")  # 60, not 6×10¹
    axis.yaxis.set_major_formatter(plain)
    axis.yaxis.set_minor_formatter(plain)
    axis.set_xlabel(" / ".join(knob_label(knob) for knob in sorted({knob for _, knob in curves})))
    axis.set_ylabel("validation perplexity ↓ (log)")
    axis.set_title("Tuned on validation (★ the chosen value)")
    chosen = Line2D([], [], marker="*", markersize=9, color="white", markeredgecolor="black", linestyle="none")
    handles, labels = axis.get_legend_handles_labels()
    axis.legend([*handles, chosen], [*labels, "chosen on validation"], ncol=3, fontsize="x-small", frameon=False,
                loc="upper center", bbox_to_anchor=(0.5, -0.14))


def weight_sample(row: dict) -> list:
    """The (weight, base entropy) pairs a row's learned weight was sampled at (``details.weights``), or []."""
    weights = (row.get("details") or {}).get("weights") or {}
    return weights.get("weight_sample") or []


def fitted(row: dict) -> bool:
    """Whether a row's combiner learned its weight: its tuning holds held-out NLLs of a fit, not a
    validation curve of a knob, so it is not drawn with the curves."""
    return (row.get("details") or {}).get("knobs_from") == "fit"


def fixed_lam(row: dict) -> float | None:
    """The one λ a mixture row used for every token (its ``lam`` knob), when it learned none."""
    lam = (row.get("knobs") or {}).get("lam")
    return lam if isinstance(lam, (int, float)) and not weight_sample(row) else None


def _plot_weights(axis, results: list[dict], colours: dict[str, str]) -> None:
    """Each learned weight against the base's entropy at the same test positions (one series per
    row: the method's colour, the base's marker), and each fixed λ as a horizontal line."""
    bases = list(dict.fromkeys(row["base"] for row in results))
    for row in results:
        line, marker = BASE_STYLES[bases.index(row["base"]) % len(BASE_STYLES)]
        label = f"{Path(row['base']).name} · {row['method']}"
        colour = colours.get(row["method"], "black")
        sample = weight_sample(row)
        if sample:
            axis.scatter([entropy for _, entropy in sample], [weight for weight, _ in sample], s=4, alpha=0.35,
                         marker=marker, color=colour, linewidths=0, label=label, rasterized=True)
        elif fixed_lam(row) is not None:
            axis.axhline(fixed_lam(row), color=colour, linestyle=line, linewidth=1.0, label=f"{label} (fixed λ)")
    axis.set_ylim(0, 1)
    axis.set_xlabel("base model's entropy at the position (nats)")
    axis.set_ylabel("memory's weight λ")
    axis.set_title("Learned weight per test position")
    legend = axis.legend(ncol=2, fontsize="x-small", frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.14),
                         markerscale=3)
    # the points in the legend opaque, whatever they are in the plot (legendHandles before matplotlib 3.7)
    for handle in getattr(legend, "legend_handles", None) or legend.legendHandles:
        handle.set_alpha(1)


def comparison_figure(report: dict):
    """The matplotlib Figure of ``report``: bars of test perplexity, the validation curves and the
    learned weights if any."""
    check_plotting()
    import matplotlib
    from matplotlib.figure import Figure

    results = report["results"]
    colours = method_colours(list(dict.fromkeys(row["method"] for row in results)))
    curves = [(row, knob) for row in results if not fitted(row) for knob in [curve_knob(row.get("tuning") or [])]
              if knob]
    learned = any(weight_sample(row) for row in results)
    panels = 1 + bool(curves) + learned
    with matplotlib.rc_context(PAPER_STYLE):
        # A Figure without pyplot: no global state and no GUI backend, whatever the caller's environment.
        figure = Figure(figsize=(6.5 + 4.5 * (panels - 1), 4.2), layout="constrained")
        axes = list(figure.subplots(1, panels, squeeze=False)[0])
        _plot_bars(axes.pop(0), report, colours)
        if curves:
            _plot_curves(axes.pop(0), curves, colours)
        if learned:
            _plot_weights(axes.pop(0), results, colours)
    return figure


def plot_comparison(report: dict, path: Path | str) -> None:
    """Save the figure at ``path``: vector for .pdf/.svg/.eps, otherwise a raster at print resolution."""
    import matplotlib

    path = Path(path)
    figure = comparison_figure(report)
    temporary = path.with_name(f".{path.name}.tmp{path.suffix}")  # the suffix tells matplotlib the format
    try:
        with matplotlib.rc_context(PAPER_STYLE):  # the font settings apply when the file is written
            figure.savefig(temporary, dpi="figure" if path.suffix.lower() in VECTOR_SUFFIXES else RASTER_DPI)
        temporary.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):  # never a half-written figure beside the real one
            temporary.unlink(missing_ok=True)
        raise
