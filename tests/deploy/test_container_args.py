"""Every tombstone-sidecar container in the rendered overlays, run for real: its exact args,
env and mounted files (paths, ports and the Redis address moved onto this machine, see
tests/deploy/launch.py) start the real sidecar, which answers /healthz and /readyz."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploy.launch import Localizer, Plan, get, running, volume_files
from tests.deploy.manifests import Container, render, sidecar_containers
from tests.deploy.tools import WORKLOAD_OVERLAYS
from tests.support.redis_server import RedisServer
from tests.support.sidecar_process import read_head, sidecar_command


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.stop()


def _localizer(overlay: str, container: Container, tmp_path: Path, redis: RedisServer) -> Localizer:
    local = Localizer(tmp_path, redis.url)
    for path, volume in container.mounts().items():
        local.mount(path, volume_files(volume, render(overlay)))
    return local


def _plan(container: Container, local: Localizer) -> Plan:
    return local.plan(container.spec.get("args", []), container.env())


def _servers() -> list[tuple[str, str]]:
    return [
        (o, c.name)
        for o in WORKLOAD_OVERLAYS
        for c in sidecar_containers(render(o))
        if c.spec["args"][0] == "run"
    ]


def _container(overlay: str, name: str) -> Container:
    (container,) = [c for c in sidecar_containers(render(overlay)) if c.name == name]
    return container


@pytest.mark.parametrize(("overlay", "name"), _servers())
def test_sidecar_starts_with_the_rendered_command_line(
    overlay: str, name: str, tmp_path: Path, redis: RedisServer
) -> None:
    container = _container(overlay, name)
    assert "command" not in container.spec, "the image's ENTRYPOINT (tombstone-sidecar) runs"
    local = _localizer(overlay, container, tmp_path, redis)
    plan = _plan(container, local)
    with running(plan, tmp_path / "sidecar.log") as process:
        ops = plan.ports["--ops-listen"]
        assert get(ops, "/healthz")[0] == 200
        assert get(ops, "/readyz")[0] == 200
        metrics = get(ops, "/metrics")[1].decode()
        assert "tombstone_build_info{" in metrics
        mode = container.env().get("TOMBSTONE_MODE", "passthrough")
        if mode == "intercept":
            assert "intercept mode: CA" in process.log_text()
        if "--proxy-auth-file" in plan.args:
            # The central proxy listens beyond loopback: without credentials it answers 407.
            with socket.create_connection(("127.0.0.1", plan.ports["--listen"]), 5) as sock:
                sock.sendall(b"CONNECT matrix.org:8448 HTTP/1.1\r\nHost: matrix.org:8448\r\n\r\n")
                assert read_head(sock)[0] == 407
        config = container.arg("--config")
        if config and "store: redis" in Path(local.value(config)).read_text():
            assert 'tombstone_store_up{store="redis"} 1.0' in metrics


def test_intercept_bundle_step_writes_the_sidecars_ca(tmp_path: Path, redis: RedisServer) -> None:
    sidecar = _container("intercept", "tombstone-sidecar")
    bundle_step = _container("intercept", "tombstone-ca-bundle")
    local = _localizer("intercept", sidecar, tmp_path, redis)
    for path, volume in bundle_step.mounts().items():
        if path not in local.mounts:
            local.mount(path, volume_files(volume, render("intercept")))
    with running(_plan(sidecar, local), tmp_path / "sidecar.log"):
        step = local.plan(bundle_step.spec["args"], bundle_step.env())
        result = subprocess.run(
            [*sidecar_command(), *step.args],
            env=step.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
    bundle = Path(local.value(bundle_step.arg("--bundle") or ""))
    state = Path(local.value(sidecar.env()["TOMBSTONE_STATE_DIR"]))
    ca_cert = (state / "ca" / "mitmproxy-ca-cert.pem").read_text()
    text = bundle.read_text()
    assert ca_cert.strip() in text, "the bundle lacks the CA the running sidecar signs with"
    assert text.count("BEGIN CERTIFICATE") > 10, "the bundle must keep the public CAs too"
