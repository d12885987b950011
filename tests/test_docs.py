"""The documentation site's build hooks (docs/hooks/build_hooks.py), without building the site.

`make docs` (run by CI) builds the whole site with warnings as errors; these tests check, in a
second, the parts that keep the site from going stale: every public name can be found where the API
pages look for it, the CLI reference covers every subcommand, formulas are converted outside code only.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path

import pytest

import bayes_dgme as bd

pytest.importorskip("mkdocs", reason="the docs extra (mkdocs) is not installed")
pytest.importorskip("latex2mathml", reason="the docs extra (latex2mathml) is not installed")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hooks():
    spec = importlib.util.spec_from_file_location("build_hooks", ROOT / "docs" / "hooks" / "build_hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _resolve(path: str):
    """Import the longest module prefix of a dotted path, then walk the attributes."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(path)


def test_every_public_name_resolves_to_its_definition(hooks):
    for name in bd.__all__:
        path = hooks._defining_path(bd, name)
        assert path.startswith("bayes_dgme"), (name, path)
        assert _resolve(path) is getattr(bd, name), (name, path)


def test_a_name_that_is_not_public_stops_the_build(hooks):
    from mkdocs.exceptions import PluginError

    with pytest.raises(PluginError, match="not a public name"):
        hooks._defining_path(bd, "no_such_function")


def test_entries_for_names_not_yet_public_are_optional_only_when_marked(hooks):
    from mkdocs.exceptions import PluginError

    out = hooks._api_markdown("::: bayes_dgme.fit_em\n\n::: bayes_dgme.not_yet_public?\n", "reference/api/x.md")
    assert "not_yet_public" not in out
    (line,) = [x for x in out.splitlines() if x.startswith(":::")]
    assert line.endswith(".fit_em") and line != "::: bayes_dgme.fit_em"  # rewritten to the defining module
    with pytest.raises(PluginError, match="not a public name"):
        hooks._api_markdown("::: bayes_dgme.not_yet_public\n", "reference/api/x.md")


def test_cli_reference_covers_every_subcommand_within_the_page_width(hooks):
    from bayes_dgme.cli import build_parser

    md = hooks._cli_markdown()
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    assert len(sub.choices) >= 7
    for name, parser in sub.choices.items():
        assert f"## `bayes-dgme {name}`" in md, name
        for action in parser._actions:  # every option of every subcommand is on the page
            for opt in action.option_strings:
                assert opt in md, (name, opt)
    blocks = re.findall(r"```text\n(.*?)```", md, re.S)
    assert len(blocks) == len(sub.choices) + 1
    too_long = [line for b in blocks for line in b.splitlines() if len(line) > hooks.CLI_WIDTH]
    assert not too_long, too_long


def test_formulas_become_mathml_outside_code_only(hooks):
    md = "Inline $\\lambda^*$ and `$not$` here.\n\n```python\nx = '$nor$'\n```\n\n$$\nD_1 = 0\n$$\n"
    out = hooks._math_markdown(md)
    keys = re.findall(r"MATHPLACEHOLDER\d+X", out)
    assert len(keys) == 2
    assert "`$not$`" in out and "x = '$nor$'" in out
    assert 'display="inline"' in hooks._math[keys[0]] and "&#x003BB;" in hooks._math[keys[0]]
    assert 'display="block"' in hooks._math[keys[1]]
    # prices and shell variables are not formulas
    assert hooks._math_markdown("costs $5 and $HOME") == "costs $5 and $HOME"
