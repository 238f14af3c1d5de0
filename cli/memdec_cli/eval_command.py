"""``memdec eval``: test perplexity of base models with adaptation methods on a domain."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from memdec_cli.options import config_option, memory_option, require_domain, run_config, split_list, write_report
from memdec_core.command_kit import eval_settings, set_option, window_options
from memdec_core.runs.runconfig import FORMATS

#: --combiner of eval and compare: one, or several for a head-to-head.
COMBINER_HELP = ("How a memory is mixed with the base: a registered name or path/to/file.py:Name. Several, "
                 "comma-separated (linear,adaptive): every method that mixes a memory gets a row per combiner, the "
                 "first named as the method, the others METHOD+COMBINER (knn-lm+adaptive).")


@click.command("eval")
@config_option("eval")
@click.option("--domain", help="A registered domain (memdec list domains) or a corpus folder with "
              "train/valid/test files (.txt: documents split by blank lines; .jsonl: {\"text\": ...}). "
              "Required, here or in --config.")
@click.option("--base", "bases", multiple=True,
              help="Base model: a registered name (memdec list models), a local HF folder, a .gguf file "
                   "or a hub id. Repeatable. Default: the offline demo family.")
@click.option("--method", "methods", multiple=True, default=("base",), show_default=True,
              help="Methods to run, comma-separated or repeated (memdec list methods).")
@memory_option
@click.option("--combiner", default="linear", show_default=True, help=COMBINER_HELP)
@click.option("--lam", type=click.FloatRange(0.0, 1.0), default=None,
              help="Fix the combiner's λ instead of tuning it on the validation split (with several combiners: "
                   "of each that has one).")
@set_option
@window_options
@click.option("--format", "output_format", type=click.Choice(FORMATS["eval"]),
              default="table", show_default=True, help="How results are printed on stdout.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the results as JSON to this file.")
@click.pass_context
def eval_command(ctx, config_file, domain, bases, methods, memory, combiner, lam, assignments, context, stride,
                 batch_size, max_train_tokens, max_eval_tokens, output_format, output):
    """Test perplexity of every base × method on a domain; knobs are tuned on the validation split.

    Artifacts a method needs (a kNN-LM datastore, ...) are built on first use and cached by
    content hash under $MEMDEC_CACHE (default ~/.cache/memdec), so reruns are fast.

    Every setting of every component is reachable with --set NAME.KEY=VALUE; `mixture` mixes any
    registered memory model (memdec list memory-models) through the combiner. With every knob
    given (--lam and one value of each memory knob: --set knn-lm.temperatures=10) nothing is
    tuned and the validation split is not scored; --set memdec.fidelity=false skips the memdec
    row's fidelity to its teacher (otherwise measured once per memory and teacher datastore,
    and cached). The JSON report's meta.timings says the seconds spent per stage.

    The defaults are those of `memdec compare`, sized for a laptop CPU: the first 32,768 train
    tokens and 4,096 valid and test tokens. For the whole splits: --max-train-tokens 0
    --max-eval-tokens 0. --config FILE takes every option from a YAML or TOML file (flags given
    as well win); the JSON report's meta says what ran (docs/reports.md).

    \b
    Examples:
      memdec eval --domain ./my-corpus --base HuggingFaceTB/SmolLM2-135M \\
                  --method base,knn-lm --set knn-lm.k=256 --format json
      memdec eval --domain finance --memory finance-memory      # base and memdec, the memory from a folder
      memdec eval --domain finance --method mixture --set mixture.memory=knn-datastore --set faiss.nprobe=64
      memdec eval --domain biomed --set biomed.source=hub --base Qwen/Qwen2.5-0.5B --method base,knn-lm
      memdec eval --config finance-knn.yaml --max-eval-tokens 0
      memdec eval --domain finance --method knn-lm --combiner linear,adaptive   # fixed vs learned weight
    """
    from memdec_cli.render import print_evaluation
    from memdec_core import api

    require_domain(ctx, domain)
    run = run_config(ctx)
    methods, component_settings = api.with_memory(memory, split_list(methods), run.settings)
    report = api.evaluate(domain, bases, methods,
                          settings=eval_settings(context, stride, batch_size, max_train_tokens, max_eval_tokens),
                          combiner=_combiner(combiner, lam, component_settings),
                          component_settings=component_settings, config=run.meta, command=sys.argv)
    print_evaluation(report, output_format)
    if output:
        write_report(output, report)


def _combiner(spec: str, lam: float | None, component_settings: dict[str, dict]):
    """The combiner spec, or a list of them for a head-to-head (``linear,adaptive``: a row per combiner
    for every method that mixes a memory). With --lam, each combiner that has a λ becomes an
    instance with λ fixed (a --set of that λ must agree); a learned weight has none to fix."""
    specs = split_list((spec,))
    if lam is not None:
        specs = _with_lam(specs, lam, component_settings)
    return specs[0] if len(specs) == 1 else specs


def _with_lam(specs: list[str], lam: float, component_settings: dict[str, dict]) -> list:
    from memdec_core.components.combiner_files import resolve_combiner
    from memdec_core.components.plan import set_by_shorthand
    from memdec_core.errors import ConfigError

    fixed, refusals = [], []
    for spec in specs:
        combiner_class = resolve_combiner(spec)
        try:
            fixed.append(combiner_class(lam=lam))
        except ConfigError as error:
            refusals.append(f"{spec!r}: {error}")
            fixed.append(spec)
            continue
        set_by_shorthand(component_settings, combiner_class, "lam", lam, "--lam")
    if len(refusals) == len(specs):
        raise ConfigError(f"--lam does not apply to combiner {'; '.join(refusals)}")
    return fixed
