"""The console's pieces without a server: cookies, CSRF, filters, cursors, the indexed
columns, and the OIDC relying party against the dev provider (over ASGI, no network)."""

from __future__ import annotations

import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from app.config import ConfigError, load_settings
from app.console import queries
from app.console.auth import OidcClient, Sessions, User, check_csrf, cookie_policy, dev_user
from app.console.devidp import create_dev_idp
from app.console.index import columns_of
from app.demo import DEMO_IDENTITIES
from app.errors import GatewayError

ISSUER = "http://idp.test"
CONSOLE = "http://127.0.0.1:8081"


def _settings(tmp_path: Path, **overrides: object):
    values: dict[str, object] = {
        "environment": "staging", "dev_mode": True,
        "dev_signing_key_file": tmp_path / "dev-key.pem",
        "console_oidc_issuer": ISSUER, "console_oidc_client_id": "querygate-console",
        "console_oidc_client_secret": "s3cret-for-the-test-only",
        "console_public_url": CONSOLE,
    }
    values.update(overrides)
    return load_settings(**values)


def test_the_session_cookie_is_secure_and_host_prefixed_except_on_loopback_dev(tmp_path):
    dev = _settings(tmp_path)
    assert cookie_policy(dev, "http://127.0.0.1:8081") == ("qg_console", False)
    assert cookie_policy(dev, "https://console.example") == ("__Host-qg_console", True)
    with pytest.raises(ConfigError):
        cookie_policy(dev, "http://console.example")  # http off loopback
    prod = load_settings(environment="prod")
    with pytest.raises(ConfigError):
        cookie_policy(prod, "http://127.0.0.1:8081")  # loopback, but not dev mode
    assert cookie_policy(prod, "https://console.example")[1] is True


def _code(exc: pytest.ExceptionInfo[GatewayError]) -> str:
    return exc.value.code


def test_csrf_needs_the_sessions_token_and_its_own_origin():
    session = Sessions(60).new()
    check_csrf(session, session.csrf, CONSOLE, CONSOLE)
    check_csrf(session, session.csrf, None, CONSOLE)  # no Origin sent: the token decides
    for token, origin, who in ((None, CONSOLE, session), ("", CONSOLE, session),
                               ("x" + session.csrf, CONSOLE, session),
                               (session.csrf, "http://evil.example", session),
                               (session.csrf, CONSOLE, None)):
        with pytest.raises(GatewayError) as exc:
            check_csrf(who, token, origin, CONSOLE)
        assert _code(exc) == "csrf_failed" and exc.value.status == 403


def test_sessions_expire_and_are_unguessable():
    sessions = Sessions(60)
    one = sessions.new(ttl_s=1)
    assert sessions.get(one.id) is one and len(one.id) >= 40 and one.csrf != one.id
    one.expires = time.time() - 1
    assert sessions.get(one.id) is None
    assert sessions.get(None) is None and sessions.get("x" * 500) is None


def test_a_flood_of_unfinished_sign_ins_never_evicts_a_signed_in_user(monkeypatch):
    from app.console import auth

    monkeypatch.setattr(auth, "MAX_SESSIONS", 50)
    sessions = Sessions(60)
    user = sessions.new(User("sec", ("audit_readers",), "i", "t", "dev"))
    for _ in range(500):
        sessions.new()
    assert sessions.get(user.id) is user
    assert len(sessions._sessions) <= 50


def test_filters_are_validated_and_names_qualified():
    parsed = queries.Filters.parse({"table": "customers", "column": "customers.email",
                                    "channel": "pgwire", "since": "2026-11-21T10:00:00"})
    assert parsed.table == "public.customers" and parsed.column == "customers.email"
    assert parsed.since is not None and parsed.since.tzinfo is not None
    for bad in ({"channel": "smtp"}, {"type": "nope"}, {"since": "yesterday"},
                {"identity": "a" * 201}):
        with pytest.raises(GatewayError) as exc:
            queries.Filters.parse(bad)
        assert _code(exc) == "invalid_filter" and exc.value.status == 400


def test_a_cursor_is_one_the_console_gave_or_refused():
    import datetime as dt

    row = {"time": dt.datetime(2026, 11, 21, tzinfo=dt.UTC), "instance": "gw", "chain": "c",
           "seq": 7}
    cursor = queries.encode_cursor(row)  # type: ignore[arg-type]
    assert queries.decode_cursor(cursor) == (row["time"], "gw", "c", 7)
    for bad in ("garbage", "", "W10", queries.encode_cursor(row)[:-3] + "!!!"):
        with pytest.raises(GatewayError) as exc:
            queries.decode_cursor(bad)
        assert _code(exc) == "invalid_cursor"


def test_the_indexed_columns_of_events():
    decision = {
        "type": "decision", "time": "2026-11-21T07:23:23.784890+00:00",
        "identity": {"sub": "agent-7", "issuer": "i", "groups": ["agents"],
                     "on_behalf_of": {"sub": "alice", "issuer": "i", "auth": "jwt", "groups": []}},
        "request": {"id": "r1", "channel": "mcp"},
        "decision": {"outcome": "deny", "code": "policy_denied", "id": "d1",
                     "reasons": [{"rule": "destructive_ddl", "message": "no"}],
                     "masks": {"public.customers.email": "email"}},
        "query": {"sql": "DROP TABLE orders", "tables": {"read": [], "write": ["public.orders"]},
                  "columns": {"read": ["public.customers.email"], "write": []}},
    }
    cols = columns_of(decision)
    assert (cols["sub"], cols["obo_sub"], cols["channel"], cols["outcome"], cols["code"]) == (
        "agent-7", "alice", "mcp", "deny", "policy_denied")
    assert cols["rules"] == ["destructive_ddl"] and cols["tables"] == ["public.orders"]
    assert cols["masks"] == ["public.customers.email"] and cols["decision_id"] == "d1"
    approval = columns_of({"type": "approval", "approval": {
        "step": "approved", "id": "a1", "tables": ["public.customers"], "decision_id": "d2"}})
    assert (approval["outcome"], approval["approval_id"], approval["decision_id"],
            approval["tables"]) == ("approved", "a1", "d2", ["public.customers"])
    # Whatever is malformed is left out, never guessed.
    odd = columns_of({"type": "decision", "time": "not a time", "identity": "x",
                      "decision": {"reasons": ["no"], "masks": []}})
    assert odd["sub"] is None and odd["rules"] == [] and odd["time"].year == 1970


