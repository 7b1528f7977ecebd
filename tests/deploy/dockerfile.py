"""Just enough of the Dockerfile syntax to read our two recipes: stages, instructions, their forms.

Continuation lines are joined, comments dropped, and every instruction keeps its line number so a
failing check can point at it. Forms we do not use (heredocs, parser directives other than
comments, ``ONBUILD``) are not understood: the tests fail on them instead of guessing.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    args: str  # the rest of the instruction, continuation lines joined with a space
    line: int  # where it starts in the file, 1-based

    def __str__(self) -> str:
        return f"line {self.line}: {self.keyword} {self.args}"


@dataclass
class Stage:
    base: str  # the image (or earlier stage) after FROM
    name: str | None  # the stage's name after AS
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def one(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert len(found) == 1, f"expected one {keyword} in stage {self.name or self.base}: {found}"
        return found[0]


def parse(path: Path) -> list[Stage]:
    """The stages of a Dockerfile, in order; instructions before the first FROM must be ARGs."""
    stages: list[Stage] = []
    for instruction in _instructions(path.read_text()):
        if instruction.keyword == "FROM":
            words = instruction.args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            assert len(words) in (1, 3), f"{path}: unexpected FROM form, {instruction}"
            stages.append(Stage(words[0], name))
        elif stages:
            stages[-1].instructions.append(instruction)
        else:
            assert instruction.keyword == "ARG", f"{path}: {instruction} before any FROM"
    return stages


def _instructions(text: str) -> list[Instruction]:
    found: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # a comment inside a continued instruction is dropped, as Docker does
        if not pending:
            start = number
        continued = stripped.endswith("\\")
        pending.append(stripped[:-1].strip() if continued else stripped)
        if not continued:
            keyword, _, args = " ".join(pending).partition(" ")
            assert "<<" not in args, f"line {start}: heredocs are not understood here"
            found.append(Instruction(keyword.upper(), args.strip(), start))
            pending = []
    assert not pending, "the Dockerfile ends inside a continued instruction"
    return found


def exec_form(instruction: Instruction, args: str | None = None) -> list[str]:
    """A JSON-array argument (``ENTRYPOINT ["a", "b"]``); the shell form is refused."""
    text = instruction.args if args is None else args
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AssertionError(f"{instruction}: not the exec (JSON array) form") from exc
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), str(instruction)
    return value


def env_pairs(instruction: Instruction) -> list[tuple[str, str]]:
    """``ENV K=V K2="v 2"`` as pairs (the legacy ``ENV K V`` form is refused)."""
    pairs = []
    for word in shlex.split(instruction.args):
        key, sep, value = word.partition("=")
        assert sep, f"{instruction}: use ENV KEY=VALUE"
        pairs.append((key, value))
    return pairs


def expand(value: str, env: dict[str, str]) -> str:
    """``$NAME`` and ``${NAME}`` as Docker substitutes them in ENV values."""
    return re.sub(r"\$(?:\{(\w+)\}|(\w+))", lambda m: env.get(m.group(1) or m.group(2), ""), value)


@dataclass(frozen=True)
class Copy:
    sources: list[str]
    dest: str
    flags: dict[str, str]


def copy_args(instruction: Instruction) -> Copy:
    words = shlex.split(instruction.args)
    flags = {}
    while words and words[0].startswith("--"):
        key, _, value = words.pop(0)[2:].partition("=")
        flags[key] = value
    assert len(words) >= 2, f"{instruction}: COPY needs a source and a destination"
    return Copy(words[:-1], words[-1], flags)


class DockerIgnore:
    """The build context's exclusions, for the patterns we use: plain paths, globs, ``**/``."""

    def __init__(self, path: Path) -> None:
        lines = [line.strip() for line in path.read_text().splitlines()]
        self.patterns = [line for line in lines if line and not line.startswith("#")]
        assert not any(p.startswith("!") for p in self.patterns), "exceptions are not understood"

    def ignored(self, relative: PurePosixPath) -> bool:
        parts = relative.parts
        for pattern in self.patterns:
            if pattern.startswith("**/"):
                tail = pattern[3:]
                if any(fnmatch.fnmatchcase(part, tail) for part in parts):
                    return True
            # A pattern that names a folder excludes everything below it.
            elif any(
                fnmatch.fnmatchcase("/".join(parts[:n]), pattern) for n in range(1, len(parts) + 1)
            ):
                return True
        return False
