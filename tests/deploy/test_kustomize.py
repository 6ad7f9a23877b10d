"""Every example overlay renders with a current kubectl and validates against the Kubernetes
schemas (kubernetes-validate, strict), and what it renders is wired together: probes on
ports that exist, HTTPS_PROXY pointing at the proxy's real address, selectors that select."""

from __future__ import annotations

import copy

# What Synapse calls to decide whether a host bypasses the proxy (not in typeshed).
from urllib.request import proxy_bypass_environment  # type: ignore[attr-defined]

import kubernetes_validate
import pytest

from tests.deploy.manifests import (
    Manifest,
    containers,
    matches,
    of_kind,
    pod_labels,
    pod_spec,
    render,
    sidecar_containers,
)
from tests.deploy.operator_schemas import operator_schema_errors
from tests.deploy.tools import KUBERNETES_VERSION, OVERLAYS, WORKLOAD_OVERLAYS

OPERATOR_GROUP = "monitoring.coreos.com/"  # Prometheus Operator CRDs: see operator_schema_errors


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates(overlay: str) -> None:
    docs = render(overlay)
    for doc in docs:
        where = f"{overlay}: {doc['kind']}/{doc['metadata']['name']}"
        if doc["apiVersion"].startswith(OPERATOR_GROUP):
            assert operator_schema_errors(doc) == [], where
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{where}: {e.message}")


@pytest.mark.parametrize("overlay", WORKLOAD_OVERLAYS)
def test_overlay_runs_the_sidecar(overlay: str) -> None:
    assert sidecar_containers(render(overlay)), f"{overlay} runs no tombstone-sidecar container"


