"""The PostgreSQL v3 protocol codec, both directions, as pure functions over bytes.

Front end (clients → gateway): ``read_startup`` and ``read_message`` frame what a client
sends, ``parse_frontend`` turns a message into a frozen dataclass, and the backend encoders
(``ready_for_query``, ``row_description``, ``data_row``, ``error_response`` …) build the
answers. Backend (gateway → PostgreSQL): the frontend encoders (``startup``, ``parse``,
``bind``, ``execute``, ``sync`` …) and the backend parsers (``parse_row_description``,
``parse_error_fields`` …). A DataRow being relayed is never parsed: ``parse_data_row`` is for
the rows a mask must rewrite.

Errors::

    ProtocolError       sqlstate 08P01 (protocol_violation) by default
                        malformed input of any kind: a length below the minimum, a body
                        shorter or longer than its length says, a string without its NUL
                        terminator, invalid UTF-8, a count that runs past the payload, an
                        unknown message type or startup code, a bad Describe/Close kind;
                        and a length over the caller's limit, also 08P01 with the limit in
                        the message, as PostgreSQL itself answers an over-long message
                        ("invalid message length", 08P01), not 54000
    EOFError            ``read_message``/``read_startup``: the peer closed cleanly before the
                        first byte of a message (not an error of the protocol)

The parsers never let ``IndexError``, ``struct.error`` or ``UnicodeDecodeError`` out: each
public parser translates them at its boundary. Encoders raise ``ValueError`` for a string
that would corrupt the framing (a NUL inside an identifier or a tag); error and notice
fields drop NULs instead, so an error can always be sent.

Lengths: the limit given to ``read_message``/``read_startup`` bounds the length word as sent,
which counts its own four bytes (PostgreSQL's own limits are 1 GiB for a message and 10,000
bytes for a startup packet). Strings are UTF-8 (the gateway's client_encoding).
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias

PROTOCOL_V3: Final = 196608  # 3 << 16 | 0
SSL_REQUEST: Final = 80877103
GSSENC_REQUEST: Final = 80877104
CANCEL_REQUEST: Final = 80877102

PROTOCOL_VIOLATION: Final = "08P01"
MAX_MESSAGE_LEN: Final = 1 << 30  # PostgreSQL's PQ_LARGE_MESSAGE_LIMIT
MAX_STARTUP_LEN: Final = 10_000  # PostgreSQL's MAX_STARTUP_PACKET_LENGTH

# The one-byte answers to an SSLRequest or GSSENCRequest.
ENCRYPTION_REFUSED: Final = b"N"
ENCRYPTION_ACCEPTED: Final = b"S"

_I16 = struct.Struct("!h")
_U16 = struct.Struct("!H")
_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_II = struct.Struct("!II")
_IIII = struct.Struct("!IIII")
_FIELD = struct.Struct("!IhIhih")  # table oid, attnum, type oid, typlen, typmod, format

_i32 = _I32.pack
_u16 = _U16.pack
_NULL: Final = _i32(-1)


class ProtocolError(Exception):
    """Malformed or over-limit protocol input; ``sqlstate`` is what to answer it with."""

    def __init__(self, message: str, sqlstate: str = PROTOCOL_VIOLATION) -> None:
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate


# --- framing --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Startup:
    """A StartupMessage: protocol 3.x and its parameters (user, database, options, …)."""

    params: dict[str, str]
    protocol: int = PROTOCOL_V3

    @property
    def user(self) -> str | None:
        return self.params.get("user")

    @property
    def database(self) -> str | None:
        """The database asked for; PostgreSQL's default is the user's name."""
        return self.params.get("database") or self.params.get("user")

    @property
    def minor(self) -> int:
        return self.protocol & 0xFFFF


@dataclass(frozen=True, slots=True)
class SSLRequest:
    """The client asks for TLS before its startup message."""


@dataclass(frozen=True, slots=True)
class GSSENCRequest:
    """The client asks for GSSAPI encryption before its startup message."""


@dataclass(frozen=True, slots=True)
class CancelRequest:
    """A request, on a new connection, to cancel what backend ``pid`` is running."""

    pid: int
    secret: int


StartupPacket: TypeAlias = Startup | SSLRequest | GSSENCRequest | CancelRequest


async def _read_exactly(reader: asyncio.StreamReader, n: int, what: str) -> bytes:
    try:
        return await reader.readexactly(n)
    except asyncio.IncompleteReadError as exc:
        raise ProtocolError(f"truncated {what}: {len(exc.partial)} of {n} bytes") from None


async def read_startup(reader: asyncio.StreamReader, max_len: int = MAX_STARTUP_LEN) -> StartupPacket:
    """The first packet of a connection (no type byte): startup, SSL, GSSENC or cancel."""
    try:
        head = await reader.readexactly(4)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            raise EOFError("the client closed the connection before its startup packet") from None
        raise ProtocolError("truncated startup packet length") from None
    (length,) = _U32.unpack(head)
    if length < 8:
        raise ProtocolError(f"invalid length of startup packet: {length}")
    if length > max_len:
        raise ProtocolError(f"startup packet of {length} bytes is over the limit of {max_len}")
    body = await _read_exactly(reader, length - 4, "startup packet")
    return parse_startup(body)


def parse_startup(body: bytes) -> StartupPacket:
    """A startup packet's body: the code (or protocol version) and what follows it."""
    if len(body) < 4:
        raise ProtocolError("startup packet too short")
    (code,) = _U32.unpack_from(body)
    if code in (SSL_REQUEST, GSSENC_REQUEST):
        if len(body) != 4:
            raise ProtocolError("invalid length of encryption request")
        return SSLRequest() if code == SSL_REQUEST else GSSENCRequest()
    if code == CANCEL_REQUEST:
        if len(body) != 12:
            # Protocol 3.2 allows longer secrets; the gateway speaks 3.0 and issues 4 bytes.
            raise ProtocolError("invalid length of cancel request")
        pid, secret = _II.unpack_from(body, 4)
        return CancelRequest(pid, secret)
    if code >> 16 != 3:
        raise ProtocolError(
            f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}: server supports 3.0",
        )
    return Startup(_startup_params(body), code)


