package querygate_test

import data.querygate

dba := {"sub": "dana", "groups": ["dba"]}

migrator := {"sub": "flyway", "groups": ["migrations", "dba"]}

write_query(kind, table, has_where, trivially_true) := {
	"kind": kind,
	"tables": {"read": [table], "write": [table]},
	"columns": {"read": [], "predicate": [], "write": []},
	"functions": [],
	"has_where": has_where,
	"where_trivially_true": trivially_true,
}

ask(identity, env, query) := {"identity": identity, "environment": env, "query": query, "approval": null}

rules_of(d) := {r.rule | some r in d.reasons}

test_unbounded_writes_denied_everywhere if {
	every env in ["dev", "staging", "prod"] {
		every q in [
			write_query("delete", "public.orders", false, false),
			write_query("update", "public.orders", true, true),
		] {
			d := querygate.decision with input as ask(dba, env, q)
			not d.allow
			"unbounded_write" in rules_of(d)
		}
	}
}

test_bounded_write_allowed_with_blast_radius if {
	d := querygate.decision with input as ask(dba, "prod", write_query("update", "public.orders", true, false))
	d.allow
	d.max_rows_affected == 1000
	d.require_approval == null
}

ddl_query(operation, actions) := {
	"kind": "ddl",
	"tables": {"read": [], "write": ["public.orders"]},
	"columns": {"read": [], "predicate": [], "write": []},
	"functions": [],
	"ddl": {"operation": operation, "object_type": "table", "targets": ["public.orders"], "actions": actions},
}

test_destructive_ddl_denied_in_staging_and_prod_even_for_migrations if {
	every env in ["staging", "prod"] {
		every q in [
			ddl_query("drop", []), ddl_query("truncate", []),
			ddl_query("alter", ["drop"]), ddl_query("alter", ["columndef", "cascade"]),
		] {
			d := querygate.decision with input as ask(migrator, env, q)
			not d.allow
			"destructive_ddl" in rules_of(d)
		}
	}
}

test_destructive_ddl_allowed_in_dev if {
	d := querygate.decision with input as ask(dba, "dev", ddl_query("drop", []))
	d.allow
}

test_prod_ddl_only_for_the_migration_identity if {
	denied := querygate.decision with input as ask(dba, "prod", ddl_query("alter", ["columndef"]))
	not denied.allow
	rules_of(denied) == {"ddl_requires_migration_identity"}
	allowed := querygate.decision with input as ask(migrator, "prod", ddl_query("alter", ["columndef"]))
	allowed.allow
	"migration_ddl" in rules_of(allowed)
}

test_protected_table_write_needs_approval if {
	d := querygate.decision with input as ask(dba, "prod", write_query("update", "public.customers", true, false))
	d.allow
	d.require_approval.rule == "protected_table_write"
	d.require_approval.tables == ["public.customers"]
	d.require_approval.approver_groups == ["security", "dba"]
	d.require_approval.ttl_s == 3600
}

test_approved_write_needs_no_further_approval if {
	inp := object.union(
		ask(dba, "prod", write_query("update", "public.customers", true, false)),
		{"approval": {"id": "a1", "status": "approved"}},
	)
	d := querygate.decision with input as inp
	d.allow
	d.require_approval == null
}

test_approval_does_not_override_a_denial if {
	inp := object.union(
		ask(dba, "prod", write_query("delete", "public.customers", false, false)),
		{"approval": {"id": "a1", "status": "approved"}},
	)
	d := querygate.decision with input as inp
	not d.allow
	"unbounded_write" in rules_of(d)
}

test_protected_table_deny_mode if {
	d := querygate.decision with input as ask(dba, "prod", write_query("update", "public.orders", true, false))
		with querygate.config.guardrails.protected_tables as {"public.orders": "deny"}
	not d.allow
	"protected_table" in rules_of(d)
}

test_db_role_from_groups if {
	d := querygate.decision with input as ask(dba, "prod", write_query("update", "public.orders", true, false))
		with querygate.config.guardrails.db_roles as {"dba": "qg_writer", "analysts": "qg_reader"}
	d.db_role == "qg_writer"
}

approval_record := {
	"requester": {"sub": "dana"},
	"approver_groups": ["security", "dba"],
	"tables": ["public.customers"],
}

test_approver_in_group_may_approve if {
	asker := {"sub": "sec", "groups": ["security"]}
	d := querygate.approver_decision with input as {"identity": asker, "approval": approval_record}
	d.allow
	d.reasons == [{"rule": "approver_group", "message": "member of an approver group"}]
}

test_requester_may_never_approve if {
	asker := {"sub": "dana", "groups": ["dba"]}
	d := querygate.approver_decision with input as {"identity": asker, "approval": approval_record}
	not d.allow
	d.reasons == [{"rule": "self_approval", "message": "requesters cannot approve their own requests"}]
}

test_non_approver_may_not_approve if {
	asker := {"sub": "alice", "groups": ["analysts"]}
	d := querygate.approver_decision with input as {"identity": asker, "approval": approval_record}
	not d.allow
	d.reasons == [{"rule": "not_an_approver", "message": "you are not an approver for this request"}]
}

test_approver_without_subject_is_refused if {
	asker := {"groups": ["security"]}
	d := querygate.approver_decision with input as {"identity": asker, "approval": approval_record}
	not d.allow
}
