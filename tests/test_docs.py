"""The documentation stays self-contained and short: no tracked file points outside the repository, the
README stays a short entry point, and every relative link in README.md and docs/ reaches a file."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README_MAX_LINES = 220
# Markers of files that live outside the repository. Built by joining so this file does not match itself.
OUTSIDE = ("../" + "shared", "rdu_" + "facts.md")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _tracked_text_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        paths = [ROOT / p for p in out.decode().split("\0") if p]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (e.g. an sdist): walk the tree
        paths = [p for p in ROOT.rglob("*") if p.is_file() and ".git" not in p.parts and ".venv" not in p.parts]
    files = []
    for p in paths:
        try:
            files.append((p, p.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
            continue  # binary, or deleted in the work tree but still tracked
    return files


def _doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_no_tracked_file_points_outside_the_repository():
    found = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p, text in _tracked_text_files()
             for i, line in enumerate(text.splitlines(), 1) if any(m in line for m in OUTSIDE)]
    assert not found, "files refer to notes outside the repository:\n" + "\n".join(found)


def test_readme_is_short():
    lines = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, (f"README.md has {lines} lines, expected at most {README_MAX_LINES}: "
                                       "move detail into docs/")


def test_docs_folder_exists():
    assert len(_doc_files()) > 1, "expected the reference documentation under docs/"


def _anchors(doc: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"```.*?```", "", doc.read_text(encoding="utf-8"), flags=re.S)  # no headings in code
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.*)$", text, flags=re.M)}


@pytest.mark.parametrize("doc", _doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_reach_files(doc):
    broken = []
    for target in LINK.findall(doc.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):
            continue  # a URL
        path, _, anchor = target.partition("#")
        file = doc.parent / path if path else doc
        if not file.exists() or (anchor and file.suffix == ".md" and anchor not in _anchors(file)):
            broken.append(target)
    assert not broken, f"{doc.relative_to(ROOT)} links to missing files or headings: {', '.join(broken)}"
