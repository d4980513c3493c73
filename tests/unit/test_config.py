"""Settings: invalid or conflicting values stop start-up naming the variable."""

from __future__ import annotations

import pytest

from app.cli import main
from app.config import ConfigError, load_settings


def test_defaults_are_the_strictest_environment():
    settings = load_settings()
    assert settings.environment == "prod"
    assert settings.dev_mode is False


def test_environment_comes_from_prefixed_variables(monkeypatch):
    monkeypatch.setenv("QUERYGATE_ENVIRONMENT", "staging")
    monkeypatch.setenv("QUERYGATE_MAX_ROWS", "50")
    monkeypatch.setenv("QUERYGATE_SCHEMAS", "public, sales")
    settings = load_settings()
    assert (settings.environment, settings.max_rows, settings.schemas) == (
        "staging", 50, ["public", "sales"]
    )


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"dev_mode": True, "environment": "prod"}, "QUERYGATE_DEV_MODE"),
        ({"environment": "production"}, "QUERYGATE_ENVIRONMENT"),
        ({"max_rows": 0}, "QUERYGATE_MAX_ROWS"),
        ({"opa_timeout_ms": "soon"}, "QUERYGATE_OPA_TIMEOUT_MS"),
        ({"opa_url": "localhost:8181"}, "QUERYGATE_OPA_URL"),
        ({"database_url": "mysql://x/y"}, "QUERYGATE_DATABASE_URL"),
        ({"jwt_algorithms": ["HS256"]}, "QUERYGATE_JWT_ALGORITHMS"),
        ({"jwt_algorithms": ["none"]}, "QUERYGATE_JWT_ALGORITHMS"),
        ({"jwt_public_key": "changeme"}, "QUERYGATE_JWT_PUBLIC_KEY"),
        ({"jwt_public_key": "k", "jwt_public_key_file": "/k.pem"}, "QUERYGATE_JWT_PUBLIC_KEY"),
        ({"max_sql_bytes": 100_000, "max_request_bytes": 2000}, "QUERYGATE_MAX_REQUEST_BYTES"),
        ({"db_pool_min": 5, "db_pool_max": 2}, "QUERYGATE_DB_POOL_MIN"),
        ({"mask_hmac_key": "short"}, "QUERYGATE_MASK_HMAC_KEY"),
        ({"mask_hmac_key": "changeme-changeme-changeme"}, "QUERYGATE_MASK_HMAC_KEY"),
    ],
)
def test_invalid_settings_name_the_variable(overrides, named):
    with pytest.raises(ConfigError) as caught:
        load_settings(**overrides)
    assert named in str(caught.value)


def test_serving_needs_a_database_and_a_key():
    with pytest.raises(ConfigError, match="QUERYGATE_DATABASE_URL"):
        load_settings(environment="staging").require_serving()
    with pytest.raises(ConfigError, match="QUERYGATE_JWT_PUBLIC_KEY"):
        load_settings(database_url="postgresql://h/db", environment="staging").require_serving()
    with pytest.raises(ConfigError, match="QUERYGATE_MASK_HMAC_KEY"):
        load_settings(database_url="postgresql://h/db", environment="prod").require_serving()


def test_token_command_refuses_without_dev_mode(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("QUERYGATE_ENVIRONMENT", "staging")
    monkeypatch.setenv("QUERYGATE_DEV_SIGNING_KEY_FILE", str(tmp_path / "k.pem"))
    assert main(["token", "--sub", "alice", "--groups", "analysts"]) == 2
    assert "QUERYGATE_DEV_MODE" in capsys.readouterr().err
    assert not (tmp_path / "k.pem").exists()


def test_token_command_refuses_prod_even_in_dev_mode(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("QUERYGATE_ENVIRONMENT", "prod")
    monkeypatch.setenv("QUERYGATE_DEV_MODE", "true")
    monkeypatch.setenv("QUERYGATE_DEV_SIGNING_KEY_FILE", str(tmp_path / "k.pem"))
    assert main(["token", "--sub", "alice"]) == 2
    assert "prod" in capsys.readouterr().err


def test_token_command_mints_a_verifiable_token(monkeypatch, capsys, tmp_path):
    import asyncio

    from app.identity import Authenticator

    monkeypatch.setenv("QUERYGATE_ENVIRONMENT", "staging")
    monkeypatch.setenv("QUERYGATE_DEV_MODE", "true")
    monkeypatch.setenv("QUERYGATE_DEV_SIGNING_KEY_FILE", str(tmp_path / "k.pem"))
    assert main(["token", "--sub", "alice", "--groups", "analysts,pii_readers"]) == 0
    token = capsys.readouterr().out.strip()
    settings = load_settings(database_url="postgresql://h/db")
    identity = asyncio.run(Authenticator(settings).verify_token(token))
    assert identity.sub == "alice"
    assert identity.groups == ("analysts", "pii_readers")
    assert (tmp_path / "k.pem").stat().st_mode & 0o077 == 0
