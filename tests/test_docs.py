"""The documentation's own rules, checked without building the site (``make docs`` builds it with --strict): the
README stays short and links every job's guide, its links lead to files, and every page is in the navigation."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_LINES = 200
JOB_GUIDES = ("convert", "detect", "evaluate", "parity", "deploy", "selftest")


def relative_links(text: str) -> list[str]:
    return [t for t in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text) if "://" not in t]


def test_the_readme_is_short_and_links_every_jobs_guide() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= README_MAX_LINES
    links = relative_links(text)
    assert {f"docs/guides/{job}.md" for job in JOB_GUIDES} <= set(links)
    assert [link for link in links if not (ROOT / link).exists()] == []


def test_every_page_is_in_the_navigation_and_every_page_link_leads_to_a_file() -> None:
    navigation = "\n".join(
        line for line in (ROOT / "mkdocs.yml").read_text().splitlines() if not line.lstrip().startswith("#")
    )
    pages = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md") if "_hooks" not in p.parts)
    assert len(pages) >= 15
    assert [page for page in pages if page not in navigation] == []
    broken = [
        f"{page}: {link}"
        for page in pages
        for link in relative_links((DOCS / page).read_text())
        if not (DOCS / page).parent.joinpath(link).exists()
    ]
    assert broken == []