def _startup_params(body: bytes) -> dict[str, str]:
    # name NUL value NUL … NUL: the final NUL must be the last byte.
    if len(body) < 5 or body[-1] != 0:
        raise ProtocolError("startup packet is not terminated by NUL")
    params: dict[str, str] = {}
    # The strings lie before the terminator: a NUL found at ``end`` ends a string, not the list.
    pos, end = 4, len(body) - 1
    while pos < end:
        name, pos = _cstring(body, pos, "startup parameter name")
        if not name:
            raise ProtocolError("empty startup parameter name")
        if pos >= end:
            raise ProtocolError(f"startup parameter {name!r} has no value")
        value, pos = _cstring(body, pos, "startup parameter value")
        if pos > end:
            raise ProtocolError("startup packet is not terminated by NUL")
        if name in params:
            raise ProtocolError(f"startup parameter {name!r} given twice")
        params[name] = value
    return params


async def read_message(reader: asyncio.StreamReader, max_len: int = MAX_MESSAGE_LEN) -> tuple[int, bytes]:
    """The next typed message: its type byte (an int) and its payload, without the length."""
    try:
        header = await reader.readexactly(5)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            raise EOFError("the peer closed the connection") from None
        raise ProtocolError("truncated message header") from None
    (length,) = _U32.unpack_from(header, 1)
    if length < 4:
        raise ProtocolError(f"invalid message length {length}")
    if length > max_len:
        raise ProtocolError(f"message of {length} bytes is over the limit of {max_len}")
    if length == 4:
        return header[0], b""
    payload = await _read_exactly(reader, length - 4, f"message {chr(header[0])!r}")
    return header[0], payload


# --- helpers ---------------------------------------------------------------------------------


def _cstring(buf: bytes, pos: int, what: str) -> tuple[str, int]:
    end = buf.find(b"\0", pos)
    if end < 0:
        raise ProtocolError(f"{what} is not terminated by NUL")
    try:
        return buf[pos:end].decode(), end + 1
    except UnicodeDecodeError:
        raise ProtocolError(f"{what} is not valid UTF-8") from None


def _only_cstring(payload: bytes, what: str) -> str:
    text, pos = _cstring(payload, 0, what)
    if pos != len(payload):
        raise ProtocolError(f"{what}: bytes after the string")
    return text


def _cstr(text: str) -> bytes:
    data = text.encode()
    if b"\0" in data:
        raise ValueError("a protocol string may not contain NUL")
    return data + b"\0"


