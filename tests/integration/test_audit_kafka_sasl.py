"""The audit topic behind SASL (SCRAM-SHA-256/512), as deploy/k8s configures a real one: the
gateway's sink writes it, and ``querygate audit verify --kafka`` reads it with the same
``QUERYGATE_AUDIT_KAFKA_*`` settings (issue 20, acceptance 5). A real KRaft broker whose
SASL_PLAINTEXT listener knows one SCRAM user, created at format time."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from app.cli import main
from app.devstack import KafkaBroker, start_kafka

pytestmark = pytest.mark.integration

USER, PASSWORD = "auditor", "scram-secret-6d1f"


@pytest.fixture(scope="module")
def scram_kafka(tmp_path_factory) -> Iterator[KafkaBroker]:
    broker = start_kafka(tmp_path_factory.mktemp("kafka-scram"), scram_users={USER: PASSWORD})
    yield broker
    broker.stop()


def _sasl_env(monkeypatch: pytest.MonkeyPatch, mechanism: str) -> None:
    for name, value in (("SECURITY_PROTOCOL", "SASL_PLAINTEXT"), ("SASL_MECHANISM", mechanism),
                        ("SASL_USERNAME", USER), ("SASL_PASSWORD", PASSWORD)):
        monkeypatch.setenv(f"QUERYGATE_AUDIT_KAFKA_{name}", value)


def _shipped(gateway: Any, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        text = gateway.client.get("/metrics").text
        gauges = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                  if line.startswith(("querygate_audit_last_sequence",
                                      "querygate_audit_shipped_sequence"))}
        if gauges and gauges["querygate_audit_last_sequence"] == gauges[
                "querygate_audit_shipped_sequence"] > 0:
            return
        assert time.monotonic() < deadline, gauges
        time.sleep(0.2)


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_the_sink_writes_and_verify_reads_a_scram_topic(
    scram_kafka, make_gateway, tmp_path, alice, capsys, monkeypatch, mechanism
):
    topic = f"audit-scram-{mechanism[-3:]}"
    scram_kafka.create_topic(topic)
    sasl = f"127.0.0.1:{scram_kafka.sasl_port}"
    gateway = make_gateway(
        audit_spool_dir=str(tmp_path / "spool"), audit_sink="kafka", audit_kafka_bootstrap=sasl,
        audit_kafka_topic=topic, audit_kafka_security_protocol="SASL_PLAINTEXT",
        audit_kafka_sasl_mechanism=mechanism, audit_kafka_sasl_username=USER,
        audit_kafka_sasl_password=PASSWORD, audit_instance_id=f"gw-scram-{mechanism[-3:]}",
    )
    for n in range(3):
        assert gateway.query("SELECT id FROM customers WHERE id = $1", alice,
                             [n + 1]).status_code == 200
    _shipped(gateway)

    # Without the credentials the SASL listener is not readable: one line, exit 2.
    assert main(["audit", "verify", "--kafka", sasl, "--topic", topic, "--timeout", "8"]) == 2
    assert "cannot reach Kafka" in capsys.readouterr().err
    # With the sink's settings it is, and the chain verifies.
    _sasl_env(monkeypatch, mechanism)
    assert main(["audit", "verify", "--kafka", sasl, "--topic", topic, "--json"]) == 0
    report = capsys.readouterr().out
    assert f"gw-scram-{mechanism[-3:]}" in report, report
    # A wrong password is refused by the broker.
    monkeypatch.setenv("QUERYGATE_AUDIT_KAFKA_SASL_PASSWORD", "not-the-password")
    assert main(["audit", "verify", "--kafka", sasl, "--topic", topic, "--timeout", "8"]) == 2
    assert "cannot reach Kafka" in capsys.readouterr().err
