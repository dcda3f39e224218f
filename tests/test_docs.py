"""The documentation site's generated parts say what the code does.

- The reference's "accepts" column is the text validation prints: each setting's bad value is refused with
  exactly the words the page shows, and every setting and policy field is on the page.
- The build hooks refuse a page that leaves out a field, or documents one the code lacks.
- The benchmark charts draw one bar per case or run of the results files.
- The tutorial's ``cachemw routes`` output is what the command prints for the sample app.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from types import ModuleType

import pytest
from mkdocs.exceptions import PluginError

from cachemw.core.policy import POLICY_FIELDS, ConfigError, Policy, field_expectations, policy_from_fields
from cachemw.core.settings import Settings, setting_expectations, settings_from_table

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
CACHEMW = str(Path(sys.executable).parent / "cachemw")  # the command the venv installed

# A value each setting refuses, by what it accepts.
_BAD = {"redis_url": "http://127.0.0.1:6379", "key_prefix": "", "session_cookie": "a b", "credentials": "x-api-key"}


def _hook(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"docs_hook_{name}", DOCS / "_hooks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _bad_value(key: str, accepts: str) -> object:
    if key in _BAD:
        return _BAD[key]
    if accepts == "true or false":
        return "yes"
    return 10**13  # above every duration's and count's bound


def test_every_setting_is_refused_in_the_words_the_reference_shows() -> None:
    expectations = setting_expectations()
    assert set(expectations) == {f.name for f in dataclasses.fields(Settings)} - {"presets", "rules", "source"}
    for key, accepts in expectations.items():
        with pytest.raises(ConfigError) as refused:
            settings_from_table({key: _bad_value(key, accepts)}, source="cachemw.toml", where="cachemw.toml")
        assert str(refused.value).endswith(f"expected {accepts}"), (key, str(refused.value))


def test_every_policy_field_has_what_it_accepts() -> None:
    accepts = field_expectations()
    assert set(accepts) == POLICY_FIELDS
    for name, text in accepts.items():
        if text.startswith("a duration"):
            with pytest.raises(ConfigError, match=name):
                policy_from_fields({name: "soon"}, base=Policy(), where="rule 1")


def _settings_page() -> str:
    return (DOCS / "reference" / "settings.md").read_text()


def test_the_reference_pages_name_every_field_and_the_hook_fills_them_in() -> None:
    reference = _hook("reference")
    settings = reference._BLOCK.sub(lambda m: reference._settings(m["body"], "settings.md"), _settings_page())
    for key, accepts in setting_expectations().items():
        assert f"| `{key}` | {accepts} |" in settings, key
    policy_page = (DOCS / "reference" / "policy.md").read_text()
    policy = reference._BLOCK.sub(
        lambda m: reference._GENERATORS[m["name"]](m["body"], "policy.md"), policy_page)
    for name, accepts in field_expectations().items():
        assert f"| `{name}` | {accepts} |" in policy, name
    assert "| `minutes` | 2m | 10m | 1h |" in policy  # the preset's values, from PRESETS


def test_a_page_that_leaves_out_a_setting_or_invents_one_fails_the_build() -> None:
    reference = _hook("reference")
    [block] = reference._BLOCK.findall(_settings_page())
    body = block[1]
    without = "\n".join(line for line in body.splitlines() if not line.startswith("| `tracking` |")) + "\n"
    with pytest.raises(PluginError, match=r"not documented \['tracking'\]"):
        reference._settings(without, "settings.md")
    with pytest.raises(PluginError, match=r"not in the code \['l2_max_bytes'\]"):
        reference._settings(body + "| `l2_max_bytes` | A second level. |\n", "settings.md")


def test_the_cli_reference_is_each_commands_help() -> None:
    reference = _hook("reference")
    text = reference._cli("", "cli.md")
    for command in ("routes", "check", "purge", "inspect", "stats", "warm", "writebehind"):
        done = subprocess.run([CACHEMW, command, "--help"], capture_output=True, text=True, check=True,
                              env={"COLUMNS": "80", "PATH": "/usr/bin:/bin"})
        assert done.stdout in text, command


def test_the_charts_draw_every_case_and_run_of_the_results() -> None:
    charts = _hook("charts")
    results = ROOT / "bench" / "results"
    expected_bars = {
        "img/charts/peers-rps.svg": len(json.loads((results / "peers.json").read_text())["cases"]),
        "img/charts/peers-p99.svg": len(json.loads((results / "peers.json").read_text())["cases"]),
        "img/charts/staleness.svg": sum(map(len, json.loads((results / "staleness.json").read_text())["results"]
                                            .values())),
        "img/charts/overload-origin-calls.svg": len(json.loads((results / "overload.json").read_text())["runs"]),
    }
    assert set(charts.CHARTS) == set(expected_bars)
    for path, draw in charts.CHARTS.items():
        svg = ET.fromstring(draw())
        rects = svg.findall("{http://www.w3.org/2000/svg}rect")
        assert len(rects) == expected_bars[path], path


def test_the_tutorials_routes_table_is_what_the_command_prints() -> None:
    tutorial = (DOCS / "tutorial.md").read_text()
    [block] = re.findall(r"<!-- doc-test: routes -->\n```console\n(.*?)```\n", tutorial, re.S)
    command, *shown = block.splitlines()
    assert command == "$ .venv/bin/cachemw routes sample_app:app"
    done = subprocess.run([CACHEMW, "routes", "sample_app:app"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=True,
                          env={"PATH": "/usr/bin:/bin", "COLUMNS": "200"})
    assert done.stdout.replace(str(ROOT), "/path/to/cachemw").splitlines() == shown
