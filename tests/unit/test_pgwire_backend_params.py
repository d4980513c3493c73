"""BackendParams: a DSN means what it means to asyncpg (the gateway's pools open the same
DSN), checked against asyncpg's own parser; and the parameters refuse what they cannot honour."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from asyncpg.connect_utils import _parse_connect_dsn_and_args

from app.pgwire.backend import BackendParams


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("PGHOST", "PGPORT", "PGUSER", "PGPASSWORD", "PGDATABASE", "PGSSLMODE", "PGSERVICE",
                 "PGPASSFILE", "PGSERVICEFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.pgpass


def as_asyncpg(dsn: str, **kwargs: Any) -> tuple[Any, ...]:
    addrs, params = _parse_connect_dsn_and_args(
        dsn=dsn, host=None, port=None, user=kwargs.get("user"), password=kwargs.get("password"),
        passfile=None, database=None, ssl=None, service=None, servicefile=None, direct_tls=None,
        server_settings=kwargs.get("server_settings"), target_session_attrs=None, krbsrvname=None,
        gsslib=None,
    )
    (address,) = addrs
    return address, params.user, params.password, params.database or params.user, params.server_settings or {}


def as_backend(dsn: str, **kwargs: Any) -> tuple[Any, ...]:
    params = BackendParams.from_dsn(dsn, **kwargs)
    address = params.unix_socket or (params.host, params.port)
    return address, params.user, params.password, params.dbname, dict(params.server_settings)


@pytest.mark.parametrize(("dsn", "kwargs"), [
    ("postgresql://querygate@/appdb?host=/tmp/qg", {}),
    ("postgresql://querygate@/appdb?host=/tmp/qg&role=querygate_owner", {}),
    ("postgresql://postgres:@/postgres?host=/tmp/qg", {}),
    ("postgres://u:p%40ss%3Aw@db.example:6543/my%20db?application_name=app&search_path=a,b", {}),
    ("postgresql://u@[::1]:5433/d", {}),
    ("postgresql://u@h/d?port=7777", {}),
    ("postgresql://u@h:1/d?port=7777&host=ignored", {}),
    ("postgresql://%2Ftmp%2Fsock/d?user=u&password=pw", {}),
    ("postgresql:///d?host=/tmp/qg&port=6000&dbname=other&user=x", {}),
    ("postgresql://u@h", {}),
    ("postgresql://u@h/d?options=-c%20statement_timeout%3D5", {}),
    # A profile's pool: the login DSN, another role and password, settings of its own.
    ("postgresql://querygate@/appdb?host=/tmp/qg&application_name=a",
     {"user": "qg_p_0123", "password": "derived",
      "server_settings": {"search_path": "x", "application_name": "b"}}),
])
def test_dsn_as_asyncpg_reads_it(dsn: str, kwargs: dict[str, Any]) -> None:
    assert as_backend(dsn, **kwargs) == as_asyncpg(dsn, **kwargs)


def test_dsn_fields() -> None:
    params = BackendParams.from_dsn(
        "postgresql://u:pw@db:6000/d?sslmode=verify-full&sslrootcert=/ca.pem&statement_timeout=5000",
        connect_timeout_s=2.5,
    )
    assert (params.host, params.port, params.user, params.password, params.database) == (
        "db", 6000, "u", "pw", "d",
    )
    assert (params.sslmode, params.sslrootcert, params.connect_timeout_s) == ("verify-full", "/ca.pem", 2.5)
    assert params.unix_socket is None
    assert params.startup_params() == {
        "user": "u", "database": "d", "client_encoding": "UTF8", "statement_timeout": "5000",
    }
    socket = BackendParams.from_dsn("postgresql://u@/d?host=/run/pg&port=6001")
    assert socket.unix_socket == "/run/pg/.s.PGSQL.6001"


def test_environment_fills_what_the_dsn_lacks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGHOST", "envhost")
    monkeypatch.setenv("PGPORT", "6543")
    monkeypatch.setenv("PGUSER", "envuser")
    monkeypatch.setenv("PGPASSWORD", "envpw")
    monkeypatch.setenv("PGDATABASE", "envdb")
    monkeypatch.setenv("PGSSLMODE", "require")
    params = BackendParams.from_dsn("postgresql://")
    assert (params.host, params.port, params.user, params.password, params.dbname, params.sslmode) == (
        "envhost", 6543, "envuser", "envpw", "envdb", "require",
    )
    assert as_backend("postgresql://") == as_asyncpg("postgresql://")


def test_params_are_immutable_hashable_and_keep_the_password_out_of_repr() -> None:
    def make() -> BackendParams:
        return BackendParams("/tmp/qg", user="u", password="hunter2", server_settings={"a": "1"})

    params = make()
    assert "hunter2" not in repr(params)
    assert hash(params) == hash(make()) and params == make()
    with pytest.raises(TypeError):
        params.server_settings["a"] = "2"  # type: ignore[index]
    assert params.dbname == "u"


@pytest.mark.parametrize(("dsn", "match"), [
    ("mysql://u@h/d", "scheme"),
    ("postgresql://u@h1,h2/d", "one host"),
    ("postgresql:///d?host=/x&port=1,2", "one host"),
    ("postgresql://u@h/d?target_session_attrs=read-write", "target_session_attrs"),
    ("postgresql://u@h/d?service=x", "service"),
    ("postgresql://u@h/d?passfile=/p", "passfile"),
    ("postgresql://u@h/d?sslnegotiation=direct", "sslnegotiation"),
    ("postgresql://u@h/d?sslmode=sometimes", "sslmode must be one of"),
    ("postgresql://u@h:99999/d", "invalid port"),
    ("postgresql://u@[::1/d", "IPv6"),
])
def test_dsns_refused(dsn: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        BackendParams.from_dsn(dsn)


def test_settings_may_not_name_user_or_database() -> None:
    with pytest.raises(ValueError, match="'user' is a field"):
        BackendParams("h", user="u", server_settings={"user": "other"})
    with pytest.raises(ValueError, match="'database' is a field"):
        BackendParams.from_dsn("postgresql://u@h/d", server_settings={"database": "x"})
