package querygate_test

import data.querygate

# ---------------------------------------------------------------- fixtures

alice := {
	"sub": "alice", "groups": ["analysts"], "issuer": "querygate-dev", "auth": "jwt",
	"email": null, "on_behalf_of": null, "attributes": {},
}

dana := object.union(alice, {"sub": "dana", "groups": ["dba"]})

select_customers := {
	"fingerprint": "sha256:0000",
	"kind": "select",
	"tables": {"read": ["public.customers"], "write": []},
	"columns": {"read": ["public.customers.email"], "predicate": ["public.customers.id"]},
	"outputs": [{"name": "email", "sources": ["public.customers.email"], "derivation": "direct"}],
	"functions": ["lower"],
	"has_where": true, "where_trivially_true": false, "limit": 100,
	"ddl": null,
}

update_orders := object.union(select_customers, {
	"kind": "update",
	"tables": {"read": ["public.orders"], "write": ["public.orders"]},
})

ddl(operation) := object.union(select_customers, {
	"kind": "ddl",
	"tables": {"read": [], "write": []},
	"columns": {"read": [], "predicate": []},
	"outputs": [],
	"ddl": {"operation": operation, "object_type": "table", "targets": ["public.orders"]},
})

req(identity, env, query) := {
	"identity": identity,
	"environment": env,
	"request": {"id": "req-1", "source_ip": "127.0.0.1", "time": "2026-11-21T10:00:00Z"},
	"database": {"name": "appdb"},
	"query": query,
	"approval": null,
}

rules(d) := {r.rule | some r in d.reasons}

denied_by(d, rule) if {
	d.allow == false
	rule in rules(d)
}

# ---------------------------------------------------------------- reads

# Worked example 1 in docs/decision-contract.md.
test_alice_select_allowed if {
	d := querygate.decision with input as req(alice, "staging", select_customers)
	d == {
		"allow": true,
		"reasons": [{"rule": "reader_group_select", "message": "reader groups may run read-only selects"}],
		"masks": {},
		"derived_mask": "redact",
		"masked_predicates_allowed": set(),
		"require_approval": null,
		"max_rows": null,
		"max_rows_affected": null,
		"db_role": null,
		"rows_per_hour": null,
		"cache_ttl_s": 60,
	}
}

test_every_reader_group_may_select if {
	every g in querygate.config.reader_groups {
		querygate.allow with input as req(object.union(alice, {"groups": [g]}), "prod", select_customers)
	}
}

test_unknown_group_denied_by_default if {
	d := querygate.decision with input as req(object.union(alice, {"groups": ["marketing"]}), "dev", select_customers)
	d.allow == false
	d.reasons == [{"rule": "default_deny", "message": "no rule permits this query"}]
}

test_no_groups_denied_by_default if {
	d := querygate.decision with input as req(object.union(alice, {"groups": []}), "dev", select_customers)
	d.reasons == [{"rule": "default_deny", "message": "no rule permits this query"}]
}

# ---------------------------------------------------------------- writes

test_dana_update_allowed if {
	d := querygate.decision with input as req(dana, "prod", update_orders)
	d.allow == true
	rules(d) == {"writer_group_write"}
}

test_alice_update_denied if {
	d := querygate.decision with input as req(alice, "dev", update_orders)
	denied_by(d, "write_requires_writer_group")
	d.max_rows == null
}

test_every_write_kind_needs_a_writer if {
	every kind in ["insert", "update", "delete", "merge"] {
		q := object.union(update_orders, {"kind": kind})
		querygate.allow with input as req(dana, "dev", q)
		denied_by(querygate.decision, "write_requires_writer_group") with input as req(alice, "dev", q)
	}
}

# A select that the extractor says writes (data-modifying CTE, SELECT INTO)
# is a write whatever its kind.
test_smuggled_write_in_select_denied_for_alice if {
	q := object.union(select_customers, {"tables": {"read": ["public.customers"], "write": ["public.orders"]}})
	d := querygate.decision with input as req(alice, "dev", q)
	denied_by(d, "write_requires_writer_group")
	not "reader_group_select" in rules(d)
}