def _msg(kind: bytes, body: bytes) -> bytes:
    return kind + _i32(len(body) + 4) + body


def _end(payload: bytes, pos: int, what: str) -> None:
    if pos != len(payload):
        raise ProtocolError(f"{what} message has {len(payload) - pos} bytes too many")


def _malformed(what: str, exc: Exception) -> ProtocolError:
    return ProtocolError(f"malformed {what} message ({type(exc).__name__})")


# --- frontend messages (parsed by the front end) -------------------------------------------

Kind = Literal["S", "P"]


@dataclass(frozen=True, slots=True)
class Query:
    sql: str


@dataclass(frozen=True, slots=True)
class Parse:
    name: str
    sql: str
    param_oids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Bind:
    portal: str
    statement: str
    param_formats: tuple[int, ...]
    params: tuple[bytes | None, ...]
    result_formats: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Describe:
    kind: Kind
    name: str


@dataclass(frozen=True, slots=True)
class Execute:
    portal: str
    max_rows: int  # 0 (or negative): all rows


@dataclass(frozen=True, slots=True)
class Close:
    kind: Kind
    name: str


@dataclass(frozen=True, slots=True)
class Sync:
    pass


@dataclass(frozen=True, slots=True)
class Flush:
    pass


@dataclass(frozen=True, slots=True)
class Terminate:
    pass


@dataclass(frozen=True, slots=True)
class PasswordMessage:
    """A 'p' message: what it holds depends on the authentication asked for.

    ``password`` is the raw payload; ``cleartext()`` reads a PasswordMessage proper (cleartext
    or ``md5…``), ``parse_sasl_initial_response`` a SASLInitialResponse, and a SASLResponse
    is the payload itself.
    """

    password: bytes

    def cleartext(self) -> str:
        return _only_cstring(self.password, "password")


@dataclass(frozen=True, slots=True)
class CopyData:
    data: bytes


@dataclass(frozen=True, slots=True)
class CopyDone:
    pass


@dataclass(frozen=True, slots=True)
class CopyFail:
    message: str


FrontendMessage: TypeAlias = (
    Query | Parse | Bind | Describe | Execute | Close | Sync | Flush | Terminate
    | PasswordMessage | CopyData | CopyDone | CopyFail
)

_SYNC, _FLUSH, _TERMINATE, _COPY_DONE = Sync(), Flush(), Terminate(), CopyDone()


def _parse_query(p: bytes) -> Query:
    return Query(_only_cstring(p, "query string"))


def _parse_parse(p: bytes) -> Parse:
    name, pos = _cstring(p, 0, "statement name")
    sql, pos = _cstring(p, pos, "query string")
    (count,) = _U16.unpack_from(p, pos)
    oids = struct.unpack_from(f"!{count}I", p, pos + 2)
    _end(p, pos + 2 + 4 * count, "Parse")
    return Parse(name, sql, oids)


def _parse_bind(p: bytes) -> Bind:
    portal, pos = _cstring(p, 0, "portal name")
    statement, pos = _cstring(p, pos, "statement name")
    (nformats,) = _U16.unpack_from(p, pos)
    formats = struct.unpack_from(f"!{nformats}h", p, pos + 2)
    pos += 2 + 2 * nformats
    (nparams,) = _U16.unpack_from(p, pos)
    pos += 2
    if nformats not in (0, 1, nparams):
        raise ProtocolError(f"bind message has {nformats} parameter formats but {nparams} parameters")
    size = len(p)
    params: list[bytes | None] = []
    for i in range(nparams):
        (length,) = _I32.unpack_from(p, pos)
        pos += 4
        if length == -1:
            params.append(None)
            continue
        end = pos + length
        if length < 0 or end > size:
            raise ProtocolError(f"bind message parameter {i + 1} has invalid length {length}")
        params.append(p[pos:end])
        pos = end
    (nresults,) = _U16.unpack_from(p, pos)
    results = struct.unpack_from(f"!{nresults}h", p, pos + 2)
    _end(p, pos + 2 + 2 * nresults, "Bind")
    return Bind(portal, statement, formats, tuple(params), results)


