# Rules every rendered Kubernetes manifest of querygate must pass (tests/deploy/).
#
# Input: {"objects": [<every object kustomize rendered for one layout>]}.
# Output: `violations`, a set of {"rule", "object", "message"}; empty means the layout
# passes. Like the gateway's own policy these are written as an allow-list: each rule fires
# unless a named helper positively shows the good setting, so a missing field is a
# violation rather than a silent pass.
package manifests

# ---------------------------------------------------------------- objects and containers

workload_kinds := {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "Pod"}

# Kinds whose pods run until stopped, and so need probes, a disruption budget and a
# network policy.
long_running_kinds := {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Pod"}

pod_spec(obj) := obj.spec if obj.kind == "Pod"

pod_spec(obj) := obj.spec.template.spec if {
	obj.kind in workload_kinds
	obj.kind != "Pod"
}

pod_labels(obj) := object.get(obj, ["metadata", "labels"], {}) if obj.kind == "Pod"

pod_labels(obj) := object.get(obj, ["spec", "template", "metadata", "labels"], {}) if obj.kind != "Pod"

name(obj) := sprintf("%s/%s", [obj.kind, object.get(obj, ["metadata", "name"], "<unnamed>")])

namespace(obj) := object.get(obj, ["metadata", "namespace"], "")

workloads contains obj if {
	some obj in input.objects
	obj.kind in workload_kinds
}

# Every container of a workload with the fields the rules need: app containers and init
# containers alike (querygate and OPA run as native sidecars, init containers with
# restartPolicy: Always).
containers contains {"obj": obj, "pod": spec, "c": c, "long_running": long} if {
	some obj in workloads
	spec := pod_spec(obj)
	some c in object.get(spec, "containers", [])
	long := obj.kind in long_running_kinds
}

containers contains {"obj": obj, "pod": spec, "c": c, "long_running": long} if {
	some obj in workloads
	spec := pod_spec(obj)
	some c in object.get(spec, "initContainers", [])
	long := native_sidecar(obj, c)
}

native_sidecar(obj, c) if {
	obj.kind in long_running_kinds
	c.restartPolicy == "Always"
}

where(x) := sprintf("%s container %s", [name(x.obj), x.c.name])

# A container setting wins over the pod's, as in Kubernetes.
effective(x, key) := x.c.securityContext[key]

effective(x, key) := x.pod.securityContext[key] if {
	not key in object.keys(object.get(x.c, "securityContext", {}))
}

violation(rule, subject, message) := {"rule": rule, "object": subject, "message": message}

# ---------------------------------------------------------------- identity and privileges

# METADATA
# title: violations
# description: Every rule this layout breaks; empty when it passes.
# entrypoint: true
violations contains violation("run_as_root", where(x), "runAsNonRoot must be true") if {
	some x in containers
	not non_root(x)
}

# Helpers, not inline comparisons: in `not f(x) == true` the call is evaluated outside the
# `not`, so an undefined value would silently make the rule not fire.
non_root(x) if effective(x, "runAsNonRoot") == true

violations contains violation("run_as_root", where(x), "runAsUser must not be 0") if {
	some x in containers
	effective(x, "runAsUser") == 0
}

violations contains violation("privileged", where(x), "privileged containers are not allowed") if {
	some x in containers
	x.c.securityContext.privileged == true
}

violations contains violation(
	"privilege_escalation", where(x),
	"allowPrivilegeEscalation must be false",
) if {
	some x in containers
	not no_escalation(x.c)
}

no_escalation(c) if c.securityContext.allowPrivilegeEscalation == false

violations contains violation(
	"writable_root_filesystem", where(x),
	"readOnlyRootFilesystem must be true",
) if {
	some x in containers
	not read_only_root(x.c)
}

read_only_root(c) if c.securityContext.readOnlyRootFilesystem == true

violations contains violation("capabilities", where(x), "capabilities must drop ALL") if {
	some x in containers
	not drops_all(x.c)
}

drops_all(c) if "ALL" in c.securityContext.capabilities.drop

violations contains violation("capabilities", where(x), "no capabilities may be added") if {
	some x in containers
	count(object.get(x.c, ["securityContext", "capabilities", "add"], [])) > 0
}

violations contains violation("seccomp", where(x), "seccompProfile must be RuntimeDefault or Localhost") if {
	some x in containers
	not confined(x)
}

confined(x) if effective(x, "seccompProfile").type in {"RuntimeDefault", "Localhost"}

# ---------------------------------------------------------------- host access

violations contains violation("host_namespace", name(obj), sprintf("%s must not be true", [field])) if {
	some obj in workloads
	some field in ["hostNetwork", "hostPID", "hostIPC"]
	pod_spec(obj)[field] == true
}

violations contains violation("host_namespace", where(x), "hostPort must not be used") if {
	some x in containers
	some port in object.get(x.c, "ports", [])
	port.hostPort
}

violations contains violation("host_path", name(obj), sprintf("volume %s mounts a host path", [v.name])) if {
	some obj in workloads
	some v in object.get(pod_spec(obj), "volumes", [])
	v.hostPath
}

# Tokens reach a pod only as projected volumes with an audience (querygate), never as the
# default API-server token.
violations contains violation(
	"service_account_token", name(obj),
	"automountServiceAccountToken must be false",
) if {
	some obj in workloads
	not token_not_mounted(obj)
}

token_not_mounted(obj) if pod_spec(obj).automountServiceAccountToken == false

# ---------------------------------------------------------------- probes and resources

violations contains violation("missing_probe", where(x), sprintf("%s is required", [probe])) if {
	some x in containers
	x.long_running
	some probe in ["livenessProbe", "readinessProbe"]
	not x.c[probe]
}

violations contains violation("resources", where(x), sprintf("resources.%s.%s is required", [kind, res])) if {
	some x in containers
	some kind in ["requests", "limits"]
	some res in ["cpu", "memory"]
	not x.c.resources[kind][res]
}

# ---------------------------------------------------------------- images

violations contains violation("image_not_pinned", where(x), msg) if {
	some x in containers
	not pinned(x.c.image)
	msg := sprintf("image %v must have a digest or an exact version tag (not latest)", [x.c.image])
}

pinned(image) if regex.match(`@sha256:[0-9a-f]{64}$`, image)

pinned(image) if {
	tag := image_tag(image)
	regex.match(`^v?[0-9]+\.[0-9]+\.[0-9]+([-.+][0-9A-Za-z.-]+)?$`, tag)
}

# The tag is what follows the last ":" of the last path segment (a registry may have a port).
image_tag(image) := tag if {
	segments := split(image, "/")
	last := segments[count(segments) - 1]
	parts := split(last, ":")
	count(parts) == 2
	tag := parts[1]
}

# ---------------------------------------------------------------- availability and network

violations contains violation("no_disruption_budget", name(obj), "no PodDisruptionBudget selects these pods") if {
	some obj in workloads
	obj.kind in {"Deployment", "StatefulSet"}
	not budgeted(obj)
}

budgeted(obj) if {
	some pdb in input.objects
	pdb.kind == "PodDisruptionBudget"
	namespace(pdb) == namespace(obj)
	selects(pdb.spec.selector, pod_labels(obj))
}

violations contains violation("no_network_policy", name(obj), msg) if {
	some obj in workloads
	obj.kind in long_running_kinds
	some direction in ["Ingress", "Egress"]
	not isolated(obj, direction)
	msg := sprintf("no NetworkPolicy restricts %s for these pods", [lower(direction)])
}

isolated(obj, direction) if {
	some np in input.objects
	np.kind == "NetworkPolicy"
	namespace(np) == namespace(obj)
	direction in np.spec.policyTypes
	selects(np.spec.podSelector, pod_labels(obj))
}

# matchLabels only: a selector this file cannot evaluate does not count as selecting.
selects(selector, labels) if {
	not selector.matchExpressions
	every k, v in object.get(selector, "matchLabels", {}) {
		labels[k] == v
	}
}

# ---------------------------------------------------------------- OPA sidecar

opa_containers contains x if {
	some x in containers
	startswith(x.c.image, "openpolicyagent/opa:")
}

# The decision API must stay on loopback: anyone who can reach it can read the policy and
# data, or push new ones.
violations contains violation("opa_api_exposed", where(x), "OPA must listen with --addr=localhost:<port>") if {
	some x in opa_containers
	not loopback_addr(x.c)
}

loopback_addr(c) if {
	some arg in c.args
	regex.match(`^--addr=(localhost|127\.0\.0\.1):[0-9]+$`, arg)
}

violations contains violation("unsigned_bundle", where(x), "OPA must not run with --skip-verify") if {
	some x in opa_containers
	"--skip-verify" in x.c.args
}

# Every bundle OPA is configured to download must be verified with a configured key.
violations contains violation("unsigned_bundle", name(cm), msg) if {
	some cm in input.objects
	cm.kind == "ConfigMap"
	some file, text in cm.data
	endswith(file, ".yaml")
	config := yaml.unmarshal(text)
	some bundle_name, bundle in config.bundles
	not verified(config, bundle)
	msg := sprintf("bundle %s in %s has no signing.keyid with a matching key", [bundle_name, file])
}

verified(config, bundle) if config.keys[bundle.signing.keyid].algorithm
