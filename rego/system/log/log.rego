# OPA's own decision logs (decision_logs in deploy/k8s/config/opa-config.yaml) hold each
# decision's input and result. The gateway's audit stream is the record of what ran; OPA's
# log is for operators, and must not become a second copy of personal data. OPA evaluates
# this mask policy for every decision it logs and erases these paths first.
package system.log

# Who the caller is, beyond its subject and groups: the e-mail address and the identity
# provider's other claims, also of the person an agent acts for.
mask contains "/input/identity/email"

mask contains "/input/identity/attributes"

mask contains "/input/identity/on_behalf_of/email"

mask contains "/input/identity/on_behalf_of/attributes"

# Where the request came from.
mask contains "/input/request/source_ip"
