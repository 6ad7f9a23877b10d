"""Build deploy/Dockerfile offline, on a base image made from Debian's packages.

No registry image can be pulled here, so `python:3.12-slim` is replaced (build argument
PYTHON_IMAGE) by a minimal Debian of the host's own release with Debian's python3, made by
mmdebstrap and imported into podman. The Dockerfile itself runs unchanged: its build stage
makes a venv and `pip install .`s the copied source; pip reads an /etc/pip.conf of the base
image that points it at a directory of wheels mounted into the build (`--network=none`).

The wheels are built on the host by the host's Debian python3, which is the very interpreter
version the base image gets from the same Debian release: environment markers such as
redis's `python_full_version < "3.11.3"` then pick the same requirements inside and out.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.deploy.dockerfile import DOCKERFILE
from tests.deploy.podman import Podman
from tests.deploy.tools import REPO, run

BASE_TAG = "localhost/tombstone-test-base:host-debian"
IMAGE_TAG = "localhost/tombstone-sidecar:test"
SYSTEM_PYTHON = "/usr/bin/python3"
# Debian packages that stand in for python:3.12-slim: the interpreter with venv/ensurepip,
# `python` (the HEALTHCHECK calls it), groupadd/useradd (the Dockerfile's RUN), system CAs.
BASE_PACKAGES = ("python3", "python3-venv", "python-is-python3", "passwd", "ca-certificates")
PIP_CONF = "[global]\nno-index = true\nfind-links = /wheels\n"
# Facts about the image under test, printed at the end of the run (conftest.py): size,
# Python and mitmproxy inside, how long each step took.
IMAGE_REPORT: list[str] = []


@dataclass
class Built:
    """The image under test, and what the tests report about it."""

    tag: str
    python: str  # the interpreter inside the image, e.g. "3.11.2"
    size_bytes: int
    timings: dict[str, float] = field(default_factory=dict)  # step -> seconds


def _os_release() -> dict[str, str]:
    pairs = (line.split("=", 1) for line in Path("/etc/os-release").read_text().splitlines())
    return {k: v.strip('"') for k, v in (p for p in pairs if len(p) == 2)}


def _apt_sources() -> list[str]:
    """The host's own Debian mirror (whatever CI is configured with), else the default one."""
    for candidate in ("/etc/apt/sources.list.d/debian.sources", "/etc/apt/sources.list"):
        path = Path(candidate)
        if path.exists() and "debian" in path.read_text():
            return [str(path)]
    return ["http://deb.debian.org/debian"]


def make_base(podman: Podman) -> None:
    """mmdebstrap (minbase + BASE_PACKAGES) piped into `podman import` (20-45 s here)."""
    codename = _os_release().get("VERSION_CODENAME")
    if not codename:
        pytest.fail("no VERSION_CODENAME in /etc/os-release: the base needs a Debian release")
    hook = f"printf '{PIP_CONF}' > \"$1/etc/pip.conf\""
    debstrap = subprocess.Popen(
        ["mmdebstrap", "--quiet", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
         f"--customize-hook={hook}", codename, "-", *_apt_sources()],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=podman.env,
    )  # fmt: skip
    assert debstrap.stdout is not None
    try:
        tarball = debstrap.stdout.fileno()
        imported = podman.run(["import", "-", BASE_TAG], stdin=tarball, check=False)
    finally:
        debstrap.stdout.close()
        _, err = debstrap.communicate(timeout=300)
    if debstrap.returncode != 0 or imported.returncode != 0:
        pytest.fail(f"mmdebstrap | podman import: {err.decode()[-3000:]}\n{imported.stderr}")


def make_wheels(work: Path) -> Path:
    """Every wheel `pip install .` needs in the image, hatchling (the build backend) included."""
    venv = work / "host-python"
    run([SYSTEM_PYTHON, "-m", "venv", str(venv)])
    wheels = work / "wheels"
    run([str(venv / "bin" / "python"), "-m", "pip", "wheel", "-q", "--disable-pip-version-check",
         "-w", str(wheels), str(REPO), "hatchling"], timeout=600)  # fmt: skip
    for own in wheels.glob("matrix_tombstone_sidecar-*.whl"):
        own.unlink()  # the image builds the package itself, from what the Dockerfile copies
    return wheels


def build(podman: Podman, work: Path) -> Built:
    timings: dict[str, float] = {}
    started = time.monotonic()
    make_base(podman)
    timings["base image (mmdebstrap | podman import)"] = time.monotonic() - started
    host_python = run([SYSTEM_PYTHON, "-c", "import platform; print(platform.python_version())"])
    base_python = podman.output(
        ["run", "--rm", "--network=none", BASE_TAG, "python3", "-c",
         "import platform; print(platform.python_version())"]
    )  # fmt: skip
    assert host_python.strip() == base_python, "wheels must be built by the image's Python"
    started = time.monotonic()
    wheels = make_wheels(work)
    timings["wheels (host pip wheel)"] = time.monotonic() - started
    started = time.monotonic()
    podman.run(
        ["build", "--network=none", "--pull=never", "--format", "docker",
         "--volume", f"{wheels}:/wheels:ro", "--build-arg", f"PYTHON_IMAGE={BASE_TAG}",
         "--file", str(DOCKERFILE), "--tag", IMAGE_TAG, str(REPO)],
        timeout=600,
    )  # fmt: skip
    timings["podman build"] = time.monotonic() - started
    size = int(podman.output(["image", "inspect", "--format", "{{.Size}}", IMAGE_TAG]))
    return Built(IMAGE_TAG, base_python, size, timings)
