"""Ids of requests, audit events and decisions: random version-4 UUIDs, drawn fast.

``uuid.uuid4()`` reads the kernel's random source on every call, a system call that
releases the GIL, and under load the request path then waits to take it back from the
audit writer's thread: about 3% of the gateway's CPU per query (make bench,
docs/benchmarks.md). These ids need to be unique, not secret (they are in answers and in
the audit trail), so they come from a generator of ``random``'s, seeded from the kernel at
import and again in every forked child. It is the module's own, not the shared one: other
code's use of ``random`` (Hypothesis checks that its strategies leave it untouched) must
not see ours. Anything that must be unguessable (approval ids, chain ids, keys) keeps
using ``secrets``/``uuid.uuid4()``: these ids are predictable from enough of them.
"""

from __future__ import annotations

import os
import random

_RANDOM = random.Random()  # noqa: S311 - ids, not secrets
os.register_at_fork(after_in_child=_RANDOM.seed)

_VERSION_4 = (4 << 76) | (2 << 62)  # version nibble 4, RFC 4122 variant bits 10
_CLEAR = ~((0xF << 76) | (0x3 << 62)) & ((1 << 128) - 1)


def new_id() -> str:
    """A random UUID (version 4), as its canonical 36-character string."""
    h = "%032x" % ((_RANDOM.getrandbits(128) & _CLEAR) | _VERSION_4)
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
