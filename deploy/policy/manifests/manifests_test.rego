package manifests_test

import data.manifests

# ---------------------------------------------------------------- fixtures

hardened := {
	"runAsNonRoot": true,
	"allowPrivilegeEscalation": false,
	"readOnlyRootFilesystem": true,
	"capabilities": {"drop": ["ALL"]},
}

probe := {"httpGet": {"path": "/healthz", "port": 8080}}

resources := {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"cpu": "1", "memory": "128Mi"}}

app := {
	"name": "app",
	"image": "registry.example.com/app:1.2.3",
	"securityContext": hardened,
	"livenessProbe": probe,
	"readinessProbe": probe,
	"resources": resources,
}

opa_sidecar := object.union(app, {
	"name": "opa",
	"image": "openpolicyagent/opa:1.22.0-static",
	"restartPolicy": "Always",
	"args": ["run", "--server", "--addr=localhost:8181", "--config-file=/config/opa-config.yaml"],
})

labels := {"app.kubernetes.io/name": "app"}

deployment(spec) := {
	"apiVersion": "apps/v1",
	"kind": "Deployment",
	"metadata": {"name": "app", "namespace": "ns"},
	"spec": {
		"selector": {"matchLabels": labels},
		"template": {"metadata": {"labels": labels}, "spec": spec},
	},
}

pod_spec := {
	"automountServiceAccountToken": false,
	"securityContext": {"runAsNonRoot": true, "runAsUser": 10001, "seccompProfile": {"type": "RuntimeDefault"}},
	"initContainers": [opa_sidecar],
	"containers": [app],
}

pdb := {
	"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
	"metadata": {"name": "app", "namespace": "ns"},
	"spec": {"maxUnavailable": 1, "selector": {"matchLabels": labels}},
}

netpol := {
	"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
	"metadata": {"name": "app", "namespace": "ns"},
	"spec": {"podSelector": {"matchLabels": labels}, "policyTypes": ["Ingress", "Egress"]},
}

opa_config := concat("\n", [
	"services:",
	"  s:",
	"    url: https://bundles.example.com",
	"bundles:",
	"  querygate:",
	"    service: s",
	"    signing:",
	"      keyid: k",
	"keys:",
	"  k:",
	"    algorithm: RS256",
])

config_map(text) := {
	"apiVersion": "v1", "kind": "ConfigMap",
	"metadata": {"name": "opa", "namespace": "ns"},
	"data": {"opa-config.yaml": text, "other": "not yaml: ["},
}

good := [deployment(pod_spec), pdb, netpol, config_map(opa_config)]

# Replace top-level keys (object.union would merge nested objects instead).
override(obj, patch) := object.union(object.remove(obj, object.keys(patch)), patch)

# The layout with one change to the pod spec.
with_spec(patch) := array.concat([deployment(override(pod_spec, patch))], array.slice(good, 1, 4))

# The layout with one change to the app container.
with_app(patch) := with_spec({"containers": [override(app, patch)]})

rule_names(violations) := {v.rule | some v in violations}

layout(objects) := {"objects": objects}

# ---------------------------------------------------------------- the good layout passes

test_good_layout_has_no_violations if {
	count(manifests.violations) == 0 with input as {"objects": good}
}

test_digest_pinned_image_passes if {
	digest := concat("", ["registry.example.com:5000/app@sha256:", concat("", [
		"0123456789abcdef0123456789abcdef",
		"0123456789abcdef0123456789abcdef",
	])])
	rule_names(manifests.violations) == set() with input as layout(with_app({"image": digest}))
}

test_container_setting_overrides_the_pod if {
	objects := with_app({"securityContext": object.union(hardened, {"runAsUser": 1000})})
	rule_names(manifests.violations) == set() with input as layout(objects)
}

test_a_job_needs_no_probes_budget_or_network_policy if {
	job := {
		"kind": "Job", "metadata": {"name": "migrate"},
		"spec": {"template": {"spec": override(pod_spec, {"containers": [object.remove(app, ["livenessProbe"])]})}},
	}
	rule_names(manifests.violations) == set() with input as layout([job])
}

