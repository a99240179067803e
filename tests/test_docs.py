"""The README and the manual in docs/: links that resolve, a config table that is the
schema's, and a front page that stays a front page.

Links to web pages are not followed (the tests run without a network); they may only
point to hosts the README already names."""

from __future__ import annotations

import os
import re
import unicodedata
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from contracts.config import markdown_table

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
MANUAL = ("configuration", "privacy", "audit", "deployment", "strategies", "energy", "speed",
          "results", "layout")
ALLOWED_HOSTS = {"flower.ai"}  # the web hosts the README links to
README_MAX_LINES = 250
TABLE_START, TABLE_END = "<!-- config-table:start -->", "<!-- config-table:end -->"
REGENERATE = ('.venv/bin/python -c "from contracts.config import markdown_table; '
              'print(markdown_table())"')

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]"  # [text] or ![alt], then
                         r"\(\s*<?([^()\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")  # (target "title")
REFERENCE_LINK = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s.*)?$", re.M)
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.+?)[ \t#]*$", re.M)


def _prose(text: str) -> str:
    """The text outside fenced code blocks and inline code (links there are examples)."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def links(page: Path) -> list[str]:
    prose = _prose(page.read_text(encoding="utf-8"))
    return INLINE_LINK.findall(prose) + REFERENCE_LINK.findall(prose)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed
    (letters, digits, `_`, `-` and spaces stay), spaces turned into hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = re.sub(r"<[^>]+>", "", text).lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return kept.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading's anchor, with GitHub's -1, -2, ... for repeated headings."""
    seen: dict[str, int] = {}
    found = set()
    for _, heading in HEADING.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def test_the_slug_is_githubs():
    assert slug("Deployment: a coordinator and edge devices") == \
        "deployment-a-coordinator-and-edge-devices"
    assert slug("`flwr run .`") == "flwr-run-"
    assert slug("What the demo does (the 5-minute tour)") == "what-the-demo-does-the-5-minute-tour"
    assert slug("Privacy: what ε means here") == "privacy-what-ε-means-here"
    assert slug("A SuperNode's node config") == "a-supernodes-node-config"


def test_the_link_finder_sees_links_and_skips_code(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("See [a](a.md#x) and ![img](i.png).\n`[b](b.md)`\n```\n[c](c.md)\n```\n"
                    "[d]: d.md\n", encoding="utf-8")
    assert sorted(links(page)) == ["a.md#x", "d.md", "i.png"]


def test_the_manual_is_there():
    for name in MANUAL:
        assert (DOCS / f"{name}.md").is_file(), f"docs/{name}.md is missing"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_resolves(page):
    problems = []
    for target in links(page):
        url = urlparse(target)
        if url.scheme in ("http", "https"):
            if url.hostname not in ALLOWED_HOSTS:
                problems.append(f"{target}: a host the README does not name "
                                f"(allowed: {', '.join(sorted(ALLOWED_HOSTS))})")
            continue
        if url.scheme or url.netloc:
            problems.append(f"{target}: only relative links and http(s) links are checked")
            continue
        path, _, anchor = unquote(target).partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            problems.append(f"{target}: {os.path.relpath(file, ROOT)} does not exist")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            problems.append(f"{target}: no heading in {file.relative_to(ROOT)} has the anchor "
                            f"#{anchor}")
    assert not problems, f"{page.relative_to(ROOT)}:\n  " + "\n  ".join(problems)


def test_readme_links_to_every_manual_page():
    targets = {urlparse(t).path for t in links(README)}
    missing = [name for name in MANUAL if f"docs/{name}.md" not in targets]
    assert not missing, f"README.md does not link to docs/{{{', '.join(missing)}}}.md"


def test_config_table_is_the_schemas():
    text = (DOCS / "configuration.md").read_text(encoding="utf-8")
    assert text.count(TABLE_START) == 1 and text.count(TABLE_END) == 1, \
        f"docs/configuration.md needs one {TABLE_START} and one {TABLE_END}"
    table = text.split(TABLE_START)[1].split(TABLE_END)[0].strip()
    assert table == markdown_table(), (
        "the config table in docs/configuration.md is not contracts.config.SCHEMA's: replace "
        f"the lines between {TABLE_START} and {TABLE_END} with the output of\n  {REGENERATE}")


def test_the_deployment_table_is_the_policys():
    """Who decides each key on a device (docs/privacy.md), from client/policy.py: every
    configuration key is classified (a new one raises KeyError here until it is)."""
    from client.policy import deployment_table

    start, end = "<!-- deployment-table:start -->", "<!-- deployment-table:end -->"
    text = (DOCS / "privacy.md").read_text(encoding="utf-8")
    assert text.count(start) == 1 and text.count(end) == 1
    assert text.split(start)[1].split(end)[0].strip() == deployment_table(), (
        "docs/privacy.md's deployment table is out of date: replace the lines between the "
        "markers with the output of\n  .venv/bin/python -c \"from client.policy import "
        "deployment_table; print(deployment_table())\"")


def test_readme_is_a_front_page():
    text = README.read_text(encoding="utf-8")
    lines = len(text.splitlines())
    assert lines <= README_MAX_LINES, \
        f"README.md has {lines} lines (at most {README_MAX_LINES}): move detail into docs/"
    for command in ("make demo", "make test"):
        assert command in text, f"README.md does not name `{command}`"


def test_layout_tree_names_the_modules_that_exist():
    """docs/layout.md's tree lists every module of each area it names, and no other."""
    tree = re.search(r"^```\n(.*?)^```", (DOCS / "layout.md").read_text(encoding="utf-8"),
                     re.M | re.S)
    assert tree, "docs/layout.md has no tree (a fenced block)"
    listed: dict[str, set[str]] = {}
    area = None
    for line in tree.group(1).splitlines():
        if re.match(r"^[\w.-]+/", line):
            area = line.split("/")[0]
            listed[area] = set()
        elif area and (name := re.match(r"^\s+([\w.-]+\.py)\b", line)):
            listed[area].add(name.group(1))
    problems = []
    for area, names in listed.items():
        if area == "tests":
            continue
        there = {p.name for p in (ROOT / area).glob("*.py")} - {"__init__.py"}
        if names - there:
            problems.append(f"{area}/: listed but missing: {', '.join(sorted(names - there))}")
        if there - names:
            problems.append(f"{area}/: not listed: {', '.join(sorted(there - names))}")
    assert not problems, "docs/layout.md's tree is out of date:\n  " + "\n  ".join(problems)
