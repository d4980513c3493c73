"""The console: an audit index filled from the audit stream, and the pages that read it.

::

    audit stream (JSONL file | Kafka) ─► ingest.Ingester ─► index (PostgreSQL, querygate_audit)
                                             checks the chain          │
                                                                       ▼
    browser ─► app.py pages (Jinja2 + htmx) ─► queries.py ─────────────┘
                │ sign-in: auth.py (dev sign-in, OIDC code + PKCE), policy: rego console.rego
                └ approve / reject ─► the gateway's HTTP API with the user's own token

The console is a reader: it never writes to the application database and never decides an
approval itself; the gateway's rules (no self-approval, the right group) hold.
"""