test_a_plain_init_container_needs_no_probes if {
	init := object.remove(opa_sidecar, ["restartPolicy", "livenessProbe", "readinessProbe"])
	objects := with_spec({"initContainers": [init]})
	rule_names(manifests.violations) == set() with input as layout(objects)
}

# ---------------------------------------------------------------- each rule fires

test_root_user if {
	objects := with_app({"securityContext": object.union(hardened, {"runAsUser": 0})})
	rule_names(manifests.violations) == {"run_as_root"} with input as layout(objects)
}

test_run_as_non_root_false if {
	objects := with_app({"securityContext": object.union(hardened, {"runAsNonRoot": false})})
	rule_names(manifests.violations) == {"run_as_root"} with input as layout(objects)
}

test_run_as_non_root_missing_everywhere if {
	ctx := object.remove(hardened, ["runAsNonRoot"])
	rule_names(manifests.violations) == {"run_as_root"} with input as layout(with_spec({
		"securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
		"containers": [override(app, {"securityContext": ctx})],
		"initContainers": [override(opa_sidecar, {"securityContext": ctx})],
	}))
}

test_privileged if {
	objects := with_app({"securityContext": object.union(hardened, {"privileged": true})})
	rule_names(manifests.violations) == {"privileged"} with input as layout(objects)
}

test_privilege_escalation if {
	objects := with_app({"securityContext": object.remove(hardened, ["allowPrivilegeEscalation"])})
	rule_names(manifests.violations) == {"privilege_escalation"} with input as layout(objects)
}

test_writable_root_filesystem if {
	objects := with_app({"securityContext": object.union(hardened, {"readOnlyRootFilesystem": false})})
	rule_names(manifests.violations) == {"writable_root_filesystem"} with input as layout(objects)
}

test_capabilities_not_dropped if {
	objects := with_app({"securityContext": object.union(hardened, {"capabilities": {"drop": ["NET_RAW"]}})})
	rule_names(manifests.violations) == {"capabilities"} with input as layout(objects)
}

test_capabilities_added if {
	caps := {"drop": ["ALL"], "add": ["NET_ADMIN"]}
	objects := with_app({"securityContext": object.union(hardened, {"capabilities": caps})})
	rule_names(manifests.violations) == {"capabilities"} with input as layout(objects)
}

test_seccomp_missing if {
	objects := with_spec({"securityContext": {"runAsNonRoot": true}})
	rule_names(manifests.violations) == {"seccomp"} with input as layout(objects)
}

test_seccomp_unconfined if {
	ctx := object.union(hardened, {"seccompProfile": {"type": "Unconfined"}})
	objects := with_app({"securityContext": ctx})
	rule_names(manifests.violations) == {"seccomp"} with input as layout(objects)
}

test_host_network if {
	objects := with_spec({"hostNetwork": true})
	rule_names(manifests.violations) == {"host_namespace"} with input as layout(objects)
}

test_host_pid if {
	objects := with_spec({"hostPID": true})
	rule_names(manifests.violations) == {"host_namespace"} with input as layout(objects)
}

test_host_port if {
	objects := with_app({"ports": [{"containerPort": 80, "hostPort": 80}]})
	rule_names(manifests.violations) == {"host_namespace"} with input as layout(objects)
}

test_host_path_volume if {
	objects := with_spec({"volumes": [{"name": "root", "hostPath": {"path": "/"}}]})
	rule_names(manifests.violations) == {"host_path"} with input as layout(objects)
}

test_default_token_mounted if {
	objects := with_spec({"automountServiceAccountToken": true})
	rule_names(manifests.violations) == {"service_account_token"} with input as layout(objects)
}

test_missing_readiness_probe if {
	objects := with_spec({"containers": [object.remove(app, ["readinessProbe"])]})
	rule_names(manifests.violations) == {"missing_probe"} with input as layout(objects)
}