def _kind_and_name(p: bytes, what: str) -> tuple[Kind, str]:
    kind = p[:1]
    if kind == b"S":
        return "S", _only_cstring(p[1:], f"{what} name")
    if kind == b"P":
        return "P", _only_cstring(p[1:], f"{what} name")
    raise ProtocolError(f"invalid {what} message subtype {kind!r}")


def _parse_describe(p: bytes) -> Describe:
    return Describe(*_kind_and_name(p, "Describe"))


def _parse_close(p: bytes) -> Close:
    return Close(*_kind_and_name(p, "Close"))


def _parse_execute(p: bytes) -> Execute:
    portal, pos = _cstring(p, 0, "portal name")
    (max_rows,) = _I32.unpack_from(p, pos)
    _end(p, pos + 4, "Execute")
    return Execute(portal, max_rows)


def _empty(message: Sync | Flush | Terminate | CopyDone, what: str) -> Callable[[bytes], FrontendMessage]:
    def parse(p: bytes) -> FrontendMessage:
        _end(p, 0, what)
        return message

    return parse


_FRONTEND: dict[int, tuple[str, Callable[[bytes], FrontendMessage]]] = {
    ord("Q"): ("Query", _parse_query),
    ord("P"): ("Parse", _parse_parse),
    ord("B"): ("Bind", _parse_bind),
    ord("D"): ("Describe", _parse_describe),
    ord("E"): ("Execute", _parse_execute),
    ord("C"): ("Close", _parse_close),
    ord("S"): ("Sync", _empty(_SYNC, "Sync")),
    ord("H"): ("Flush", _empty(_FLUSH, "Flush")),
    ord("X"): ("Terminate", _empty(_TERMINATE, "Terminate")),
    ord("p"): ("PasswordMessage", PasswordMessage),
    ord("d"): ("CopyData", CopyData),
    ord("c"): ("CopyDone", _empty(_COPY_DONE, "CopyDone")),
    ord("f"): ("CopyFail", lambda p: CopyFail(_only_cstring(p, "CopyFail message"))),
}


def parse_frontend(type_byte: int, payload: bytes) -> FrontendMessage:
    """One frontend message (after startup) as its dataclass; anything else is a ProtocolError."""
    entry = _FRONTEND.get(type_byte)
    if entry is None:
        shown = chr(type_byte) if 32 < type_byte < 127 else f"0x{type_byte:02x}"
        raise ProtocolError(f"invalid frontend message type {shown!r}")
    what, parse = entry
    try:
        return parse(payload)
    except (struct.error, ValueError, IndexError) as exc:
        raise _malformed(what, exc) from None


def parse_sasl_initial_response(payload: bytes) -> tuple[str, bytes | None]:
    """A SASLInitialResponse ('p'): the mechanism chosen and its initial data (None: absent)."""
    try:
        mechanism, pos = _cstring(payload, 0, "SASL mechanism")
        (length,) = _I32.unpack_from(payload, pos)
        pos += 4
        if length == -1:
            _end(payload, pos, "SASLInitialResponse")
            return mechanism, None
        if length < 0:
            raise ProtocolError(f"invalid SASL data length {length}")
        _end(payload, pos + length, "SASLInitialResponse")
        return mechanism, payload[pos:]
    except (struct.error, ValueError, IndexError) as exc:
        raise _malformed("SASLInitialResponse", exc) from None


# --- backend messages (encoded by the front end) --------------------------------------------


@dataclass(frozen=True, slots=True)
class Field:
    """One column of a RowDescription."""

    name: str
    table_oid: int = 0
    column_attr: int = 0
    type_oid: int = 25  # text
    type_size: int = -1
    type_mod: int = -1
    format: int = 0  # 0 text, 1 binary


AUTHENTICATION_OK: Final = b"R\x00\x00\x00\x08\x00\x00\x00\x00"
PARSE_COMPLETE: Final = b"1\x00\x00\x00\x04"
BIND_COMPLETE: Final = b"2\x00\x00\x00\x04"
CLOSE_COMPLETE: Final = b"3\x00\x00\x00\x04"
NO_DATA: Final = b"n\x00\x00\x00\x04"
PORTAL_SUSPENDED: Final = b"s\x00\x00\x00\x04"
EMPTY_QUERY_RESPONSE: Final = b"I\x00\x00\x00\x04"
_READY: Final = {status: b"Z\x00\x00\x00\x05" + status for status in (b"I", b"T", b"E")}


def authentication_ok() -> bytes:
    return AUTHENTICATION_OK


