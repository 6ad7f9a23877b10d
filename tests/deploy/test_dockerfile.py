"""deploy/Dockerfile read and run on the host, in seconds: hadolint, the files its build copies
are enough to build the package, and its ENTRYPOINT + CMD with its ENV start the real sidecar
(state and /tmp on its declared volumes, ports moved to free ones). test_image.py builds the
image itself with podman and runs it as the pod specs do."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from tests.deploy.dockerfile import DOCKERFILE, final_stage, stages
from tests.deploy.launch import Localizer, get, running
from tests.deploy.tools import REPO, run, tool


def test_hadolint_is_clean() -> None:
    run([tool("hadolint"), "--failure-threshold", "info", str(DOCKERFILE)])


def test_image_is_python_312_or_newer_and_runs_as_a_numeric_non_root_user() -> None:
    final = final_stage()
    name, _, tag = final.base.partition(":")
    assert name == "python" and tag.endswith("-slim"), final.base
    assert tuple(int(p) for p in tag.split("-")[0].split(".")) >= (3, 12), "mitmproxy 12 needs 3.12"
    uid, _, gid = final.user.partition(":")
    assert uid.isdigit() and int(uid) > 0 and gid.isdigit(), final.user
    assert final.entrypoint == ["tombstone-sidecar"]
    state = final.env["TOMBSTONE_STATE_DIR"]
    assert state in final.volumes and "/tmp" in final.volumes, "writable paths must be volumes"


def test_what_the_build_copies_is_enough_to_build_the_package(tmp_path: Path) -> None:
    """The build stage copies a few paths into the image; a wheel must build from them alone
    (a file the build needs but the Dockerfile forgets fails here, not in someone's CI)."""
    build = stages()[0]
    context = tmp_path / "context"
    context.mkdir()
    for *sources, destination in build.copies:
        assert not sources[0].startswith("--from"), "the build stage copies from the context"
        for source in sources:
            src = REPO / source
            assert src.exists(), f"COPY {source}: no such file in the repository"
            dest = context / destination
            if destination.endswith("/"):
                dest = dest / src.name
            if src.is_dir():
                shutil.copytree(src, dest)
            else:
                shutil.copy2(src, dest)
    wheels = tmp_path / "wheels"
    run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(context)],
        timeout=300,
    )
    (wheel,) = wheels.glob("matrix_tombstone_sidecar-*.whl")
    assert wheel.stat().st_size > 0


def test_entrypoint_and_cmd_start_the_real_sidecar(tmp_path: Path) -> None:
    final = final_stage()
    local = Localizer(tmp_path)
    for volume in final.volumes:
        local.mount(volume)
    plan = local.plan(final.cmd, final.env)
    assert set(plan.ports) == {"--listen", "--ops-listen"}
    with running(plan, tmp_path / "sidecar.log"):
        ops = plan.ports["--ops-listen"]
        assert get(ops, "/healthz")[0] == 200
        assert get(ops, "/readyz")[0] == 200
        # The image's HEALTHCHECK command (its port moved like the CMD's) passes.
        image_port = final.cmd[final.cmd.index("--ops-listen") + 1].rsplit(":", 1)[1]
        check = [a.replace(f":{image_port}/", f":{ops}/") for a in final.healthcheck]
        assert check[0] == "python" and check != final.healthcheck, final.healthcheck
        run([sys.executable, *check[1:]], timeout=30)
    # The state (verdicts.sqlite3) went to the state volume, nothing to the read-only root.
    state = Path(local.value(final.env["TOMBSTONE_STATE_DIR"]))
    assert (state / "verdicts.sqlite3").exists(), sorted(p.name for p in state.iterdir())
