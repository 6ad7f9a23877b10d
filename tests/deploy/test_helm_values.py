"""The Helm values snippets (deploy/helm/) say exactly what the kustomize components do, so
what the kustomize tests prove (schema-valid, probes wired, the real sidecar starts with
these args) holds for them too. The chart keys are documented in deploy/README.md."""

from __future__ import annotations

from typing import Any

import yaml

from tests.deploy.manifests import Manifest, of_kind, pod_labels, pod_spec, render
from tests.deploy.tools import DEPLOY, KUSTOMIZE

HELM = DEPLOY / "helm"
EXAMPLE = yaml.safe_load((KUSTOMIZE / "examples" / "synapse" / "statefulset.yaml").read_text())


def _values(name: str) -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((HELM / name).read_text())
    return values


def _unimaged(containers: list[Manifest]) -> list[Manifest]:
    return [{k: v for k, v in c.items() if k != "image"} for c in containers]


def _added(overlay: str) -> dict[str, Any]:
    """What the components added to the example Synapse workload in this overlay."""
    (workload,) = of_kind(render(overlay), "StatefulSet")
    spec = pod_spec(workload)
    example = pod_spec(EXAMPLE)
    (synapse,) = [c for c in spec["containers"] if c["name"] == "synapse"]
    (original,) = [c for c in example["containers"] if c["name"] == "synapse"]
    return {
        "labels": {k: v for k, v in pod_labels(workload).items() if k not in pod_labels(EXAMPLE)},
        "env": [e for e in synapse["env"] if e not in original.get("env", [])],
        "mounts": [m for m in synapse["volumeMounts"] if m not in original["volumeMounts"]],
        "init": spec.get("initContainers", []),
        "volumes": [v for v in spec["volumes"] if v not in example["volumes"]],
    }


def _sorted(items: list[Manifest]) -> list[Manifest]:
    return sorted(items, key=lambda item: str(item.get("name")))


def test_ess_helm_values_are_the_native_sidecar_component() -> None:
    synapse = _values("ess-helm-values.yaml")["synapse"]
    added = _added("native-sidecar")
    assert synapse["labels"] == added["labels"]
    assert synapse["extraEnv"] == added["env"]
    assert _unimaged(synapse["extraInitContainers"]) == _unimaged(added["init"])
    assert _sorted(synapse["extraVolumes"]) == _sorted(added["volumes"])


def test_ess_helm_intercept_values_are_the_intercept_components() -> None:
    synapse = _values("ess-helm-intercept-values.yaml")["synapse"]
    added = _added("intercept")
    assert _unimaged(synapse["extraInitContainers"]) == _unimaged(added["init"])
    assert _sorted(synapse["extraVolumes"]) == _sorted(added["volumes"])
    assert synapse["extraVolumeMounts"] == added["mounts"]
    bundle_step = synapse["extraInitContainers"][1]
    bundle = bundle_step["args"][bundle_step["args"].index("--bundle") + 1]
    (extra,) = synapse["additional"].values()
    assert yaml.safe_load(extra["config"]) == {"federation_custom_ca_list": [bundle]}


def test_ananace_values_are_the_egress_client_component() -> None:
    values = _values("ananace-matrix-synapse-values.yaml")
    added = _added("central-egress")
    for where in (values["synapse"], values["workers"]["default"]):
        assert where["labels"] == added["labels"]
        assert where["extraEnv"] == added["env"]


def test_monitoring_overlay_scrapes_the_ess_helm_pods() -> None:
    """For Helm installs: the monitoring overlay's PodMonitor selects the pods the ess-helm
    values label, on the port the sidecar there names; the rules come along."""
    docs = render("monitoring")
    (monitor,) = of_kind(docs, "PodMonitor")
    assert of_kind(docs, "PrometheusRule")
    synapse = _values("ess-helm-values.yaml")["synapse"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= synapse["labels"].items()
    ports = {p["name"] for c in synapse["extraInitContainers"] for p in c.get("ports", [])}
    assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} <= ports
