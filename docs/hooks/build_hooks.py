"""MkDocs hooks of the bayes_dgme site (``mkdocs.yml: hooks``); nothing here is part of the package.

1. **CLI reference** generated at build time: ``<!-- cli-reference -->`` in ``reference/cli.md`` becomes
   the ``--help`` text of ``bayes-dgme`` and of every subcommand, rendered from
   ``bayes_dgme.cli.build_parser()``, so the page cannot go stale.
2. **API reference by public name**: a line ``::: bayes_dgme.NAME`` documents the public name
   ``bayes_dgme.NAME`` wherever it is defined (the hook imports the package and rewrites the line to the
   defining module), so moving a function to another module changes no page. ``::: bayes_dgme.NAME?``
   is an entry for a name that another branch is adding: left out while the name is not public. A public name (in
   ``bayes_dgme.__all__``) that no API page lists is documented on ``reference/api/other.md``
   (``<!-- api-unlisted -->``), so a new public name is never missing from the site; a listed name
   that is not public stops the build.
3. **Formulas**: ``$...$`` (inline) and ``$$ ... $$`` (display, on lines of their own) are converted to
   MathML at build time with ``latex2mathml``: no JavaScript, and the pages render offline.
4. ``<!-- readme-sections REGEX -->`` includes the README's ``## `` sections whose heading matches
   REGEX (``readme-sections?``: none is fine), so the results tables exist once, in the README.
5. ``changelog.md`` is the repository's ``CHANGELOG.md``; a nav entry whose page another branch has
   not delivered yet (``analyses/real-data.md``) is dropped with a log line instead of breaking the build.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import sys
import textwrap
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

log = logging.getLogger("mkdocs.hooks.bayes_dgme")

ROOT = Path(__file__).resolve().parents[2]
API_DIR = "reference/api/"
OPTIONAL_PAGES = {"analyses/real-data.md"}  # written on another branch; included as soon as it exists
_API_LINE = re.compile(r"^:::[ \t]+bayes_dgme\.([A-Za-z_][A-Za-z0-9_]*)(\?)?[ \t]*$", re.M)
_FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
_CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)
_DISPLAY = re.compile(r"^\$\$[ \t]*\n(.+?)\n\$\$[ \t]*$", re.M | re.S)
_INLINE = re.compile(r"(?<![\\$\w])\$(?![\s$])([^$\n]+?)(?<!\s)\$(?!\w)")
_math: dict[str, str] = {}
_listed: set[str] = set()


def _package():
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module("bayes_dgme")


# ------------------------------------------------------------------------------------------------ nav
def _drop_missing(items: list, docs_dir: Path) -> list:
    kept = []
    for item in items:
        if isinstance(item, dict):
            (title, value), = item.items()
            if isinstance(value, list):
                kept.append({title: _drop_missing(value, docs_dir)})
                continue
            if value in OPTIONAL_PAGES and not (docs_dir / value).exists():
                log.info("nav: %s is not in this tree yet; its entry is left out", value)
                continue
        kept.append(item)
    return kept


def on_config(config):
    config["nav"] = _drop_missing(config["nav"], Path(config["docs_dir"]))
    return config


def on_files(files, config):
    changelog = ROOT / "CHANGELOG.md"
    files.append(File.generated(config, "changelog.md", content=changelog.read_text(encoding="utf-8")))
    _listed.clear()
    for f in files:
        if f.src_uri.startswith(API_DIR) and f.src_uri.endswith(".md") and f.abs_src_path:
            _listed.update(m.group(1) for m in _API_LINE.finditer(Path(f.abs_src_path).read_text(encoding="utf-8")))
    return files


# ------------------------------------------------------------------------------------------ API names
def _defining_path(bd, name: str) -> str:
    """The dotted path where ``bayes_dgme.NAME`` is defined (what mkdocstrings needs to find it)."""
    if name not in getattr(bd, "__all__", ()):
        raise PluginError(f"docs: `::: bayes_dgme.{name}`: {name!r} is not a public name of bayes_dgme "
                          f"(bayes_dgme.__all__); remove the line or export the name")
    obj = getattr(bd, name)
    if isinstance(obj, type(bd)):  # a submodule such as bayes_dgme.known
        return obj.__name__
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if module and qualname and module.startswith("bayes_dgme"):
        return f"{module}.{qualname}"
    # a constant (RBAR, DEFAULT_SCENARIO): the package's lazy table or the first submodule holding it
    lazy = getattr(bd, "_LAZY", {})
    if name in lazy:
        return f"bayes_dgme.{lazy[name]}.{name}"
    for mod_name, mod in sorted(sys.modules.items()):
        if mod_name.startswith("bayes_dgme.") and getattr(mod, name, None) is obj:
            return f"{mod_name}.{name}"
    return f"bayes_dgme.{name}"


def _api_markdown(markdown: str, src_uri: str) -> str:
    bd = _package()
    if "<!-- api-unlisted -->" in markdown:
        unlisted = [n for n in bd.__all__ if n not in _listed]
        if unlisted:
            log.info("docs: public names documented on %s only: %s", src_uri, ", ".join(unlisted))
            block = "\n\n".join(f"::: bayes_dgme.{n}" for n in unlisted)
        else:
            block = "Every public name is documented on one of the pages above."
        markdown = markdown.replace("<!-- api-unlisted -->", block)
    def entry(m):
        name, optional = m.group(1), m.group(2) == "?"
        if optional and name not in getattr(bd, "__all__", ()):
            log.info("docs: %s: bayes_dgme.%s is not public in this tree; its entry is left out", src_uri, name)
            return ""
        return f"::: {_defining_path(bd, name)}"
    return _API_LINE.sub(entry, markdown)


# ------------------------------------------------------------------------------------------------ CLI
CLI_WIDTH = 80  # characters that fit the site's code blocks


def _wrap(text: str) -> str:
    """Wrap the lines argparse leaves long (raw descriptions and epilogs), keeping their indentation."""
    out = []
    for line in text.rstrip().splitlines():
        indent = line[:len(line) - len(line.lstrip())]
        out.append(textwrap.fill(line, CLI_WIDTH, subsequent_indent=indent) if len(line) > CLI_WIDTH else line)
    return "\n".join(out)

def _cli_markdown() -> str:
    _package()
    from bayes_dgme.cli import build_parser

    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(CLI_WIDTH)  # argparse wraps to the terminal width: make the page reproducible
    try:
        parser = build_parser()
        subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
        summaries = {a.dest: a.help for a in subparsers._choices_actions}
        parts = ["## `bayes-dgme`", "", "```text", _wrap(parser.format_help()), "```", ""]
        for name, sub in subparsers.choices.items():
            summary = summaries.get(name) or ""
            parts += [f"## `bayes-dgme {name}`", "", summary[:1].upper() + summary[1:] + ".", "",
                      "```text", _wrap(sub.format_help()), "```", ""]
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------- formulas
def _mathml(tex: str, display: bool) -> str:
    from latex2mathml.converter import convert

    key = f"MATHPLACEHOLDER{len(_math)}X"
    _math[key] = convert(tex.strip(), display="block" if display else "inline")
    return key


def _math_markdown(markdown: str) -> str:
    def prose(text: str) -> str:
        for heading in re.findall(r"^#+ .*\$.*$", text, re.M):  # the table of contents shows headings raw
            log.warning("docs: a formula in a heading (use <sub>, not $...$): %s", heading)
        text = _DISPLAY.sub(lambda m: "\n" + _mathml(m.group(1), True) + "\n", text)
        out, last = [], 0
        for m in _CODE_SPAN.finditer(text):  # leave inline code alone
            out.append(_INLINE.sub(lambda mm: _mathml(mm.group(1), False), text[last:m.start()]))
            out.append(m.group(0))
            last = m.end()
        out.append(_INLINE.sub(lambda mm: _mathml(mm.group(1), False), text[last:]))
        return "".join(out)

    out, last = [], 0
    for m in _FENCE.finditer(markdown):  # leave fenced code alone
        out.append(prose(markdown[last:m.start()]))
        out.append(m.group(0))
        last = m.end()
    out.append(prose(markdown[last:]))
    return "".join(out)


# ---------------------------------------------------------------------------------- README sections
_README_DIRECTIVE = re.compile(r"^<!-- readme-sections(\?)? (.+?) -->[ \t]*$", re.M)
_MD_LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")


def _readme_sections(pattern: str) -> list[tuple[str, str]]:
    """The README's ``## `` sections whose heading matches ``pattern``: (heading, body) pairs."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    text = _FENCE.sub(lambda m: m.group(0).replace("\n## ", "\n\u200b## "), text)  # no headings in code
    parts = re.split(r"^## (.+)$", text, flags=re.M)
    found = [(parts[i].strip(), parts[i + 1].replace("\u200b", "")) for i in range(1, len(parts), 2)]
    return [(h, body) for h, body in found if re.search(pattern, h)]


