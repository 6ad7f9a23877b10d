"""The container image, built once per test run (session scope), and a report of it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.deploy.image import IMAGE_REPORT, Built, build
from tests.deploy.podman import Podman, require_podman


@pytest.fixture(scope="session")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    require_podman()
    engine = Podman(tmp_path_factory.mktemp("podman", numbered=True))
    try:
        yield engine
    finally:
        engine.close()


@pytest.fixture(scope="session")
def image(podman: Podman, tmp_path_factory: pytest.TempPathFactory) -> Built:
    built = build(podman, tmp_path_factory.mktemp("image-build"))
    IMAGE_REPORT.append(
        f"image {built.tag}: {built.size_bytes / 1e6:.0f} MB, Python {built.python} on Debian "
        f"{built.release} (standing in for python:3.12-slim, which cannot be pulled here)"
    )
    IMAGE_REPORT.extend(f"  {step}: {seconds:.1f} s" for step, seconds in built.timings.items())
    return built


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if IMAGE_REPORT:
        terminalreporter.section("container image")
        for line in IMAGE_REPORT:
            terminalreporter.write_line(line)
