# Agent guardrails (docs/agents.md). A request that came over MCP is an agent's:
# input.request.channel is "mcp" and input.request.agent names the agent (the token's
# OAuth client id, else its subject). Tunable in data.json (`agents`); if that section is
# missing, agents may write nothing and get no rows (every default below fails closed).
package querygate

agents := cfg.agents

is_agent if input.request.channel == "mcp"

# Agents are read-only unless a rule says otherwise: an agent named in agents.writers, or
# one whose token is in a group of agents.writer_groups, may write (every other rule still
# holds: protected tables still need an approval, unbounded writes are still refused).
deny contains {"rule": "agent_read_only", "message": "agents may only read: this agent is not an agent writer"} if {
	is_agent
	agent_changes_data
	not agent_may_write
}

agent_changes_data if is_write

agent_changes_data if input.query.kind == "ddl"

agent_may_write if input.request.agent.id in agents.writers

agent_may_write if {
	some g in groups
	g in agents.writer_groups
}

# Agents get a lower row cap: agents.max_rows, or the general cap when that is lower.
default agent_max_rows := 0

agent_max_rows := agents.max_rows if {
	is_number(agents.max_rows)
	cfg.default_max_rows == null
}

agent_max_rows := min([agents.max_rows, cfg.default_max_rows]) if {
	is_number(agents.max_rows)
	is_number(cfg.default_max_rows)
}

# Rows an agent may receive per rolling hour, counted and enforced by the gateway per
# agent (429 row_budget_exhausted); null for every caller that is not an agent.
default rows_per_hour := null

rows_per_hour := agent_rows_per_hour if {
	allow
	is_agent
}

default agent_rows_per_hour := 0

agent_rows_per_hour := agents.rows_per_hour if is_number(agents.rows_per_hour)
