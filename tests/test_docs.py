"""The repository holds what its documents cite: every relative Markdown link resolves inside it."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _tracked(pattern: str):
    try:
        out = subprocess.run(["git", "ls-files", pattern], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        out = [str(p.relative_to(ROOT)) for p in ROOT.rglob(pattern)
               if ".venv" not in p.parts and "build" not in p.parts]
    return sorted(ROOT / p for p in out)


# the docs pages count before they are committed (a new page is checked from its first run)
MARKDOWN = sorted(set(_tracked("*.md")) | set(ROOT.glob("docs/*.md")) | {ROOT / "README.md"})


def _links(path: Path):
    text = path.read_text(encoding="utf-8")
    # code spans and fenced blocks are not links
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return LINK.findall(text)


def _code_spans(path: Path):
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    return re.findall(r"`([^`\n]+)`", text)


def test_there_are_documents_to_check():
    names = {p.relative_to(ROOT).as_posix() for p in MARKDOWN}
    assert {"README.md", "docs/SPEC.md", "muscle_fast/ops/compat_loss/README.md"} <= names


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve_inside_the_repository(path):
    bad = []
    for target in _links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL or an anchor in the same page
        file = (path.parent / target.split("#", 1)[0]).resolve()
        if ROOT not in file.parents and file != ROOT:
            bad.append(f"{target} (outside the repository)")
        elif not file.exists():
            bad.append(f"{target} (missing)")
    assert not bad, f"{path.relative_to(ROOT)}: " + ", ".join(bad)


def test_no_document_or_source_cites_files_outside_the_repository():
    cited = []
    for path in MARKDOWN + _tracked("*.py"):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if "../shared/" in line and path != Path(__file__).resolve():
                cited.append(f"{path.relative_to(ROOT)}:{n}")
    assert not cited, "cites ../shared/ (not in a clone): " + ", ".join(cited)


def test_readme_links_every_docs_page():
    """The README is the first page: every page under docs/ is reachable from it."""
    linked = {(ROOT / target.split("#", 1)[0]).resolve() for target in _links(ROOT / "README.md")}
    missing = [p.name for p in sorted(ROOT.glob("docs/*.md")) if p.resolve() not in linked]
    assert not missing, f"README.md does not link docs/{missing}"


_TOP = {p.name for p in ROOT.iterdir() if not p.name.startswith(".") or p.name == ".ci"}
_REPO_PATH = re.compile(r"[A-Za-z0-9_.-]+(?:/[A-Za-z0-9_.-]+)+/?")


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_cited_repository_paths_exist(path):
    """A file named in code (`benchmarks/NOTES.md`, `csrc/thread_pool.h`) whose first part is a
    top-level entry of the repository exists, from the root or from the page's folder."""
    bad = []
    for span in _code_spans(path):
        if not _REPO_PATH.fullmatch(span) or span.split("/", 1)[0] not in _TOP - {"build", "dist"}:
            continue
        if not ((ROOT / span).exists() or (path.parent / span).exists()):
            bad.append(span)
    assert not bad, f"{path.relative_to(ROOT)} cites missing files: {bad}"
