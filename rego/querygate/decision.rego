# The gateway asks for data.querygate.decision and treats an undefined,
# erroring or malformed answer as a denial. Every part of `decision` therefore
# has a default, so a defined object comes back even for `{}` as input.
#
# Allow-list: a query runs only if some `permit` fires and no `deny` fires.
# A deny rule that touches input which might be undefined would silently stop
# firing exactly when input is odd. So deny rules negate named helper rules
# (`not known_kind`), never a raw expression: `not input.query.kind in xs` is
# evaluated with its operands outside the `not`, and is *false* when the kind
# is missing. Messages are constants unless the value is known to exist.
package querygate

# Tunable without code: rego/querygate/config/data.json. If it is missing,
# every lookup below is undefined and the policy denies everything.
cfg := data.querygate.config

# METADATA
# description: What the gateway asks for every request (docs/decision-contract.md).
# entrypoint: true
decision := {
	"allow": allow,
	"reasons": reasons,
	"masks": masks,
	"derived_mask": derived_mask,
	"masked_predicates_allowed": masked_predicates_allowed,
	"require_approval": require_approval,
	"max_rows": max_rows,
	"max_rows_affected": max_rows_affected,
	"db_role": db_role,
	"rows_per_hour": rows_per_hour,
	"cache_ttl_s": cache_ttl_s,
}

default allow := false

allow if {
	count(deny) == 0
	count(permit) > 0
}

# Explain the outcome with the rules that produced it: permits when allowed,
# denies when denied, and default_deny when nothing spoke up at all.
default reasons := [{"rule": "default_deny", "message": "no rule permits this query"}]

reasons := sorted_reasons(permit) if allow

reasons := sorted_reasons(deny) if count(deny) > 0

# Sets of objects sort by key order ("message" before "rule"); sort by rule
# name explicitly so the audit log reads in a stable, meaningful order.
sorted_reasons(rs) := [{"rule": p[0], "message": p[1]} |
	some p in sort([[r.rule, r.message] | some r in rs])
]

# A row limit only means something for a query that will run.
default max_rows := null

max_rows := cfg.default_max_rows if {
	allow
	not is_agent
}

# Agents get their own, lower cap (agents.rego).
max_rows := agent_max_rows if {
	allow
	is_agent
}

# ---------------------------------------------------------------- caching

# How long the gateway may reuse this decision for the same input (all of it but the
# request's id and time), bundle revision and catalog version (docs/decision-contract.md,
# "Caching"). Every rule of this policy reads only the input and data.querygate.config,
# never the time or another service, so its decisions may be reused, except one that
# weighs an approval: its state (approved, unused, unexpired) changes without the input
# changing. A rule that reads the time (time.now_ns, input.request.time) or calls out
# (http.send) must make cache_ttl_s 0 for every decision it takes part in.
default cache_ttl_s := 0

cache_ttl_s := cfg.decision_cache_ttl_s if input.approval == null

# ---------------------------------------------------------------- facts

default groups := set()

groups := {g | some g in input.identity.groups} if is_array(input.identity.groups)

# Where the first of several groups wins (masking.rego, guardrails.rego), it is the
# first in this order, so two memberships always resolve the same way.
sorted_groups := sort(groups)

is_reader if {
	some g in groups
	g in cfg.reader_groups
}

is_writer if {
	some g in groups
	g in cfg.writer_groups
}

# A query is read-only only if the extractor positively says it writes
# nothing; a missing or malformed write list counts as a write.
read_only if input.query.tables.write == []

is_write if input.query.kind in {"insert", "update", "delete", "merge"}

is_write if not read_only

ddl_forbidden_here if input.environment in cfg.ddl_forbidden_environments

# Rules that only concern DDL test `input.query.kind == "ddl"` themselves rather than
# through an is_ddl helper: OPA's rule index sees a comparison of input with a constant
# and skips those rules outright for every other kind, instead of evaluating each body
# to find out. (A positive test needs no helper: a missing kind just doesn't match.)

# ---------------------------------------------------------------- deny

deny contains {"rule": "missing_subject", "message": "the identity has no subject (sub)"} if {
	not valid_subject
}

valid_subject if {
	is_string(input.identity.sub)
	input.identity.sub != ""
}

deny contains {"rule": "malformed_groups", "message": "identity.groups must be a list of group names"} if {
	not well_formed_groups
}

well_formed_groups if {
	is_array(input.identity.groups)
	every g in input.identity.groups {
		is_string(g)
	}
}

deny contains {"rule": "unknown_environment", "message": "environment is not one of the known environments"} if {
	not known_environment
}

known_environment if input.environment in cfg.environments

deny contains {"rule": "unknown_kind", "message": "query kind is not one of the known statement kinds"} if {
	not known_kind
}

known_kind if input.query.kind in cfg.known_kinds

deny contains {"rule": "write_requires_writer_group", "message": "writing to tables requires a writer group"} if {
	is_write
	not is_writer
}

# No exception for writer groups: schema changes in these environments go
# through migrations, not through the gateway.
deny contains {"rule": "ddl_forbidden_in_environment", "message": msg} if {
	input.query.kind == "ddl"
	ddl_forbidden_here
	msg := sprintf("DDL is never allowed in %s", [input.environment])
}

deny contains {"rule": "ddl_requires_writer_group", "message": "DDL requires a writer group"} if {
	input.query.kind == "ddl"
	not is_writer
}

# Functions run inside the database with the gateway's privileges, so they are
# allowed by name: the curated built-ins plus whatever a team adds under
# functions.extra. (Functions that read files, settings or other servers are
# refused by the gateway itself before policy is asked, whatever this list says.)
deny contains {"rule": "function_not_allowed", "message": msg} if {
	some f in input.query.functions
	not allowed_function(f)
	msg := sprintf("function %v() is not on the allow-list", [f])
}

# Membership is tested on the two lists as they are, one rule each (either one
# allows). Their union as a set would be rebuilt from ~100 names on every
# evaluation, which cost more than the rest of the decision put together; a
# lookup walks a list only for the few functions a query calls.
allowed_function(f) if f in cfg.functions.builtin

allowed_function(f) if f in cfg.functions.extra

# Catalog introspection (docs/pgwire.md): a query of system catalogs only, whose relations
# and functions PostgreSQL's parse tree names (query.introspection). It reads the relations
# listed under catalog.relations, with the functions under functions.catalog besides the
# others; the catalogs that hold values or credentials are refused by the gateway first.
deny contains {"rule": "catalog_relation_not_allowed", "message": msg} if {
	input.query.introspection
	some t in input.query.tables.read
	not t in cfg.catalog.relations
	msg := sprintf("system catalog %s is not readable through the gateway", [t])
}

allowed_function(f) if {
	input.query.introspection
	f in cfg.functions.catalog
}

# What drivers and tools ask on connect (SQLAlchemy's version() and current_schema(), JDBC's
# current_database(), psql's pg_backend_pid()): facts about the session, never about data.
allowed_function(f) if f in cfg.functions.session

# ---------------------------------------------------------------- permit

permit contains {"rule": "reader_group_select", "message": "reader groups may run read-only selects"} if {
	input.query.kind == "select"
	read_only
	is_reader
}

permit contains {"rule": "writer_group_write", "message": "writer groups may write to tables"} if {
	is_write
	is_writer
}

permit contains {"rule": "writer_group_ddl", "message": msg} if {
	input.query.kind == "ddl"
	is_writer
	not ddl_forbidden_here
	msg := sprintf("writer groups may run DDL in %s", [input.environment])
}
