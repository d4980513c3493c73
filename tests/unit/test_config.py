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
        ({"audit_sink": "kafka", "audit_kafka_bootstrap": "k:9092",
          "audit_kafka_compression": "zstd"}, "QUERYGATE_AUDIT_KAFKA_COMPRESSION"),
        ({"audit_kafka_compression": "brotli"}, "QUERYGATE_AUDIT_KAFKA_COMPRESSION"),
        ({"audit_kafka_security_protocol": "SASL_SSL", "audit_kafka_sasl_mechanism":
          "OAUTHBEARER"}, "QUERYGATE_AUDIT_KAFKA_SASL_OAUTH_TOKEN_FILE"),
        ({"audit_kafka_security_protocol": "SASL_SSL", "audit_kafka_sasl_mechanism": "PLAIN",
          "audit_kafka_sasl_username": "u", "audit_kafka_sasl_password": "p",
          "audit_kafka_sasl_oauth_token_file": "/t"}, "QUERYGATE_AUDIT_KAFKA_SASL_OAUTH_TOKEN_FILE"),
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


def test_several_workers_need_one_masking_key():
    # Each process would otherwise draw its own, store it and derive profile passwords from it.
    dev = {"database_url": "postgresql://h/db", "environment": "staging", "dev_mode": True}
    with pytest.raises(ConfigError, match="QUERYGATE_MASK_HMAC_KEY is required with QUERYGATE_WORKERS"):
        load_settings(**dev, workers=2).require_serving()
    load_settings(**dev, workers=2, mask_hmac_key="k" * 32).require_serving()
    load_settings(**dev, workers=1).require_serving()
    with pytest.raises(ConfigError, match="QUERYGATE_WORKERS"):
        load_settings(workers=0)


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


# --- unknown variables -----------------------------------------------------------------------

import re  # noqa: E402
from pathlib import Path  # noqa: E402

from app.config import OTHER_VARIABLES, secret_fields, unknown_variables  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def test_a_misspelled_variable_stops_start_up_with_a_hint(monkeypatch):
    monkeypatch.setenv("QUERYGATE_AUDIT_SNK", "kafka")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert "QUERYGATE_AUDIT_SNK" in message
    assert "did you mean QUERYGATE_AUDIT_SINK?" in message
    assert "kafka" not in message  # names only: a value may be a secret


def test_a_misspelled_variable_stops_serve(monkeypatch, capsys):
    monkeypatch.setenv("QUERYGATE_ENVIRONMENT", "staging")
    monkeypatch.setenv("QUERYGATE_DATABSE_URL", "postgresql://h/db")
    assert main(["serve"]) == 2
    assert "did you mean QUERYGATE_DATABASE_URL?" in capsys.readouterr().err


def test_a_file_variable_for_a_setting_that_is_no_secret_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("QUERYGATE_AUDIT_SINK_FILE", str(tmp_path / "sink"))
    with pytest.raises(ConfigError, match="QUERYGATE_AUDIT_SINK is not a secret"):
        load_settings()


def test_variables_read_outside_the_settings_are_allowed(monkeypatch):
    for name in OTHER_VARIABLES:
        monkeypatch.setenv(name, "x")
    monkeypatch.setenv("querygate_environment", "staging")  # names are matched in any case
    assert load_settings().environment == "staging"


def test_every_variable_the_repository_names_is_known():
    # Whatever the code, manifests and docs name must pass the start-up check; a new name read
    # outside Settings belongs in OTHER_VARIABLES (with what reads it).
    name = re.compile(r"QUERYGATE_[A-Z0-9_]*[A-Z0-9](?![A-Za-z0-9_*<])")
    files = [REPO / "Makefile", REPO / "Dockerfile", REPO / "README.md"] + [
        path
        for top in ("app", "bench", "deploy", "docs", "tests")
        for path in (REPO / top).rglob("*")
        if path.suffix in {".py", ".md", ".yaml", ".yml", ".env", ".sh"}
        and path != Path(__file__).resolve()
    ]
    found = {
        match: path.relative_to(REPO)
        for path in files if path.is_file()
        for match in name.findall(path.read_text(encoding="utf-8", errors="replace"))
    }
    assert found
    problems = unknown_variables(dict.fromkeys(found, ""))
    assert not problems, {p: str(found[p.split()[0].rstrip(":")]) for p in problems}


# --- secrets from files ------------------------------------------------------------------------

SECRET_SAMPLES = {
    "database_url": "postgresql://querygate@db.internal:5432/appdb",
    "mask_hmac_key": "0123456789abcdef0123456789abcdef",
    "jwt_public_key": "-----BEGIN PUBLIC KEY-----\nMIIBIjAN\n-----END PUBLIC KEY-----",
}


def _sample(name: str) -> str:
    return SECRET_SAMPLES.get(name, "an-opaque-secret-of-some-length")


def _secret(settings, name):
    return getattr(settings, name).get_secret_value()


@pytest.mark.parametrize("name", [n for n, var in secret_fields().items() if var is not None])
def test_every_secret_can_come_from_a_file_variable(monkeypatch, tmp_path, name):
    path = tmp_path / "secret"
    path.write_text(_sample(name) + "\n")  # the newline `echo` leaves is not part of it
    monkeypatch.setenv(secret_fields()[name], str(path))
    assert _secret(load_settings(), name) == _sample(name)


def test_the_secret_settings_are_the_secret_str_fields():
    assert {"database_url", "mask_hmac_key", "jwt_public_key",
            "audit_kafka_sasl_password"} <= set(secret_fields())
    # jwt_public_key has had its own file setting all along; it is not doubled.
    assert secret_fields()["jwt_public_key"] is None