test_missing_write_list_counts_as_write if {
	q := json.remove(select_customers, ["tables/write"])
	denied_by(querygate.decision, "write_requires_writer_group") with input as req(alice, "dev", q)
}

test_malformed_write_list_counts_as_write if {
	q := object.union(select_customers, {"tables": {"read": [], "write": "public.orders"}})
	denied_by(querygate.decision, "write_requires_writer_group") with input as req(alice, "dev", q)
}

# ---------------------------------------------------------------- DDL

test_alice_drop_in_staging_denied if {
	d := querygate.decision with input as req(alice, "staging", ddl("drop"))
	denied_by(d, "ddl_forbidden_in_environment")
	{"rule": "ddl_forbidden_in_environment", "message": "DDL is never allowed in staging"} in d.reasons
}

test_dana_ddl_denied_in_staging if {
	d := querygate.decision with input as req(dana, "staging", ddl("create"))
	d.allow == false
	d.reasons == [{"rule": "ddl_forbidden_in_environment", "message": "DDL is never allowed in staging"}]
}

test_dana_ddl_denied_in_prod_without_the_migration_identity if {
	d := querygate.decision with input as req(dana, "prod", ddl("create"))
	d.allow == false
	d.reasons == [{"rule": "ddl_requires_migration_identity", "message": "DDL in prod is only for the migration identity"}]
}

# Worked example 2 in docs/decision-contract.md: a deny outweighs the write
# permit dana's group earns, and only the deny is reported.
test_dana_drop_with_write_targets_in_staging_denied if {
	q := object.union(ddl("drop"), {"tables": {"read": [], "write": ["public.orders"]}})
	d := querygate.decision with input as req(dana, "staging", q)
	d == {
		"allow": false,
		"reasons": [
			{"rule": "ddl_forbidden_in_environment", "message": "DDL is never allowed in staging"},
			{"rule": "destructive_ddl", "message": "destructive DDL is never allowed in staging"},
		],
		"masks": {},
		"derived_mask": "redact",
		"masked_predicates_allowed": set(),
		"require_approval": null,
		"max_rows": null,
		"max_rows_affected": 1000,
		"db_role": null,
		"rows_per_hour": null,
		"cache_ttl_s": 60,
	}
}

test_dana_ddl_allowed_in_dev if {
	d := querygate.decision with input as req(dana, "dev", ddl("alter"))
	d.allow == true
	d.reasons == [{"rule": "writer_group_ddl", "message": "writer groups may run DDL in dev"}]
}

test_alice_ddl_denied_in_dev if {
	d := querygate.decision with input as req(alice, "dev", ddl("create"))
	denied_by(d, "ddl_requires_writer_group")
	not "ddl_forbidden_in_environment" in rules(d)
}

test_ddl_environments_come_from_data if {
	d := querygate.decision with input as req(dana, "dev", ddl("truncate"))
		with querygate.config.ddl_forbidden_environments as ["dev", "staging", "prod"]
	denied_by(d, "ddl_forbidden_in_environment")
}

# ---------------------------------------------------------------- odd input

test_unknown_kind_denied if {
	every kind in ["copy", "SELECT", "", 1, null] {
		q := object.union(select_customers, {"kind": kind})
		denied_by(querygate.decision, "unknown_kind") with input as req(dana, "dev", q)
	}
}

test_missing_kind_denied if {
	q := json.remove(select_customers, ["kind"])
	denied_by(querygate.decision, "unknown_kind") with input as req(alice, "dev", q)
}

test_identity_without_sub_denied if {
	every identity in [json.remove(alice, ["sub"]), object.union(alice, {"sub": ""}), object.union(alice, {"sub": 7})] {
		denied_by(querygate.decision, "missing_subject") with input as req(identity, "dev", select_customers)
	}
}