def authentication_cleartext_password() -> bytes:
    return _msg(b"R", _i32(3))


def authentication_md5_password(salt: bytes) -> bytes:
    if len(salt) != 4:
        raise ValueError("an MD5 salt is 4 bytes")
    return _msg(b"R", _i32(5) + salt)


def authentication_sasl(mechanisms: Iterable[str]) -> bytes:
    return _msg(b"R", _i32(10) + b"".join(_cstr(m) for m in mechanisms) + b"\0")


def authentication_sasl_continue(data: bytes) -> bytes:
    return _msg(b"R", _i32(11) + data)


def authentication_sasl_final(data: bytes) -> bytes:
    return _msg(b"R", _i32(12) + data)


def parameter_status(name: str, value: str) -> bytes:
    return _msg(b"S", _cstr(name) + _cstr(value))


def backend_key_data(pid: int, secret: int) -> bytes:
    return _msg(b"K", _II.pack(pid, secret))


def ready_for_query(status: bytes) -> bytes:
    """ReadyForQuery: b'I' idle, b'T' in a transaction, b'E' in a failed transaction."""
    try:
        return _READY[status]
    except KeyError:
        raise ValueError(f"invalid transaction status {status!r}") from None


def row_description(fields: Sequence[Field]) -> bytes:
    pack = _FIELD.pack
    body = b"".join(
        [_u16(len(fields))]
        + [
            _cstr(f.name) + pack(f.table_oid, f.column_attr, f.type_oid, f.type_size, f.type_mod, f.format)
            for f in fields
        ]
    )
    return _msg(b"T", body)


def data_row(values: Sequence[bytes | None]) -> bytes:
    """A DataRow of values already encoded in their column's format (None: NULL)."""
    # The hot path of a masked result: one list, one join, no intermediate bodies.
    parts: list[bytes] = [b"", _u16(len(values))]
    append = parts.append
    size = 6
    for value in values:
        if value is None:
            append(_NULL)
            size += 4
        else:
            n = len(value)
            append(_i32(n))
            append(value)
            size += 4 + n
    parts[0] = b"D" + _i32(size)
    return b"".join(parts)


def command_complete(tag: str) -> bytes:
    return _msg(b"C", _cstr(tag))


def empty_query_response() -> bytes:
    return EMPTY_QUERY_RESPONSE


def parse_complete() -> bytes:
    return PARSE_COMPLETE


def bind_complete() -> bytes:
    return BIND_COMPLETE


def close_complete() -> bytes:
    return CLOSE_COMPLETE


def no_data() -> bytes:
    return NO_DATA


def portal_suspended() -> bytes:
    return PORTAL_SUSPENDED


def parameter_description(oids: Sequence[int]) -> bytes:
    return _msg(b"t", _u16(len(oids)) + struct.pack(f"!{len(oids)}I", *oids))


def _fields_body(fields: Mapping[str, str]) -> bytes:
    parts = []
    for code, value in fields.items():
        if len(code) != 1 or not code.isascii() or code == "\0":
            raise ValueError(f"invalid error field code {code!r}")
        # An error must always be sendable: a NUL would end the field early, so it goes.
        parts.append(code.encode() + value.encode(errors="replace").replace(b"\0", b"") + b"\0")
    parts.append(b"\0")
    return b"".join(parts)


def error_response(fields: Mapping[str, str]) -> bytes:
    """An ErrorResponse of ``{field code: value}`` (S, V, C, M, D, H, P, …; see error_fields)."""
    return _msg(b"E", _fields_body(fields))


def notice_response(fields: Mapping[str, str]) -> bytes:
    return _msg(b"N", _fields_body(fields))


def error_fields(
    severity: str,
    sqlstate: str,
    message: str,
    detail: str | None = None,
    hint: str | None = None,
    position: int | None = None,
) -> dict[str, str]:
    """The fields of an ErrorResponse or NoticeResponse (severity ERROR, FATAL, WARNING, …)."""
    fields = {"S": severity, "V": severity, "C": sqlstate, "M": message}
    if detail is not None:
        fields["D"] = detail
    if hint is not None:
        fields["H"] = hint
    if position is not None:
        fields["P"] = str(position)
    return fields


