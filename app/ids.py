"""Ids of requests, audit events and decisions: random version-4 UUIDs, drawn fast.

``uuid.uuid4()`` reads the kernel's random source on every call, a system call that
releases the GIL, and under load the request path then waits to take it back from the
audit writer's thread: about 3% of the gateway's CPU per query (make bench,
docs/benchmarks.md). These ids need to be unique, not secret (they are in answers and in
the audit trail), so they come from ``random``'s generator, which Python seeds from the
kernel at start-up and again in every forked child. Anything that must be unguessable
(approval ids, chain ids, keys) keeps using ``secrets``/``uuid.uuid4()``.
"""

from __future__ import annotations

import random

_VERSION_4 = (4 << 76) | (2 << 62)  # version nibble 4, RFC 4122 variant bits 10
_CLEAR = ~((0xF << 76) | (0x3 << 62)) & ((1 << 128) - 1)


def new_id() -> str:
    """A random UUID (version 4), as its canonical 36-character string."""
    h = "%032x" % ((random.getrandbits(128) & _CLEAR) | _VERSION_4)
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
