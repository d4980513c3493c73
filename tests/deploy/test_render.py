"""Every layout in deploy/k8s renders with the pinned kustomize and validates offline against
the Kubernetes OpenAPI schemas (kubernetes-validate, strict: unknown fields are errors)."""

from __future__ import annotations

import copy
import re

import kubernetes_validate
import pytest

from tests.deploy.manifests import LAYOUTS, REPO, container, find, render

# The oldest Kubernetes the layouts support (native sidecars are on by default from 1.29)
# and the newest the validator knows.
KUBERNETES_VERSIONS = ["1.30.0", "1.37.0"]

EXPECTED_KINDS = {
    "dev": ["ConfigMap", "ConfigMap", "Deployment", "NetworkPolicy", "PodDisruptionBudget",
            "ServiceAccount"],
    "prod": ["ConfigMap", "ConfigMap", "Deployment", "NetworkPolicy", "PodDisruptionBudget",
             "ServiceAccount"],
    "shared-gateway": ["ConfigMap", "ConfigMap", "Deployment", "NetworkPolicy",
                       "PodDisruptionBudget", "Service", "ServiceAccount"],
}

# Created outside the repository (docs/deployment.md); the manifests only name them.
SECRETS = {
    "querygate-database", "querygate-identity", "querygate-masking", "querygate-kafka",
    "querygate-bundle-credentials",
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_layout_validates_against_the_kubernetes_schemas(layout, version):
    objects = render(LAYOUTS[layout])
    assert sorted(o["kind"] for o in objects) == EXPECTED_KINDS[layout]
    for obj in objects:
        kubernetes_validate.validate(obj, version, strict=True)


def test_the_validator_rejects_an_unknown_field():
    """The check above is only worth something if a typo fails it."""
    deployment = copy.deepcopy(find(render(LAYOUTS["prod"]), "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_references_resolve_and_secrets_are_only_named(layout):
    objects = render(LAYOUTS[layout])
    assert not [o for o in objects if o["kind"] == "Secret"], "secrets never live in the repository"
    config_maps = {o["metadata"]["name"] for o in objects if o["kind"] == "ConfigMap"}
    spec = find(objects, "Deployment")["spec"]["template"]["spec"]
    containers = spec.get("initContainers", []) + spec["containers"]
    referenced_maps = {v["configMap"]["name"] for v in spec["volumes"] if "configMap" in v}
    referenced_maps |= {
        e["configMapRef"]["name"] for c in containers for e in c.get("envFrom", []) if "configMapRef" in e
    }
    assert referenced_maps <= config_maps
    secrets = {v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}
    secrets |= {e["secretRef"]["name"] for c in containers for e in c.get("envFrom", []) if "secretRef" in e}
    secrets |= {
        e["valueFrom"]["secretKeyRef"]["name"]
        for c in containers for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert secrets == SECRETS
    deployment_doc = (REPO / "docs" / "deployment.md").read_text()
    assert all(name in deployment_doc for name in SECRETS)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_gateway_and_opa_wiring(layout):
    objects = render(LAYOUTS[layout])
    opa = container(objects, "opa")
    gateway = container(objects, "querygate")
    assert "--addr=localhost:8181" in opa["args"]
    assert opa["readinessProbe"]["httpGet"]["path"] == "/health?bundles"
    diagnostic = next(a for a in opa["args"] if a.startswith("--diagnostic-addr="))
    assert diagnostic.endswith(":8282") and opa["ports"][0]["containerPort"] == 8282
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"
    settings = find(objects, "ConfigMap", "querygate-config-")["data"]
    assert settings["QUERYGATE_OPA_URL"] == "http://localhost:8181"
    assert all(re.fullmatch(r"QUERYGATE_[A-Z0-9_]+", k) for k in settings)


def test_overlays_differ_where_they_should():
    dev, prod = render(LAYOUTS["dev"]), render(LAYOUTS["prod"])
    assert {o["metadata"].get("namespace") for o in dev} == {"querygate-dev"}
    assert {o["metadata"].get("namespace") for o in prod} == {"querygate"}
    assert find(dev, "ConfigMap", "querygate-config-")["data"]["QUERYGATE_ENVIRONMENT"] == "dev"
    assert find(prod, "ConfigMap", "querygate-config-")["data"]["QUERYGATE_ENVIRONMENT"] == "prod"
    assert find(dev, "Deployment")["spec"]["replicas"] == 1
    assert find(prod, "Deployment")["spec"]["replicas"] == 3
    assert find(prod, "PodDisruptionBudget")["spec"] == {
        "minAvailable": 2, "selector": {"matchLabels": {"app.kubernetes.io/name": "orders-app"}},
    }


def test_sidecar_pod_mounts_a_querygate_audience_token_and_no_api_token():
    objects = render(LAYOUTS["prod"])
    spec = find(objects, "Deployment")["spec"]["template"]["spec"]
    assert spec["automountServiceAccountToken"] is False
    assert find(objects, "ServiceAccount")["automountServiceAccountToken"] is False
    projected = next(v["projected"] for v in spec["volumes"] if "projected" in v)
    token = projected["sources"][0]["serviceAccountToken"]
    assert token["audience"] == "querygate" and token["expirationSeconds"] <= 3600
    # The gateway port has no ingress rule: only the pod itself reaches it over localhost.
    policy = find(objects, "NetworkPolicy")
    assert 8080 not in {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}


def test_shared_gateway_admits_named_callers_only():
    policy = find(render(LAYOUTS["shared-gateway"]), "NetworkPolicy")
    rule, metrics = policy["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 8080}]
    [peer] = rule["from"]
    assert peer["namespaceSelector"]["matchLabels"] and peer["podSelector"]["matchLabels"]
    assert metrics["ports"] == [{"protocol": "TCP", "port": 9090}]  # Prometheus alone


@pytest.mark.parametrize("layout", ["dev", "prod", "shared-gateway"])
def test_metrics_have_a_port_of_their_own_open_to_prometheus_alone(layout):
    """QUERYGATE_METRICS_PORT in the config, the container's `metrics` port, and one ingress
    rule to it from the monitoring namespace's Prometheus; the API port is not in that rule."""
    objects = render(LAYOUTS[layout])
    config = find(objects, "ConfigMap", "querygate-config")["data"]
    assert config["QUERYGATE_METRICS_PORT"] == "9090"
    spec = find(objects, "Deployment")["spec"]["template"]["spec"]
    containers = spec.get("initContainers", []) + spec["containers"]
    gateway = next(c for c in containers if c["name"] == "querygate")
    assert {"name": "metrics", "containerPort": 9090} in gateway["ports"]
    policy = find(objects, "NetworkPolicy")
    [rule] = [r for r in policy["spec"]["ingress"]
              if {"protocol": "TCP", "port": 9090} in r["ports"]]
    assert rule["ports"] == [{"protocol": "TCP", "port": 9090}]
    [peer] = rule["from"]
    assert peer["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "monitoring"}
