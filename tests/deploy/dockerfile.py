"""What deploy/Dockerfile says, read the way Docker reads it (enough for its own instructions)."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from tests.deploy.tools import DEPLOY

DOCKERFILE = DEPLOY / "Dockerfile"


@dataclass
class Stage:
    base: str
    env: dict[str, str] = field(default_factory=dict)
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    user: str = ""
    healthcheck: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)
    copies: list[list[str]] = field(default_factory=list)  # [--from=..., src..., dest]


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with comments dropped and continuation lines joined."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, rest = line.partition(" ")
        result.append((keyword.upper(), rest.strip()))
    return result


def stages(path: Path = DOCKERFILE) -> list[Stage]:
    args: dict[str, str] = {}
    found: list[Stage] = []
    for keyword, rest in instructions(path):
        if keyword == "ARG" and not found:
            name, _, default = rest.partition("=")
            args[name] = default
        elif keyword == "FROM":
            base = rest.split()[0]
            for name, value in args.items():
                base = base.replace("${" + name + "}", value)
            found.append(Stage(base))
        elif keyword == "ENV":
            for pair in shlex.split(rest):
                key, _, value = pair.partition("=")
                found[-1].env[key] = value
        elif keyword in ("ENTRYPOINT", "CMD"):
            value = json.loads(rest)  # exec form only: no shell in between
            assert isinstance(value, list), f"{keyword} must be in exec (JSON) form"
            setattr(found[-1], keyword.lower(), [str(v) for v in value])
        elif keyword == "HEALTHCHECK":
            found[-1].healthcheck = [str(v) for v in json.loads(rest.split(" CMD ", 1)[1])]
        elif keyword == "USER":
            found[-1].user = rest
        elif keyword == "VOLUME":
            found[-1].volumes.extend(json.loads(rest))
        elif keyword == "COPY":
            found[-1].copies.append(rest.split())
    return found


def final_stage() -> Stage:
    return stages()[-1]
