# Who may read what in the console (docs/console.md).
#
# The console asks data.querygate.console.access with
# {"identity": {"sub": …, "issuer": …, "groups": […]}} and reads
# {"scope": "all"} (every event) or {"scope": "own"} (only the events of that
# identity). Anything else, an undefined answer included, is a refusal: the
# console fails closed.
package querygate.console

cfg := data.querygate.config

access := {"scope": "all"} if {
	signed_in
	reader
}

access := {"scope": "own"} if {
	signed_in
	not reader
}

# Members of console_reader_groups (data.json: audit_readers) see everything.
reader if {
	some group in input.identity.groups
	group in cfg.console_reader_groups
}

signed_in if {
	is_string(input.identity.sub)
	input.identity.sub != ""
}
