"""Errors carry no values (issue 13): a corpus of statements whose PostgreSQL or asyncpg
error quotes the data or the parameter it failed on, through a real gateway.

Every answer must be a 4xx with the gateway's error shape, and neither the answer, nor the
audit events of the request, nor any log record may hold a value of the rows involved
(every name, email, SSN and card number of the demo customers) or a piece of a parameter
sent. Reads run as pat (pii_readers, who is shown the raw PII, so nothing but the error path
could hide it), as JSON and as NDJSON; writes run as dana against an OPA whose guardrails
let writes to customers through without an approval, and the tables must be unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import Database, Keys
from tests.integration.test_audit import Trail

pytestmark = pytest.mark.integration

DB_ERROR, BAD_PARAM = "database_error", "invalid_parameters"


@dataclass(frozen=True)
class Case:
    sql: str
    code: str = DB_ERROR
    params: list[Any] = field(default_factory=list)
    needles: tuple[str, ...] = ()  # values this statement makes PostgreSQL quote
    classes: tuple[str, ...] = ("22", "23")  # SQLSTATE classes a failing write may end in

    def __str__(self) -> str:
        return self.sql


READS = [
    # Values PostgreSQL returns but Python cannot hold: asyncpg's decoder quotes them.
    Case("SELECT make_date(length(ssn) * 1000, 1, 1) FROM customers",
         "result_not_representable"),
    # Casts of the sensitive columns: PostgreSQL quotes the text it could not convert.
    Case("SELECT ssn::int FROM customers"),
    Case("SELECT email::int FROM customers"),
    Case("SELECT full_name::int FROM customers"),
    Case("SELECT card_number::int FROM customers"),
    Case("SELECT ssn::int8 FROM customers"),
    Case("SELECT ssn::numeric FROM customers"),
    Case("SELECT email::numeric FROM customers"),
    Case("SELECT ssn::float8 FROM customers"),
    Case("SELECT card_number::int2 FROM customers"),
    Case("SELECT ssn::date FROM customers"),
    Case("SELECT full_name::date FROM customers"),
    Case("SELECT ssn::timestamp FROM customers"),
    Case("SELECT email::timestamptz FROM customers"),
    Case("SELECT email::time FROM customers"),
    Case("SELECT full_name::interval FROM customers"),
    Case("SELECT ssn::uuid FROM customers"),
    Case("SELECT card_number::uuid FROM customers"),
    Case("SELECT email::inet FROM customers"),
    Case("SELECT ssn::json FROM customers"),
    Case("SELECT full_name::jsonb FROM customers"),
    Case("SELECT email::bool FROM customers"),
    Case("SELECT full_name::money FROM customers"),
    Case("SELECT ssn::point FROM customers"),
    Case("SELECT ssn::macaddr FROM customers"),
    Case("SELECT ssn::int4range FROM customers"),
    Case("SELECT ssn::bit(3) FROM customers"),
    Case("SELECT ARRAY[ssn]::int[] FROM customers"),
    Case("SELECT ARRAY[email]::date[] FROM customers"),
    # A class 42 code raised while executing: no position, the datum quoted.
    Case("SELECT full_name::tsquery FROM customers"),
    # Formatting functions of values.
    Case("SELECT to_date(ssn, 'YYYY-MM-DD') FROM customers"),
    Case("SELECT to_date(email, 'DD') FROM customers"),
    Case("SELECT to_number(email, '999') FROM customers"),
    Case("SELECT to_timestamp(ssn, 'HH24:MI') FROM customers"),
    Case("SELECT to_timestamp(email, 'DD') FROM customers"),
    Case("SELECT make_date(2024, id, 1) FROM customers WHERE id > 12", needles=("2024-13-01",)),
    Case("SELECT make_date(length(ssn) * 1000, 2, 30) FROM customers",
         needles=("11000-02-30",)),
    Case("SELECT date_trunc(ssn, created_at) FROM customers"),
    Case("SELECT date_part(email, created_at) FROM customers"),
    Case("SELECT to_jsonb(ssn)::numeric FROM customers"),
    # Arithmetic on data.
    Case("SELECT amount_cents::int2 FROM orders"),
    Case("SELECT (amount_cents * 100000000000000)::int8 FROM orders"),
    Case("SELECT 1 / (id - 1) FROM customers"),
    Case("SELECT amount_cents / (customer_id - customer_id) FROM orders"),
    Case("SELECT sqrt(-amount_cents) FROM orders"),
    Case("SELECT ln(-amount_cents) FROM orders"),
    Case("SELECT power(-amount_cents, 0.5) FROM orders"),
    Case("SELECT width_bucket(amount_cents, 1, 1, 1) FROM orders"),
    Case("SELECT substr(ssn, 1, -id) FROM customers"),
    Case("SELECT ntile(-id) OVER () FROM customers"),
    Case("SELECT regexp_match(ssn, ssn || '(') FROM customers"),
    Case("SELECT ARRAY[ARRAY[ssn], ARRAY[ssn, email]] FROM customers"),
    Case("SELECT (SELECT ssn FROM customers)"),
    # Bound parameters: refused by the gateway's conversion, by asyncpg's codecs, or by the
    # server's input function, each of which used to quote the value.
    Case("SELECT id FROM customers WHERE id = $1", BAD_PARAM, [1099511627776]),
    Case("SELECT $1::int4 + id FROM customers", BAD_PARAM, [1099511627776]),
    Case("SELECT id FROM customers WHERE id = $1", BAD_PARAM, ["Zq766-16-2186x"]),
    Case("SELECT id FROM orders WHERE amount_cents = $1", BAD_PARAM, ["Zq9912-kv"]),
    Case("SELECT $1::int2", BAD_PARAM, [99999]),
    Case("SELECT $1::int8", BAD_PARAM, ["Zq99999999999999999999"]),
    Case("SELECT id FROM customers WHERE created_at > $1", BAD_PARAM, ["Zq2024-13-45T9"]),
    Case("SELECT $1::date", BAD_PARAM, ["Zq2024-99-99"]),
    Case("SELECT $1::uuid", BAD_PARAM, ["Zq766-16-2186u"]),
    Case("SELECT $1::numeric", BAD_PARAM, ["Zq766n"]),
    Case("SELECT $1::inet", BAD_PARAM, ["Zq766i"]),
    Case("SELECT $1::interval", BAD_PARAM, ["ZqP1Dv"]),
    Case("SELECT $1::time", BAD_PARAM, ["Zq12x00"]),
    Case("SELECT $1::bytea", BAD_PARAM, ["Zq766b"]),
    Case("SELECT $1::int4[]", BAD_PARAM, [["Zq766a"]]),
    Case("SELECT $1::text::int", DB_ERROR, ["Zq766-16t"]),
    Case("SELECT to_date($1, 'YYYY-MM-DD')", DB_ERROR, ["Zq2024td"]),
    Case("SELECT make_date($1, 13, 1)", DB_ERROR, [2024], needles=("2024-13-01",)),
    Case("SELECT id FROM customers WHERE ssn::int = $1", DB_ERROR, [12345678]),
]

STATUSES = ("pending", "paid", "shipped", "delivered", "refunded")  # app/demo.py
CUSTOMER_COLUMNS = "(id, full_name, email, ssn, card_number, country, created_at)"
ORDER_COLUMNS = "(id, customer_id, amount_cents, status, created_at)"

# Writing a column dana reads masked may be refused before any constraint is checked: a
# masking profile's view column is not updatable (0A000, withheld as well).
MASKED_WRITE = ("23", "0A")

WRITES = [
    # unique_violation: DETAIL is "Key (id)=(1) already exists."
    Case(f"INSERT INTO customers {CUSTOMER_COLUMNS} VALUES (1, 'QGname Dup', 'qg.dup@row.test', "
         "'QG-000-dup', 'QGcard0002', 'DE', now())", needles=("QGname", "qg.dup"),
         classes=MASKED_WRITE),
    Case(f"INSERT INTO customers {CUSTOMER_COLUMNS} SELECT id, full_name, email, ssn, "
         "card_number, country, created_at FROM customers WHERE id = 2", classes=MASKED_WRITE),
    Case(f"INSERT INTO customers {CUSTOMER_COLUMNS} SELECT id + 1, full_name, email, ssn, "
         "card_number, country, created_at FROM customers WHERE id = 1", classes=MASKED_WRITE),
    Case("UPDATE customers SET id = (SELECT id FROM customers WHERE id = 2) WHERE id = 1"),
    Case("UPDATE customers SET id = id + 1 WHERE id = 7"),
    Case(f"INSERT INTO orders {ORDER_COLUMNS} VALUES (1, 1, 100, 'QGstatus-dup', now())",
         needles=("QGstatus",)),
    # not_null_violation: DETAIL is "Failing row contains (…every value of the row…)."
    Case("UPDATE customers SET email = NULL WHERE id = 1", classes=MASKED_WRITE),
    Case("UPDATE customers SET full_name = NULL WHERE id = 3"),
    Case("UPDATE customers SET country = NULL WHERE id = 4"),
    Case("UPDATE customers SET created_at = NULL WHERE id = 2"),
    Case(f"INSERT INTO customers {CUSTOMER_COLUMNS} VALUES (999001, 'QGname Newrow', "
         "'qg.new@row.test', NULL, 'QGcard0001', 'DE', now())", needles=("QGname", "qg.new"),
         classes=MASKED_WRITE),
    Case(f"INSERT INTO orders {ORDER_COLUMNS} VALUES (999004, 1, 100, NULL, now())"),
    # check_violation (amount_cents >= 0): DETAIL is the failing row.
    Case("UPDATE orders SET amount_cents = -amount_cents WHERE id = 1"),
    Case(f"INSERT INTO orders {ORDER_COLUMNS} VALUES (999001, 1, -5, 'QGstatus-neg', now())",
         needles=("QGstatus",)),
    # foreign_key_violation: DETAIL is "Key (customer_id)=(…) is not present in …".
    Case("UPDATE orders SET customer_id = customer_id + 1000000 WHERE id = 2"),
    Case(f"INSERT INTO orders {ORDER_COLUMNS} VALUES (999002, 987654, 100, 'QGstatus-fk', now())",
         needles=("987654", "QGstatus")),
    Case("DELETE FROM customers WHERE id = (SELECT customer_id FROM orders WHERE id = 3)"),
    Case("UPDATE customers SET id = id + 100000 WHERE id = (SELECT customer_id FROM orders "
         "WHERE id = 4)"),
    # Data exceptions inside writes.
    # (dana may not copy the masked columns, so these quote an order's status.)
    Case("UPDATE orders SET amount_cents = status::bigint WHERE id = 1", needles=STATUSES),
    Case(f"INSERT INTO orders {ORDER_COLUMNS} SELECT 999003, customer_id, status::bigint, "
         "status, now() FROM orders WHERE id = 1", needles=STATUSES),
    Case("UPDATE orders SET created_at = status::timestamptz WHERE id = 6", needles=STATUSES),
    Case("UPDATE orders SET amount_cents = amount_cents / (id - id) WHERE id = 5"),
    # Parameters of writes.
    Case("UPDATE orders SET amount_cents = $1 WHERE id = 1", BAD_PARAM, ["Zq1234b"]),
    Case(f"INSERT INTO orders {ORDER_COLUMNS} VALUES ($1, 1, 100, 'x', now())", BAD_PARAM,
         [1099511627776]),
    Case("UPDATE orders SET status = $1 WHERE id = $2", BAD_PARAM, ["shipped", "Zq1x"]),
    Case("UPDATE customers SET created_at = $1 WHERE id = 1", BAD_PARAM,
         ["Zq2024-13-45s"]),
    Case("UPDATE customers SET email = $1 WHERE id = $2", DB_ERROR, [None, 1],
         classes=MASKED_WRITE),
]


def test_the_corpus_is_large_enough():
    assert len(READS) + len(WRITES) >= 40
    assert len({c.sql + repr(c.params) for c in READS + WRITES}) == len(READS) + len(WRITES)


@pytest.fixture(scope="module")
def trail(make_gateway: Any, opa_with_config: Any,
          tmp_path_factory: pytest.TempPathFactory) -> Trail:
    """A gateway with an audit file, whose policy lets dana write customers unapproved."""
    opa = opa_with_config(guardrails={"protected_tables": {"public.customers": "none"}})
    spool = tmp_path_factory.mktemp("audit-values") / "spool"
    gateway = make_gateway(opa_url=opa.url, audit_spool_dir=str(spool),
                           audit_instance_id="gw-values")
    return Trail(gateway, spool)


@pytest.fixture(scope="module")
def pat(keys: Keys) -> dict[str, str]:
    return keys.headers("pat", ["pii_readers"])


@pytest.fixture(scope="module")
def raw_values(db: Database) -> set[str]:
    """Every sensitive value of the demo rows (the rows any case touches are among them)."""
    rows = db.fetch("SELECT full_name, email, ssn, card_number FROM customers")
    values = {str(v) for row in rows for v in row}
    assert len(values) > 4000
    return values


def pieces(params: list[Any]) -> set[str]:
    """Every 4-character piece of the parameters sent (nested values too)."""
    out: set[str] = set()
    for value in params:
        if isinstance(value, list):
            out |= pieces(value)
        elif value is not None:
            text = str(value)
            out |= {text[i:i + 4] for i in range(len(text) - 3)}
    return out


# Leaves of an audit event that are the gateway's own identifiers, hashes or clocks: the
# event's JSON is checked without them, so a hex digest cannot look like a parameter piece.
_OWN = {"id", "seq", "prev", "prev_hash", "hash", "time", "ts", "fingerprint", "instance",
        "instance_id", "chain", "durations_us", "expires_at", "bundle_revision", "source_ip"}


def _strings(value: Any, key: str = "") -> list[str]:
    if key in _OWN or key.endswith("_id"):
        return []
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in _strings(v, k)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v, key)]
    return [value] if isinstance(value, str) else []


# The test's own HTTP client logs its requests (headers with request ids) at DEBUG.
_TEST_CLIENT = ("httpx", "httpcore")


def leaks(texts: list[str], case: Case, raw: set[str]) -> list[str]:
    found = []
    forbidden = pieces(case.params) | set(case.needles) | {"Key (", "Failing row", "DETAIL"}
    for text in texts:
        found += [v for v in raw if v in text]
        found += [p for p in forbidden if p in text]
    return found


def error_of(response: httpx.Response) -> dict[str, Any]:
    """The error object of a JSON error, or of the last line of a cut NDJSON stream."""
    if response.headers["content-type"].startswith("application/x-ndjson"):
        assert response.status_code == 200, response.text
        last = orjson.loads(response.text.strip().splitlines()[-1])
        assert last["complete"] is False, last
        error: dict[str, Any] = last["error"]
        return error
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    return dict(body["error"])


def check(trail: Trail, response: httpx.Response, case: Case, raw: set[str],
          caplog: pytest.LogCaptureFixture) -> dict[str, Any]:
    assert response.status_code < 500, response.text
    error = error_of(response)
    assert error["code"] == case.code, (case.sql, error)
    if response.status_code != 200:
        assert 400 <= response.status_code < 500
    if case.code == DB_ERROR:
        assert error["sqlstate"] and error["message"]
    if response.headers["content-type"].startswith("application/x-ndjson"):
        body = [orjson.loads(line) for line in response.text.splitlines()]
    else:
        body = response.json()
    assert not leaks(_strings(body), case, raw), (case.sql, response.text)
    events = trail.of(response)
    assert events, "every request is on record"
    event_texts = [s for e in events for s in _strings(e)]
    assert not leaks(event_texts, case, raw), (case.sql, events)
    logged = [r.getMessage() + (logging.Formatter().formatException(r.exc_info)
                                if r.exc_info else "")
              for r in caplog.records if not r.name.startswith(_TEST_CLIENT)]
    assert not leaks(logged, case, raw), (case.sql, logged)
    return error


@pytest.mark.parametrize("case", READS, ids=str)
def test_a_failing_read_answers_without_values(trail, pat, raw_values, caplog, case):
    caplog.set_level(logging.DEBUG)
    gateway = trail.gateway
    answer = gateway.query(case.sql, pat, case.params)
    error = check(trail, answer, case, raw_values, caplog)
    assert 400 <= answer.status_code < 500
    streamed = gateway.client.post(
        "/v1/query", json={"sql": case.sql, "params": case.params},
        headers={**pat, "accept": "application/x-ndjson"},
    )
    assert check(trail, streamed, case, raw_values, caplog)["code"] == error["code"]


def _fingerprint(db: Database) -> tuple[str, str]:
    return (
        db.fetchval("SELECT md5(string_agg(c::text, ',' ORDER BY id)) FROM customers c"),
        db.fetchval("SELECT md5(string_agg(o::text, ',' ORDER BY id)) FROM orders o"),
    )


@pytest.fixture(scope="module")
def unchanged(db):
    before = _fingerprint(db)
    yield
    assert _fingerprint(db) == before, "a failing write changed the data"


@pytest.mark.parametrize("case", WRITES, ids=str)
def test_a_failing_write_answers_without_values(trail, dana, raw_values, caplog, db, unchanged,
                                                case):
    caplog.set_level(logging.DEBUG)
    before = _fingerprint(db)
    answer = trail.gateway.query(case.sql, dana, case.params)
    check(trail, answer, case, raw_values, caplog)
    assert 400 <= answer.status_code < 500
    assert _fingerprint(db) == before
    if case.code == DB_ERROR:
        assert answer.json()["error"]["sqlstate"][:2] in case.classes
