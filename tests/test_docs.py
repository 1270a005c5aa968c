"""The docs speak to users about the code as it is: no tracker references, no dated "Update,"
paragraphs over older ones, nothing about how this project's own machines are provided, and
relative links that resolve."""

from __future__ import annotations

import re

import pytest

from conftest import REPO

PAGES = sorted([*REPO.glob("docs/*.md"), REPO / "README.md", REPO / "CHANGELOG.md", *REPO.glob("configs/*.yaml"),
                REPO / "pyproject.toml"])
# (pattern, case-sensitive): tracker numbers, dated "Update," paragraphs, numbered sections that
# rewrites renumber, asides about this project's own sessions and machines.
STALE = [(r"\bissues? \d", False), (r"\bUpdate,", True), (r"§\d", True), (r"\bdevice (tool|time)\b", False),
         (r"\ba later session\b", False), (r"\bfor the lead\b", False)]


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_no_tracker_references_or_stale_asides(page):
    text = page.read_text(encoding="utf-8")
    found = [f"{page.name}:{text[:m.start()].count(chr(10)) + 1}: {m.group(0)!r}"
             for pattern, exact in STALE for m in re.finditer(pattern, text, 0 if exact else re.IGNORECASE)]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("page", [p for p in PAGES if p.suffix == ".md"], ids=lambda p: p.name)
def test_relative_links_resolve(page):
    text = page.read_text(encoding="utf-8")
    missing = [target for target in re.findall(r"\]\(([^)#\s]+)", text)
               if "://" not in target and not (page.parent / target).exists()]
    assert not missing, missing


def test_readme_names_the_torch_range_pyproject_declares():
    declared = re.search(r'"torch(>=[0-9.]+[^"]*)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert f"torch{declared}" in (REPO / "README.md").read_text()