def test_the_validator_rejects_what_kubernetes_would() -> None:
    """A control for the test above: strict validation does catch a misspelt field."""
    workload = copy.deepcopy(of_kind(render("native-sidecar"), "StatefulSet")[0])
    pod_spec(workload)["initContainers"][0]["restartPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(workload, KUBERNETES_VERSION, strict=True)


def test_the_operator_schemas_reject_what_the_operator_would() -> None:
    """A control for operator_schema_errors: an unknown field, a wrong enum value and a
    malformed duration are all reported."""
    (monitor,) = of_kind(render("monitoring"), "PodMonitor")
    (rule,) = of_kind(render("monitoring"), "PrometheusRule")
    unknown = copy.deepcopy(monitor)
    unknown["spec"]["podMetricsEndpoints"][0]["prot"] = "tombstone-ops"
    action = copy.deepcopy(monitor)
    action["spec"]["podMetricsEndpoints"][0]["relabelings"][0]["action"] = "replacee"
    duration = copy.deepcopy(rule)
    duration["spec"]["groups"][0]["rules"][0]["for"] = "5 minutes"
    for broken in (unknown, action, duration):
        assert operator_schema_errors(broken), broken["kind"]


def _probe_port_exists(container: Manifest, probe: str, path: str) -> None:
    spec = container[probe]["httpGet"]
    assert spec["path"] == path
    names = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    assert spec["port"] in names, f"{probe} names port {spec['port']}, not one of {names}"


@pytest.mark.parametrize("overlay", WORKLOAD_OVERLAYS)
def test_sidecar_probes_and_hardening(overlay: str) -> None:
    for sidecar in sidecar_containers(render(overlay)):
        if sidecar.spec["args"][0] != "run":
            continue  # the intercept CA bundle step runs once and exits
        _probe_port_exists(sidecar.spec, "startupProbe", "/readyz")
        _probe_port_exists(sidecar.spec, "readinessProbe", "/readyz")
        _probe_port_exists(sidecar.spec, "livenessProbe", "/healthz")
        ops = sidecar.arg("--ops-listen")
        assert ops is not None and ops.startswith("0.0.0.0:"), "kubelet probes need the pod IP"
        port = int(ops.rsplit(":", 1)[1])
        assert port in {p["containerPort"] for p in sidecar.spec["ports"]}
    for sidecar in sidecar_containers(render(overlay)):
        security = {
            **pod_spec(sidecar.workload).get("securityContext", {}),
            **sidecar.spec.get("securityContext", {}),
        }
        assert security["readOnlyRootFilesystem"] is True
        assert security["runAsNonRoot"] is True and security["runAsUser"] == 10001
        assert security["allowPrivilegeEscalation"] is False
        # With a read-only root, everything the sidecar writes must be a volume.
        mounts = sidecar.mounts()
        assert {"/tmp", "/var/lib/tombstone-sidecar"} <= set(mounts), mounts
        assert sidecar.env().get("TOMBSTONE_STATE_DIR") == "/var/lib/tombstone-sidecar"


def _synapse(docs: tuple[Manifest, ...]) -> list[Manifest]:
    return [c.spec for c in containers(docs) if c.name == "synapse"]


def _bypassed(no_proxy: str, host: str) -> bool:
    """What Synapse decides: it calls urllib's proxy_bypass_environment with NO_PROXY."""
    return bool(proxy_bypass_environment(host, proxies={"no": no_proxy}))


@pytest.mark.parametrize("overlay", WORKLOAD_OVERLAYS)
def test_synapse_no_proxy_keeps_cluster_names_direct_and_federation_proxied(overlay: str) -> None:
    synapse = _synapse(render(overlay))
    assert synapse
    for container in synapse:
        env = {e["name"]: e.get("value") for e in container["env"]}
        no_proxy = env["NO_PROXY"]
        assert no_proxy is not None
        # ess-helm names services with a trailing dot (its clusterDomain is "cluster.local.").
        for internal in (
            "localhost",
            "127.0.0.1",
            "mas.matrix.svc",
            "synapse-main.matrix.svc.cluster.local",
            "ess-matrix-authentication-service.ess.svc.cluster.local.",
        ):
            assert _bypassed(no_proxy, internal), internal
        for remote in ("matrix.org", "example.com", "fed.example.net"):
            assert not _bypassed(no_proxy, remote), remote


@pytest.mark.parametrize("overlay", ["native-sidecar", "intercept"])
def test_native_sidecar_starts_first_and_synapse_uses_it(overlay: str) -> None:
    docs = render(overlay)
    for workload in of_kind(docs, "StatefulSet"):
        init = pod_spec(workload)["initContainers"]
        sidecar = init[0]
        assert sidecar["name"] == "tombstone-sidecar"
        assert sidecar["restartPolicy"] == "Always", "a native sidecar (Kubernetes >= 1.29)"
        listen = sidecar["args"][sidecar["args"].index("--listen") + 1]
        for container in _synapse((workload,)):
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert env["HTTPS_PROXY"] == f"http://{listen}"


def test_intercept_shares_only_the_ca_bundle_with_synapse() -> None:
    (workload,) = of_kind(render("intercept"), "StatefulSet")
    init = {c["name"]: c for c in pod_spec(workload)["initContainers"]}
    order = list(init)
    assert order.index("tombstone-sidecar") < order.index("tombstone-ca-bundle")
    sidecar_env = {e["name"]: e["value"] for e in init["tombstone-sidecar"]["env"]}
    assert sidecar_env["TOMBSTONE_MODE"] == "intercept"
    bundle_step = init["tombstone-ca-bundle"]
    bundle = bundle_step["args"][bundle_step["args"].index("--bundle") + 1]
    (synapse,) = _synapse((workload,))
    synapse_mounts = {m["mountPath"]: m for m in synapse["volumeMounts"]}
    shared = [path for path in synapse_mounts if bundle.startswith(path + "/")]
    assert shared, f"Synapse mounts nothing containing {bundle}"
    assert synapse_mounts[shared[0]].get("readOnly") is True
    state_volume = {m["mountPath"]: m["name"] for m in init["tombstone-sidecar"]["volumeMounts"]}[
        "/var/lib/tombstone-sidecar"
    ]
    assert state_volume not in {m["name"] for m in synapse["volumeMounts"]}, "CA key exposed"


def test_central_egress_is_wired_together() -> None:
    docs = render("central-egress")
    deployments = {d["metadata"]["name"]: d for d in of_kind(docs, "Deployment")}
    egress = deployments["tombstone-egress"]
    assert egress["spec"]["replicas"] >= 2
    labels = pod_labels(egress)
    (service,) = of_kind(docs, "Service")
    (pdb,) = of_kind(docs, "PodDisruptionBudget")
    assert matches(service["spec"]["selector"], labels)
    assert matches(pdb["spec"]["selector"]["matchLabels"], labels)
    assert pdb["spec"]["minAvailable"] >= 1
    proxy_port = next(p for p in service["spec"]["ports"] if p["name"] == "proxy")
    # Synapse: HTTPS_PROXY names the Service and its port, with credentials from the Secret
    # defined before it (Kubernetes expands $(VAR) only from earlier variables).
    (synapse_workload,) = of_kind(docs, "StatefulSet")
    (synapse,) = _synapse((synapse_workload,))
    names = [e["name"] for e in synapse["env"]]
    env = {e["name"]: e for e in synapse["env"]}
    url = env["HTTPS_PROXY"]["value"]
    assert url.endswith(f"@{service['metadata']['name']}:{proxy_port['port']}"), url
    for var in ("TOMBSTONE_PROXY_USER", "TOMBSTONE_PROXY_PASSWORD"):
        assert f"$({var})" in url
        assert names.index(var) < names.index("HTTPS_PROXY")
        assert env[var]["valueFrom"]["secretKeyRef"]["name"] == "tombstone-egress-auth"
    # The sidecar reads the same Secret's `users` key as its --proxy-auth-file.
    (sidecar,) = [c for c in sidecar_containers(docs) if c.workload is egress]
    auth_file = sidecar.arg("--proxy-auth-file")
    assert auth_file is not None
    directory, _, key = auth_file.rpartition("/")
    volume = sidecar.mounts()[directory]
    assert volume["secret"]["secretName"] == "tombstone-egress-auth"
    assert {"key": "users", "path": key} in volume["secret"]["items"]
    # NetworkPolicies: Synapse pods may reach the proxy, DNS and their namespace, no ipBlock.
    policies = {p["metadata"]["name"]: p["spec"] for p in of_kind(docs, "NetworkPolicy")}
    synapse_policy = policies["synapse-egress-via-tombstone"]
    assert matches(synapse_policy["podSelector"]["matchLabels"], pod_labels(synapse_workload))
    peers = [peer for rule in synapse_policy["egress"] for peer in rule["to"]]
    assert not [p for p in peers if "ipBlock" in p], "Synapse must not reach the internet directly"
    assert any(matches(p.get("podSelector", {}).get("matchLabels", {}), labels) for p in peers)
    egress_policy = policies["tombstone-egress"]
    assert matches(egress_policy["podSelector"]["matchLabels"], labels)
    proxy_port_rule = {"port": 3128, "protocol": "TCP"}
    (proxy_rule,) = [r for r in egress_policy["ingress"] if proxy_port_rule in r["ports"]]
    clients = proxy_rule["from"][0]["podSelector"]["matchLabels"]
    assert matches(clients, pod_labels(synapse_workload))


@pytest.mark.parametrize("overlay", WORKLOAD_OVERLAYS)
def test_monitors_select_a_named_metrics_port(overlay: str) -> None:
    docs = render(overlay)
    monitors = of_kind(docs, "PodMonitor") + of_kind(docs, "ServiceMonitor")
    assert monitors
    for monitor in monitors:
        selector = monitor["spec"]["selector"]["matchLabels"]
        if monitor["kind"] == "PodMonitor":
            endpoints = monitor["spec"]["podMetricsEndpoints"]
            selected = [c for c in containers(docs) if matches(selector, pod_labels(c.workload))]
            ports = {p["name"] for c in selected for p in c.spec.get("ports", [])}
        else:
            endpoints = monitor["spec"]["endpoints"]
            ports = {
                p["name"]
                for s in of_kind(docs, "Service")
                if matches(selector, s["metadata"].get("labels", {}))
                for p in s["spec"]["ports"]
            }
        for endpoint in endpoints:
            assert endpoint["port"] in ports, f"{monitor['kind']} scrapes nothing: {ports}"
            job = {"action": "replace", "targetLabel": "job", "replacement": "tombstone-sidecar"}
            assert job in endpoint["relabelings"], "the rules and dashboard select this job"


def test_synapse_ignores_cidrs_in_no_proxy_so_the_manifests_list_names() -> None:
    """Why NO_PROXY lists names and no pod/service CIDRs: Synapse's bypass check matches
    names only, so a CIDR entry would promise a bypass that never happens."""
    assert not _bypassed("10.0.0.0/8", "10.1.2.3")
    assert _bypassed(".svc", "auth.matrix.svc")
