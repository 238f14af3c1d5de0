"""``memdec compare --plot``: perplexity per method per base, and each mixture's validation curve."""

from __future__ import annotations

from pathlib import Path

from memdec_core.errors import ConfigError


def check_plotting() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError("--plot needs matplotlib: pip install 'memdec[plot]' (or pip install matplotlib)") from None


def curve_knob(tuning: list[dict]) -> str | None:
    """The knob a method tuned over the most values (at least three), or None: what its curve shows."""
    counts = {key: len({point[key] for point in tuning}) for key in (tuning[0] if tuning else {})
              if key != "valid_ppl" and all(isinstance(point.get(key), (int, float)) for point in tuning)}
    best = max(counts, key=counts.get, default=None)
    return best if best and counts[best] >= 3 else None


def _plot_curves(axis, curves: list[tuple[dict, str]]) -> None:
    """Validation perplexity against the tuned knob (the best over the other knobs at each value)."""
    for row, knob in curves:
        best: dict = {}
        for point in row["tuning"]:
            best[point[knob]] = min(best.get(point[knob], float("inf")), point["valid_ppl"])
        values = sorted(best)
        axis.plot(values, [best[value] for value in values], marker="o",
                  label=f"{Path(row['base']).name} · {row['method']} ({knob})")
    knobs = sorted({knob for _, knob in curves})
    axis.set_xlabel(" / ".join(knobs))
    axis.set_ylabel("validation perplexity")
    axis.set_title("Tuned on validation")
    axis.legend(fontsize="small")


def plot_comparison(report: dict, path: Path | str) -> None:
    path = Path(path)
    check_plotting()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    results = report["results"]
    bases = list(dict.fromkeys(row["base"] for row in results))
    methods = list(dict.fromkeys(row["method"] for row in results))
    curves = [(row, knob) for row in results for knob in [curve_knob(row.get("tuning") or [])] if knob]
    figure, axes = plt.subplots(1, 2 if curves else 1, figsize=(12 if curves else 7, 4.5), squeeze=False)
    bars = axes[0][0]
    width = 0.8 / len(methods)
    for offset, method in enumerate(methods):
        values = [next((row["test_ppl"] for row in results if row["base"] == base and row["method"] == method),
                       float("nan")) for base in bases]
        bars.bar([index + offset * width for index in range(len(bases))], values, width, label=method)
    bars.set_xticks([index + 0.4 - width / 2 for index in range(len(bases))], [Path(b).name for b in bases])
    bars.set_ylabel("test perplexity")
    bars.set_title(f"{report['domain']}: test perplexity per method")
    bars.legend(ncol=3, fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.08))
    if curves:
        _plot_curves(axes[0][1], curves)
    figure.tight_layout()
    temporary = path.with_name(f".{path.name}.tmp{path.suffix}")
    figure.savefig(temporary, dpi=120)
    plt.close(figure)
    temporary.replace(path)