def negotiate_protocol_version(newest_minor: int, unrecognized: Sequence[str] = ()) -> bytes:
    """The newest 3.x minor version the server supports, and the ``_pq_.`` options it does not."""
    return _msg(
        b"v", _i32(newest_minor) + _i32(len(unrecognized)) + b"".join(_cstr(o) for o in unrecognized)
    )


# --- frontend messages (encoded by the backend client) --------------------------------------

SYNC: Final = b"S\x00\x00\x00\x04"
FLUSH: Final = b"H\x00\x00\x00\x04"
TERMINATE: Final = b"X\x00\x00\x00\x04"


def startup(params: Mapping[str, str], protocol: int = PROTOCOL_V3) -> bytes:
    body = _i32(protocol) + b"".join(_cstr(k) + _cstr(v) for k, v in params.items()) + b"\0"
    return _i32(len(body) + 4) + body


def ssl_request() -> bytes:
    return _II.pack(8, SSL_REQUEST)


def gssenc_request() -> bytes:
    return _II.pack(8, GSSENC_REQUEST)


def cancel_request(pid: int, secret: int) -> bytes:
    return _IIII.pack(16, CANCEL_REQUEST, pid, secret)


def password(secret: bytes | str) -> bytes:
    """A PasswordMessage (cleartext, or ``md5…`` hex): the string and its NUL terminator."""
    data = secret.encode() if isinstance(secret, str) else secret
    if b"\0" in data:
        raise ValueError("a password may not contain NUL")
    return _msg(b"p", data + b"\0")


def sasl_initial_response(mechanism: str, data: bytes | None) -> bytes:
    tail = _NULL if data is None else _i32(len(data)) + data
    return _msg(b"p", _cstr(mechanism) + tail)


def sasl_response(data: bytes) -> bytes:
    return _msg(b"p", data)


def query(sql: str) -> bytes:
    return _msg(b"Q", _cstr(sql))


def parse(name: str, sql: str, oids: Sequence[int] = ()) -> bytes:
    return _msg(b"P", _cstr(name) + _cstr(sql) + _u16(len(oids)) + struct.pack(f"!{len(oids)}I", *oids))


def bind(
    portal: str,
    stmt: str,
    param_formats: Sequence[int] = (),
    params: Sequence[bytes | None] = (),
    result_formats: Sequence[int] = (),
) -> bytes:
    parts = [
        _cstr(portal),
        _cstr(stmt),
        _u16(len(param_formats)),
        struct.pack(f"!{len(param_formats)}h", *param_formats),
        _u16(len(params)),
    ]
    append = parts.append
    for value in params:
        if value is None:
            append(_NULL)
        else:
            append(_i32(len(value)))
            append(value)
    append(_u16(len(result_formats)))
    append(struct.pack(f"!{len(result_formats)}h", *result_formats))
    return _msg(b"B", b"".join(parts))


def describe(kind: Kind, name: str) -> bytes:
    if kind not in ("S", "P"):
        raise ValueError(f"invalid Describe kind {kind!r}")
    return _msg(b"D", kind.encode() + _cstr(name))


def execute(portal: str = "", max_rows: int = 0) -> bytes:
    return _msg(b"E", _cstr(portal) + _i32(max_rows))


def close(kind: Kind, name: str) -> bytes:
    if kind not in ("S", "P"):
        raise ValueError(f"invalid Close kind {kind!r}")
    return _msg(b"C", kind.encode() + _cstr(name))


def sync() -> bytes:
    return SYNC


def flush() -> bytes:
    return FLUSH


def terminate() -> bytes:
    return TERMINATE


def copy_data(data: bytes) -> bytes:
    return _msg(b"d", data)


def copy_done() -> bytes:
    return b"c\x00\x00\x00\x04"


def copy_fail(message: str) -> bytes:
    return _msg(b"f", _cstr(message))


# --- backend messages (parsed by the backend client) ----------------------------------------


def parse_row_description(payload: bytes) -> tuple[Field, ...]:
    try:
        (count,) = _U16.unpack_from(payload, 0)
        pos = 2
        fields = []
        unpack = _FIELD.unpack_from
        for _ in range(count):
            name, pos = _cstring(payload, pos, "column name")
            fields.append(Field(name, *unpack(payload, pos)))
            pos += _FIELD.size
        _end(payload, pos, "RowDescription")
        return tuple(fields)
    except (struct.error, ValueError, IndexError) as exc:
        raise _malformed("RowDescription", exc) from None


