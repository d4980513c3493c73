# Guardrails: destructive or sweeping operations stopped, sensitive writes held for a second
# person, and limits on what an allowed write may do. All tunable in data.json
# (`guardrails`), so teams change them without touching Rego.
package querygate

guard := cfg.guardrails

# An UPDATE or DELETE without a WHERE that filters anything touches every row. "Trivially
# true" is the extractor's verdict that the WHERE bounds nothing: a condition that reads no
# column, `x = x`, `x IS NOT NULL`, `id <> 0 OR id = 0`, `… OR true` (docs/approvals.md).
deny contains {"rule": "unbounded_write", "message": msg} if {
	input.query.kind in {"update", "delete"}
	not bounded_where
	msg := sprintf("%s without a WHERE clause that filters rows is never allowed", [upper(input.query.kind)])
}

bounded_where if {
	input.query.has_where == true
	input.query.where_trivially_true == false
}

# DROP, TRUNCATE, ALTER … DROP, ALTER … TYPE (which rewrites every value) and anything
# CASCADE destroy data beyond recovery.
deny contains {"rule": "destructive_ddl", "message": msg} if {
	input.query.kind == "ddl"
	destructive_ddl
	input.environment in guard.destructive_ddl_environments
	msg := sprintf("destructive DDL is never allowed in %s", [input.environment])
}

destructive_ddl if input.query.ddl.operation in {"drop", "truncate"}

destructive_ddl if {
	input.query.ddl.operation == "alter"
	some action in input.query.ddl.actions
	action in {"drop", "alter_type"}
}

destructive_ddl if "cascade" in input.query.ddl.actions

# Schema changes in these environments go through the migration identity only.
deny contains {"rule": "ddl_requires_migration_identity", "message": msg} if {
	input.query.kind == "ddl"
	input.environment in guard.migration_environments
	not is_migrator
	msg := sprintf("DDL in %s is only for the migration identity", [input.environment])
}

permit contains {"rule": "migration_ddl", "message": msg} if {
	input.query.kind == "ddl"
	input.environment in guard.migration_environments
	is_migrator
	msg := sprintf("the migration identity may run DDL in %s", [input.environment])
}

is_migrator if {
	some g in groups
	g in guard.migration_groups
}

# Protected tables: "deny" refuses every write, "approval" holds it for an approver.
deny contains {"rule": "protected_table", "message": msg} if {
	some t in input.query.tables.write
	guard.protected_tables[t] == "deny"
	msg := sprintf("writes to %s are not allowed", [t])
}

approval_tables contains t if {
	some t in input.query.tables.write
	guard.protected_tables[t] == "approval"
}

# The gateway puts an approval in the input only after checking that it is approved, unused,
# unexpired and bound to this requester, SQL text, parameters and environment.
approved if input.approval.status == "approved"

default require_approval := null

require_approval := {
	"rule": "protected_table_write",
	"message": sprintf("writes to %s need an approval", [concat(", ", sort(approval_tables))]),
	"tables": sort(approval_tables),
	"approver_groups": guard.approver_groups,
	"ttl_s": guard.approval_ttl_s,
} if {
	count(approval_tables) > 0
	not approved
}

# Blast radius: a write that affects more rows than this is rolled back by the gateway.
default max_rows_affected := null

max_rows_affected := guard.max_rows_affected if is_write

# Least privilege in the database: the first of the caller's groups (sorted) that maps to a
# role; the statement runs under SET LOCAL ROLE, so the database enforces it too.
default db_role := null

db_role := roles[0] if {
	roles := [r | some g in sorted_groups; r := guard.db_roles[g]]
	count(roles) > 0
}

# ---------------------------------------------------------------- approvers

# Asked by the gateway when someone approves or rejects: input is the approver's identity,
# the environment and the approval record (requester, tables, approver_groups, …).
# METADATA
# description: What the gateway asks when someone approves or rejects a request.
# entrypoint: true
approver_decision := {"allow": approver_allowed, "reasons": approver_reasons}

default approver_allowed := false

approver_allowed if {
	count(approver_deny) == 0
	count(approver_permit) > 0
}

default approver_reasons := [{"rule": "not_an_approver", "message": "you are not an approver for this request"}]

approver_reasons := sorted_reasons(approver_deny) if count(approver_deny) > 0

approver_reasons := sorted_reasons(approver_permit) if approver_allowed

# Never the requester, whatever groups they are in.
approver_deny contains {"rule": "self_approval", "message": "requesters cannot approve their own requests"} if {
	input.identity.sub == input.approval.requester.sub
}

approver_deny contains {"rule": "missing_subject", "message": "the identity has no subject (sub)"} if {
	not valid_subject
}

approver_permit contains {"rule": "approver_group", "message": "member of an approver group"} if {
	some g in groups
	g in input.approval.approver_groups
}