def test_dev_sign_in_and_the_dev_provider_exist_only_in_dev_mode(tmp_path):
    prod = load_settings(environment="prod")
    with pytest.raises(GatewayError) as exc:
        dev_user(prod, "alice", DEMO_IDENTITIES)
    assert _code(exc) == "dev_signin_disabled"
    with pytest.raises(ConfigError):
        create_dev_idp(load_settings(environment="staging", console_oidc_issuer=ISSUER,
                                     console_oidc_client_id="c"))
    with pytest.raises(ConfigError):
        load_settings(environment="staging", console_dev_idp_port=8082)
    with pytest.raises(ConfigError):
        load_settings(console_oidc_issuer=ISSUER)  # without a client id
    with pytest.raises(ConfigError):
        load_settings(environment="prod", console_oidc_issuer="http://idp.example",
                      console_oidc_client_id="c")  # prod: https only
    user = dev_user(_settings(tmp_path), "sec", DEMO_IDENTITIES)
    assert user.groups == ("security", "audit_readers") and user.via == "dev" and user.token


async def _oidc(tmp_path: Path) -> tuple[OidcClient, httpx.AsyncClient]:
    settings = _settings(tmp_path)
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_dev_idp(settings)))
    return OidcClient(settings, f"{CONSOLE}/auth/callback", http), http


async def _authorize(client: OidcClient, http: httpx.AsyncClient, sub: str) -> dict[str, str]:
    """What the browser does: open the authorization URL, pick an identity, follow back."""
    session = Sessions(60).new()
    url = await client.authorization_url(session)
    query = {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}
    assert query["code_challenge_method"] == "S256" and len(query["code_challenge"]) == 43
    assert "verifier" not in url and session.login["verifier"] not in url
    page = await http.get(url)
    assert page.status_code == 200 and f'id="idp-{sub}"' in page.text
    back = await http.post(f"{ISSUER}/authorize", data={**query, "sub": sub})
    assert back.status_code == 303
    location = urlsplit(back.headers["location"])
    assert f"{location.scheme}://{location.netloc}{location.path}" == f"{CONSOLE}/auth/callback"
    params = {k: v[0] for k, v in parse_qs(location.query).items()}
    return {"session": session, **params}  # type: ignore[dict-item]


async def test_oidc_code_flow_with_pkce_against_the_dev_provider(tmp_path):
    client, http = await _oidc(tmp_path)
    async with http:
        got = await _authorize(client, http, "sec")
        session = got.pop("session")
        user = await client.finish(session, got)  # type: ignore[arg-type]
        assert isinstance(user, User)
        assert (user.sub, user.groups, user.via) == ("sec", ("security", "audit_readers"), "oidc")
        assert user.issuer == "querygate-dev"  # the gateway's issuer: "own events" match
        # The same callback again: the login state is spent.
        with pytest.raises(GatewayError) as exc:
            await client.finish(session, got)  # type: ignore[arg-type]
        assert _code(exc) == "signin_failed"


async def test_oidc_refuses_a_wrong_state_and_a_replayed_or_unverified_code(tmp_path):
    client, http = await _oidc(tmp_path)
    async with http:
        got = await _authorize(client, http, "alice")
        session = got.pop("session")
        with pytest.raises(GatewayError) as exc:
            await client.finish(session, {**got, "state": "forged"})  # type: ignore[arg-type]
        assert _code(exc) == "signin_failed"
        # The provider refuses a code without the verifier, and a code used twice.
        token = f"{ISSUER}/token"
        form = {"grant_type": "authorization_code", "code": got["code"],
                "redirect_uri": f"{CONSOLE}/auth/callback", "client_id": "querygate-console",
                "client_secret": "s3cret-for-the-test-only", "code_verifier": "x" * 64}
        wrong = await http.post(token, data=form)
        assert wrong.status_code == 400 and wrong.json()["error"] == "invalid_grant"
        again = await http.post(token, data=form)
        assert again.json()["error"] == "invalid_grant"  # the code was spent by the try
        assert (await http.post(token, data={**form, "client_secret": "no"})).status_code == 401


async def test_the_dev_provider_requires_pkce_state_nonce_and_the_registered_redirect(tmp_path):
    _, http = await _oidc(tmp_path)
    good = {"response_type": "code", "client_id": "querygate-console",
            "redirect_uri": f"{CONSOLE}/auth/callback", "scope": "openid", "state": "s",
            "nonce": "n", "code_challenge": "c" * 43, "code_challenge_method": "S256"}
    async with http:
        assert (await http.get(f"{ISSUER}/authorize", params=good)).status_code == 200
        for change in ({"code_challenge_method": "plain"}, {"code_challenge": ""},
                       {"redirect_uri": "http://evil.example/cb"}, {"client_id": "other"},
                       {"state": ""}, {"nonce": ""}, {"scope": "profile"}):
            answer = await http.get(f"{ISSUER}/authorize", params={**good, **change})
            assert answer.status_code == 400, change
