"""deploy/Dockerfile built for real (podman, offline) and run the way its pod spec runs it.

The image is built once per run (conftest.py: a Debian base standing in for python:3.12-slim,
see image.py) and its containers are started from the rendered overlays' own container specs
(pod.py): read-only root, UID 10001, all capabilities dropped, no-new-privileges, memory
limit, the state volume and /tmp as emptyDirs. The run's summary says which Python the image
had and how large it is.
"""

from __future__ import annotations

import errno
import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploy.dockerfile import final_stage
from tests.deploy.image import IMAGE_REPORT, Built
from tests.deploy.manifests import of_kind, render
from tests.deploy.pod import Pod
from tests.deploy.podman import Podman

SIDECAR = "tombstone-sidecar"
STATE = "/var/lib/tombstone-sidecar"
TOKEN_DIR = "/var/run/secrets/tombstone-ops"  # a Secret in a real pod; read-only here too
RETIRED = "retired.example.org"

# Run inside the container as its own user: what the process is, and which paths it can write.
_INSPECT = """
import errno, json, os, sys
status = dict(line.split(":", 1) for line in open("/proc/1/status"))
cmdline = open("/proc/1/cmdline", "rb").read().split(b"\\0")
writable, refused = [], {}
for directory in sys.argv[1:]:
    probe = os.path.join(directory, ".write-probe")
    try:
        open(probe, "w").close()
        os.unlink(probe)
        writable.append(directory)
    except OSError as e:
        refused[directory] = e.errno
rw = [line.split()[4] for line in open("/proc/self/mountinfo")
      if "rw" in line.split()[5].split(",")]
print(json.dumps({"status": {k: v.strip() for k, v in status.items()},
                  "cmdline": [c.decode() for c in cmdline if c],
                  "writable": writable, "refused": refused, "rw_mounts": rw}))
"""
# Written to by a kubelet or runtime in any pod (rw bind mounts of single files, or virtual).
_RUNTIME_MOUNTS = (
    "/proc",
    "/sys",
    "/dev",
    "/etc/hosts",
    "/etc/hostname",
    "/etc/resolv.conf",
    "/run/.containerenv",
)
_TRY_WRITE = (
    "/",
    "/etc",
    "/opt/tombstone-sidecar",
    "/opt/tombstone-sidecar/bin",
    "/usr",
    "/var/tmp",
    "/run",
    "/home",
    "/tmp",
    STATE,
)


def _workload(overlay: str) -> dict[str, object]:
    (workload,) = of_kind(render(overlay), "StatefulSet")
    return workload


@pytest.fixture(scope="module")
def native(podman: Podman, image: Built, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pod]:
    """The native-sidecar overlay's sidecar, started from its container spec, with an ops
    token mounted (as a Secret would be) so the test can write a verdict through the API."""
    root = tmp_path_factory.mktemp("native-pod")
    pod = Pod(podman, _workload("native-sidecar"), root / "volumes", "native")
    secret = root / "secret"
    secret.mkdir()
    (secret / "token").write_text(secrets.token_hex(32))
    (secret / "token").chmod(0o644)
    try:
        pod.start(
            SIDECAR,
            image.tag,
            extra_mounts={TOKEN_DIR: secret},
            extra_env={"TOMBSTONE_OPS_TOKEN_FILE": f"{TOKEN_DIR}/token"},
        )
        pod.wait_started(SIDECAR)
        yield pod
    finally:
        podman.run(["rm", "--force", "--time", "5", pod.container_name(SIDECAR)], check=False)


def _inside(pod: Pod, *argv: str) -> str:
    return pod.podman.output(["exec", pod.container_name(SIDECAR), *argv], timeout=60)


def test_the_image_keeps_its_healthcheck_user_and_command(podman: Podman, image: Built) -> None:
    (inspected,) = json.loads(podman.output(["image", "inspect", image.tag]))
    config = inspected["Config"]
    final = final_stage()
    assert config["User"] == final.user == "10001:10001"
    assert config["Entrypoint"] == final.entrypoint and config["Cmd"] == final.cmd
    assert inspected["Healthcheck"]["Test"] == ["CMD", *final.healthcheck], "docker format keeps it"
    assert set(config["Volumes"]) == set(final.volumes)
    assert image.size_bytes > 0 and image.python.startswith("3."), image


