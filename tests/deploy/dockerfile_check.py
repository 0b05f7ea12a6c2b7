"""A small Dockerfile reader: enough to check an image's build without a Docker engine."""
from __future__ import annotations

import fnmatch
import shlex
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Instruction:
    stage: int
    keyword: str
    args: str


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions in order, line continuations joined, comments and parser directives dropped."""
    out: list[Instruction] = []
    stage = -1
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        keyword, _, args = buf.strip().partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        out.append(Instruction(stage, keyword, args.strip()))
        buf = ""
    if buf:
        raise ValueError("Dockerfile ends inside a line continuation")
    return out


def copy_sources(ins: Instruction) -> list[str]:
    """The build-context sources of a COPY/ADD (none for COPY --from=stage)."""
    words = shlex.split(ins.args)
    if any(w.startswith("--from") for w in words):
        return []
    words = [w for w in words if not w.startswith("--")]
    return words[:-1]


def dockerignore_patterns(path: Path) -> list[str]:
    if not path.exists():
        return []
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def ignored(rel: str, patterns: list[str]) -> bool:
    hit = False
    for p in patterns:
        neg = p.startswith("!")
        pat = p[1:] if neg else p
        if fnmatch.fnmatch(rel, pat) or fnmatch.fnmatch(rel, pat.rstrip("/") + "/*") or rel == pat.rstrip("/"):
            hit = not neg
    return hit