test_sidecar_missing_liveness_probe if {
	objects := with_spec({"initContainers": [object.remove(opa_sidecar, ["livenessProbe"])]})
	rule_names(manifests.violations) == {"missing_probe"} with input as layout(objects)
}

test_missing_limits if {
	objects := with_app({"resources": {"requests": resources.requests}})
	rule_names(manifests.violations) == {"resources"} with input as layout(objects)
}

test_latest_image if {
	objects := with_app({"image": "registry.example.com/app:latest"})
	rule_names(manifests.violations) == {"image_not_pinned"} with input as layout(objects)
}

test_untagged_image if {
	objects := with_app({"image": "registry.example.com:5000/app"})
	rule_names(manifests.violations) == {"image_not_pinned"} with input as layout(objects)
}

test_minor_version_tag_is_not_pinned if {
	objects := with_app({"image": "python:3.11"})
	rule_names(manifests.violations) == {"image_not_pinned"} with input as layout(objects)
}

test_no_disruption_budget if {
	objects := [deployment(pod_spec), netpol, config_map(opa_config)]
	rule_names(manifests.violations) == {"no_disruption_budget"} with input as layout(objects)
}

test_budget_in_another_namespace_does_not_count if {
	elsewhere := override(pdb, {"metadata": {"name": "app", "namespace": "other"}})
	objects := [deployment(pod_spec), elsewhere, netpol]
	rule_names(manifests.violations) == {"no_disruption_budget"} with input as layout(objects)
}

test_no_network_policy if {
	objects := [deployment(pod_spec), pdb]
	rule_names(manifests.violations) == {"no_network_policy"} with input as layout(objects)
}

test_ingress_only_network_policy if {
	ingress_only := object.union(netpol, {"spec": {"policyTypes": ["Ingress"]}})
	violations := manifests.violations with input as {"objects": [deployment(pod_spec), pdb, ingress_only]}
	{v.message | some v in violations} == {"no NetworkPolicy restricts egress for these pods"}
}

test_network_policy_for_other_pods if {
	other := object.union(netpol, {"spec": {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "other"}}}})
	objects := [deployment(pod_spec), pdb, other]
	rule_names(manifests.violations) == {"no_network_policy"} with input as layout(objects)
}

test_match_expressions_selector_does_not_count if {
	expr := {"matchExpressions": [{"key": "app.kubernetes.io/name", "operator": "Exists"}]}
	objects := [deployment(pod_spec), pdb, object.union(netpol, {"spec": {"podSelector": expr}})]
	rule_names(manifests.violations) == {"no_network_policy"} with input as layout(objects)
}

test_opa_listening_on_every_interface if {
	exposed := override(opa_sidecar, {"args": ["run", "--server", "--addr=0.0.0.0:8181"]})
	objects := with_spec({"initContainers": [exposed]})
	rule_names(manifests.violations) == {"opa_api_exposed"} with input as layout(objects)
}

test_opa_skip_verify if {
	skip := override(opa_sidecar, {"args": array.concat(opa_sidecar.args, ["--skip-verify"])})
	objects := with_spec({"initContainers": [skip]})
	rule_names(manifests.violations) == {"unsigned_bundle"} with input as layout(objects)
}

test_bundle_without_signing if {
	unsigned := replace(opa_config, "    signing:\n      keyid: k\n", "")
	objects := [deployment(pod_spec), pdb, netpol, config_map(unsigned)]
	rule_names(manifests.violations) == {"unsigned_bundle"} with input as layout(objects)
}

test_bundle_signed_with_unknown_key if {
	unknown := replace(opa_config, "keyid: k", "keyid: nobody")
	objects := [deployment(pod_spec), pdb, netpol, config_map(unknown)]
	rule_names(manifests.violations) == {"unsigned_bundle"} with input as layout(objects)
}

test_bare_pod_is_checked if {
	pod := {
		"kind": "Pod",
		"metadata": {"name": "debug", "namespace": "ns", "labels": labels},
		"spec": override(pod_spec, {"hostIPC": true}),
	}
	rule_names(manifests.violations) == {"host_namespace"} with input as layout([pod, netpol])
}