test_missing_identity_denied if {
	d := querygate.decision with input as req(null, "dev", select_customers)
	denied_by(d, "missing_subject")
	denied_by(d, "malformed_groups")
}

# An object of groups must not be read as its values.
test_non_array_groups_denied if {
	every groups in ["analysts", {"a": "analysts"}, null, ["analysts", 1]] {
		id := object.union(alice, {"groups": groups})
		denied_by(querygate.decision, "malformed_groups") with input as req(id, "dev", select_customers)
	}
}

test_unknown_environment_denied if {
	every env in ["production", "", null, ["prod"]] {
		denied_by(querygate.decision, "unknown_environment") with input as req(alice, env, select_customers)
	}
}

test_missing_environment_denied if {
	inp := json.remove(req(alice, "dev", select_customers), ["environment"])
	denied_by(querygate.decision, "unknown_environment") with input as inp
}

test_empty_input_denied_with_a_defined_decision if {
	d := querygate.decision with input as {}
	d.allow == false
	rules(d) == {
		"missing_subject", "malformed_groups", "unknown_environment", "unknown_kind",
		"write_requires_writer_group",
	}
	d.masks == {}
	d.require_approval == null
	d.max_rows == null
}

test_missing_config_denies_everything if {
	d := querygate.decision with input as req(dana, "dev", select_customers)
		with querygate.config as {}
	denied_by(d, "unknown_environment")
}

# ---------------------------------------------------------------- shape

inputs := [
	{},
	req(alice, "staging", select_customers),
	req(alice, "staging", ddl("drop")),
	req(dana, "dev", ddl("drop")),
	req(dana, "prod", update_orders),
	req(object.union(alice, {"groups": ["marketing"]}), "dev", select_customers),
	{"identity": "alice", "environment": 3, "query": []},
	"not an object",
	[],
	null,
]

test_decision_always_has_every_key if {
	every inp in inputs {
		d := querygate.decision with input as inp
		object.keys(d) == {
			"allow", "reasons", "masks", "derived_mask", "masked_predicates_allowed",
			"require_approval", "max_rows", "max_rows_affected", "db_role", "rows_per_hour",
			"cache_ttl_s",
		}
		is_boolean(d.allow)
		is_object(d.masks)
		d.require_approval == null
	}
}

test_reasons_are_rule_message_pairs_sorted_by_rule if {
	every inp in inputs {
		d := querygate.decision with input as inp
		count(d.reasons) > 0
		every r in d.reasons {
			object.keys(r) == {"rule", "message"}
			is_string(r.rule)
			is_string(r.message)
		}
		names := [r.rule | some r in d.reasons]
		names == sort(names)
	}
}

test_default_deny_only_when_no_deny_fired if {
	d := querygate.decision with input as req(alice, "staging", ddl("drop"))
	not "default_deny" in rules(d)
}

test_max_rows_comes_from_data if {
	querygate.decision.max_rows == null with input as req(alice, "dev", select_customers)
		with querygate.config.default_max_rows as null
	querygate.decision.max_rows == 50 with input as req(alice, "dev", select_customers)
		with querygate.config.default_max_rows as 50
}

# Guards the data file: a bad max_rows would make every allow malformed,
# which the gateway turns into a denial of everything.
test_shipped_max_rows_is_null_or_non_negative_integer if {
	valid_max_rows(querygate.config.default_max_rows)
	valid_max_rows(null)
	not valid_max_rows(-1)
	not valid_max_rows(1.5)
	not valid_max_rows("1000")
}

valid_max_rows(null)

valid_max_rows(n) if {
	is_number(n)
	n == round(n)
	n >= 0
}

# ---------------------------------------------------------------- functions

select_with_functions(fs) := {
	"identity": {"sub": "alice", "groups": ["analysts"]},
	"environment": "staging",
	"query": {"kind": "select", "tables": {"read": ["public.customers"], "write": []}, "functions": fs},
}

