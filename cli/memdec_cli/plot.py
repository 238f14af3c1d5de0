"""``memdec compare --plot``: perplexity per method per base, and the Memory Decoder's λ curve."""

from __future__ import annotations

from pathlib import Path

from memdec_core.errors import ConfigError


def check_plotting() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError("--plot needs matplotlib: pip install 'memdec[plot]' (or pip install matplotlib)") from None


def plot_comparison(report: dict, path: Path | str) -> None:
    path = Path(path)
    check_plotting()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    results = report["results"]
    bases = list(dict.fromkeys(row["base"] for row in results))
    methods = list(dict.fromkeys(row["method"] for row in results))
    curves = [row for row in results if row["method"] == "memdec" and row["details"].get("valid_grid")]
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
        lam = axes[0][1]
        for row in curves:
            grid = sorted(row["details"]["valid_grid"], key=lambda point: point["lam"])
            lam.plot([point["lam"] for point in grid], [point["valid_ppl"] for point in grid], marker="o",
                     label=Path(row["base"]).name)
        lam.set_xlabel("λ (weight of the memory)")
        lam.set_ylabel("validation perplexity")
        lam.set_title("Memory Decoder: λ on validation")
        lam.legend()
    figure.tight_layout()
    temporary = path.with_name(f".{path.name}.tmp{path.suffix}")
    figure.savefig(temporary, dpi=120)
    plt.close(figure)
    temporary.replace(path)