def test_the_sidecar_runs_as_its_pod_spec_says(native: Pod, image: Built) -> None:
    assert native.probe(SIDECAR, "readinessProbe") == 200
    assert native.probe(SIDECAR, "livenessProbe") == 200
    facts = json.loads(_inside(native, "python", "-c", _INSPECT, *_TRY_WRITE))
    status = facts["status"]
    assert facts["cmdline"][1:2] == ["/opt/tombstone-sidecar/bin/tombstone-sidecar"], facts
    assert status["Uid"].split() == ["10001"] * 4, status["Uid"]
    assert status["Gid"].split() == ["10001"] * 4, status["Gid"]
    assert int(status["CapEff"], 16) == 0 and int(status["CapBnd"], 16) == 0, "caps dropped"
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2", "the runtime's default seccomp filter"
    # Only the state volume and /tmp are writable; everywhere else the root is read-only
    # (EROFS, not merely a permission error).
    assert sorted(facts["writable"]) == sorted(["/tmp", STATE]), facts
    assert set(facts["refused"].values()) == {errno.EROFS}, facts["refused"]
    rw = {m for m in facts["rw_mounts"] if not m.startswith(_RUNTIME_MOUNTS)}
    assert rw == {"/tmp", STATE}, facts["rw_mounts"]
    # The state file is in the volume (the pod's emptyDir), owned by the sidecar's user.
    state = native.volumes["tombstone-state"] / "verdicts.sqlite3"
    assert state.exists() and state.stat().st_uid == 10001
    # The image's HEALTHCHECK passes in the running container.
    healthcheck = native.podman.run(
        ["healthcheck", "run", native.container_name(SIDECAR)], check=False
    )
    assert healthcheck.returncode == 0, healthcheck.stderr
    version = _inside(
        native,
        "python",
        "-c",
        "import sys, mitmproxy.version as m; print(sys.version.split()[0], m.VERSION)",
    )
    assert version.split()[0] == image.python, version
    IMAGE_REPORT.append(
        f"  in the image: Python {version.split()[0]}, mitmproxy {version.split()[1]}"
    )


def _verdict(pod: Pod) -> dict[str, object]:
    text = _inside(
        pod, SIDECAR, "verdicts", "show", RETIRED, "--json", "--ops-listen", "127.0.0.1:9480"
    )
    result: dict[str, object] = json.loads(text)
    return result


def test_a_verdict_survives_a_restart_and_sigterm_stops_it_in_time(native: Pod) -> None:
    """A verdict written through the API before a restart is served after it (the state file
    on the volume), and SIGTERM ends the process with status 0 within the grace period."""
    _inside(
        native,
        SIDECAR,
        "verdicts",
        "deny",
        RETIRED,
        "--comment",
        "image test",
        "--ops-listen",
        "127.0.0.1:9480",
    )
    before = _verdict(native)
    assert before["state"] == "gone" and before["signal"] == "operator", before
    name = native.container_name(SIDECAR)
    started = time.monotonic()
    # podman stop: the image's stop signal (SIGTERM), SIGKILL only after the grace period.
    native.podman.run(
        ["stop", "--time", str(native.grace_seconds), name], timeout=native.grace_seconds + 30
    )
    took = time.monotonic() - started
    state = json.loads(native.podman.output(["inspect", "--format", "{{json .State}}", name]))
    assert state["ExitCode"] == 0, state
    assert took < native.grace_seconds, f"stopped after {took:.1f}s"
    IMAGE_REPORT.append(
        f"  SIGTERM to exit 0: {took:.1f} s (grace period {native.grace_seconds} s)"
    )
    logs = native.podman.run(["logs", name], check=False)
    assert "SIGTERM" in logs.stdout + logs.stderr
    native.podman.run(["start", name])
    native.wait_started(SIDECAR)
    after = _verdict(native)
    assert (after["state"], after["signal"]) == ("gone", "operator"), after


def test_the_intercept_ca_bundle_step_runs_in_the_image(
    podman: Podman, image: Built, tmp_path: Path
) -> None:
    """The intercept overlay's pod: the sidecar (intercept mode) makes its CA in the state
    volume, then the `ca --bundle` init container, run from its own spec, writes system CAs
    plus that CA into the volume Synapse mounts, and no private key."""
    pod = Pod(podman, _workload("intercept"), tmp_path / "volumes", "intercept")
    bundle_step = "tombstone-ca-bundle"
    try:
        pod.start(SIDECAR, image.tag)
        pod.wait_started(SIDECAR)
        assert pod.run_to_completion(bundle_step, image.tag) == 0
    finally:
        podman.run(
            [
                "rm",
                "--force",
                "--time",
                "5",
                pod.container_name(SIDECAR),
                pod.container_name(bundle_step),
            ],
            check=False,
        )
    ca = (pod.volumes["tombstone-state"] / "ca" / "mitmproxy-ca-cert.pem").read_text()
    args = pod.container(bundle_step)["args"]
    target = Path(args[args.index("--bundle") + 1])
    (mount,) = [
        m
        for m in pod.container(bundle_step)["volumeMounts"]
        if target.is_relative_to(m["mountPath"])
    ]
    bundle = (pod.volumes[mount["name"]] / target.relative_to(mount["mountPath"])).read_text()
    assert ca.strip() in bundle
    assert bundle.count("BEGIN CERTIFICATE") > 50, "the system CAs are in the bundle too"
    assert "PRIVATE KEY" not in bundle
