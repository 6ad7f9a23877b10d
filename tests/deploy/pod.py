"""Run a rendered pod's containers with podman the way a kubelet would, as far as one can.

What is carried over from the pod spec: the image's ENTRYPOINT/CMD overridden by
`command`/`args`, literal env, the securityContext (pod-level merged with the container's:
runAsUser/runAsGroup, fsGroup as a supplementary group, readOnlyRootFilesystem, capabilities,
allowPrivilegeEscalation as no-new-privileges, the runtime's default seccomp profile), memory
and CPU limits, and every volumeMount: an emptyDir is a host directory made the way the
kubelet makes one (mode 0777, group fsGroup), shared by the pod's containers. A probe runs its
httpGet inside the container (`podman exec`), since the pod has no network of its own here
(`--network=none`): the ops listener binds 0.0.0.0, so loopback reaches the same socket.

Not carried over: the pod's network (none), sizeLimit and `medium: Memory` of an emptyDir
(a plain directory), ConfigMap/Secret volumes (not needed by the overlays run here).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.manifests import Manifest, pod_spec
from tests.deploy.podman import Podman

_QUANTITY = re.compile(r"^([0-9.]+)([A-Za-z]*)$")
_BINARY = {"": 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 10**3, "M": 10**6, "G": 10**9}
DEFAULT_GRACE_SECONDS = 30  # terminationGracePeriodSeconds when a pod spec does not say
_PROBE = (
    "import sys, urllib.request, urllib.error\n"
    "try:\n"
    "    status = urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2])).status\n"
    "except urllib.error.HTTPError as e:\n"
    "    status = e.code\n"
    "except OSError:\n"
    "    status = 0\n"
    "print(status)\n"
)


def memory_bytes(quantity: str) -> int:
    match = _QUANTITY.match(str(quantity))
    assert match and match.group(2) in _BINARY, f"unsupported quantity {quantity!r}"
    return int(float(match.group(1)) * _BINARY[match.group(2)])


def cpus(quantity: str) -> str:
    text = str(quantity)
    return str(int(text[:-1]) / 1000) if text.endswith("m") else text


class Pod:
    """One rendered pod: its emptyDir volumes as host directories, its containers by name."""

    def __init__(self, podman: Podman, workload: Manifest, volumes_root: Path, name: str) -> None:
        self.podman = podman
        self.workload = workload
        self.name = name
        self.spec = pod_spec(workload)
        self.volumes: dict[str, Path] = {}
        fs_group = self.spec.get("securityContext", {}).get("fsGroup")
        for volume in self.spec.get("volumes", []):
            assert "emptyDir" in volume, f"no podman stand-in for volume {volume}"
            path = volumes_root / name / volume["name"]
            path.mkdir(parents=True)
            path.chmod(0o777)  # the kubelet's emptyDir mode
            if fs_group is not None:
                os.chown(path, -1, int(fs_group))
                path.chmod(0o2777)
            self.volumes[volume["name"]] = path

    def container(self, name: str) -> Manifest:
        every = [*self.spec.get("initContainers", []), *self.spec.get("containers", [])]
        found: list[Manifest] = [c for c in every if c["name"] == name]
        assert len(found) == 1, f"no single container {name} in the pod"
        return found[0]

    def container_name(self, name: str) -> str:
        return f"{self.name}-{name}"

    @property
    def grace_seconds(self) -> int:
        return int(self.spec.get("terminationGracePeriodSeconds", DEFAULT_GRACE_SECONDS))

    def security(self, container: Manifest) -> dict[str, Any]:
        pod = self.spec.get("securityContext", {})
        inherited = {
            k: pod[k]
            for k in ("runAsUser", "runAsGroup", "runAsNonRoot", "seccompProfile")
            if k in pod
        }
        merged: dict[str, Any] = {**inherited, **container.get("securityContext", {})}
        return merged

    def run_args(
        self,
        name: str,
        image: str,
        extra_mounts: dict[str, Path] | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> list[str]:
        """`podman run` arguments (after `run`) for container `name`, the image in place of
        the manifest's (a registry name the tests cannot pull)."""
        container = self.container(name)
        security = self.security(container)
        args = ["--network=none", "--name", self.container_name(name)]
        assert not security.get("privileged"), "a privileged container"
        if security.get("readOnlyRootFilesystem"):
            # podman would add writable tmpfs on /tmp, /var/tmp and /run; a kubelet does not.
            args += ["--read-only", "--read-only-tmpfs=false"]
        if "runAsUser" in security:
            group = security.get("runAsGroup")
            args += ["--user", f"{security['runAsUser']}" + (f":{group}" if group else "")]
        if security.get("runAsNonRoot"):
            user = security.get("runAsUser")
            if user is None:
                user = self.podman.output(["image", "inspect", "--format", "{{.User}}", image])
            assert str(user).split(":")[0] not in ("", "0", "root"), "runAsNonRoot, but root"
        fs_group = self.spec.get("securityContext", {}).get("fsGroup")
        if fs_group is not None:
            args += ["--group-add", str(fs_group)]
        capabilities = security.get("capabilities", {})
        for cap in capabilities.get("drop", []):
            args.append(f"--cap-drop={cap.lower()}")
        for cap in capabilities.get("add", []):
            args.append(f"--cap-add={cap.lower()}")
        if security.get("allowPrivilegeEscalation") is False:
            args.append("--security-opt=no-new-privileges")
        seccomp = security.get("seccompProfile", {}).get("type", "RuntimeDefault")
        assert seccomp == "RuntimeDefault", f"seccomp {seccomp}: podman's default is the runtime's"
        limits = container.get("resources", {}).get("limits", {})
        if "memory" in limits:
            args += ["--memory", str(memory_bytes(limits["memory"]))]
        if "cpu" in limits:
            args += ["--cpus", cpus(limits["cpu"])]
        for env in container.get("env", []):
            assert "value" in env, f"env {env['name']}: only literal values are carried over"
            args += ["--env", f"{env['name']}={env['value']}"]
        for key, value in (extra_env or {}).items():
            args += ["--env", f"{key}={value}"]
        for mount in container.get("volumeMounts", []):
            assert "subPath" not in mount, "subPath mounts are not carried over"
            suffix = ":ro" if mount.get("readOnly") else ""
            args += ["--volume", f"{self.volumes[mount['name']]}:{mount['mountPath']}{suffix}"]
        for path, host in (extra_mounts or {}).items():
            args += ["--volume", f"{host}:{path}:ro"]
        # The image's HEALTHCHECK stays runnable (`podman healthcheck run`) without the
        # systemd timer podman would try to create for it (no systemd here).
        args.append("--health-interval=disable")
        if "command" in container:
            (entrypoint,) = container["command"][:1]
            args += ["--entrypoint", entrypoint]
            return [*args, image, *container["command"][1:], *container.get("args", [])]
        return [*args, image, *[str(a) for a in container.get("args", [])]]

    def start(self, name: str, image: str, **extra: Any) -> str:
        """Start container `name` detached, as an init container with restartPolicy Always
        or a regular container would be; its podman name."""
        self.podman.run(["run", "--detach", *self.run_args(name, image, **extra)])
        return self.container_name(name)

    def run_to_completion(self, name: str, image: str, timeout: float = 60, **extra: Any) -> int:
        """Run container `name` (an init container that must exit); its exit status."""
        result = self.podman.run(
            ["run", *self.run_args(name, image, **extra)], timeout=timeout, check=False
        )
        assert result.returncode in (0, 1, 2), result.stderr  # 125-127: podman's own failure
        return result.returncode

    def probe(self, name: str, kind: str) -> int:
        """Run the container's `kind` probe (httpGet) once from inside it: the HTTP status,
        0 when nothing answered."""
        container = self.container(name)
        probe = container[kind]["httpGet"]
        port = probe["port"]
        if isinstance(port, str):
            port = {p["name"]: p["containerPort"] for p in container["ports"]}[port]
        timeout = container[kind].get("timeoutSeconds", 1)
        url = f"http://127.0.0.1:{port}{probe['path']}"
        result = self.podman.run(
            ["exec", self.container_name(name), "python", "-c", _PROBE, url, str(timeout)],
            timeout=30,
            check=False,
        )
        return int(result.stdout.strip() or 0) if result.returncode == 0 else 0

    def wait_started(self, name: str) -> float:
        """Poll the startup probe as the kubelet would, within the budget the manifest gives
        (failureThreshold x periodSeconds); the seconds it took."""
        probe = self.container(name)["startupProbe"]
        budget = probe.get("failureThreshold", 3) * probe.get("periodSeconds", 10)
        started = time.monotonic()
        while time.monotonic() - started < budget:
            if self.probe(name, "startupProbe") == 200:
                return time.monotonic() - started
            state = self.podman.output(
                ["inspect", "--format", "{{.State.Status}}", self.container_name(name)]
            )
            if state != "running":
                logs = self.podman.run(["logs", self.container_name(name)], check=False)
                pytest.fail(f"{name} is {state} before its startup probe passed:\n{logs.stderr}")
            time.sleep(0.5)
        pytest.fail(f"{name}: startup probe did not pass within {budget}s")