def test_secrets_come_from_a_secrets_directory(monkeypatch, tmp_path):
    (tmp_path / "QUERYGATE_DATABASE_URL").write_text(_sample("database_url") + "\n")
    (tmp_path / "querygate_mask_hmac_key").write_text(_sample("mask_hmac_key"))
    (tmp_path / "QUERYGATE_JWT_PUBLIC_KEY").write_text(_sample("jwt_public_key"))
    (tmp_path / "..data").mkdir()  # what a mounted Kubernetes Secret also holds
    monkeypatch.setenv("QUERYGATE_SECRETS_DIR", str(tmp_path))
    settings = load_settings()
    for name in ("database_url", "mask_hmac_key", "jwt_public_key"):
        assert _secret(settings, name) == _sample(name)
    assert load_settings(secrets_dir=tmp_path).database_url == settings.database_url


@pytest.mark.parametrize(
    "sources", [("variable", "file"), ("variable", "dir"), ("file", "dir")]
)
def test_a_secret_given_twice_is_refused(monkeypatch, tmp_path, sources):
    dsn = _sample("database_url")
    if "variable" in sources:
        monkeypatch.setenv("QUERYGATE_DATABASE_URL", dsn)
    if "file" in sources:
        (tmp_path / "dsn").write_text(dsn)
        monkeypatch.setenv("QUERYGATE_DATABASE_URL_FILE", str(tmp_path / "dsn"))
    if "dir" in sources:
        (tmp_path / "secrets").mkdir()
        (tmp_path / "secrets" / "QUERYGATE_DATABASE_URL").write_text(dsn)
        monkeypatch.setenv("QUERYGATE_SECRETS_DIR", str(tmp_path / "secrets"))
    with pytest.raises(ConfigError, match="QUERYGATE_DATABASE_URL is given more than once") as caught:
        load_settings()
    assert dsn not in str(caught.value)


def test_an_argument_still_wins_over_a_secret_file(monkeypatch, tmp_path):
    (tmp_path / "dsn").write_text(_sample("database_url"))
    monkeypatch.setenv("QUERYGATE_DATABASE_URL_FILE", str(tmp_path / "dsn"))
    settings = load_settings(database_url="postgresql://other/db")
    assert _secret(settings, "database_url") == "postgresql://other/db"


def test_a_secret_from_a_file_is_validated_like_the_variable(monkeypatch, tmp_path):
    (tmp_path / "key").write_text("changeme-changeme-changeme")
    monkeypatch.setenv("QUERYGATE_MASK_HMAC_KEY_FILE", str(tmp_path / "key"))
    with pytest.raises(ConfigError, match="QUERYGATE_MASK_HMAC_KEY must be a real secret"):
        load_settings()


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "QUERYGATE_DATABASE_URL_FILE: cannot read"),
        ("empty", "QUERYGATE_DATABASE_URL_FILE: .* is empty"),
        ("binary", "QUERYGATE_DATABASE_URL_FILE: .* is not UTF-8 text"),
        ("dir_missing", "QUERYGATE_SECRETS_DIR: .* is not a directory"),
        ("dir_typo", "QUERYGATE_DATABSE_URL in .* is not a secret setting "
                     r"\(did you mean QUERYGATE_DATABASE_URL\?\)"),
        ("dir_stray", "QUERYGATE_SECRETS_DIR: url in .* is not a secret setting; expected"),
    ],
)
def test_unusable_secret_files_name_the_variable(monkeypatch, tmp_path, setup, message):
    path = tmp_path / "dsn"
    if setup == "empty":
        path.write_text("\n")
    elif setup == "binary":
        path.write_bytes(b"\xff\xfe\x00")
    if setup.startswith("dir_"):
        monkeypatch.setenv("QUERYGATE_SECRETS_DIR", str(tmp_path / "secrets"))
        if setup != "dir_missing":
            (tmp_path / "secrets").mkdir()
            name = "QUERYGATE_DATABSE_URL" if setup == "dir_typo" else "url"
            (tmp_path / "secrets" / name).write_text(_sample("database_url"))
    else:
        monkeypatch.setenv("QUERYGATE_DATABASE_URL_FILE", str(path))
    with pytest.raises(ConfigError, match=message):
        load_settings()


def test_kafka_batches_are_compressed_by_default():
    from app.audit import KafkaSink
    from app.metrics import Metrics

    settings = load_settings(audit_sink="kafka", audit_kafka_bootstrap="k:9092")
    assert settings.audit_kafka_compression == "gzip"
    sink = KafkaSink(settings, "i", Metrics())
    assert sink._config()["compression_type"] == "gzip"
    sink.settings = load_settings(audit_sink="kafka", audit_kafka_bootstrap="k:9092",
                                  audit_kafka_compression="none")
    assert sink._config()["compression_type"] is None


def test_an_oauthbearer_token_is_read_from_its_file_at_every_authentication(tmp_path):
    import asyncio

    from app.audit import kafka_security

    token = tmp_path / "token"
    token.write_text("first\n")
    settings = load_settings(audit_kafka_security_protocol="SASL_SSL",
                             audit_kafka_sasl_mechanism="OAUTHBEARER",
                             audit_kafka_sasl_oauth_token_file=token)
    config = kafka_security(settings)
    assert config["sasl_mechanism"] == "OAUTHBEARER" and "ssl_context" in config
    provider = config["sasl_oauth_token_provider"]
    assert asyncio.run(provider.token()) == "first"
    token.write_text("rotated")
    assert asyncio.run(provider.token()) == "rotated"
