package querygate.console_test

import data.querygate.console

test_audit_readers_see_everything if {
	console.access == {"scope": "all"} with input as {"identity": {"sub": "sec", "groups": ["security", "audit_readers"]}}
}

test_others_see_only_their_own_events if {
	console.access == {"scope": "own"} with input as {"identity": {"sub": "alice", "groups": ["analysts"]}}
}

test_no_groups_is_own if {
	console.access == {"scope": "own"} with input as {"identity": {"sub": "alice"}}
}

test_no_subject_gets_no_answer if {
	not console.access with input as {"identity": {"sub": "", "groups": ["audit_readers"]}}
	not console.access with input as {"identity": {"groups": ["audit_readers"]}}
	not console.access with input as {}
}

test_reader_groups_come_from_data if {
	console.access == {"scope": "own"} with input as {"identity": {"sub": "sec", "groups": ["audit_readers"]}}
		with data.querygate.config.console_reader_groups as ["auditors"]
}
