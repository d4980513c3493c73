"""The PostgreSQL v3 wire protocol (issue 17): clients such as psql, JDBC, psycopg, asyncpg
and pgbench connect to the gateway as to PostgreSQL.

- ``messages``: the codec, both directions, pure: frontend messages parsed and backend
  messages encoded for the front end; frontend messages encoded and backend messages
  parsed for the gateway's own client of PostgreSQL.
- ``backend``: that client (``BackendConnection``, ``BackendPool``), which hands back each
  backend message as its raw bytes, so a DataRow that needs no mask is relayed verbatim,
  in the text or binary format the client asked for.
"""
