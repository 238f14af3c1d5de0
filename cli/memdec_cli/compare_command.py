"""``memdec compare``: every base × method on a domain, in one table."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from memdec_cli.eval_command import COMBINER_HELP, _combiner
from memdec_cli.options import config_option, memory_option, require_domain, run_config, split_list, write_report
from memdec_core.command_kit import eval_settings, set_option, window_options
from memdec_core.errors import ConfigError, MemdecError
from memdec_core.runs.compare import CompareSettings
from memdec_core.runs.runconfig import EQUAL_COMPUTE, FORMATS, QUICK_EVAL_TOKENS, QUICK_TRAIN_TOKENS


def _parse_budget(ctx, param, value):
    """--budget as CompareSettings fields; a malformed one is bad usage (exit 2), caught before any work."""
    from memdec_core.runs.runconfig import parse_budget

    try:
        return parse_budget(value)
    except ConfigError as error:
        raise click.BadParameter(str(error), ctx=ctx, param=param) from error


def _check_plot(ctx, param, value):
    """--plot checked when parsed: a figure matplotlib cannot write is bad usage (exit 2), found before
    the run rather than after it; no matplotlib at all is a ConfigError (exit 1)."""
    if value is None:
        return None
    from memdec_cli.plot import check_plot_path, check_plotting

    check_plotting()
    try:
        check_plot_path(value)
    except ConfigError as error:
        raise click.BadParameter(str(error), ctx=ctx, param=param) from error
    return value


@click.command("compare")
@config_option("compare")
@click.option("--domain", help="A registered domain (memdec list domains) or a corpus folder. Required, here or in "
              "--config.")
@click.option("--base", "bases", multiple=True, help="Base model (repeatable). Default: the offline demo family.")
@click.option("--method", "methods", multiple=True,
              help="Methods, comma-separated or repeated. Default: every installed method that declares a place "
                   "in the default comparison (memdec list methods).")
@memory_option
@click.option("--combiner", default="linear", show_default=True, help=COMBINER_HELP)
@click.option("--lam", type=click.FloatRange(0.0, 1.0), default=None,
              help="Fix λ instead of tuning it (with several combiners: of each that has one).")
@click.option("--budget", default=EQUAL_COMPUTE, show_default=True, metavar="equal|0|TOKENS|FLOPS",
              callback=_parse_budget,
              help="Training compute of the methods that train (dapt, lora, memdec). equal: the paper's protocol, "
                   "every method gets the FLOPs of the Memory Decoder's own training, with early stopping on "
                   "validation; 0: each method's own schedule; or the same budget for all, in tokens (24576, 64k, "
                   "2M) or FLOPs (3e12flops, 2TFLOPs: 6N per token for dapt and the memory, about 4N for lora).")
@click.option("--general-tokens", type=click.IntRange(min=2), default=CompareSettings.general_tokens,
              show_default=True, help="Tokens of the general test split scored per base × method (forgetting).")
@click.option("--latency-tokens", type=click.IntRange(min=2), default=CompareSettings.latency_tokens,
              show_default=True, help="Domain test tokens timed per method for the latency ratio.")
@click.option("--fresh", is_flag=True,
              help="Measure every row again instead of reading back rows measured with identical inputs "
                   "(artifacts are still reused).")
@set_option
@window_options(train_default=QUICK_TRAIN_TOKENS, eval_default=QUICK_EVAL_TOKENS)
@click.option("--format", "output_format", type=click.Choice(FORMATS["compare"]),
              default="table", show_default=True, help="How results are printed on stdout.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the results as JSON to this file.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None, callback=_check_plot,
              help="Save a figure: test perplexity per method per base, each mixture's validation curve of "
                   "the combiner's knob, and a learned weight against the base's entropy (needs matplotlib).")
@click.pass_context
def compare_command(ctx, config_file, domain, bases, methods, memory, combiner, lam, budget, general_tokens,
                    latency_tokens, fresh, assignments, context, stride, batch_size, max_train_tokens, max_eval_tokens,
                    output_format, output, plot):
    """Adapt every base model to a domain with every method and compare them head to head.

    For each base × method: domain test perplexity (knobs tuned on validation only), general
    test perplexity with the method applied (forgetting), parameters and bytes added, training
    time, and inference time per token relative to the base. Artifacts are cached by content
    hash: a second run reuses datastores, targets, adapters and memories, and reads back every
    row measured with identical inputs (--fresh measures them again).

    Only the asked-for work runs: a method whose every knob is given (--lam and one value of
    each memory knob, e.g. --set knn-lm.temperatures=10) scores no validation; the memdec row's
    fidelity to its teacher is measured once per memory and teacher datastore and cached, or
    skipped with --set memdec.fidelity=false. The JSON's meta.timings and each row's timings
    give the seconds per stage (tokenise, datastore, index, targets, train, tune, test, ...).

    The defaults are sized for a laptop CPU (the demo family on finance in under 10 minutes):
    the first 32,768 train tokens and 4,096 valid and test tokens. Every method that trains gets
    the compute of the Memory Decoder's own training (the paper's equal-compute protocol). For
    the full splits and each method's own schedule:
    --max-train-tokens 0 --max-eval-tokens 0 --budget 0.

    \b
    Examples:
      memdec compare --domain finance
      memdec compare --domain law --method base,lora,memdec --budget 2M --format markdown
      memdec compare --domain finance --budget 5TFLOPs --max-train-tokens 0 --max-eval-tokens 0
      memdec compare --domain biomed --base Qwen/Qwen2.5-0.5B --base Qwen/Qwen2.5-1.5B --plot biomed.png
      memdec compare --domain finance --method base,knn-lm,mixture --set mixture.memory=unigram
      memdec compare --config finance.toml --budget 0     # the file's options, its budget overridden
      memdec compare --domain law --method base,knn-lm,memdec --combiner linear,adaptive --plot law.png
    """
    from memdec_cli.render import print_comparison
    from memdec_core.runs.compare import compare
    from memdec_core.runs.prepare import with_memory

    require_domain(ctx, domain)
    run = run_config(ctx)
    methods, component_settings = with_memory(memory, split_list(methods) if methods else (), run.settings)
    try:
        report = compare(domain, bases, methods,
                         settings=eval_settings(context, stride, batch_size, max_train_tokens, max_eval_tokens),
                         combiner=_combiner(combiner, lam, component_settings),
                         component_settings=component_settings,
                         measure=CompareSettings(general_tokens=general_tokens, latency_tokens=latency_tokens,
                                                 reuse_results=not fresh, **budget),
                         config=run.meta, command=list(sys.argv))
    except MemdecError as error:  # print and save the rows measured before the failure, then report it
        _keep_partial(getattr(error, "partial_report", None), output_format, output)
        raise
    print_comparison(report, output_format)
    if output:
        write_report(output, report)
    if plot:
        from memdec_cli.plot import plot_comparison

        plot_comparison(report, plot)


def _keep_partial(report: dict | None, output_format: str, output: Path | None) -> None:
    from memdec_cli.render import print_comparison
    from memdec_core.runtime.progress import log

    if not report or not report["results"]:
        return
    print_comparison(report, output_format)
    log(f"kept the {len(report['results'])} row(s) measured before the failure (a rerun resumes after them)")
    if output:
        try:
            write_report(output, report)
        except MemdecError:
            pass  # the disk that failed the run may refuse this too; the table is on stdout