def parse_data_row(payload: bytes) -> list[bytes | None]:
    """The values of a DataRow, for a row that must be inspected (relaying never needs it)."""
    try:
        (count,) = _U16.unpack_from(payload, 0)
        pos, size = 2, len(payload)
        unpack = _I32.unpack_from
        values: list[bytes | None] = []
        append = values.append
        for i in range(count):
            (length,) = unpack(payload, pos)
            pos += 4
            if length == -1:
                append(None)
                continue
            end = pos + length
            if length < 0 or end > size:
                raise ProtocolError(f"DataRow column {i + 1} has invalid length {length}")
            append(payload[pos:end])
            pos = end
        _end(payload, pos, "DataRow")
        return values
    except (struct.error, ValueError, IndexError) as exc:
        raise _malformed("DataRow", exc) from None


def parse_error_fields(payload: bytes) -> dict[str, str]:
    """An ErrorResponse's or NoticeResponse's fields, ``{code: value}``."""
    fields: dict[str, str] = {}
    pos, size = 0, len(payload)
    while True:
        if pos >= size:
            raise ProtocolError("error fields are not terminated by NUL")
        code = payload[pos]
        if code == 0:
            _end(payload, pos + 1, "ErrorResponse")
            return fields
        end = payload.find(b"\0", pos + 1)
        if end < 0:
            raise ProtocolError("error field is not terminated by NUL")
        # Decoded leniently: a server message in another encoding must still reach the caller.
        fields[chr(code)] = payload[pos + 1 : end].decode(errors="replace")
        pos = end + 1


def parse_command_complete(payload: bytes) -> str:
    return _only_cstring(payload, "command tag")


def parse_parameter_description(payload: bytes) -> tuple[int, ...]:
    try:
        (count,) = _U16.unpack_from(payload, 0)
        _end(payload, 2 + 4 * count, "ParameterDescription")
        return struct.unpack_from(f"!{count}I", payload, 2)
    except (struct.error, ValueError, IndexError) as exc:
        raise _malformed("ParameterDescription", exc) from None


def parse_authentication(payload: bytes) -> tuple[int, bytes]:
    """An Authentication message: its code (0 ok, 3 cleartext, 5 MD5, 10/11/12 SASL) and data."""
    if len(payload) < 4:
        raise ProtocolError("malformed Authentication message")
    (code,) = _I32.unpack_from(payload, 0)
    return code, payload[4:]


def parse_sasl_mechanisms(data: bytes) -> list[str]:
    """The mechanisms of an AuthenticationSASL's data (after the code)."""
    mechanisms: list[str] = []
    pos = 0
    while True:
        if pos >= len(data):
            raise ProtocolError("SASL mechanism list is not terminated by NUL")
        if data[pos] == 0:
            _end(data, pos + 1, "AuthenticationSASL")
            return mechanisms
        name, pos = _cstring(data, pos, "SASL mechanism")
        mechanisms.append(name)


def parse_backend_key_data(payload: bytes) -> tuple[int, int]:
    """BackendKeyData of protocol 3.0: (pid, secret)."""
    if len(payload) != 8:
        raise ProtocolError("malformed BackendKeyData message")
    pid, secret = _II.unpack(payload)
    return pid, secret


def parse_parameter_status(payload: bytes) -> tuple[str, str]:
    name, pos = _cstring(payload, 0, "parameter name")
    value, pos = _cstring(payload, pos, "parameter value")
    _end(payload, pos, "ParameterStatus")
    return name, value


def parse_ready_for_query(payload: bytes) -> bytes:
    if len(payload) != 1 or payload not in _READY:
        raise ProtocolError(f"malformed ReadyForQuery message {payload!r}")
    return payload


def parse_negotiate_protocol_version(payload: bytes) -> tuple[int, list[str]]:
    """NegotiateProtocolVersion: the newest minor version and the options not recognised."""
    try:
        minor, count = _II.unpack_from(payload, 0)
        pos = 8
        options = []
        for _ in range(count):
            option, pos = _cstring(payload, pos, "protocol option")
            options.append(option)
        _end(payload, pos, "NegotiateProtocolVersion")
        return minor, options
    except (struct.error, ValueError, IndexError) as exc:
        raise _malformed("NegotiateProtocolVersion", exc) from None
