"""Run the sidecar exactly as a container spec would, on this machine.

A container's command line, environment and mounted files are kept as they are, except for
what cannot be the same outside a pod: every path under a mount point lives in a temporary
directory instead, every listen address keeps its host but gets a free port, a Redis URL
points at the real test Redis, and a Secret's keys get test values. The real
`tombstone-sidecar` console script then runs with that command line.
"""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.support.procs import ManagedProcess, free_port, wait_for_port, wait_until
from tests.support.sidecar_process import sidecar_command

LISTEN_FLAGS = ("--listen", "--ops-listen")
LISTEN_KEYS = ("listen", "ops_listen", "ops-listen")
# Test values for the keys of the Secrets the manifests mount.
SECRET_VALUES = {"users": "synapse:test-password-0123456789abcdef\n"}
_REDIS = re.compile(r"^redis://[^/]+")


@dataclass
class Plan:
    """A command line and environment ready to run here, and the ports it will listen on."""

    args: list[str]
    env: dict[str, str]
    ports: dict[str, int]  # "--listen"/"--ops-listen" -> local port


class Localizer:
    """Maps container paths, addresses and URLs to this machine (see the module doc)."""

    def __init__(self, root: Path, redis_url: str | None = None) -> None:
        self.root = root
        self.redis_url = redis_url
        self.mounts: dict[str, Path] = {}
        self.ports: dict[str, int] = {}

    def mount(self, container_path: str, files: Mapping[str, str] | None = None) -> Path:
        local = self.root / ("mnt" + container_path.replace("/", "_"))
        local.mkdir(parents=True, exist_ok=True)
        for name, text in (files or {}).items():
            (local / name).write_text(self.config_text(name, text))
        self.mounts[container_path] = local
        return local

    def value(self, value: str) -> str:
        """A path under a mount point -> its local copy; a Redis URL -> the test Redis."""
        for path in sorted(self.mounts, key=len, reverse=True):
            if value == path or value.startswith(path + "/"):
                return str(self.mounts[path]) + value[len(path) :]
        if self.redis_url and _REDIS.match(value):
            return _REDIS.sub(self.redis_url.rsplit("/", 1)[0], value)
        return value

    def address(self, flag: str, value: str) -> str:
        host = value.rsplit(":", 1)[0]
        self.ports[flag] = free_port()
        return f"{host}:{self.ports[flag]}"

    def args(self, args: Sequence[str]) -> list[str]:
        result = [str(a) for a in args]
        for i, arg in enumerate(result):
            if i > 0 and result[i - 1] in LISTEN_FLAGS:
                result[i] = self.address(result[i - 1], arg)
            else:
                result[i] = self.value(arg)
        return result

    def env(self, env: Mapping[str, str]) -> dict[str, str]:
        result = {k: self.value(v) for k, v in env.items() if k != "PATH"}
        if "/tmp" in self.mounts:
            result["TMPDIR"] = str(self.mounts["/tmp"])  # /tmp is the volume in the pod
        return result

    def config_text(self, name: str, text: str) -> str:
        """A YAML options file with its addresses, paths and URLs localized too."""
        if not name.endswith((".yaml", ".yml")):
            return text
        data = yaml.safe_load(text) or {}
        for key, value in data.items():
            if key in LISTEN_KEYS:
                data[key] = self.address("--" + key.replace("_", "-"), str(value))
            elif isinstance(value, str):
                data[key] = self.value(value)
        return yaml.safe_dump(data)

    def plan(self, args: Sequence[str], env: Mapping[str, str]) -> Plan:
        local_args = self.args(args)
        return Plan(local_args, self.env(env), dict(self.ports))


def volume_files(volume: dict[str, Any], docs: Sequence[dict[str, Any]]) -> dict[str, str]:
    """The files a pod volume shows in its mount point (ConfigMap data, Secret test values)."""
    if "configMap" in volume:
        name = volume["configMap"]["name"]
        (config_map,) = [
            d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == name
        ]
        return dict(config_map["data"])
    if "secret" in volume:
        items = volume["secret"].get("items") or [{"key": k, "path": k} for k in SECRET_VALUES]
        return {item["path"]: SECRET_VALUES[item["key"]] for item in items}
    assert "emptyDir" in volume, f"no local stand-in for volume {volume}"
    return {}


def get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@contextmanager
def running(plan: Plan, log_path: Path) -> Iterator[ManagedProcess]:
    """The real sidecar with this plan's command line, ready (/readyz 200), then stopped."""
    process = ManagedProcess([*sidecar_command(), *plan.args], env=plan.env, log_path=log_path)
    process.start()
    try:
        assert process.proc is not None
        for port in plan.ports.values():
            wait_for_port(port, proc=process.proc, log_path=log_path)
        ops = plan.ports["--ops-listen"]
        ready = wait_until(lambda: get(ops, "/readyz")[0] == 200, timeout=10)
        assert ready, f"/readyz never answered 200:\n{process.log_tail()}"
        yield process
    finally:
        process.stop()
