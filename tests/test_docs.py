"""The docs cannot rot quietly: every repository path they name exists, every setting the
settings table lists is one, and every `FOLDSERVE_*` name they use is a setting's variable."""

from __future__ import annotations

import argparse
import re
import subprocess
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
    missing = sorted(p for p in named_paths(text) if not (ROOT / p).exists() and not generated(p))
    assert not missing, f"{doc.name} names paths that do not exist: {missing}"


def generated(path: str) -> bool:
    """A path git ignores: made by a run (bench/.cache, .venv), absent from a fresh clone."""
    # NOTE: as a folder too: a pattern for folders ("bench/.gitignore": `.cache/`) matches a
    # path that does not exist only when it is asked about as one.
    for form in (path, f"{path}/"):
        if subprocess.run(["git", "check-ignore", "-q", form], cwd=ROOT).returncode == 0:
            return True
    return False


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


def _options(parser: argparse.ArgumentParser, command: str) -> set[str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            return set(action.choices[command]._option_string_actions)
    return set()


def shown_commands(text: str) -> list[list[str]]:
    """Each `foldserve <command> ...` line of the docs' shell blocks, continuations joined."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = line.split("#")[0].split()
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
                words = words[1:]  # VAR=value before the command
            if len(words) > 1 and words[0].endswith("foldserve"):
                commands.append(words[1:])
    return commands


def test_every_option_a_shown_foldserve_command_uses_exists() -> None:
    from foldserve.cli import build_parser as offline_parser
    from service.cli import build_parser as server_parser

    parsers = {"serve": server_parser()}
    seen = 0
    for doc in DOCS:
        for command, *words in shown_commands(doc.read_text()):
            parser = parsers.get(command) or offline_parser()
            known = _options(parser, command)
            assert known, f"{doc.name}: `foldserve {command}` is no command"
            used = {w.split("=")[0] for w in words if w.startswith("--")}
            assert used <= known, f"{doc.name}: foldserve {command} {sorted(used - known)}"
            seen += 1
    assert seen >= 5  # the README's and docs' commands were read


def test_the_command_reader_joins_continuations_and_skips_variables() -> None:
    text = "```bash\nFOLDSERVE_X=1 .venv/bin/foldserve export --model a:b \\\n  --bogus 3\n```"
    assert shown_commands(text) == [["export", "--model", "a:b", "--bogus", "3"]]
