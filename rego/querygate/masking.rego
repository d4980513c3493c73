# Which source columns are masked for this caller, and how.
#
# The gateway carries each mask to every output derived from the column (by
# lineage, not by name), so this file only reasons about catalog columns:
# "public.customers.email" → "email". Strategies: redact, null, partial
# (partial:F:L keeps the first F and last L characters; plain partial keeps the
# last 4), email, hash (keyed, deterministic: joins and GROUP BY still work),
# pan (card number, last four kept).
package querygate

# A column's class: the policy data's classification wins (a team may
# reclassify a column, or mark it "public" to opt out); otherwise the class the
# gateway gave it from its name when it read the catalog (input.classification).
column_class[col] := cls if {
	some col in input.query.columns.read
	cls := cfg.classification[col]
}

# The lookup comes before the negation so that `not has_data_class` is only
# evaluated for the columns the gateway did classify, not for every column read.
column_class[col] := cls if {
	some col in input.query.columns.read
	cls := input.classification[col]
	not has_data_class(col)
}

has_data_class(col) if cfg.classification[col]

masks[col] := strategy_for(cls) if {
	some col, cls in column_class
	cls != "public"
	not unmasked_for_caller(cls)
}

# A group sees a class in the clear when it is listed for the class or for a
# parent class: "pii" covers "pii.email" and "pii.ssn".
unmasked_for_caller(cls) if {
	some prefix, allowed in cfg.masking.unmasked_groups
	class_within(cls, prefix)
	some g in groups
	g in allowed
}

class_within(cls, prefix) if cls == prefix

class_within(cls, prefix) if startswith(cls, concat("", [prefix, "."]))

# A group-wide strategy (security reviews hashes, so it can still join and
# count) comes before the per-class one. Groups are sorted so two memberships
# always resolve the same way.
group_overrides := [s |
	some g in sorted_groups
	s := cfg.masking.group_strategies[g]
]

strategy_for(_) := group_overrides[0] if count(group_overrides) > 0

strategy_for(cls) := class_strategy(cls) if count(group_overrides) == 0

# Without configuration a sensitive column is still fully masked.
default class_strategy(_) := "redact"

class_strategy(cls) := cfg.masking.strategies[cls]

class_strategy(cls) := cfg.masking.default_strategy if not cfg.masking.strategies[cls]

# An output computed from a masked column (lower(email), count(DISTINCT ssn))
# gets a full mask, or the query is denied when this is "deny".
default derived_mask := "redact"

derived_mask := cfg.masking.derived

# A masked column used to filter, join, group or sort can leak its value by
# inference, so the gateway denies it — except for the columns listed here:
# for named groups, and for hash-masked columns used only as equality join
# keys (equal hashes reveal no more than the join itself).
#
# `count(masks) > 0` comes first so that `masks` is evaluated once, as a whole, and
# `masks[col]` below is a lookup in it. Without it each predicate column would
# evaluate the masking rules for that one column (`decision` asks for this rule
# before `masks`), and then `masks` would evaluate them all again. It also ends
# the rule at once when nothing is masked, which is the common case.
masked_predicates_allowed contains col if {
	count(masks) > 0
	some col in input.query.columns.predicate
	masks[col]
	predicate_exempt(col)
}

predicate_exempt(_) if {
	some g in groups
	g in cfg.masking.predicate_groups
}

# Masks are enforced by PostgreSQL (masking_profile): a predicate on a masked
# column compares masked values, so it cannot leak the raw ones. With
# "compare_masked" such predicates run and the answer carries a notice saying
# so; with "deny" they are refused as before (masked_column_predicate).
predicate_exempt(_) if cfg.masking.predicates == "compare_masked"

predicate_exempt(col) if {
	masks[col] == "hash"
	col in input.query.columns.join_equality
}

# A write must not launder a masked value into a column that is not protected the same
# way: `INSERT INTO orders (status) SELECT ssn FROM customers` would make SSNs readable as
# order statuses. Values may move between columns of the same class.
deny contains {"rule": "masked_value_copied", "message": msg} if {
	count(masks) > 0 # masks as a whole, once (see masked_predicates_allowed)
	some target, sources in input.query.columns.write_sources
	some src in sources
	masks[src]
	not same_class(target, src)
	msg := sprintf("writing masked %s into %s is not allowed", [src, target])
}

same_class(a, b) if class_of(a) == class_of(b)

class_of(col) := cfg.classification[col]

class_of(col) := input.classification[col] if not has_data_class(col)

# METADATA
# description: |
#   The masking profile every statement of this caller runs under, enforced by
#   PostgreSQL (docs/masking.md). It is decided over every exposed column the
#   gateway lists in input.columns, from the identity and environment alone, so
#   no reading of a statement can choose a weaker one; the per-statement
#   decision's masks are only ever added to it. The answer depends on nothing
#   but the input and policy data, so the gateway caches it per identity.
# entrypoint: true
masking_profile := {"masks": profile_masks}

profile_masks[col] := strategy_for(cls) if {
	some col in input.columns
	cls := class_of(col)
	cls != "public"
	not unmasked_for_caller(cls)
}
