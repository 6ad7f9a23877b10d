"""Build deploy/Dockerfile offline, on a base image made from Debian's packages.

No registry image can be pulled here, so `python:3.12-slim` is replaced (build argument
PYTHON_IMAGE) by a minimal Debian with Debian's python3, made by mmdebstrap and imported
into podman. The Dockerfile itself runs unchanged: its build stage makes a venv and
`pip install .`s the copied source; pip reads an /etc/pip.conf of the base image that points
it at a directory of wheels mounted into the build (`--network=none`).

The release: trixie (Python 3.13, so pip picks mitmproxy 12 as it does on python:3.12-slim)
when the host has a Python 3.13 to build the wheels with (pyenv's, on these machines), else
bookworm (Python 3.11, mitmproxy 11) with the host's Debian python3. The wheels must come
from the image's Python version, since environment markers choose the requirements
(mitmproxy 12 needs Python >= 3.12; redis needs async-timeout below Python 3.11.3).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.deploy.dockerfile import DOCKERFILE
from tests.deploy.podman import Podman
from tests.deploy.tools import REPO, run

BASE_TAG = "localhost/tombstone-test-base:debian"
IMAGE_TAG = "localhost/tombstone-sidecar:test"
# Newest first, with the Python each release ships.
RELEASES = {"trixie": (3, 13), "bookworm": (3, 11)}
DEFAULT_MIRROR = "http://deb.debian.org/debian"
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
    release: str  # the Debian release of the base
    python: str  # the interpreter inside the image, e.g. "3.13.5"
    size_bytes: int
    timings: dict[str, float] = field(default_factory=dict)  # step -> seconds


@dataclass(frozen=True)
class Base:
    release: str  # Debian codename
    mirror: list[str]  # mmdebstrap's mirror arguments
    python: str  # a host interpreter of the release's Python version, to build the wheels


def _os_release() -> dict[str, str]:
    pairs = (line.split("=", 1) for line in Path("/etc/os-release").read_text().splitlines())
    return {k: v.strip('"') for k, v in (p for p in pairs if len(p) == 2)}


def _host_python(version: tuple[int, int]) -> str | None:
    """A host Python of this version that can make a venv; Debian's own first."""
    name = f"python{version[0]}.{version[1]}"
    check = f"import sys, ensurepip, venv; sys.exit(sys.version_info[:2] != {version})"
    pyenv = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv") / "versions"
    # pyenv's shims run only its selected versions: ask the installed ones directly too.
    installed = sorted(pyenv.glob(f"{version[0]}.{version[1]}.*/bin/python3"), reverse=True)
    for candidate in (f"/usr/bin/{name}", shutil.which(name), *map(str, installed)):
        if candidate and Path(candidate).exists():
            probe = subprocess.run([candidate, "-c", check], capture_output=True, check=False)
            if probe.returncode == 0:
                return candidate
    return None


def _mirror(release: str) -> list[str]:
    """The host's own Debian sources for its release (whatever CI is configured with), its
    mirror for another release, else Debian's default mirror."""
    host = _os_release().get("VERSION_CODENAME")
    deb822 = Path("/etc/apt/sources.list.d/debian.sources")
    if deb822.exists():
        if release == host:
            return [str(deb822)]
        for line in deb822.read_text().splitlines():
            if line.startswith("URIs:") and line.split()[1].rstrip("/").endswith("/debian"):
                return [line.split()[1]]
    return [DEFAULT_MIRROR]


def choose_base() -> Base:
    for release, version in RELEASES.items():
        python = _host_python(version)
        if python:
            return Base(release, _mirror(release), python)
    pytest.fail(f"no host Python of {RELEASES} to build wheels with (apt-get install python3-venv)")


def make_base(podman: Podman, base: Base) -> None:
    """mmdebstrap (minbase + BASE_PACKAGES) piped into `podman import` (30-60 s here)."""
    hook = f"printf '{PIP_CONF}' > \"$1/etc/pip.conf\""
    debstrap = subprocess.Popen(
        [
            "mmdebstrap",
            "--quiet",
            "--variant=minbase",
            f"--include={','.join(BASE_PACKAGES)}",
            f"--customize-hook={hook}",
            base.release,
            "-",
            *base.mirror,
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=podman.env,
    )
    assert debstrap.stdout is not None
    try:
        tarball = debstrap.stdout.fileno()
        imported = podman.run(["import", "-", BASE_TAG], stdin=tarball, check=False)
    finally:
        debstrap.stdout.close()
        _, err = debstrap.communicate(timeout=300)
    if debstrap.returncode != 0 or imported.returncode != 0:
        pytest.fail(f"mmdebstrap | podman import: {err.decode()[-3000:]}\n{imported.stderr}")


def make_wheels(work: Path, python: str) -> Path:
    """Every wheel `pip install .` needs in the image, hatchling (the build backend) included."""
    venv = work / "host-python"
    run([python, "-m", "venv", str(venv)])
    wheels = work / "wheels"
    run(
        [
            str(venv / "bin" / "python"),
            "-m",
            "pip",
            "wheel",
            "-q",
            "--disable-pip-version-check",
            "-w",
            str(wheels),
            str(REPO),
            "hatchling",
        ],
        timeout=600,
    )
    for own in wheels.glob("matrix_tombstone_sidecar-*.whl"):
        own.unlink()  # the image builds the package itself, from what the Dockerfile copies
    return wheels


def build(podman: Podman, work: Path) -> Built:
    timings: dict[str, float] = {}
    base = choose_base()
    started = time.monotonic()
    make_base(podman, base)
    timings[f"base image, Debian {base.release} (mmdebstrap | podman import)"] = (
        time.monotonic() - started
    )
    version = "import platform; print(platform.python_version())"
    host_python = run([base.python, "-c", version]).strip()
    base_python = podman.output(
        ["run", "--rm", "--network=none", BASE_TAG, "python3", "-c", version]
    )
    assert host_python.split(".")[:2] == base_python.split(".")[:2], (
        f"wheels made by Python {host_python} for an image with {base_python}"
    )
    started = time.monotonic()
    wheels = make_wheels(work, base.python)
    timings[f"wheels (pip wheel, host Python {host_python})"] = time.monotonic() - started
    started = time.monotonic()
    podman.run(
        [
            "build",
            "--network=none",
            "--pull=never",
            "--format",
            "docker",
            "--volume",
            f"{wheels}:/wheels:ro",
            "--build-arg",
            f"PYTHON_IMAGE={BASE_TAG}",
            "--file",
            str(DOCKERFILE),
            "--tag",
            IMAGE_TAG,
            str(REPO),
        ],
        timeout=600,
    )
    timings["podman build"] = time.monotonic() - started
    size = int(podman.output(["image", "inspect", "--format", "{{.Size}}", IMAGE_TAG]))
    return Built(IMAGE_TAG, base.release, base_python, size, timings)
