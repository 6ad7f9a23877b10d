"""Rendered Kubernetes manifests: `kubectl kustomize` output, and what the tests look up in it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any

import yaml

from tests.deploy.tools import KUSTOMIZE, run, tool

Manifest = dict[str, Any]
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet")


@cache
def render(overlay: str) -> tuple[Manifest, ...]:
    """`kubectl kustomize deploy/kustomize/overlays/<overlay>`, parsed (cached per run)."""
    text = run([tool("kubectl"), "kustomize", str(KUSTOMIZE / "overlays" / overlay)])
    return tuple(doc for doc in yaml.safe_load_all(text) if doc)


def of_kind(docs: tuple[Manifest, ...], kind: str) -> list[Manifest]:
    return [d for d in docs if d["kind"] == kind]


def pod_spec(workload: Manifest) -> Manifest:
    spec: Manifest = workload["spec"]["template"]["spec"]
    return spec


@dataclass(frozen=True)
class Container:
    """One container of a rendered workload, with the pod it runs in."""

    workload: Manifest
    spec: Manifest
    init: bool

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    @property
    def image(self) -> str:
        return str(self.spec.get("image", ""))

    def env(self) -> dict[str, str]:
        """Literal env values (secret references are left out)."""
        return {e["name"]: e["value"] for e in self.spec.get("env", []) if "value" in e}

    def mounts(self) -> dict[str, Manifest]:
        """mountPath -> the pod volume mounted there."""
        volumes = {v["name"]: v for v in pod_spec(self.workload).get("volumes", [])}
        return {m["mountPath"]: volumes[m["name"]] for m in self.spec.get("volumeMounts", [])}

    def arg(self, flag: str) -> str | None:
        """The value after `flag` in args (the last one wins, as in argparse)."""
        args = [str(a) for a in self.spec.get("args", [])]
        values = [args[i + 1] for i, a in enumerate(args[:-1]) if a == flag]
        return values[-1] if values else None


def containers(docs: tuple[Manifest, ...]) -> Iterator[Container]:
    for workload in docs:
        if workload["kind"] not in WORKLOAD_KINDS:
            continue
        spec = pod_spec(workload)
        for c in spec.get("initContainers", []):
            yield Container(workload, c, init=True)
        for c in spec.get("containers", []):
            yield Container(workload, c, init=False)


def sidecar_containers(docs: tuple[Manifest, ...]) -> list[Container]:
    """Every container that runs the tombstone-sidecar image."""
    return [c for c in containers(docs) if "tombstone-sidecar" in c.image.rsplit("/", 1)[-1]]


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """matchLabels semantics: every selector label present with the same value."""
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def pod_labels(workload: Manifest) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"].get("labels", {})
    return labels
