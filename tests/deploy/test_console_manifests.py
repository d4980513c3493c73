"""The console's layout (deploy/k8s/console): one Deployment per cluster, rendered with the
pinned kustomize, validated offline against the Kubernetes schemas, checked by
deploy/policy, with probes, and a NetworkPolicy that admits the ingress controller only."""

from __future__ import annotations

import kubernetes_validate
import pytest

from app.config import Settings
from tests.deploy.manifests import K8S, REPO, container, find, render, violations
from tests.deploy.test_render import KUBERNETES_VERSIONS

CONSOLE = K8S / "console"
SECRETS = {"querygate-console-index", "querygate-console-oidc", "querygate-kafka",
           "querygate-bundle-credentials"}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_console_layout_validates(version):
    objects = render(CONSOLE)
    assert sorted(o["kind"] for o in objects) == [
        "ConfigMap", "ConfigMap", "ConfigMap", "Deployment", "NetworkPolicy",
        "PodDisruptionBudget", "Service", "ServiceAccount"]
    for obj in objects:
        kubernetes_validate.validate(obj, version, strict=True)


def test_the_console_layout_breaks_no_manifest_rule():
    assert violations(render(CONSOLE)) == []


def test_one_console_per_cluster_with_probes_and_opa_beside_it():
    objects = render(CONSOLE)
    deployment = find(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    console = container(objects, "console")
    assert console["args"] == ["console"]
    assert console["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "console"}
    assert console["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "console"}
    assert console["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert "--addr=localhost:8181" in container(objects, "opa")["args"]
    settings = find(objects, "ConfigMap", "querygate-console-config-")["data"]
    assert settings["QUERYGATE_CONSOLE_SOURCE"] == "kafka"
    assert settings["QUERYGATE_CONSOLE_PUBLIC_URL"].startswith("https://")
    assert settings["QUERYGATE_OPA_URL"] == "http://localhost:8181"
    known = {f"QUERYGATE_{name.upper()}" for name in Settings.model_fields}
    assert set(settings) <= known
    spec = deployment["spec"]["template"]["spec"]
    containers = spec["initContainers"] + spec["containers"]
    secrets = {v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}
    secrets |= {e["secretRef"]["name"] for c in containers for e in c.get("envFrom", [])
                if "secretRef" in e}
    secrets |= {e["valueFrom"]["secretKeyRef"]["name"] for c in containers
                for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
    assert secrets == SECRETS
    assert not [o for o in objects if o["kind"] == "Secret"]
    docs = (REPO / "docs" / "deployment.md").read_text() + (REPO / "docs" / "console.md").read_text()
    assert all(name in docs for name in SECRETS)


def test_the_console_admits_the_ingress_controller_only_and_reaches_the_gateway():
    objects = render(CONSOLE)
    policy = find(objects, "NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    [rule] = policy["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 8081}]
    [peer] = rule["from"]
    assert peer["namespaceSelector"]["matchLabels"] and peer["podSelector"]["matchLabels"]
    to_gateway = [r for r in policy["egress"]
                  if any(p.get("podSelector", {}).get("matchLabels") ==
                         {"app.kubernetes.io/name": "querygate"} for p in r["to"])]
    assert to_gateway and to_gateway[0]["ports"] == [{"protocol": "TCP", "port": 8080}]
    # The shared gateway's own policy admits it as a named caller.
    labels = find(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    gateway_policy = find(render(K8S / "shared-gateway"), "NetworkPolicy")["spec"]
    admitted = gateway_policy["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    assert admitted.items() <= labels.items()
