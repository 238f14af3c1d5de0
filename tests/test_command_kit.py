"""The command kit (memdec_core.command_kit): a third party's command reads the window options and
--set exactly as memdec's own commands do, and no plugin imports the CLI package."""

import ast
import subprocess
import sys
import types
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from memdec_core.command_kit import eval_settings, parse_assignments, set_option, window_options
from memdec_core.components.plugins import register_plugin, unregister_plugin
from memdec_core.hookspecs import hookimpl
from memdec_core.interfaces import EvalSettings
from memdec_core.runs.runconfig import QUICK_EVAL_TOKENS, QUICK_TRAIN_TOKENS

ROOT = Path(__file__).resolve().parents[1]
WINDOWS = ("--context", "64", "--stride", "16", "--batch-size", "2", "--max-train-tokens", "0")
SETS = ("--set", "faiss.nprobe=8", "--set", "knn-lm.k=4", "--set", "faiss.factory=IVF4,Flat")


@pytest.fixture
def shelf_cli(fresh_plugins):
    """``memdec`` with a third party's ``shelve`` command (a plugin registered in-process); returns
    (the CLI, the calls the command received)."""
    from memdec_cli.main import build_cli

    calls = []

    @click.command("shelve")
    @click.option("--domain", required=True)
    @set_option
    @window_options
    def shelve(domain, assignments, context, stride, batch_size, max_train_tokens, max_eval_tokens):
        """Build a shelf."""
        calls.append(dict(domain=domain, component_settings=parse_assignments(assignments),
                          settings=eval_settings(context, stride, batch_size, max_train_tokens, max_eval_tokens)))

    register_plugin(types.SimpleNamespace(memdec_register_commands=hookimpl(lambda cli: cli.add_command(shelve))),
                    name="shelf")
    yield build_cli(), calls
    unregister_plugin("shelf")


def test_a_plugin_command_gets_the_window_settings_and_component_settings(shelf_cli):
    cli, calls = shelf_cli
    result = CliRunner().invoke(cli, ["shelve", "--domain", "finance", *WINDOWS, *SETS])
    assert result.exit_code == 0, result.output
    assert calls == [dict(domain="finance",
                          component_settings={"faiss": {"nprobe": "8", "factory": "IVF4,Flat"}, "knn-lm": {"k": "4"}},
                          settings=EvalSettings(context=64, stride=16, batch_size=2, max_train_tokens=None,
                                                max_eval_tokens=QUICK_EVAL_TOKENS))]


def test_a_plugin_command_parses_as_a_built_in_command_does(shelf_cli, monkeypatch):
    """``memdec datastore build`` (the knn plugin's command) receives the same settings from the same flags."""
    import memdec_knn.api

    cli, calls = shelf_cli
    built = []
    monkeypatch.setattr(memdec_knn.api, "build_datastore", lambda domain, base, **given: built.append(given) or "x")
    for flags in ((), WINDOWS + SETS):
        assert CliRunner().invoke(cli, ["shelve", "--domain", "law", *flags]).exit_code == 0
        assert CliRunner().invoke(cli, ["datastore", "build", "--domain", "law", "--base", "b", *flags]).exit_code == 0
    assert [(call["settings"], call["component_settings"]) for call in calls] == \
        [(given["settings"], given["component_settings"]) for given in built]
    assert calls[0]["settings"] == EvalSettings(max_train_tokens=QUICK_TRAIN_TOKENS, max_eval_tokens=QUICK_EVAL_TOKENS)


@pytest.mark.parametrize("flags, message", [
    (("--set", "faiss-nprobe=8"), "Invalid value for --set: 'faiss-nprobe=8' is not NAME.KEY=VALUE"),
    (("--max-train-tokens", "1"), "Invalid value for '--max-train-tokens': 0 (the whole split) or at least 2"),
    (("--context", "1"), "Invalid value for '--context'"),
])
def test_a_plugin_command_refuses_bad_usage_as_a_built_in_command_does(shelf_cli, flags, message):
    cli, _ = shelf_cli
    ours = CliRunner().invoke(cli, ["shelve", "--domain", "law", *flags])
    built_in = CliRunner().invoke(cli, ["eval", "--domain", "law", *flags])
    assert ours.exit_code == built_in.exit_code == 2
    assert message in ours.stderr and message in built_in.stderr


def test_a_plugin_command_shows_the_built_in_options_help(shelf_cli):
    cli, _ = shelf_cli
    ours, built_in = cli.commands["shelve"], cli.commands["eval"]
    for name in ("context", "stride", "batch_size", "max_train_tokens", "max_eval_tokens", "assignments"):
        mine, theirs = (next(p for p in command.params if p.name == name) for command in (ours, built_in))
        assert (mine.opts, mine.default, mine.help, repr(mine.type)) == \
            (theirs.opts, theirs.default, theirs.help, repr(theirs.type))


def test_window_options_take_other_default_caps():
    @click.command()
    @window_options(train_default=0, eval_default=512)
    def command(**values):
        click.echo(repr(eval_settings(**values)))

    result = CliRunner().invoke(command, [])
    assert result.output.strip() == repr(EvalSettings(max_train_tokens=None, max_eval_tokens=512))


def test_parse_assignments_keeps_the_text_after_the_first_equals():
    assert parse_assignments(("rag.query=a=b", "x.y=")) == {"rag": {"query": "a=b"}, "x": {"y": ""}}
    with pytest.raises(click.BadParameter, match="'.k=1' is not NAME.KEY=VALUE"):
        parse_assignments((".k=1",))


def test_the_kit_imports_neither_torch_nor_faiss():
    probe = ("import sys, memdec_core.command_kit\n"
             "print([m for m in ('torch', 'faiss', 'transformers') if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_no_plugin_imports_the_cli_package():
    """Plugins use the kit (memdec_core.command_kit); memdec_cli is memdec's own command package."""
    offenders = []
    for path in sorted([*(ROOT / "plugins").rglob("*.py"), *(ROOT / "examples").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno}" for name in names
                          if name.split(".")[0] == "memdec_cli"]
    assert offenders == []
