package querygate_test

import data.querygate

# ---------------------------------------------------------------- fixtures

agent_req(identity, query) := object.union(req(identity, "staging", query), {"request": {
	"id": "req-1", "source_ip": "127.0.0.1", "channel": "mcp", "time": "2026-11-21T10:00:00Z",
	"agent": {"id": identity.sub, "client_id": null, "sub": identity.sub, "on_behalf_of": null},
}})

http_req(identity, query) := object.union(req(identity, "staging", query), {"request": {
	"id": "req-1", "source_ip": "127.0.0.1", "channel": "http", "time": "2026-11-21T10:00:00Z",
	"agent": null,
}})

update_orders_where := object.union(update_orders, {"has_where": true, "where_trivially_true": false})

# ---------------------------------------------------------------- read-only

test_agent_may_read if {
	d := querygate.decision with input as agent_req(alice, select_customers)
	d.allow == true
}

test_agent_write_denied_when_not_a_writer if {
	d := querygate.decision with input as agent_req(dana, update_orders_where)
		with querygate.config.agents.writer_groups as []
	denied_by(d, "agent_read_only")
}

test_agent_ddl_denied_when_not_a_writer if {
	d := querygate.decision with input as agent_req(alice, ddl("create"))
	denied_by(d, "agent_read_only")
}

test_agent_in_a_writer_group_may_write if {
	d := querygate.decision with input as agent_req(dana, update_orders_where)
	d.allow == true
	not "agent_read_only" in rules(d)
}

test_agent_named_as_writer_may_write if {
	d := querygate.decision with input as agent_req(dana, update_orders_where)
		with querygate.config.agents.writer_groups as []
		with querygate.config.agents.writers as ["dana"]
	d.allow == true
}

test_same_write_over_http_is_not_an_agents if {
	d := querygate.decision with input as http_req(dana, update_orders_where)
		with querygate.config.agents.writer_groups as []
	d.allow == true
}

test_agent_writes_denied_without_agents_config if {
	d := querygate.decision with input as agent_req(dana, update_orders_where)
		with querygate.agents as {}
	denied_by(d, "agent_read_only")
}

# ---------------------------------------------------------------- row caps

test_agent_gets_the_agent_row_cap if {
	querygate.decision.max_rows == 100 with input as agent_req(alice, select_customers)
}

test_agent_cap_is_never_above_the_general_cap if {
	querygate.decision.max_rows == 50 with input as agent_req(alice, select_customers)
		with querygate.config.default_max_rows as 50
	querygate.decision.max_rows == 100 with input as agent_req(alice, select_customers)
		with querygate.config.default_max_rows as 500
}

test_http_caller_keeps_the_general_cap if {
	querygate.decision.max_rows == null with input as http_req(alice, select_customers)
}

test_agent_gets_no_rows_without_agents_config if {
	querygate.decision.max_rows == 0 with input as agent_req(alice, select_customers)
		with querygate.agents as {}
}

# ---------------------------------------------------------------- rows per hour

test_agent_has_a_rows_per_hour_budget if {
	querygate.decision.rows_per_hour == 5000 with input as agent_req(alice, select_customers)
}

test_http_caller_has_no_budget if {
	querygate.decision.rows_per_hour == null with input as http_req(alice, select_customers)
}

test_a_denied_agent_request_has_no_budget if {
	querygate.decision.rows_per_hour == null with input as agent_req(alice, ddl("drop"))
}

test_agent_budget_is_zero_without_agents_config if {
	querygate.decision.rows_per_hour == 0 with input as agent_req(alice, select_customers)
		with querygate.agents as {}
}

# Guards the data file: the gateway treats a malformed rows_per_hour as no decision at all.
test_shipped_agent_limits_are_non_negative_integers if {
	is_number(querygate.config.agents.max_rows)
	querygate.config.agents.max_rows >= 0
	is_number(querygate.config.agents.rows_per_hour)
	querygate.config.agents.rows_per_hour >= 0
}
