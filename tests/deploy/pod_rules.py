"""Rules a Kubernetes API server enforces on a pod template that the OpenAPI schema does not
(kubernetes-validate --strict accepts all of these), plus the ones this project relies on.

From the API server's validation of pod specs (pkg/apis/core/validation, Kubernetes >= 1.29
with native sidecars): an init container's `restartPolicy` may only be `Always` (a
restartable "sidecar" init container); probes and lifecycle hooks are allowed on regular
containers and restartable init containers only; liveness and startup probes need
successThreshold 1; container names and port names are unique in the pod; every volumeMount
names a pod volume; a resource request may not exceed its limit.

This project's own: a restartable init container is only ever the tombstone-sidecar proxy;
it is listed before every init container that needs it (one that sends through its proxy
address or reads a volume it writes), since init containers start strictly in order; every
tombstone-sidecar container sets resources and a securityContext.
"""

from __future__ import annotations

import re
from typing import Any

from tests.deploy.manifests import Manifest, pod_spec

PROBES = ("startupProbe", "livenessProbe", "readinessProbe")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_IANA_SVC_NAME = re.compile(r"^(?=.*[a-z])[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_UNITS = {"": 1, "m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 1e3, "M": 1e6, "G": 1e9}


def _quantity(value: object) -> float:
    match = re.match(r"^([0-9.]+)([A-Za-z]*)$", str(value))
    assert match and match.group(2) in _UNITS, f"unsupported quantity {value!r}"
    return float(match.group(1)) * _UNITS[match.group(2)]


def _is_sidecar_proxy(container: Manifest) -> bool:
    image = str(container.get("image", "")).rsplit("/", 1)[-1]
    return "tombstone-sidecar" in image and [*container.get("args", []), ""][0] == "run"


def _writes(container: Manifest) -> set[str]:
    """Volumes it writes that others may read (scratch space at /tmp is nobody's input)."""
    return {
        m["name"]
        for m in container.get("volumeMounts", [])
        if not m.get("readOnly") and m["mountPath"] != "/tmp"
    }


def _reads(container: Manifest) -> set[str]:
    return {m["name"] for m in container.get("volumeMounts", [])}


def _proxy_addresses(container: Manifest) -> set[str]:
    args = [str(a) for a in container.get("args", [])]
    return {args[i + 1] for i, a in enumerate(args[:-1]) if a == "--listen"}


def _needs(container: Manifest, sidecar: Manifest) -> bool:
    """Does this init container need the (restartable) sidecar to be up already?"""
    env = " ".join(str(e.get("value", "")) for e in container.get("env", []))
    if any(address in env for address in _proxy_addresses(sidecar)):
        return True
    return bool(_writes(sidecar) & _reads(container))


def _container_errors(where: str, container: Manifest, init: bool) -> list[str]:
    errors: list[str] = []
    restartable = init and container.get("restartPolicy") == "Always"
    if init and container.get("restartPolicy", "Always") != "Always":
        errors.append(f"{where}: an init container's restartPolicy may only be Always")
    if not init and "restartPolicy" in container:
        errors.append(f"{where}: restartPolicy is for init containers")
    if init and not restartable:
        for field in (*PROBES, "lifecycle"):
            if field in container:
                errors.append(f"{where}: {field} on an init container that is not restartable")
    for probe in ("startupProbe", "livenessProbe"):
        if container.get(probe, {}).get("successThreshold", 1) != 1:
            errors.append(f"{where}: {probe}.successThreshold must be 1")
    if not _DNS_LABEL.match(container["name"]) or len(container["name"]) > 63:
        errors.append(f"{where}: container name is not a DNS label")
    for port in container.get("ports", []):
        name = port.get("name")
        if name is not None and (len(name) > 15 or not _IANA_SVC_NAME.match(name)):
            errors.append(f"{where}: port name {name!r} is not an IANA service name")
    resources: dict[str, Any] = container.get("resources", {})
    for key, limit in resources.get("limits", {}).items():
        request = resources.get("requests", {}).get(key)
        if request is not None and _quantity(request) > _quantity(limit):
            errors.append(f"{where}: {key} request {request} is above its limit {limit}")
    image = str(container.get("image", "")).rsplit("/", 1)[-1]
    if "tombstone-sidecar" in image:
        for field in ("resources", "securityContext"):
            if not container.get(field):
                errors.append(f"{where}: a tombstone-sidecar container without {field}")
        if init and _is_sidecar_proxy(container) != restartable:
            errors.append(f"{where}: only the sidecar proxy is a restartable init container")
    elif restartable:
        errors.append(f"{where}: a restartable init container that is not the sidecar proxy")
    return errors


def pod_rule_errors(workload: Manifest) -> list[str]:
    """Every rule of the module doc that the workload's pod template breaks."""
    spec = pod_spec(workload)
    name = f"{workload['kind']}/{workload['metadata']['name']}"
    init = spec.get("initContainers", [])
    regular = spec.get("containers", [])
    errors: list[str] = []
    for container in init:
        errors += _container_errors(f"{name} init {container['name']}", container, init=True)
    for container in regular:
        errors += _container_errors(f"{name} {container['name']}", container, init=False)
    every = [*init, *regular]
    names = [c["name"] for c in every]
    errors += [f"{name}: container name {n} twice" for n in set(names) if names.count(n) > 1]
    ports = [p["name"] for c in every for p in c.get("ports", []) if "name" in p]
    errors += [f"{name}: port name {p} twice" for p in set(ports) if ports.count(p) > 1]
    volumes = {v["name"] for v in spec.get("volumes", [])}
    for container in every:
        for mount in container.get("volumeMounts", []):
            if mount["name"] not in volumes:
                errors.append(f"{name} {container['name']}: mounts undefined {mount['name']}")
    for position, sidecar in enumerate(init):
        if sidecar.get("restartPolicy") != "Always":
            continue
        errors += [
            f"{name}: init {c['name']} needs {sidecar['name']} but starts before it"
            for c in init[:position]
            if _needs(c, sidecar)
        ]
    return errors
