"""The settings of deadlines and limits per caller (README, Settings)."""

from __future__ import annotations

import pytest

from app.config import ConfigError, load_settings


def test_the_shipped_deadlines_and_limits():
    settings = load_settings()
    assert settings.request_timeout_s == 6.0  # the statement timeout + 1 s
    assert settings.stream_timeout_s == 300.0
    assert settings.pool_acquire_timeout_ms == 2000
    assert settings.max_response_bytes == 32 << 20
    assert (settings.rate_limit_per_s, settings.rate_limit_burst) == (50.0, 100)
    # Pool fairness: one caller's statements cannot take every connection of a pool.
    assert 0 < settings.max_concurrent_per_identity < min(
        settings.db_pool_max, settings.profile_pool_max)


def test_the_request_deadline_follows_the_statement_timeout():
    assert load_settings(statement_timeout_ms=30_000).request_timeout_s == 31.0
    assert load_settings(statement_timeout_ms=200).request_timeout_s == 1.2
    assert load_settings(request_timeout_ms=9000).request_timeout_s == 9.0
    # A stream's deadline is never shorter than a request's.
    assert load_settings(statement_timeout_ms=600_000).stream_timeout_s == 601.0


def test_from_the_environment(monkeypatch):
    monkeypatch.setenv("QUERYGATE_MAX_RESPONSE_BYTES", "1048576")
    monkeypatch.setenv("QUERYGATE_RATE_LIMIT_PER_S", "2.5")
    monkeypatch.setenv("QUERYGATE_MAX_CONCURRENT_PER_IDENTITY", "0")
    settings = load_settings()
    assert (settings.max_response_bytes, settings.rate_limit_per_s,
            settings.max_concurrent_per_identity) == (1 << 20, 2.5, 0)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"request_timeout_ms": 5000}, "QUERYGATE_REQUEST_TIMEOUT_MS"),  # not above 5000
        ({"request_timeout_ms": 50}, "QUERYGATE_REQUEST_TIMEOUT_MS"),
        ({"pool_acquire_timeout_ms": 0}, "QUERYGATE_POOL_ACQUIRE_TIMEOUT_MS"),
        ({"max_response_bytes": 10}, "QUERYGATE_MAX_RESPONSE_BYTES"),
        ({"max_concurrent_per_identity": -1}, "QUERYGATE_MAX_CONCURRENT_PER_IDENTITY"),
        ({"rate_limit_burst": 0}, "QUERYGATE_RATE_LIMIT_BURST"),
        ({"liveness_max_loop_lag_ms": 10}, "QUERYGATE_LIVENESS_MAX_LOOP_LAG_MS"),
    ],
)
def test_invalid_values_name_the_variable(overrides, named):
    with pytest.raises(ConfigError, match=named):
        load_settings(**overrides)
