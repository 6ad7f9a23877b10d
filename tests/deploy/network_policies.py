"""What the NetworkPolicies must permit and forbid, judged by network-config-analyzer (nca).

nca computes, offline, the connections a set of NetworkPolicies allows between the pods of a
described cluster and IP blocks outside it. Each claim here is itself written as a
NetworkPolicy (the connections it talks about) and asked as `nca --permits` (the rendered
policies allow all of them) or `nca --forbids` (they allow none of them); nca's exit status
is the verdict.

The cluster around the rendered workloads: the overlay's namespace with a database and a
Redis pod, kube-system with CoreDNS (label k8s-app=kube-dns), `monitoring` with Prometheus,
and another tenant's namespace whose pod even carries the egress-client label.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.manifests import WORKLOAD_KINDS, Manifest
from tests.deploy.tools import tool

CLIENT = {"tombstone-sidecar/egress-client": "true"}
PROXY = {"app.kubernetes.io/name": "tombstone-egress"}
DNS = {"k8s-app": "kube-dns"}
REDIS = {"app.kubernetes.io/name": "redis"}
MONITORING = "monitoring"
OTHER_TENANT = "tenant-b"
# Public addresses (federation peers), and what the proxy must never reach: the RFC 1918 and
# CGNAT ranges pod and service CIDRs are drawn from (kubeadm 10.96.0.0/12, k3s 10.42/10.43,
# GKE/EKS VPC ranges, ...), IPv6 ULA and link-local, and the cloud metadata address.
PUBLIC = ("1.1.1.1/32", "8.8.8.8/32", "203.0.113.7/32", "2606:4700:4700::1111/128")
PRIVATE = (
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "fc00::/7",
    "fe80::/10",
)
METADATA = ("169.254.169.254/32", "fd00:ec2::254/128")
EVERYWHERE = ("0.0.0.0/0", "::/0")


def tcp(*ports: int) -> list[dict[str, Any]]:
    return [{"port": p, "protocol": "TCP"} for p in ports]


def dns_ports() -> list[dict[str, Any]]:
    return [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]


def pods(labels: dict[str, str], namespace: str | None = None) -> dict[str, Any]:
    peer: dict[str, Any] = {"podSelector": {"matchLabels": labels}}
    if namespace:
        peer["namespaceSelector"] = {"matchLabels": {"kubernetes.io/metadata.name": namespace}}
    return peer


def namespace(name: str) -> dict[str, Any]:
    return {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": name}}}


def namespaces_except(*names: str) -> dict[str, Any]:
    expression = {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": list(names)}
    return {"namespaceSelector": {"matchExpressions": [expression]}}


def blocks(*cidrs: str) -> list[dict[str, Any]]:
    return [{"ipBlock": {"cidr": c}} for c in cidrs]


@dataclass(frozen=True)
class Claim:
    """`query` ("permits" or "forbids") the connections of one rule, egress or ingress, of
    the pods selected by `selector`."""

    name: str
    query: str
    selector: dict[str, str]
    direction: str  # "egress" | "ingress"
    peers: list[dict[str, Any]]
    ports: list[dict[str, Any]] | None = None

    def policy(self, namespace: str) -> Manifest:
        rule: dict[str, Any] = {"to" if self.direction == "egress" else "from": self.peers}
        if self.ports:
            rule["ports"] = self.ports
        return {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": self.name, "namespace": namespace},
            "spec": {
                "podSelector": {"matchLabels": self.selector},
                "policyTypes": [self.direction.capitalize()],
                self.direction: [rule],
            },
        }


# fmt: off
CLAIMS = (
    # Synapse pods: the proxy, DNS and their own namespace; never the internet directly.
    Claim("synapse-reaches-the-proxy", "permits", CLIENT, "egress", [pods(PROXY)], tcp(3128)),
    Claim("synapse-reaches-dns", "permits", CLIENT, "egress", [pods(DNS, "kube-system")],
          dns_ports()),
    Claim("synapse-reaches-its-namespace", "permits", CLIENT, "egress", [{"podSelector": {
          "matchExpressions": [{"key": "app.kubernetes.io/name", "operator": "NotIn",
                                "values": ["tombstone-egress"]}]}}]),
    Claim("synapse-never-goes-direct", "forbids", CLIENT, "egress", blocks(*EVERYWHERE)),
    Claim("synapse-reaches-no-other-namespace", "forbids", CLIENT, "egress",
          [namespaces_except("matrix", "kube-system")]),
    Claim("synapse-never-reaches-the-ops-port", "forbids", CLIENT, "egress", [pods(PROXY)],
          tcp(9480)),
    # The proxy: DNS, Redis and public addresses; no private range, no metadata service, no
    # other pod.
    Claim("proxy-reaches-dns", "permits", PROXY, "egress", [pods(DNS, "kube-system")],
          dns_ports()),
    Claim("proxy-reaches-redis", "permits", PROXY, "egress", [pods(REDIS)], tcp(6379)),
    Claim("proxy-reaches-public-addresses", "permits", PROXY, "egress", blocks(*PUBLIC)),
    Claim("proxy-reaches-no-private-range", "forbids", PROXY, "egress", blocks(*PRIVATE)),
    Claim("proxy-reaches-no-metadata-service", "forbids", PROXY, "egress", blocks(*METADATA)),
    Claim("proxy-reaches-no-pod-but-redis", "forbids", PROXY, "egress",
          [{"podSelector": {}}, namespaces_except("matrix", "kube-system")],
          tcp(5432, 8008, 8448, 9090, 9480)),
    # Who reaches the proxy: Synapse pods of its namespace on 3128, Prometheus on 9480.
    Claim("clients-reach-the-proxy", "permits", PROXY, "ingress", [pods(CLIENT)], tcp(3128)),
    Claim("monitoring-reaches-the-ops-port", "permits", PROXY, "ingress",
          [namespace(MONITORING)], tcp(9480)),
    Claim("only-monitoring-reaches-the-ops-port", "forbids", PROXY, "ingress",
          [namespaces_except(MONITORING), *blocks(*EVERYWHERE)], tcp(9480)),
    Claim("no-stranger-reaches-the-proxy", "forbids", PROXY, "ingress",
          [{"podSelector": {"matchExpressions": [
              {"key": "tombstone-sidecar/egress-client", "operator": "DoesNotExist"}]}},
           namespaces_except("matrix"), *blocks(*EVERYWHERE)], tcp(3128)),
)
# fmt: on


def _namespace(name: str) -> Manifest:
    labels = {"kubernetes.io/metadata.name": name}
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def _pod(name: str, namespace: str, labels: dict[str, str], port: int) -> Manifest:
    container = {"name": name, "image": name, "ports": [{"containerPort": port}]}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"containers": [container]},
    }


def topology(docs: tuple[Manifest, ...]) -> list[Manifest]:
    """The rendered workloads in the cluster described in the module doc."""
    workloads = [d for d in docs if d["kind"] in WORKLOAD_KINDS]
    (namespace,) = {w["metadata"]["namespace"] for w in workloads}
    assert namespace == "matrix", "the claims name the overlay's namespace"
    names = (namespace, "kube-system", MONITORING, OTHER_TENANT)
    return [
        *(_namespace(n) for n in names),
        *workloads,
        _pod("postgres", namespace, {"app.kubernetes.io/name": "postgres"}, 5432),
        _pod("synapse-redis", namespace, REDIS, 6379),
        _pod("coredns", "kube-system", DNS, 53),
        _pod("prometheus", MONITORING, {"app.kubernetes.io/name": "prometheus"}, 9090),
        _pod("tenant-b-client", OTHER_TENANT, CLIENT, 8008),
    ]


def judge(claim: Claim, policies: list[Manifest], cluster: list[Manifest], work: Path) -> str:
    """Ask nca; '' when the policies satisfy the claim, else nca's explanation."""
    work.mkdir(parents=True, exist_ok=True)
    base = work / "policies.yaml"
    resources = work / "cluster.yaml"
    spec = work / f"{claim.name}.yaml"
    base.write_text(yaml.safe_dump_all(policies))
    resources.write_text(yaml.safe_dump_all(cluster))
    spec.write_text(yaml.safe_dump(claim.policy("matrix")))
    result = subprocess.run(
        [
            tool("nca"),
            f"--{claim.query}",
            str(spec),
            "--base_np_list",
            str(base),
            "--resource_list",
            str(resources),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode == 0:
        return ""
    assert result.returncode == 1, f"nca failed to run:\n{result.stdout}\n{result.stderr}"
    return f"{claim.name} ({claim.query}):\n{result.stdout.strip()}"
