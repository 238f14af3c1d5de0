"""The plugin manager and the registry."""

import textwrap
import types

import pytest

from memdec_core.components import registry
from memdec_core.components.plugins import register_plugin, unregister_plugin
from memdec_core.components.registry import plugin_records
from memdec_core.errors import DuplicateComponentError, PluginError, UnknownComponentError
from memdec_core.hookspecs import hookimpl
from memdec_core.interfaces import Method

BUILT_INS = {"base", "knn", "combiners"}


def test_built_ins_come_through_entry_points(fresh_plugins):
    records = {record.name: record for record in plugin_records()}
    assert BUILT_INS <= set(records)
    assert all(records[name].status == "loaded" and records[name].distribution == "memdec" for name in BUILT_INS)
    assert "memdec_register_methods" in records["knn"].hooks
    assert {"base", "knn-lm"} <= set(registry.names("methods"))
    assert registry.get("methods", "knn-lm").plugin == "knn"


def test_disabled_plugins_are_not_loaded(fresh_plugins, monkeypatch):
    monkeypatch.setenv("MEMDEC_DISABLE_PLUGINS", "knn, combiners")
    records = {record.name: record.status for record in plugin_records()}
    assert records["knn"] == records["combiners"] == "disabled"
    assert "knn-lm" not in registry.names("methods")


def fake_distribution(tmp_path, entry_points: dict[str, str], modules: dict[str, str]):
    info = tmp_path / "fake_memdec_plugins-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-memdec-plugins\nVersion: 0.1\n")
    lines = "".join(f"{name} = {module}\n" for name, module in entry_points.items())
    (info / "entry_points.txt").write_text(f"[memdec]\n{lines}")
    for module, source in modules.items():
        (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))


def test_broken_and_misspelt_plugins_are_reported_and_skipped(fresh_plugins, tmp_path, monkeypatch):
    fake_distribution(tmp_path, {"broken": "no_such_module_xyz", "misspelt": "misspelt_memdec_plugin"}, {
        "misspelt_memdec_plugin": """
            from memdec_core.hookspecs import hookimpl

            @hookimpl
            def memdec_register_methodz():
                return []
        """})
    monkeypatch.syspath_prepend(str(tmp_path))
    records = {record.name: record for record in plugin_records()}
    assert records["broken"].status == "failed" and "No module named" in records["broken"].error
    assert records["misspelt"].status == "failed" and "memdec_register_methodz" in records["misspelt"].error
    assert records["knn"].status == "loaded"
    assert "knn-lm" in registry.names("methods")


class Twin(Method):
    """A second method called knn-lm."""

    name = "knn-lm"

    def evaluate(self, ctx):
        raise NotImplementedError


def test_duplicate_name_names_both_plugins(fresh_plugins):
    plugin = types.SimpleNamespace(memdec_register_methods=hookimpl(lambda: [Twin]))
    register_plugin(plugin, name="twin-plugin")
    try:
        with pytest.raises(DuplicateComponentError, match="already used by plugin 'knn'.*'twin-plugin'"):
            registry.names("methods")
    finally:
        unregister_plugin("twin-plugin")


def test_a_registered_non_component_is_an_error(fresh_plugins):
    plugin = types.SimpleNamespace(memdec_register_methods=hookimpl(lambda: [dict]))
    register_plugin(plugin, name="bad-plugin")
    with pytest.raises(PluginError, match="not a subclass of Method"):
        registry.names("methods")


def test_unknown_name_has_did_you_mean_and_the_list():
    with pytest.raises(UnknownComponentError) as raised:
        registry.get("methods", "knn-ml")
    message = str(raised.value)
    assert "did you mean 'knn-lm'?" in message
    assert "available: base, dapt, knn-lm, lora, memdec, mixture, rag" in message
    assert isinstance(raised.value, LookupError) and not isinstance(raised.value, KeyError)


def test_every_component_has_a_valid_name_and_config():
    import dataclasses

    for kind in registry.KINDS:
        for name, cls in registry.components(kind).items():
            assert cls.name == name and cls.plugin and cls.describe()
            assert dataclasses.is_dataclass(cls.Config)
            cls.Config()  # defaults are valid


def test_disabling_an_unknown_plugin_is_an_error(fresh_plugins, monkeypatch):
    monkeypatch.setenv("MEMDEC_DISABLE_PLUGINS", "knnn")
    with pytest.raises(UnknownComponentError, match="unknown plugin 'knnn'; did you mean 'knn'"):
        plugin_records()


def test_disabling_an_unknown_plugin_on_the_command_line(monkeypatch):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "memdec_cli.main", "plugins"], capture_output=True, text=True,
                            env={**__import__("os").environ, "MEMDEC_DISABLE_PLUGINS": "knnn"})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "Error: unknown plugin 'knnn'; did you mean 'knn'? "
        "(available: base, combiners, decoder, domains, knn, peft, rag, zoo); check MEMDEC_DISABLE_PLUGINS"]
