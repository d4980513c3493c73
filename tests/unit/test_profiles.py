"""Masking profiles without a database: names, view definitions, the decision cache."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

import pytest

from app.catalog import Relation
from app.profiles import (
    ProfileDecisions,
    ProfileSpec,
    hmac_pads,
    mask_expression,
    quote_ident,
    quote_literal,
    scram_verifier,
    server_version_problem,
    view_definition,
)

CUSTOMERS = Relation("public", "customers", "table",
                     {"id": "int4", "email": "text", "ssn": "text", "created_at": "timestamptz"})


def test_the_profile_key_depends_on_masks_and_role_only():
    a = ProfileSpec.of({"public.customers.email": "email", "public.customers.ssn": "partial"})
    b = ProfileSpec.of({"public.customers.ssn": "partial", "public.customers.email": "email"})
    assert a == b and a.key == b.key and a.role.startswith("qg_p_")
    assert ProfileSpec.of(dict(a.masks), "reporting").key != a.key
    assert ProfileSpec.of({"public.customers.email": "hash"}).key != a.key
    assert len(a.view_schema("x" * 80)) == 63


def test_a_view_never_outputs_a_masked_column_raw():
    spec = ProfileSpec.of({"public.customers.email": "email", "public.customers.ssn": "hash",
                           "public.customers.created_at": "redact"})
    sql = view_definition(spec, CUSTOMERS, "[REDACTED]")
    assert sql.startswith('SELECT t."id" AS "id", querygate_mask.email(t."email", ')
    assert 'FROM "public"."customers" t' in sql
    # Each masked column appears only inside its masking expression.
    for column in ("email", "ssn", "created_at"):
        assert f't."{column}" AS' not in sql
    assert '(CASE WHEN false THEN t."created_at" END) AS "created_at"' in sql


def test_mask_expressions_quote_what_they_embed():
    assert mask_expression("redact", 'we"ird', "text", "it's") == (
        """(CASE WHEN t."we""ird" IS NULL THEN NULL ELSE 'it''s'::text END)"""
    )
    assert mask_expression("partial:2:3", "c", "int4", "x") == 'querygate_mask.partial(t."c"::text, 2, 3)'
    with pytest.raises(ValueError):
        mask_expression("rot13", "c", "text", "x")
    with pytest.raises(ValueError):
        quote_literal("back\\slash")
    assert quote_ident('a"b') == '"a""b"'


def test_hmac_pads_compute_hmac_with_plain_sha256():
    key, message = b"k" * 70, b"766-16-2186"
    ipad, opad = hmac_pads(key)
    inner = hashlib.sha256(ipad + message).digest()
    assert hashlib.sha256(opad + inner).hexdigest() == hmac.new(key, message, hashlib.sha256).hexdigest()


def test_scram_verifier_has_postgresql_s_shape_and_is_deterministic():
    verifier = scram_verifier("secret", b"0123456789abcdef")
    scheme, rest = verifier.split("$", 1)
    iterations_salt, keys = rest.split("$")
    iterations, salt = iterations_salt.split(":")
    stored, server = keys.split(":")
    assert scheme == "SCRAM-SHA-256" and iterations == "4096"
    assert base64.b64decode(salt) == b"0123456789abcdef"
    salted = hashlib.pbkdf2_hmac("sha256", b"secret", b"0123456789abcdef", 4096)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    assert base64.b64decode(stored) == hashlib.sha256(client_key).digest()
    assert len(base64.b64decode(server)) == 32
    assert scram_verifier("secret", b"0123456789abcdef") == verifier


def test_old_servers_are_named_with_their_cves():
    assert server_version_problem(160014) is None
    assert server_version_problem(160005) is None
    assert server_version_problem(180004) is None
    problem = server_version_problem(160002)
    assert problem is not None and "16.2" in problem and "CVE-2024-10976" in problem
    assert "15.18" in (server_version_problem(150018) or "")


def test_profile_decisions_expire_and_follow_the_bundle_revision(monkeypatch):
    cache = ProfileDecisions(ttl_s=10)
    cache.put(b"alice", {"c": "email"}, "rev1")
    assert cache.get(b"alice", "rev1") == {"c": "email"}
    # A decision from another bundle revision: the cached profile is dropped.
    assert cache.get(b"alice", "rev2") is None
    assert cache.get(b"alice", "rev1") is None
    cache.put(b"alice", {"c": "email"}, None)
    now = time.monotonic()
    monkeypatch.setattr(time, "monotonic", lambda: now + 11)
    assert cache.get(b"alice", None) is None
    off = ProfileDecisions(ttl_s=0)
    off.put(b"alice", {}, None)
    assert off.get(b"alice", None) is None
