"""The NetworkPolicies do what deploy/README.md says, judged by network-config-analyzer on the
rendered overlays (see network_policies.py for the cluster around them and the claims), and
a deliberately broken copy of each policy fails the claim it breaks."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.deploy.manifests import Manifest, of_kind, render
from tests.deploy.network_policies import CLAIMS, Claim, judge, topology
from tests.deploy.tools import OVERLAYS

# A native sidecar shares its pod's network namespace with Synapse: no NetworkPolicy can
# tell their traffic apart, so those overlays ship none (the proxy is on the pod's loopback).
WITH_POLICIES = ("central-egress",)
BY_NAME = {claim.name: claim for claim in CLAIMS}


def _policies(overlay: str) -> list[Manifest]:
    return copy.deepcopy(of_kind(render(overlay), "NetworkPolicy"))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_central_egress_overlay_ships_network_policies(overlay: str) -> None:
    """So that a policy added to another overlay gets claims of its own here."""
    assert bool(_policies(overlay)) == (overlay in WITH_POLICIES)


@pytest.mark.parametrize("overlay", WITH_POLICIES)
@pytest.mark.parametrize("claim", CLAIMS, ids=lambda c: c.name)
def test_network_policies_hold(overlay: str, claim: Claim, tmp_path: Path) -> None:
    docs = render(overlay)
    assert judge(claim, _policies(overlay), topology(docs), tmp_path) == ""


def _named(policies: list[Manifest], name: str) -> Manifest:
    (policy,) = [p for p in policies if p["metadata"]["name"] == name]
    return policy


def _no_private_except(policies: list[Manifest]) -> None:
    for rule in _named(policies, "tombstone-egress")["spec"]["egress"]:
        for peer in rule["to"]:
            peer.get("ipBlock", {}).pop("except", None)


def _ops_open_in_cluster(policies: list[Manifest]) -> None:
    for rule in _named(policies, "tombstone-egress")["spec"]["ingress"]:
        if {"port": 9480, "protocol": "TCP"} in rule["ports"]:
            rule["from"] = [{"namespaceSelector": {}}]


def _synapse_direct(policies: list[Manifest]) -> None:
    egress = _named(policies, "synapse-egress-via-tombstone")["spec"]["egress"]
    egress.append({"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}], "ports": [{"port": 8448}]})


def _synapse_without_dns(policies: list[Manifest]) -> None:
    spec = _named(policies, "synapse-egress-via-tombstone")["spec"]
    spec["egress"] = [
        r for r in spec["egress"] if {"port": 53, "protocol": "UDP"} not in r.get("ports", [])
    ]


def _proxy_open_to_all(policies: list[Manifest]) -> None:
    for rule in _named(policies, "tombstone-egress")["spec"]["ingress"]:
        if {"port": 3128, "protocol": "TCP"} in rule["ports"]:
            rule["from"] = [{"namespaceSelector": {}}]


BROKEN: dict[str, tuple[Callable[[list[Manifest]], None], str]] = {
    "egress to private ranges": (_no_private_except, "proxy-reaches-no-private-range"),
    "egress to the metadata address": (_no_private_except, "proxy-reaches-no-metadata-service"),
    "ops port open in-cluster": (_ops_open_in_cluster, "only-monitoring-reaches-the-ops-port"),
    "Synapse direct to 8448": (_synapse_direct, "synapse-never-goes-direct"),
    "Synapse without DNS": (_synapse_without_dns, "synapse-reaches-dns"),
    "proxy open to every pod": (_proxy_open_to_all, "no-stranger-reaches-the-proxy"),
}


@pytest.mark.parametrize("breakage", BROKEN)
def test_a_broken_policy_fails_its_claim(breakage: str, tmp_path: Path) -> None:
    """A control: each claim can fail, on the policy change it is there to catch."""
    policies = _policies("central-egress")
    break_it, claim = BROKEN[breakage]
    break_it(policies)
    verdict = judge(BY_NAME[claim], policies, topology(render("central-egress")), tmp_path)
    assert verdict, f"nca accepted the broken copy ({breakage})"
