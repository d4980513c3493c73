package querygate_test

import data.querygate

customers_read(cols, predicate) := {
	"kind": "select",
	"tables": {"read": ["public.customers"], "write": []},
	"columns": {"read": cols, "predicate": predicate, "join_equality": []},
	"functions": [],
}

masking_input(groups, cols, predicate, classes) := {
	"identity": {"sub": "someone", "groups": groups},
	"environment": "staging",
	"query": customers_read(cols, predicate),
	"classification": classes,
}

demo_classes := {
	"public.customers.email": "pii.email",
	"public.customers.ssn": "pii.ssn",
	"public.customers.card_number": "pci.pan",
}

demo_cols := ["public.customers.card_number", "public.customers.email", "public.customers.id", "public.customers.ssn"]

test_analysts_get_class_strategies if {
	d := querygate.decision with input as masking_input(["analysts"], demo_cols, [], demo_classes)
	d.allow
	d.masks == {
		"public.customers.email": "email",
		"public.customers.ssn": "partial",
		"public.customers.card_number": "pan",
	}
	d.derived_mask == "redact"
}

test_pii_readers_see_pii_but_not_cards if {
	d := querygate.decision with input as masking_input(["pii_readers"], demo_cols, [], demo_classes)
	d.masks == {"public.customers.card_number": "pan"}
}

test_security_sees_hashes_of_everything_sensitive if {
	d := querygate.decision with input as masking_input(["security"], demo_cols, [], demo_classes)
	d.masks == {
		"public.customers.email": "hash",
		"public.customers.ssn": "hash",
		"public.customers.card_number": "hash",
	}
}

test_only_columns_the_query_reads_are_listed if {
	columns := ["public.customers.id", "public.customers.email"]
	d := querygate.decision with input as masking_input(["analysts"], columns, [], demo_classes)
	d.masks == {"public.customers.email": "email"}
}

test_policy_data_can_reclassify_and_opt_out if {
	d := querygate.decision with input as masking_input(["analysts"], demo_cols, [], demo_classes)
		with querygate.config.classification as {
			"public.customers.email": "public",
			"public.customers.id": "secret.internal",
		}
	d.masks == {
		"public.customers.id": "redact",
		"public.customers.ssn": "partial",
		"public.customers.card_number": "pan",
	}
}

test_unconfigured_classes_are_fully_masked if {
	classes := {"public.customers.email": "pii.email"}
	d := querygate.decision with input as masking_input(["analysts"], ["public.customers.email"], [], classes)
		with querygate.config as object.remove(querygate.config, ["masking"])
	d.masks == {"public.customers.email": "redact"}
}

# The database masks the column, so by default a predicate on it compares masked values.
test_masked_predicates_compare_masked_values_by_default if {
	d := querygate.decision with input as masking_input(["analysts"], demo_cols, ["public.customers.ssn"], demo_classes)
	d.masked_predicates_allowed == {"public.customers.ssn"}
}

test_masked_predicates_can_still_be_denied if {
	d := querygate.decision with input as masking_input(["analysts"], demo_cols, ["public.customers.ssn"], demo_classes)
		with querygate.config.masking.predicates as "deny"
	d.masked_predicates_allowed == set()
}

test_predicate_groups_exempt_masked_predicates if {
	d := querygate.decision with input as masking_input(["analysts"], demo_cols, ["public.customers.ssn"], demo_classes)
		with querygate.config.masking.predicate_groups as ["analysts"]
	d.masked_predicates_allowed == {"public.customers.ssn"}
}

test_hash_equality_joins_are_exempt if {
	inp := masking_input(["security"], demo_cols, ["public.customers.email"], demo_classes)
	joined := object.union(inp, {"query": object.union(inp.query, {"columns": {
		"read": demo_cols,
		"predicate": ["public.customers.email"],
		"join_equality": ["public.customers.email"],
	}})})
	d := querygate.decision with input as joined
	d.masked_predicates_allowed == {"public.customers.email"}
}

test_hash_probe_is_not_exempt_when_predicates_are_denied if {
	d := querygate.decision with input as masking_input(["security"], demo_cols, ["public.customers.email"], demo_classes)
		with querygate.config.masking.predicates as "deny"
	d.masked_predicates_allowed == set()
}

profile_input(groups) := {
	"identity": {"sub": "x", "groups": groups},
	"environment": "staging",
	"columns": ["public.customers.id", "public.customers.email", "public.customers.ssn", "public.orders.status"],
	"classification": {"public.customers.email": "pii.email", "public.customers.ssn": "pii.ssn"},
}

test_the_profile_covers_every_exposed_column if {
	p := querygate.masking_profile with input as profile_input(["analysts"])
	p == {"masks": {"public.customers.email": "email", "public.customers.ssn": "partial"}}
}

test_the_profile_of_a_pii_reader_masks_nothing if {
	p := querygate.masking_profile with input as profile_input(["pii_readers"])
	p == {"masks": {}}
}

test_the_profile_follows_group_strategies_and_policy_data if {
	p := querygate.masking_profile with input as profile_input(["security"])
		with querygate.config.classification as {"public.orders.status": "secret.internal"}
	p.masks == {
		"public.customers.email": "hash",
		"public.customers.ssn": "hash",
		"public.orders.status": "hash",
	}
}

test_the_profile_without_input_masks_nothing_and_is_defined if {
	p := querygate.masking_profile with input as {}
	p == {"masks": {}}
}

test_derived_mask_comes_from_data if {
	d := querygate.decision with input as masking_input(["analysts"], demo_cols, [], demo_classes)
		with querygate.config.masking.derived as "deny"
	d.derived_mask == "deny"
}

ssn := ["public.customers.ssn"]

copy_input(groups, target, sources, classes) := {
	"identity": {"sub": "dana", "groups": groups},
	"environment": "staging",
	"query": {
		"kind": "update",
		"tables": {"read": ["public.customers"], "write": ["public.customers"]},
		"columns": {
			"read": sources, "predicate": ["public.customers.id"], "join_equality": [],
			"write": [target], "write_sources": {target: sources},
		},
		"functions": [], "has_where": true, "where_trivially_true": false,
	},
	"classification": classes,
}

test_copying_a_masked_value_into_another_class_is_denied if {
	d := querygate.decision with input as copy_input(["dba"], "public.customers.email", ssn, demo_classes)
	not d.allow
	d.reasons == [{
		"rule": "masked_value_copied",
		"message": "writing masked public.customers.ssn into public.customers.email is not allowed",
	}]
}

test_copying_into_an_unclassified_column_is_denied if {
	d := querygate.decision with input as copy_input(["dba"], "public.customers.country", ssn, demo_classes)
	not d.allow
}

test_copying_within_a_class_is_allowed if {
	d := querygate.decision with input as copy_input(["dba"], "public.customers.ssn", ssn, demo_classes)
	d.allow
}

test_copying_what_the_caller_sees_in_the_clear_is_allowed if {
	groups := ["dba", "pii_readers"]
	email := ["public.customers.email"]
	d := querygate.decision with input as copy_input(groups, "public.customers.country", email, demo_classes)
	d.allow
}