test_curated_functions_are_allowed if {
	d := querygate.decision with input as select_with_functions(["lower", "count", "date_trunc"])
	d.allow
}

test_unlisted_function_is_denied_by_name if {
	d := querygate.decision with input as select_with_functions(["lower", "public.exfiltrate"])
	not d.allow
	d.reasons == [{"rule": "function_not_allowed", "message": "function public.exfiltrate() is not on the allow-list"}]
}

test_extra_functions_extend_the_list if {
	d := querygate.decision with input as select_with_functions(["public.exfiltrate"])
		with querygate.config as object.union(querygate.config, {"functions": {
			"builtin": [],
			"extra": ["public.exfiltrate"],
		}})
	d.allow
}

introspect(tables, fs) := {
	"identity": {"sub": "alice", "groups": ["analysts"]},
	"environment": "staging",
	"query": {
		"kind": "select", "introspection": true,
		"tables": {"read": tables, "write": []}, "functions": fs,
	},
}

test_a_reader_may_read_the_listed_catalogs_with_catalog_functions if {
	tables := ["pg_catalog.pg_attribute", "pg_catalog.pg_class"]
	d := querygate.decision with input as introspect(tables, ["format_type", "pg_get_expr"])
	d.allow
}

test_an_unlisted_catalog_is_denied if {
	d := querygate.decision with input as introspect(["pg_catalog.pg_class", "pg_catalog.pg_foo"], [])
	not d.allow
	msg := "system catalog pg_catalog.pg_foo is not readable through the gateway"
	d.reasons == [{"rule": "catalog_relation_not_allowed", "message": msg}]
}

test_catalog_functions_only_in_introspection if {
	d := querygate.decision with input as select_with_functions(["pg_get_expr"])
	not d.allow
}

test_introspection_needs_a_reader_group if {
	inp := object.union(introspect(["pg_catalog.pg_class"], []), {"identity": {"groups": ["nobody"]}})
	d := querygate.decision with input as inp
	not d.allow
}

test_session_functions_that_drivers_call_on_connect_are_allowed if {
	every f in ["version", "current_schema", "current_database", "current_user", "pg_backend_pid"] {
		d := querygate.decision with input as select_with_functions([f])
		d.allow
	}
}

test_session_functions_are_their_own_list if {
	d := querygate.decision with input as select_with_functions(["version"])
		with querygate.config as object.union(querygate.config, {"functions": {"session": []}})
	not d.allow
}

test_without_function_config_every_function_is_denied if {
	d := querygate.decision with input as select_with_functions(["lower"])
		with querygate.config as object.remove(querygate.config, ["functions"])
	not d.allow
}

# ---------------------------------------------------------------- caching

test_decisions_without_an_approval_are_cacheable_for_the_configured_ttl if {
	allowed := querygate.decision with input as req(alice, "staging", select_customers)
	allowed.cache_ttl_s == querygate.config.decision_cache_ttl_s
	denied := querygate.decision with input as req(alice, "staging", update_orders)
	denied.allow == false
	denied.cache_ttl_s == querygate.config.decision_cache_ttl_s
}

test_a_decision_that_weighs_an_approval_is_never_cached if {
	inp := object.union(req(dana, "prod", update_orders), {"approval": {"id": "a-1", "status": "approved"}})
	d := querygate.decision with input as inp
	d.cache_ttl_s == 0
}

test_an_input_without_the_approval_key_is_not_cached if {
	d := querygate.decision with input as object.remove(req(alice, "staging", select_customers), ["approval"])
	d.cache_ttl_s == 0
}

test_no_configured_ttl_means_no_caching if {
	d := querygate.decision with input as req(alice, "staging", select_customers)
		with querygate.config.decision_cache_ttl_s as 0
	d.cache_ttl_s == 0
	e := querygate.decision with input as req(alice, "staging", select_customers)
		with querygate.config as object.remove(querygate.config, ["decision_cache_ttl_s"])
	e.cache_ttl_s == 0
}
