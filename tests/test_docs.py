"""The docs cannot rot quietly: every repository path they name exists, every setting the
settings table lists is one, and every `FOLDSERVE_*` name they use is a setting's variable."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from service.settings import ENV_PREFIX, Settings, env_name

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
# Reports of past runs name the code as it was then (a file since split or renamed included).
REPORTS = {"performance.md"}
# A path of this repository in backticks or a link: a known top folder, then a file or folder.
TOP = r"(?:service|foldserve|tests|docs|deploy|docker|bench|scripts|model_store|\.ci)"
PATH = re.compile(rf"(?:`|\()({TOP}/[\w./-]*[\w/])(?:[`)\s:]|$)")


def named_paths(text: str) -> set[str]:
    found = set()
    for match in PATH.finditer(text):
        path = match.group(1).split("::")[0].rstrip("/.")
        if "*" in path or "<" in path or "{" in path:
            continue  # a pattern, not a path
        found.add(path)
    return found


@pytest.mark.parametrize("doc", [d for d in DOCS if d.name not in REPORTS], ids=lambda p: p.name)
def test_every_repository_path_a_doc_names_exists(doc: Path) -> None:
    text = doc.read_text()
    missing = sorted(p for p in named_paths(text) if not (ROOT / p).exists())
    assert not missing, f"{doc.name} names paths that do not exist: {missing}"


def test_the_path_reader_finds_paths_and_skips_patterns() -> None:
    text = "see `service/batching.py`, [x](docs/drift.md) and `docs/*.md`, `tests/a.py::test`"
    assert named_paths(text) == {"service/batching.py", "docs/drift.md", "tests/a.py"}


def test_every_setting_the_settings_table_lists_is_one() -> None:
    table = (ROOT / "docs" / "settings.md").read_text()
    listed = set(re.findall(r"^\| `([a-z_]+)`(?:, `([a-z_]+)`)?", table, re.M))
    names = {name for pair in listed for name in pair if name}
    assert names and names <= set(Settings.model_fields), names - set(Settings.model_fields)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_foldserve_variable_a_doc_uses_is_a_setting(doc: Path) -> None:
    variables = {env_name(field) for field in Settings.model_fields}
    used = set(re.findall(rf"\b{ENV_PREFIX}[A-Z0-9_]+\b", doc.read_text()))
    assert used <= variables, f"{doc.name}: {sorted(used - variables)}"
