"""The audit trail's parts alone: redaction, the hash chain, the spool, the verifier.

The spool and the file sink work on real files in a temporary directory; only the disk-full
case swaps ``os.write`` for one that fails with ENOSPC.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import itertools
import json
import logging
import os
from pathlib import Path
from typing import Any

import orjson
import pytest

from app import audit
from app.audit import (
    GENESIS,
    AuditLog,
    FileSink,
    Shipper,
    Spool,
    SpoolFull,
    Verifier,
    canonical,
    claim_spool,
    event_hash,
    redact_sql,
    verify_file,
    worker_spool,
)
from app.cli import main
from app.config import ConfigError, load_settings
from app.errors import Unavailable
from app.metrics import JsonFormatter, Metrics

# --- redacted SQL -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT id FROM customers WHERE email = 'ada@example.com'",
         "SELECT id FROM customers WHERE email = ?"),
        ("SELECT id FROM t WHERE a = 'x''y' AND b = 12.5e3 AND c = $1",
         "SELECT id FROM t WHERE a = ? AND b = ? AND c = $1"),
        ("select  id\n  from t where n = -5 limit 10", "select  id\n  from t where n = -? limit ?"),
        ("SELECT $$dollar secret$$, E'esc', B'101', X'ff', N'nat', U&'d\\0061t'",
         "SELECT ?, ?, ?, ?, ?, ?"),
        ("SELECT DATE '2024-01-01', 'a'::text", "SELECT DATE ?, ?::text"),
        ('SELECT "Weird Name" FROM "T" WHERE x = $2', 'SELECT "Weird Name" FROM "T" WHERE x = $2'),
        ("SELECT 1 -- the ssn is 123-45-6789\nFROM t /* card 4111 */ WHERE a = 'é€'",
         "SELECT ? FROM t WHERE a = ?"),
    ],
)
def test_literals_and_comments_are_replaced(sql, expected):
    assert redact_sql(sql) == expected


def test_unreadable_sql_gives_no_text_rather_than_raw_text():
    # Where PostgreSQL's scanner gives up, everything from there on is one "?".
    assert redact_sql("SELECT 'never closed") == "SELECT ?"
    assert redact_sql("SELECT '\ud800'") is None  # a lone surrogate cannot even be encoded


# --- canonical form and the chain -----------------------------------------------------------


def test_the_hash_covers_every_field_but_itself_in_canonical_form():
    event = {"b": 1, "a": {"y": [1, "é"], "x": None}, "hash": "ignored"}
    expected = b'{"a":{"x":null,"y":[1,"\xc3\xa9"]},"b":1}'
    assert canonical({"b": 1, "a": {"y": [1, "é"], "x": None}}) == expected
    assert event_hash(event) == event_hash({"a": {"x": None, "y": [1, "é"]}, "b": 1})
    assert event_hash(event) != event_hash({**event, "b": 2})


def _event(kind: str = "decision", **fields: Any) -> dict[str, Any]:
    return {"schema": audit.SCHEMA, "type": kind, "time": "2026-11-21T10:00:00+00:00", **fields}


async def _spool(tmp_path: Path, **kwargs: Any) -> tuple[Spool, asyncio.Task[None]]:
    spool = Spool(tmp_path / "spool", kwargs.pop("max_bytes", 1 << 20),
                  kwargs.pop("segment_bytes", 1 << 16), kwargs.pop("instance", "gw-test"))
    spool.open()
    return spool, asyncio.create_task(spool.run_writer())


async def _close(spool: Spool, writer: asyncio.Task[None]) -> None:
    await spool.close()
    await writer
    spool.release()


def _lines(spool: Spool) -> list[dict[str, Any]]:
    out = []
    for path in sorted((spool.directory / "segments").glob("*.jsonl")):
        out.extend(orjson.loads(line) for line in path.read_bytes().splitlines())
    return out


async def test_appended_events_form_a_chain_and_are_durable_when_awaited(tmp_path):
    spool, writer = await _spool(tmp_path)
    futures = [spool.append(_event(n=i), gate=True) for i in range(5)]
    await asyncio.gather(*futures)
    assert spool.durable_seq == 5
    events = _lines(spool)
    assert [e["seq"] for e in events] == [1, 2, 3, 4, 5]
    assert events[0]["prev_hash"] == GENESIS
    for before, after in itertools.pairwise(events):
        assert after["prev_hash"] == before["hash"]
    assert all(e["hash"] == event_hash(e) and e["instance"] == "gw-test" for e in events)
    await _close(spool, writer)


async def test_a_restart_continues_the_chain_and_drops_a_torn_tail(tmp_path):
    spool, writer = await _spool(tmp_path)
    await asyncio.gather(*[spool.append(_event(n=i), gate=True) for i in range(3)])
    chain = spool.chain
    await _close(spool, writer)
    # A crash in the middle of a write: half a line at the end of the last segment.
    last = sorted((tmp_path / "spool" / "segments").glob("*.jsonl"))[-1]
    with last.open("ab") as f:
        f.write(b'{"seq": 4, "half')
    again, writer = await _spool(tmp_path)
    assert (again.seq, again.chain, again.torn_bytes) == (3, chain, 16)
    await again.append(_event(n=3), gate=True)
    events = _lines(again)
    assert [e["seq"] for e in events] == [1, 2, 3, 4]
    assert events[3]["prev_hash"] == events[2]["hash"]
    await _close(again, writer)


async def test_a_second_process_cannot_open_the_same_spool(tmp_path):
    spool, writer = await _spool(tmp_path)
    with pytest.raises(ConfigError, match="in use by another gateway process"):
        Spool(tmp_path / "spool", 1 << 20, 1 << 16).open()
    await _close(spool, writer)


def test_worker_slots_have_their_own_directory_and_instance_id(tmp_path):
    # Slot 0 is the single process's spool, so one worker or several keep its chain.
    assert worker_spool(tmp_path, "gw", 0) == (tmp_path, "gw")
    assert worker_spool(tmp_path, "gw", 1) == (tmp_path / "worker-1", "gw-w1")
    assert worker_spool(tmp_path, None, 2) == (tmp_path / "worker-2", None)
    settings = load_settings(audit_instance_id=worker_spool(tmp_path, "g" * 120, 63)[1])
    assert settings.audit_instance_id == "g" * 120 + "-w63"  # still a valid id


async def test_each_worker_claims_a_spool_of_its_own_and_a_restarted_one_takes_the_free_slot(
    tmp_path,
):
    # Three processes' worth of claims (flock is per open file, so one process shows it).
    claimed = [claim_spool(tmp_path / "spool", 3, 1 << 20, 1 << 16, "gw") for _ in range(3)]
    assert [s.directory for s in claimed] == [
        tmp_path / "spool", tmp_path / "spool" / "worker-1", tmp_path / "spool" / "worker-2"
    ]
    assert [s.instance for s in claimed] == ["gw", "gw-w1", "gw-w2"]
    assert len({s.chain for s in claimed}) == 3
    with pytest.raises(ConfigError, match="worker-2 is in use"):
        claim_spool(tmp_path / "spool", 3, 1 << 20, 1 << 16, "gw")
    # Worker 1 dies: its successor gets slot 1 back, with the same instance and chain.
    chain = claimed[1].chain
    claimed[1].release()
    again = claim_spool(tmp_path / "spool", 3, 1 << 20, 1 << 16, "gw")
    assert (again.instance, again.chain) == ("gw-w1", chain)
    for spool in (claimed[0], claimed[2], again):
        spool.release()
    # Without a configured id each spool records one of its own.
    unnamed = [claim_spool(tmp_path / "other", 2, 1 << 20, 1 << 16) for _ in range(2)]
    assert unnamed[0].instance != unnamed[1].instance
    for spool in unnamed:
        spool.release()


async def test_workers_share_the_file_sink_and_verify_checks_every_chain(tmp_path):
    settings = load_settings(environment="staging", audit_spool_dir=tmp_path / "spool",
                             audit_instance_id="gw", workers=2, mask_hmac_key="k" * 32)
    logs = [AuditLog(settings, Metrics()) for _ in range(2)]
    for log_ in logs:
        await log_.start()
    assert [log_.instance for log_ in logs] == ["gw", "gw-w1"]
    await asyncio.gather(*(
        log_.record(log_.event("decision", n=n), gate=True) for n in range(20) for log_ in logs
    ))
    for log_ in logs:
        await log_.close()
    verifier = verify_file(tmp_path / "spool" / "audit.jsonl")
    assert verifier.ok, verifier.summary()
    # started, 20 decisions, stopped: each chain whole in the one file.
    assert sorted((c["instance"], c["events"]) for c in verifier.report()["chains"]) == [
        ("gw", 22), ("gw-w1", 22)
    ]


async def test_another_instance_id_is_refused_while_events_are_unshipped(tmp_path):
    spool, writer = await _spool(tmp_path)
    await spool.append(_event(), gate=True)
    await _close(spool, writer)
    with pytest.raises(ConfigError, match="QUERYGATE_AUDIT_INSTANCE_ID"):
        Spool(tmp_path / "spool", 1 << 20, 1 << 16, "gw-other").open()


async def test_the_quota_refuses_gate_events_first_and_appends_nothing(tmp_path):
    spool, writer = await _spool(tmp_path, max_bytes=64 * 1024, segment_bytes=8192)
    big = "x" * 2000
    accepted = 0
    with pytest.raises(SpoolFull) as refused:
        while True:
            await spool.append(_event(pad=big), gate=True)
            accepted += 1
    assert refused.value.reason == "quota"
    seq = spool.seq
    # The headroom still takes outcome events of statements that already ran.
    await spool.append(_event("execution", pad=big), gate=False)
    assert spool.seq == seq + 1
    assert spool.accepting()[0] is False
    assert [e["seq"] for e in _lines(spool)] == list(range(1, accepted + 2))
    await _close(spool, writer)


async def test_events_that_come_a_few_loop_turns_apart_share_one_fsync(tmp_path, monkeypatch):
    """Group commit under load: the writer lets the loop run a few turns before it takes a
    batch (Spool.run_writer), so requests that append in those turns share its fsync; an
    event alone is written once a few turns passed with nothing new."""
    spool, writer = await _spool(tmp_path)
    syncs: list[int] = []
    real_fdatasync = os.fdatasync
    monkeypatch.setattr(audit.os, "fdatasync",
                        lambda fd: (syncs.append(fd), real_fdatasync(fd))[1])

    async def request(n: int, turns: int) -> None:
        for _ in range(turns):  # the rest of its work before its event
            await asyncio.sleep(0)
        await spool.append(_event(n=n), gate=True)

    # Eight requests whose events come one loop turn after another: one batch, one fsync.
    await asyncio.gather(*(request(n, turns=n) for n in range(8)))
    assert len(syncs) == 1 and spool.durable_seq == 8
    # One event alone is durable after the idle turns, in an fsync of its own.
    loop = asyncio.get_running_loop()
    started = loop.time()
    await spool.append(_event(n=8), gate=True)
    assert len(syncs) == 2 and loop.time() - started < 0.5
    await _close(spool, writer)


async def test_a_failed_write_fails_its_batch_and_rewinds_the_chain(tmp_path, monkeypatch):
    spool, writer = await _spool(tmp_path)
    await spool.append(_event(n=0), gate=True)
    real_write = os.write

    def full(fd: int, data: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(audit.os, "write", full)
    failing = [spool.append(_event(n=i), gate=True) for i in (1, 2)]
    results = await asyncio.gather(*failing, return_exceptions=True)
    assert all(isinstance(r, SpoolFull) and r.reason == "disk" for r in results)
    assert (spool.seq, spool.accepting()[0]) == (1, False)
    monkeypatch.setattr(audit.os, "write", real_write)
    await spool.append(_event(n=3), gate=True)
    events = _lines(spool)
    assert [(e["seq"], e["n"]) for e in events] == [(1, 0), (2, 3)]
    assert events[1]["prev_hash"] == events[0]["hash"]
    assert spool.accepting() == (True, "ok")
    await _close(spool, writer)


async def test_segments_roll_and_the_shipper_moves_everything_in_order(tmp_path):
    spool, writer = await _spool(tmp_path, segment_bytes=4096)
    sink = FileSink(tmp_path / "out.jsonl")
    await sink.start()
    shipper = Shipper(spool, sink, Metrics(), batch_bytes=3000)
    shipping = asyncio.create_task(shipper.run())
    await asyncio.gather(*[spool.append(_event(n=i, pad="y" * 300), gate=True)
                           for i in range(40)])
    for _ in range(200):
        if spool.shipped_seq == 40:
            break
        await asyncio.sleep(0.01)
    await spool.save_marker(force=True)
    shipping.cancel()
    await sink.close()
    shipped = [orjson.loads(line) for line in (tmp_path / "out.jsonl").read_bytes().splitlines()]
    assert [e["n"] for e in shipped] == list(range(40))
    assert verify_file(tmp_path / "out.jsonl").ok
    # Shipped segments are deleted once the marker says so; the current one stays.
    assert len(list((tmp_path / "spool" / "segments").glob("*.jsonl"))) <= 2
    marker = json.loads((tmp_path / "spool" / "shipped.json").read_text())
    assert marker["seq"] == 40
    await _close(spool, writer)


async def test_the_shipper_skips_what_was_shipped_and_lines_that_are_not_events(tmp_path):
    """The slow path of a batch: resumed behind the marker (a crash between send and save),
    with a line that is not an event (a half write); only what follows the marker ships."""
    spool, writer = await _spool(tmp_path)
    await asyncio.gather(*[spool.append(_event(n=i), gate=True) for i in range(6)])
    segment = sorted((tmp_path / "spool" / "segments").glob("*.jsonl"))[-1]
    lines = segment.read_bytes().splitlines()
    spool.shipped_seq = 3  # the sink has 1-3; the marker still points at the start
    segment.write_bytes(b"\n".join([*lines[:4], b'{"seq": 5, "half', *lines[4:]]) + b"\n")
    spool._sizes[spool._segment] = segment.stat().st_size
    sink = FileSink(tmp_path / "out.jsonl")
    await sink.start()
    shipping = asyncio.create_task(Shipper(spool, sink, Metrics()).run())
    for _ in range(200):
        if spool.shipped_seq == 6:
            break
        await asyncio.sleep(0.01)
    shipping.cancel()
    await sink.close()
    shipped = [orjson.loads(line) for line in (tmp_path / "out.jsonl").read_bytes().splitlines()]
    assert [e["seq"] for e in shipped] == [4, 5, 6]
    await _close(spool, writer)

async def test_the_audit_log_recovers_unshipped_events_at_start(tmp_path):
    settings = load_settings(environment="staging", audit_spool_dir=tmp_path / "spool",
                             audit_instance_id="gw-a", audit_drain_timeout_s=2)
    first = AuditLog(settings, Metrics())
    await first.start()
    await first.record(first.event("decision", n=1), gate=True)
    assert first.spool is not None
    # As after SIGKILL: the writer ran, the shipper did not get to it, nothing was closed.
    first._tasks[1].cancel()
    first.spool.shipped_seq = 0
    first.spool.release()
    for task in first._tasks:
        task.cancel()
    (tmp_path / "spool" / "shipped.json").unlink(missing_ok=True)
    second = AuditLog(settings, Metrics())
    await second.start()
    await second.close()
    verifier = verify_file(tmp_path / "spool" / "audit.jsonl")
    assert verifier.ok, verifier.summary()
    events = [orjson.loads(line) for line in (tmp_path / "spool" / "audit.jsonl").read_bytes().splitlines()]
    seqs = [e["seq"] for e in events]
    # Exact duplicates are possible (the first instance may have shipped before the cut);
    # every event is there, in order, once the duplicates are set aside.
    assert sorted(set(seqs)) == list(range(1, max(seqs) + 1))
    started = [e for e in events if e["type"] == "lifecycle" and e["lifecycle"]["action"] == "started"]
    assert started[-1]["lifecycle"]["recovered_unshipped"] >= 1


async def test_record_turns_a_full_spool_into_audit_unavailable_or_logs_it_when_fail_open(tmp_path, caplog):
    for fail_open, spool_dir in ((False, "a"), (True, "b")):
        settings = load_settings(environment="staging", audit_spool_dir=tmp_path / spool_dir,
                                 audit_sink="kafka", audit_kafka_bootstrap="127.0.0.1:1",
                                 audit_spool_max_bytes=64 * 1024, audit_fail_open=fail_open,
                                 audit_drain_timeout_s=0)
        log = AuditLog(settings, Metrics())
        await log.start()
        pad = "z" * 4000
        if fail_open:
            with caplog.at_level(logging.ERROR, logger="querygate.audit"):
                for _ in range(30):
                    await log.record(log.event("decision", pad=pad), gate=True)
            assert "NOT recorded (fail-open)" in caplog.text
        else:
            with pytest.raises(Unavailable) as refused:
                for _ in range(30):
                    await log.record(log.event("decision", pad=pad), gate=True)
            assert refused.value.code == "audit_unavailable"
            assert log.ready()[0] is False
        await log.close()



async def test_a_kafka_connect_cancelled_in_progress_still_stops_its_producer():
    """close() with no drain time left cancels the shipper mid-connect; the producer it was
    starting must be stopped all the same (an unstopped one keeps its sockets and tasks, and
    warns from __del__, which pytest turns into an error at the gc below)."""
    accepted: list[asyncio.StreamWriter] = []

    async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # a broker that accepts and never answers

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = load_settings(environment="dev", audit_sink="kafka",
                             audit_kafka_bootstrap=f"127.0.0.1:{port}")
    sink = audit.KafkaSink(settings, "gw", Metrics())
    connecting = asyncio.ensure_future(sink.send([b"{}"]))
    for _ in range(200):
        if accepted:
            break
        await asyncio.sleep(0.01)
    assert accepted, "the producer never reached the broker"
    connecting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await connecting
    server.close()
    for writer in accepted:
        writer.close()
    await server.wait_closed()
    gc.collect()


# --- the verifier ---------------------------------------------------------------------------


def _chain(n: int, instance: str = "gw", chain: str = "c1") -> list[dict[str, Any]]:
    events, prev = [], GENESIS
    for seq in range(1, n + 1):
        event = {"type": "decision", "instance": instance, "chain": chain, "seq": seq,
                 "prev_hash": prev, "n": seq}
        event["hash"] = event_hash(event)
        prev = event["hash"]
        events.append(event)
    return events


def _verify(events: list[dict[str, Any]], **kwargs: Any) -> Verifier:
    verifier = Verifier(**kwargs)
    for i, event in enumerate(events):
        verifier.feed(canonical(event), f"#{i}")
    return verifier


def test_an_intact_chain_passes_and_exact_duplicates_are_counted_not_failed():
    events = _chain(10)
    assert _verify(events).ok
    resent = _verify(events[:7] + events[4:])  # a resend after a lost acknowledgement
    assert resent.ok
    assert resent.report()["chains"][0]["duplicates"] == 3


def test_a_deleted_event_is_a_gap():
    events = _chain(10)
    verifier = _verify(events[:4] + events[5:])
    assert not verifier.ok
    assert verifier.report()["chains"][0]["gaps"] == [(5, 5)]
    assert "missing events: 5" in verifier.summary()


def test_reordering_is_reported():
    events = _chain(10)
    events[3], events[4] = events[4], events[3]
    verifier = _verify(events)
    assert not verifier.ok
    assert verifier.report()["chains"][0]["reordered"] == [4]


def test_an_edit_is_caught_by_its_own_hash_and_a_rehashed_edit_by_the_next_link():
    events = _chain(10)
    events[5] = {**events[5], "n": 999}
    assert _verify(events).report()["chains"][0]["edited"] == [6]
    rehashed = _chain(10)
    rehashed[5] = {**rehashed[5], "n": 999}
    rehashed[5]["hash"] = event_hash(rehashed[5])
    report = _verify(rehashed).report()["chains"][0]
    assert (report["edited"], report["broken_links"]) == ([], [7])


def test_a_missing_start_fails_unless_allowed_and_chains_are_separate():
    events = _chain(10)[3:]
    assert not _verify(events).ok
    assert _verify(events, allow_partial_start=True).ok
    two = _chain(5, "gw-a") + _chain(3, "gw-b")
    assert _verify(two).ok
    assert len(_verify(two).chains) == 2


def test_same_seq_with_other_content_is_a_conflict_and_junk_is_malformed():
    events = _chain(4)
    other = {**events[2], "n": 42}
    other["hash"] = event_hash(other)
    assert _verify([*events, other]).report()["chains"][0]["conflicts"] == [3]
    verifier = _verify(events)
    verifier.feed(b"not json", "line 99")
    assert not verifier.ok and verifier.malformed == ["line 99"]


def test_the_cli_verifies_a_file(tmp_path, capsys):
    path = tmp_path / "trail.jsonl"
    path.write_bytes(b"\n".join(canonical(e) for e in _chain(20)) + b"\n")
    assert main(["audit", "verify", str(path)]) == 0
    assert "verify: passed" in capsys.readouterr().out
    lines = path.read_bytes().splitlines()
    del lines[10]
    path.write_bytes(b"\n".join(lines) + b"\n")
    assert main(["audit", "verify", str(path), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["chains"][0]["gaps"] == [[11, 11]]
    assert main(["audit", "verify"]) == 2


# --- settings and logs ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"audit_sink": "kafka"}, "QUERYGATE_AUDIT_KAFKA_BOOTSTRAP"),
        ({"audit_fail_open": True}, "QUERYGATE_AUDIT_FAIL_OPEN"),
        ({"audit_sink": "syslog"}, "QUERYGATE_AUDIT_SINK"),
        ({"audit_spool_max_bytes": 1000}, "QUERYGATE_AUDIT_SPOOL_MAX_BYTES"),
        ({"audit_instance_id": "a b"}, "QUERYGATE_AUDIT_INSTANCE_ID"),
        ({"audit_kafka_security_protocol": "SASL_SSL"}, "QUERYGATE_AUDIT_KAFKA_SASL_MECHANISM"),
        ({"audit_kafka_security_protocol": "SASL_SSL", "audit_kafka_sasl_mechanism": "PLAIN"},
         "QUERYGATE_AUDIT_KAFKA_SASL_USERNAME"),
    ],
)
def test_audit_settings_are_checked(overrides, named):
    with pytest.raises(ConfigError, match=named):
        load_settings(**overrides)


def test_json_log_lines_carry_the_request_id_and_extras():
    from app.metrics import REQUEST_ID

    record = logging.LogRecord("querygate.x", logging.INFO, __file__, 1, 'say "%s"', ("hi",), None)
    record.fingerprint = "sha256:abc"
    token = REQUEST_ID.set("req-1")
    try:
        line = json.loads(JsonFormatter().format(record))
    finally:
        REQUEST_ID.reset(token)
    assert line["message"] == 'say "hi"'
    assert (line["request_id"], line["fingerprint"], line["level"]) == ("req-1", "sha256:abc", "INFO")


# --- redacted SQL: every literal form PostgreSQL's scanner knows -------------------------------


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        # Numbers sqlglot splits into a number and an identifier (0 AS o1234567).
        ("SELECT 0o1234567", "SELECT ?"),
        ("SELECT 0x1F, 0X1f", "SELECT ?, ?"),
        ("SELECT 0b101", "SELECT ?"),
        ("SELECT 1_234_567", "SELECT ?"),
        ("SELECT 1.5e10, 1.5E-10, 2e3", "SELECT ?, ?, ?"),
        ("SELECT .5, 5., 0.5", "SELECT ?, ?, ?"),
        ("SELECT 123abc FROM t WHERE ssn = '078-05-1120'", "SELECT ?"),  # trailing junk
        # Strings.
        ("SELECT $$078-05-1120$$", "SELECT ?"),
        ("SELECT $tag$ it's $$ 078-05-1120 $tag$", "SELECT ?"),
        ("SELECT E'it\\'s \\x41 078-05-1120'", "SELECT ?"),
        ("SELECT e'\\n078'", "SELECT ?"),
        ("SELECT U&'\\0030\\0037\\0038-05-1120'", "SELECT ?"),
        ("SELECT U&'!0030!0037' UESCAPE '!'", "SELECT ? UESCAPE ?"),
        ("SELECT B'0101', b'1'", "SELECT ?, ?"),
        ("SELECT X'1F', x'ff'", "SELECT ?, ?"),
        ("SELECT N'078-05-1120', n'x'", "SELECT ?, ?"),
        ("SELECT date '2024-01-01', timestamp with time zone '2024-01-01 00:00'",
         "SELECT date ?, timestamp with time zone ?"),
        ("SELECT interval '1 day', '42'::int", "SELECT interval ?, ?::int"),
        ("SELECT 'a'\n'078-05-1120'", "SELECT ?"),  # continuation: one literal
        ("SELECT 'a' 'b'", "SELECT ? ?"),
        # Unterminated or unreadable: nothing after the scanner's stop is kept.
        ("SELECT id FROM t WHERE ssn = '078-05-1120", "SELECT id FROM t WHERE ssn = ?"),
        ("SELECT $$078-05-1120", "SELECT ?"),
        ("SELECT E'\\u12 078-05-1120'", "SELECT ?"),
        ("SELECT 1 /* 078-05-1120", "SELECT ? ?"),
        ("SELECT 'a\x00', '078-05-1120'", "SELECT ?"),
        # Not literals: parameters, identifiers, keywords.
        ("SELECT $1, $2::int, $10 FROM \"T 1\" WHERE x IS TRUE",
         "SELECT $1, $2::int, $10 FROM \"T 1\" WHERE x IS TRUE"),
        ("SELECT U&\"d\\0061t\" FROM t", "SELECT U&\"d\\0061t\" FROM t"),
    ],
)
def test_every_literal_form_is_replaced(sql, expected):
    assert redact_sql(sql) == expected
    assert "078" not in (redact_sql(sql) or "")

