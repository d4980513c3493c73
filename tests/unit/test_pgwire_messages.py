"""The wire-protocol codec: exact bytes from the protocol documentation, round trips of every
message both ways, and malformed input that is always a ProtocolError (never an IndexError,
struct.error or UnicodeDecodeError)."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.pgwire import messages as m
from app.pgwire.messages import ProtocolError


def split(message: bytes) -> tuple[int, bytes]:
    """A whole typed message as (type byte, payload), its length word checked."""
    (length,) = struct.unpack_from("!I", message, 1)
    assert length == len(message) - 1
    return message[0], message[5:]


def reader_of(data: bytes, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


# --- exact bytes (https://www.postgresql.org/docs/current/protocol-message-formats.html) -----


@pytest.mark.parametrize(("message", "expected"), [
    (m.ready_for_query(b"I"), b"Z\x00\x00\x00\x05I"),
    (m.ready_for_query(b"T"), b"Z\x00\x00\x00\x05T"),
    (m.ready_for_query(b"E"), b"Z\x00\x00\x00\x05E"),
    (m.authentication_ok(), b"R\x00\x00\x00\x08\x00\x00\x00\x00"),
    (m.authentication_cleartext_password(), b"R\x00\x00\x00\x08\x00\x00\x00\x03"),
    (m.authentication_md5_password(b"abcd"), b"R\x00\x00\x00\x0c\x00\x00\x00\x05abcd"),
    (m.authentication_sasl(["SCRAM-SHA-256"]), b"R\x00\x00\x00\x17\x00\x00\x00\x0aSCRAM-SHA-256\x00\x00"),
    (m.parse_complete(), b"1\x00\x00\x00\x04"),
    (m.bind_complete(), b"2\x00\x00\x00\x04"),
    (m.close_complete(), b"3\x00\x00\x00\x04"),
    (m.no_data(), b"n\x00\x00\x00\x04"),
    (m.portal_suspended(), b"s\x00\x00\x00\x04"),
    (m.empty_query_response(), b"I\x00\x00\x00\x04"),
    (m.command_complete("SELECT 1"), b"C\x00\x00\x00\x0dSELECT 1\x00"),
    (m.backend_key_data(1234, 0xDEADBEEF), b"K\x00\x00\x00\x0c\x00\x00\x04\xd2\xde\xad\xbe\xef"),
    (m.parameter_status("TimeZone", "UTC"), b"S\x00\x00\x00\x11TimeZone\x00UTC\x00"),
    (m.parameter_description([23, 25]), b"t\x00\x00\x00\x0e\x00\x02\x00\x00\x00\x17\x00\x00\x00\x19"),
    (m.data_row([b"42", None]), b"D\x00\x00\x00\x10\x00\x02\x00\x00\x00\x0242\xff\xff\xff\xff"),
    (m.data_row([]), b"D\x00\x00\x00\x06\x00\x00"),
    (m.row_description([m.Field("n", 0, 0, 23, 4, -1, 1)]),
     b"T\x00\x00\x00\x1a\x00\x01n\x00" b"\x00\x00\x00\x00" b"\x00\x00" b"\x00\x00\x00\x17" b"\x00\x04"
     b"\xff\xff\xff\xff" b"\x00\x01"),
    (m.error_response({"S": "ERROR", "C": "42601", "M": "bad"}),
     b"E\x00\x00\x00\x18SERROR\x00C42601\x00Mbad\x00\x00"),
    (m.notice_response({"S": "NOTICE", "M": "hi"}), b"N\x00\x00\x00\x11SNOTICE\x00Mhi\x00\x00"),
    (m.negotiate_protocol_version(0, ["_pq_.x"]),
     b"v\x00\x00\x00\x13\x00\x00\x00\x00\x00\x00\x00\x01_pq_.x\x00"),
    # frontend
    (m.ssl_request(), b"\x00\x00\x00\x08\x04\xd2\x16\x2f"),
    (m.gssenc_request(), b"\x00\x00\x00\x08\x04\xd2\x16\x30"),
    (m.cancel_request(7, 9), b"\x00\x00\x00\x10\x04\xd2\x16\x2e\x00\x00\x00\x07\x00\x00\x00\x09"),
    (m.startup({"user": "u"}), b"\x00\x00\x00\x10\x00\x03\x00\x00user\x00u\x00\x00"),
    (m.query("SELECT 1"), b"Q\x00\x00\x00\x0dSELECT 1\x00"),
    (m.sync(), b"S\x00\x00\x00\x04"),
    (m.flush(), b"H\x00\x00\x00\x04"),
    (m.terminate(), b"X\x00\x00\x00\x04"),
    (m.execute("", 0), b"E\x00\x00\x00\x09\x00\x00\x00\x00\x00"),
    (m.describe("S", "s1"), b"D\x00\x00\x00\x08Ss1\x00"),
    (m.close("P", ""), b"C\x00\x00\x00\x06P\x00"),
    (m.parse("", "SELECT $1", [23]), b"P\x00\x00\x00\x15\x00SELECT $1\x00\x00\x01\x00\x00\x00\x17"),
    (m.bind("", "", [1], [b"\x00\x00\x00\x2a", None], [1]),
     b"B\x00\x00\x00\x1c\x00\x00\x00\x01\x00\x01\x00\x02\x00\x00\x00\x04\x00\x00\x00\x2a"
     b"\xff\xff\xff\xff\x00\x01\x00\x01"),
    (m.password("secret"), b"p\x00\x00\x00\x0bsecret\x00"),
    (m.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=x"),
     b"p\x00\x00\x00\x1fSCRAM-SHA-256\x00\x00\x00\x00\x09n,,n=,r=x"),
])
def test_exact_bytes(message: bytes, expected: bytes) -> None:
    assert message == expected


def test_constants() -> None:
    assert (m.PROTOCOL_V3, m.SSL_REQUEST, m.GSSENC_REQUEST, m.CANCEL_REQUEST) == (
        196608, 80877103, 80877104, 80877102,
    )
    assert m.PROTOCOL_V3 == 3 << 16


def test_error_fields() -> None:
    assert m.error_fields("ERROR", "42501", "no", detail="d", hint="h", position=7) == {
        "S": "ERROR", "V": "ERROR", "C": "42501", "M": "no", "D": "d", "H": "h", "P": "7",
    }
    # An error is always sendable: a NUL in a value is dropped, not a broken frame.
    _, payload = split(m.error_response({"M": "a\x00b"}))
    assert m.parse_error_fields(payload) == {"M": "ab"}


def test_encoders_refuse_nul_in_identifiers() -> None:
    for encode in (lambda: m.query("a\x00b"), lambda: m.parameter_status("a", "b\x00"),
                   lambda: m.command_complete("x\x00"), lambda: m.password(b"p\x00w")):
        with pytest.raises(ValueError, match="NUL"):
            encode()
    with pytest.raises(ValueError):
        m.ready_for_query(b"X")
    with pytest.raises(ValueError):
        m.describe("X", "")  # type: ignore[arg-type]


# --- frontend round trips --------------------------------------------------------------------


@pytest.mark.parametrize(("message", "parsed"), [
    (m.query("SELECT 'é'"), m.Query("SELECT 'é'")),
    (m.parse("s1", "SELECT $1, $2", [23, 0]), m.Parse("s1", "SELECT $1, $2", (23, 0))),
    (m.parse("", "SELECT 1"), m.Parse("", "SELECT 1", ())),
    (m.bind("p", "s", [0, 1], [b"x", None], [1, 0, 1]),
     m.Bind("p", "s", (0, 1), (b"x", None), (1, 0, 1))),
    (m.bind("", ""), m.Bind("", "", (), (), ())),
    (m.describe("S", "s1"), m.Describe("S", "s1")),
    (m.describe("P", ""), m.Describe("P", "")),
    (m.execute("p", 2), m.Execute("p", 2)),
    (m.close("S", "s1"), m.Close("S", "s1")),
    (m.close("P", "p"), m.Close("P", "p")),
    (m.sync(), m.Sync()),
    (m.flush(), m.Flush()),
    (m.terminate(), m.Terminate()),
    (m.password("pw"), m.PasswordMessage(b"pw\x00")),
    (m.sasl_response(b"c=biws,r=x"), m.PasswordMessage(b"c=biws,r=x")),
    (m.copy_data(b"1\t2\n"), m.CopyData(b"1\t2\n")),
    (m.copy_done(), m.CopyDone()),
    (m.copy_fail("stop"), m.CopyFail("stop")),
])
def test_frontend_round_trip(message: bytes, parsed: m.FrontendMessage) -> None:
    assert m.parse_frontend(*split(message)) == parsed


def test_password_message_readers() -> None:
    message = m.parse_frontend(*split(m.password("pw")))
    assert isinstance(message, m.PasswordMessage)
    assert message.cleartext() == "pw"
    with pytest.raises(ProtocolError):
        m.PasswordMessage(b"pw").cleartext()
    _, payload = split(m.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abc"))
    assert m.parse_sasl_initial_response(payload) == ("SCRAM-SHA-256", b"n,,n=,r=abc")
    _, payload = split(m.sasl_initial_response("SCRAM-SHA-256", None))
    assert m.parse_sasl_initial_response(payload) == ("SCRAM-SHA-256", None)
    with pytest.raises(ProtocolError):
        m.parse_sasl_initial_response(payload[:-1])


names = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=20)
values = st.one_of(st.none(), st.binary(max_size=40))
formats = st.integers(0, 1)


@st.composite
def binds(draw: st.DrawFn) -> m.Bind:
    params = tuple(draw(st.lists(values, max_size=12)))
    nformats = draw(st.sampled_from(sorted({0, 1, len(params)})))
    return m.Bind(
        draw(names), draw(names), tuple(draw(st.lists(formats, min_size=nformats, max_size=nformats))),
        params, tuple(draw(st.lists(formats, max_size=12))),
    )


@given(binds())
def test_bind_round_trip(bind: m.Bind) -> None:
    encoded = m.bind(bind.portal, bind.statement, bind.param_formats, bind.params, bind.result_formats)
    assert m.parse_frontend(*split(encoded)) == bind


@given(st.lists(values, max_size=30))
def test_data_row_round_trip(row: list[bytes | None]) -> None:
    kind, payload = split(m.data_row(row))
    assert kind == ord("D")
    assert m.parse_data_row(payload) == row
    # Anything bytes-like encodes the same (a masked value may be a memoryview or bytearray).
    assert m.data_row([None if v is None else bytearray(v) for v in row]) == m.data_row(row)


# --- backend round trips ---------------------------------------------------------------------


def test_backend_round_trips() -> None:
    fields = (m.Field("id", 16384, 1, 23, 4, -1, 0), m.Field("név", 0, 0, 25, -1, -1, 1),
              m.Field("big", 4_000_000_000, -7, 4_000_000_001, -2, 2_000_000, 1))
    assert m.parse_row_description(split(m.row_description(fields))[1]) == fields
    assert m.parse_row_description(split(m.row_description([]))[1]) == ()
    assert m.parse_command_complete(split(m.command_complete("INSERT 0 3"))[1]) == "INSERT 0 3"
    assert m.parse_parameter_description(split(m.parameter_description([23, 4_000_000_000]))[1]) == (
        23, 4_000_000_000,
    )
    assert m.parse_parameter_status(split(m.parameter_status("a", ""))[1]) == ("a", "")
    assert m.parse_backend_key_data(split(m.backend_key_data(1, 2**32 - 1))[1]) == (1, 2**32 - 1)
    assert m.parse_ready_for_query(split(m.ready_for_query(b"T"))[1]) == b"T"
    fields_in = m.error_fields("FATAL", "28P01", "password authentication failed", hint="é")
    assert m.parse_error_fields(split(m.error_response(fields_in))[1]) == fields_in
    assert m.parse_error_fields(split(m.notice_response({}))[1]) == {}
    assert m.parse_authentication(split(m.authentication_ok())[1]) == (0, b"")
    assert m.parse_authentication(split(m.authentication_md5_password(b"salt"))[1]) == (5, b"salt")
    code, data = m.parse_authentication(split(m.authentication_sasl(["SCRAM-SHA-256", "X"]))[1])
    assert (code, m.parse_sasl_mechanisms(data)) == (10, ["SCRAM-SHA-256", "X"])
    assert m.parse_authentication(split(m.authentication_sasl_continue(b"r=1"))[1]) == (11, b"r=1")
    assert m.parse_authentication(split(m.authentication_sasl_final(b"v=2"))[1]) == (12, b"v=2")
    assert m.parse_negotiate_protocol_version(split(m.negotiate_protocol_version(2, ["_pq_.a"]))[1]) == (
        2, ["_pq_.a"],
    )


# --- malformed input -------------------------------------------------------------------------

VALID_FRONTEND = [
    m.query("SELECT 1"), m.parse("s", "SELECT $1", [23]), m.bind("p", "s", [1], [b"abc", None], [1]),
    m.describe("S", "s"), m.execute("p", 5), m.close("P", "p"), m.copy_fail("x"),
]

BACKEND_PARSERS: list[Callable[[bytes], Any]] = [
    m.parse_row_description, m.parse_data_row, m.parse_error_fields, m.parse_command_complete,
    m.parse_parameter_description, m.parse_authentication, m.parse_backend_key_data,
    m.parse_parameter_status, m.parse_ready_for_query, m.parse_negotiate_protocol_version,
    m.parse_sasl_mechanisms, m.parse_sasl_initial_response,
]
VALID_BACKEND = [
    (m.parse_row_description, m.row_description([m.Field("a"), m.Field("b", 1, 2, 3, 4, 5, 1)])),
    (m.parse_data_row, m.data_row([b"abc", None, b""])),
    (m.parse_error_fields, m.error_response({"S": "ERROR", "M": "m"})),
    (m.parse_command_complete, m.command_complete("SELECT 3")),
    (m.parse_parameter_description, m.parameter_description([23, 25])),
    (m.parse_backend_key_data, m.backend_key_data(1, 2)),
    (m.parse_parameter_status, m.parameter_status("a", "b")),
    (m.parse_negotiate_protocol_version, m.negotiate_protocol_version(0, ["_pq_.a"])),
]


@pytest.mark.parametrize("message", VALID_FRONTEND)
def test_every_truncation_of_a_frontend_message_is_a_protocol_error(message: bytes) -> None:
    kind, payload = split(message)
    for cut in range(len(payload)):
        with pytest.raises(ProtocolError) as info:
            m.parse_frontend(kind, payload[:cut])
        assert info.value.sqlstate == "08P01"
    with pytest.raises(ProtocolError, match=r"too many|after the string"):
        m.parse_frontend(kind, payload + b"\x00")


@pytest.mark.parametrize(("parser", "message"), VALID_BACKEND)
def test_every_truncation_of_a_backend_message_is_a_protocol_error(
    parser: Callable[[bytes], Any], message: bytes
) -> None:
    _, payload = split(message)
    for cut in range(len(payload)):
        with pytest.raises(ProtocolError):
            parser(payload[:cut])
    with pytest.raises(ProtocolError):
        parser(payload + b"\x01")


@settings(max_examples=300)
@given(st.sampled_from(b"QPBDECSHXpdcf"), st.binary(max_size=64))
def test_garbage_frontend_is_parsed_or_a_protocol_error(kind: int, payload: bytes) -> None:
    try:
        m.parse_frontend(kind, payload)
    except ProtocolError:
        pass


@settings(max_examples=300)
@given(st.sampled_from(BACKEND_PARSERS), st.binary(max_size=64))
def test_garbage_backend_is_parsed_or_a_protocol_error(
    parser: Callable[[bytes], Any], payload: bytes
) -> None:
    try:
        parser(payload)
    except ProtocolError:
        pass


@pytest.mark.parametrize(("kind", "payload", "match"), [
    (ord("Z"), b"", "invalid frontend message type 'Z'"),
    (0, b"", "0x00"),
    (ord("F"), b"", "invalid frontend message type 'F'"),  # FunctionCall: not spoken
    (ord("Q"), b"SELECT 1", "not terminated by NUL"),
    (ord("Q"), b"SELECT \xff\x00", "UTF-8"),
    (ord("Q"), b"SELECT 1\x00x\x00", "after the string"),
    (ord("D"), b"X\x00", "subtype"),
    (ord("C"), b"", "subtype"),
    (ord("S"), b"\x00", "too many"),
    # Two parameters, three formats.
    (ord("B"), b"\x00\x00\x00\x03\x00\x00\x00\x00\x00\x00\x00\x02", "3 parameter formats but 2"),
    # A parameter whose length runs past the payload.
    (ord("B"), b"\x00\x00\x00\x00\x00\x01\x00\x00\x00\x09abc\x00\x00", "parameter 1 has invalid length 9"),
    (ord("B"), b"\x00\x00\x00\x00\x00\x01\xff\xff\xff\xfe\x00\x00", "invalid length -2"),
    # Parse saying two OIDs and carrying one.
    (ord("P"), b"\x00SELECT 1\x00\x00\x02\x00\x00\x00\x17", "malformed Parse"),
])
def test_malformed_frontend(kind: int, payload: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        m.parse_frontend(kind, payload)


def test_data_row_with_a_column_past_the_payload() -> None:
    with pytest.raises(ProtocolError, match="column 2 has invalid length"):
        m.parse_data_row(b"\x00\x02\x00\x00\x00\x01a\x00\x00\x00\x05ab")


# --- the readers -----------------------------------------------------------------------------


async def test_read_message() -> None:
    reader = reader_of(m.query("SELECT 1") + m.sync() + m.execute("p", 3))
    assert await m.read_message(reader, 1024) == (ord("Q"), b"SELECT 1\x00")
    assert await m.read_message(reader, 1024) == (ord("S"), b"")
    kind, payload = await m.read_message(reader, 1024)
    assert m.parse_frontend(kind, payload) == m.Execute("p", 3)
    with pytest.raises(EOFError):
        await m.read_message(reader, 1024)


async def test_read_message_in_pieces() -> None:
    reader = reader_of(b"", eof=False)
    task = asyncio.ensure_future(m.read_message(reader, 1024))
    for byte in m.query("SELECT 1"):
        reader.feed_data(bytes([byte]))
        await asyncio.sleep(0)
    assert await task == (ord("Q"), b"SELECT 1\x00")


@pytest.mark.parametrize(("data", "error", "match"), [
    (b"Q", ProtocolError, "truncated message header"),
    (b"Q\x00\x00", ProtocolError, "truncated message header"),
    (b"Q\x00\x00\x00\x0dSELECT", ProtocolError, "truncated message 'Q': 6 of 9 bytes"),
    (b"Q\x00\x00\x00\x03", ProtocolError, "invalid message length 3"),
    (b"Q\x00\x00\x04\x01" + b"x" * 1021, ProtocolError, "1025 bytes is over the limit of 1024"),
    (b"Q\xff\xff\xff\xff", ProtocolError, "over the limit"),
])
async def test_read_message_errors(data: bytes, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match) as info:
        await m.read_message(reader_of(data), 1024)
    assert isinstance(info.value, ProtocolError) and info.value.sqlstate == "08P01"


async def test_read_message_at_the_limit() -> None:
    message = m.query("x" * (1024 - 5))  # length word: 4 + 1019 + NUL = 1024
    assert len(message) == 1025  # the length word counts itself, not the type byte
    assert await m.read_message(reader_of(message), 1024) == (ord("Q"), message[5:])


async def test_read_startup() -> None:
    params = {"user": "alice", "database": "appdb", "options": "-c search_path=x",
              "application_name": "psql", "client_encoding": "UTF8"}
    packet = await m.read_startup(reader_of(m.startup(params)), 10_000)
    assert packet == m.Startup(params, m.PROTOCOL_V3)
    assert isinstance(packet, m.Startup)
    assert (packet.user, packet.database, packet.minor) == ("alice", "appdb", 0)
    assert m.Startup({"user": "bob"}).database == "bob"
    assert await m.read_startup(reader_of(m.ssl_request()), 10_000) == m.SSLRequest()
    assert await m.read_startup(reader_of(m.gssenc_request()), 10_000) == m.GSSENCRequest()
    assert await m.read_startup(reader_of(m.cancel_request(42, 2**32 - 1)), 10_000) == m.CancelRequest(
        42, 2**32 - 1
    )
    # Protocol 3.2 (libpq 18): parsed; the server answers NegotiateProtocolVersion.
    newer = await m.read_startup(reader_of(m.startup({"user": "u"}, protocol=3 << 16 | 2)), 10_000)
    assert isinstance(newer, m.Startup) and newer.minor == 2
    # After an SSLRequest refused, the same connection sends its startup packet.
    reader = reader_of(m.ssl_request() + m.startup({"user": "u"}))
    assert await m.read_startup(reader, 100) == m.SSLRequest()
    assert await m.read_startup(reader, 100) == m.Startup({"user": "u"})


def startup_packet(body: bytes) -> bytes:
    return struct.pack("!I", len(body) + 4) + body


V3 = struct.pack("!I", m.PROTOCOL_V3)


@pytest.mark.parametrize(("data", "match"), [
    (b"\x00\x00", "truncated startup packet length"),
    (b"\x00\x00\x00\x07abc", "invalid length of startup packet: 7"),
    (b"\x00\x00\x27\x11" + b"\x00" * 10_000, "10001 bytes is over the limit of 10000"),
    (b"\x00\x00\x00\x10\x00\x03\x00\x00", "truncated startup packet: 4 of 12"),
    (startup_packet(struct.pack("!I", 2 << 16)), "unsupported frontend protocol 2.0"),
    (startup_packet(struct.pack("!I", 1234)), "unsupported frontend protocol"),
    (startup_packet(V3), "not terminated by NUL"),
    (startup_packet(V3 + b"user\x00u"), "not terminated by NUL"),
    (startup_packet(V3 + b"user\x00u\x00"), "not terminated by NUL"),
    (startup_packet(V3 + b"user\x00\x00"), "has no value"),
    (startup_packet(V3 + b"\x00\x00"), "empty startup parameter name"),
    (startup_packet(V3 + b"user\x00a\x00user\x00b\x00\x00"), "given twice"),
    (startup_packet(V3 + b"user\x00\xff\x00\x00"), "UTF-8"),
    (startup_packet(struct.pack("!II", m.SSL_REQUEST, 0)), "encryption request"),
    (startup_packet(struct.pack("!II", m.CANCEL_REQUEST, 1)), "cancel request"),
])
async def test_read_startup_errors(data: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        await m.read_startup(reader_of(data), 10_000)


async def test_read_startup_clean_eof() -> None:
    with pytest.raises(EOFError):
        await m.read_startup(reader_of(b""), 10_000)


@settings(max_examples=200)
@given(st.binary(max_size=80))
def test_garbage_startup_is_a_protocol_error(data: bytes) -> None:
    async def read() -> None:
        try:
            await m.read_startup(reader_of(data), 10_000)
        except (ProtocolError, EOFError):
            pass

    asyncio.run(read())
