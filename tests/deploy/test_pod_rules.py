"""The native-sidecar and probe rules an API server enforces (pod_rules.py), over every
workload of every overlay, and broken copies that must be caught."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest

from tests.deploy.manifests import Manifest, of_kind, pod_spec, render
from tests.deploy.pod_rules import pod_rule_errors
from tests.deploy.tools import WORKLOAD_OVERLAYS

WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet")


def _workloads(overlay: str) -> list[Manifest]:
    return [w for kind in WORKLOADS for w in of_kind(render(overlay), kind)]


@pytest.mark.parametrize("overlay", WORKLOAD_OVERLAYS)
def test_every_workload_keeps_the_api_server_rules(overlay: str) -> None:
    workloads = _workloads(overlay)
    assert workloads
    for workload in workloads:
        assert pod_rule_errors(workload) == []


def _intercept() -> Manifest:
    (workload,) = copy.deepcopy(of_kind(render("intercept"), "StatefulSet"))
    return workload


def _init(workload: Manifest, name: str) -> Manifest:
    found: list[Manifest] = [c for c in pod_spec(workload)["initContainers"] if c["name"] == name]
    return found[0]


def _restart_never(w: Manifest) -> None:
    _init(w, "tombstone-ca-bundle")["restartPolicy"] = "Never"


def _probe_on_a_step(w: Manifest) -> None:
    probe = {"exec": {"command": ["true"]}, "periodSeconds": 1}
    _init(w, "tombstone-ca-bundle")["startupProbe"] = probe


def _not_restartable(w: Manifest) -> None:
    del _init(w, "tombstone-sidecar")["restartPolicy"]


def _restartable_step(w: Manifest) -> None:
    _init(w, "tombstone-ca-bundle")["restartPolicy"] = "Always"


def _sidecar_last(w: Manifest) -> None:
    init = pod_spec(w)["initContainers"]
    init.append(init.pop(0))


def _proxy_user_first(w: Manifest) -> None:
    env = [{"name": "HTTPS_PROXY", "value": "http://127.0.0.1:3128"}]
    step = {"name": "fetch-keys", "image": "curlimages/curl", "env": env}
    pod_spec(w)["initContainers"].insert(0, step)


def _no_resources(w: Manifest) -> None:
    del _init(w, "tombstone-sidecar")["resources"]


def _no_security_context(w: Manifest) -> None:
    del _init(w, "tombstone-ca-bundle")["securityContext"]


def _request_above_limit(w: Manifest) -> None:
    _init(w, "tombstone-sidecar")["resources"]["requests"]["memory"] = "1Gi"


def _liveness_threshold(w: Manifest) -> None:
    _init(w, "tombstone-sidecar")["livenessProbe"]["successThreshold"] = 2


def _duplicate_port_name(w: Manifest) -> None:
    (synapse,) = pod_spec(w)["containers"]
    synapse["ports"].append({"name": "tombstone-ops", "containerPort": 9000})


def _undefined_volume(w: Manifest) -> None:
    pod_spec(w)["volumes"] = [v for v in pod_spec(w)["volumes"] if v["name"] != "tombstone-ca"]


BROKEN: dict[str, tuple[Callable[[Manifest], None], str]] = {
    "init container with restartPolicy Never": (_restart_never, "may only be Always"),
    "startup probe on a run-once init container": (_probe_on_a_step, "startupProbe on an init"),
    "sidecar not restartable, probes kept": (_not_restartable, "livenessProbe on an init"),
    "the CA step made restartable": (_restartable_step, "only the sidecar proxy"),
    "sidecar after the step that reads its CA": (
        _sidecar_last,
        "ca-bundle needs tombstone-sidecar",
    ),
    "an init container using the proxy first": (_proxy_user_first, "fetch-keys needs"),
    "sidecar without resources": (_no_resources, "without resources"),
    "CA step without securityContext": (_no_security_context, "without securityContext"),
    "memory request above the limit": (_request_above_limit, "above its limit"),
    "liveness successThreshold 2": (_liveness_threshold, "successThreshold must be 1"),
    "a port name used twice": (_duplicate_port_name, "port name tombstone-ops twice"),
    "a mount of an undefined volume": (_undefined_volume, "mounts undefined tombstone-ca"),
}


@pytest.mark.parametrize("breakage", BROKEN)
def test_a_broken_pod_is_caught(breakage: str) -> None:
    workload = _intercept()
    assert pod_rule_errors(workload) == []
    break_it, expected = BROKEN[breakage]
    break_it(workload)
    errors = pod_rule_errors(workload)
    assert any(expected in e for e in errors), errors
