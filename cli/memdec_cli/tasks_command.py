"""``memdec tasks``: zero-shot downstream accuracy (DCPMI) of every base × method adapted to a domain."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from memdec_cli.eval_command import _combiner
from memdec_cli.options import memory_option, split_list, write_report
from memdec_core.command_kit import eval_settings, parse_assignments, set_option, window_options
from memdec_core.errors import ArtifactError
from memdec_core.runs.tasks import DEFAULT_VALIDATION_EXAMPLES, TASKS_DIR_VARIABLE, task_names

FORMATS = ("table", "json", "markdown")


@click.command("tasks")
@click.option("--domain", required=True, help="The domain every method adapts to, as in memdec eval: a registered "
              "domain (memdec list domains) or a corpus folder.")
@click.option("--base", "bases", multiple=True, help="Base model (repeatable). Default: the offline demo family.")
@click.option("--method", "methods", multiple=True, default=("base",), show_default=True,
              help="Methods, comma-separated or repeated (memdec list methods).")
@memory_option
@click.option("--tasks", "task_list", multiple=True, required=True,
              help=f"Tasks, comma-separated or repeated: a shipped task ({', '.join(task_names())}) or a spec file "
                   f"of your own (path/to/task.yaml, docs/tasks.md).")
@click.option("--tasks-dir", type=click.Path(file_okay=False, path_type=Path), envvar=TASKS_DIR_VARIABLE,
              show_envvar=True, help="The folder that holds the shipped tasks' data (memdec ships their specs, "
                                     "not their data: kNN-prompt's task_data/ layout).")
@click.option("--max-examples", type=click.IntRange(min=1), default=None,
              help="Score a seeded sample of N test examples per task [default: all].")
@click.option("--validation-examples", type=click.IntRange(min=1), default=DEFAULT_VALIDATION_EXAMPLES,
              show_default=True, help="Validation examples per task for tuning λ (each λ of the grid scores them).")
@click.option("--combiner", default="linear", show_default=True,
              help="How a memory is mixed with the base: a registered name or path/to/file.py:Name.")
@click.option("--lam", type=click.FloatRange(0.0, 1.0), default=None,
              help="Fix λ for perplexity and every task instead of tuning it.")
@set_option
@window_options
@click.option("--format", "output_format", type=click.Choice(FORMATS), default="table", show_default=True,
              help="How results are printed on stdout.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the results as JSON to this file, rewritten after each method (\"complete\": "
                   "false until the last).")
@click.option("--resume", is_flag=True, help="Keep the rows --output already holds from an interrupted run of the "
                                             "same settings, and score only the rest.")
def tasks_command(domain, bases, methods, memory, task_list, tasks_dir, max_examples, validation_examples, combiner,
                  lam, assignments, context, stride, batch_size, max_train_tokens, max_eval_tokens, output_format,
                  output, resume):
    """Zero-shot classification accuracy of every base × method adapted to a domain, scored by DCPMI.

    Each method adapts to --domain exactly as in `memdec eval` (artifacts cached, knobs tuned on the
    domain's validation split), then classifies each task's test examples by domain-conditional
    PMI, the paper's and kNN-prompt's scoring: a class's score is log P(words | prompt) minus
    log P(words | domain premise), summed over its verbaliser words. For a method that mixes a
    memory, λ is tuned per task on the task's validation slice where it has one, else it is the λ
    chosen on perplexity; the table says which.

    Every task file is read and checked before any model is loaded. Tasks are YAML specs naming
    a jsonl/csv/tsv file, a template, a premise and verbaliser words: docs/tasks.md.

    \b
    Examples:
      memdec tasks --domain general --base memdec-demo-m --method base,knn-lm,memdec,dapt,lora \\
                   --tasks sst2,mr --tasks-dir ~/kNN_prompt/task_data --max-examples 500
      MEMDEC_TASKS_DIR=~/kNN_prompt/task_data memdec tasks --domain finance --method base,memdec \\
                   --tasks sst2,mr,cr,rotten_tomatoes,hyp,rte,agn --format markdown
      memdec tasks --domain ./my-corpus --base Qwen/Qwen2.5-0.5B --method base,knn-lm --tasks ./my-task.yaml
    """
    from memdec_core.runs.prepare import with_memory
    from memdec_core.runs.tasks import evaluate_tasks

    if resume and output is None:
        raise click.UsageError("--resume needs --output, the report to resume")
    methods, component_settings = with_memory(memory, split_list(methods), parse_assignments(assignments))
    report = evaluate_tasks(domain, split_list(task_list), tasks_dir, bases, methods,
                            max_examples=max_examples, validation_examples=validation_examples,
                            settings=eval_settings(context, stride, batch_size, max_train_tokens, max_eval_tokens),
                            combiner=_combiner(combiner, lam, component_settings),
                            component_settings=component_settings,
                            command=list(sys.argv), previous=_earlier_report(output) if resume else None,
                            on_row=(lambda partial: write_report(output, partial)) if output else None)
    print_tasks(report, output_format)
    if output:
        write_report(output, report)


def _earlier_report(path: Path) -> dict | None:
    """The report an interrupted run left at ``path`` (None if there is none yet)."""
    if not path.exists():
        return None
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ArtifactError(f"{path} is not a report of memdec tasks to resume ({error})") from None
    if not isinstance(report, dict) or not isinstance(report.get("results"), list):
        raise ArtifactError(f"{path} is not a report of memdec tasks to resume (no results list)")
    return report


def task_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    """The columns (base, method, one per task, mean, the knobs of each task) and the rows."""
    names = [task["name"] for task in report["tasks"]]
    columns = ["base", "method", *[f"{name} ↑" for name in names], "mean ↑", "λ per task"]
    rows = [[row["base"], row["method"], *[_percent(row["tasks"][name]["accuracy"]) for name in names],
             _percent(row["mean_accuracy"]), _knobs_cell(row, names)] for row in report["results"]]
    return columns, rows


def _percent(value: float) -> str:
    return f"{100 * value:.1f}"


def _knobs_cell(row: dict, names: list[str]) -> str:
    """``sst2 λ=0.3 (validation), mr λ=0.25 (perplexity)``; ``-`` for a method that does not mix."""
    from memdec_cli.render import compact_knobs

    parts = [f"{name} {compact_knobs(entry['knobs'])} ({entry['knob_source']})"
             for name in names for entry in [row["tasks"][name]] if entry["knobs"]]
    return ", ".join(parts) or "-"


def print_tasks(report: dict, output_format: str) -> None:
    from memdec_cli.render import print_table

    if output_format == "json":
        print(json.dumps(report, indent=2, default=str, allow_nan=False))
        return
    columns, rows = task_rows(report)
    if output_format == "markdown":
        print("| " + " | ".join(columns) + " |")
        print("|" + "---|" * len(columns))
        for row in rows:
            print("| " + " | ".join(row) + " |")
        return
    sizes = ", ".join(f"{task['name']} {task['examples']}" for task in report["tasks"])
    print_table(f"{report['domain']}: zero-shot accuracy (%) by DCPMI — examples: {sizes}", columns, rows)
