"""The Kafka broker's cluster id (app/devstack.py): never one the storage tool reads as an option."""

from __future__ import annotations

import base64
import uuid

import pytest

from app import devstack


def test_a_cluster_id_that_would_start_with_a_dash_is_drawn_again(monkeypatch: pytest.MonkeyPatch):
    dashed = uuid.UUID(bytes=b"\xf8" + b"\x00" * 15)  # 111110… is "-" in URL-safe base64
    plain = uuid.UUID(bytes=b"\x00" * 16)
    assert base64.urlsafe_b64encode(dashed.bytes).startswith(b"-")
    drawn = iter([dashed, dashed, plain])
    monkeypatch.setattr(devstack.uuid, "uuid4", lambda: next(drawn))
    cluster_id = devstack.kafka_cluster_id()
    assert cluster_id == "AAAAAAAAAAAAAAAAAAAAAA"
    assert len(base64.urlsafe_b64decode(cluster_id + "==")) == 16


def test_cluster_ids_are_random_and_well_formed():
    ids = {devstack.kafka_cluster_id() for _ in range(2000)}
    assert len(ids) == 2000
    assert not any(i.startswith("-") for i in ids)
    assert all(len(i) == 22 for i in ids)
