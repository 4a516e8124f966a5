"""The docs hold together: every relative Markdown link in README.md and docs/*.md names a file that exists, and
every ``#anchor`` (in the same page or another) a heading of its target, by GitHub's rule for heading anchors;
and README.md stays short, the rest being in docs/."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCED = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)  # code blocks: no links, no headings
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")  # [text](target)
HEADING = re.compile(r"^#{1,6} +(.+?) *$", re.MULTILINE)


def prose(page: Path) -> str:
    return FENCED.sub("", page.read_text())


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower-case, punctuation dropped except '-' and '_', spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(heading) for heading in HEADING.findall(prose(page))}


def relative_links(page: Path) -> list[str]:
    targets = LINK.findall(INLINE_CODE.sub("", prose(page)))
    return [target for target in targets if not re.match(r"[a-z]+:", target)]  # not https:, mailto:, ...


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.relative_to(ROOT).as_posix())
def test_every_relative_link_names_a_file_and_a_heading_that_exist(page):
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists() or (anchor and anchor not in anchors(linked)):
            broken.append(target)
    assert broken == []


def test_the_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) < 250