def _relink(body: str, page_uri: str) -> str:
    """README links made relative to the page: figures under docs/ stay links, other files become text."""
    depth = page_uri.count("/")

    def fix(m):
        bang, text, target = m.groups()
        if re.match(r"[a-z]+://|#", target):
            return m.group(0)
        if target.startswith("docs/"):
            return f"{bang}[{text}]({'../' * depth}{target[len('docs/'):]})"
        return f"`{text}`" if not bang else text
    return _MD_LINK.sub(fix, body)


def _readme_markdown(markdown: str, src_uri: str) -> str:
    def expand(m):
        optional, pattern = m.group(1) == "?", m.group(2)
        sections = _readme_sections(pattern)
        if not sections and not optional:
            raise PluginError(f"docs: {src_uri}: no README section has a heading matching {pattern!r}")
        return "\n".join(f"## {h}\n{_relink(body, src_uri)}" for h, body in sections)
    return _README_DIRECTIVE.sub(expand, markdown)


# ------------------------------------------------------------------------------------------ the hooks
def on_page_markdown(markdown, page, config, files):
    src = page.file.src_uri
    if "<!-- cli-reference -->" in markdown:
        markdown = markdown.replace("<!-- cli-reference -->", _cli_markdown())
    if "<!-- readme-sections" in markdown:
        markdown = _readme_markdown(markdown, src)
    if src.startswith(API_DIR):
        markdown = _api_markdown(markdown, src)
    return _math_markdown(markdown)


def on_page_content(content, page, config, files):
    if "MATHPLACEHOLDER" not in content:
        return content
    content = re.sub(r"<p>\s*(MATHPLACEHOLDER\d+X)\s*</p>",
                     lambda m: f'<div class="math-display">{_math[m.group(1)]}</div>', content)
    missing = [k for k in re.findall(r"MATHPLACEHOLDER\d+X", content) if k not in _math]
    if missing:
        raise PluginError(f"docs: {page.file.src_uri}: formula placeholders lost: {missing}")
    return re.sub(r"MATHPLACEHOLDER\d+X", lambda m: _math[m.group(0)], content)

