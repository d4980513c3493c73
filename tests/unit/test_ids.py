"""app/ids.py: random version-4 UUIDs."""

from __future__ import annotations

import os
import uuid

from app.ids import new_id


def test_ids_are_version_4_uuids_and_do_not_repeat():
    ids = [new_id() for _ in range(20_000)]
    assert len(set(ids)) == len(ids)
    for text in ids[:500]:
        parsed = uuid.UUID(text)
        assert str(parsed) == text and parsed.version == 4
        assert parsed.variant == uuid.RFC_4122


def test_a_forked_child_draws_other_ids():
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.write(write, new_id().encode())
        os._exit(0)
    os.close(write)
    mine = new_id()
    child = os.read(read, 64).decode()
    os.waitpid(pid, 0)
    os.close(read)
    assert child != mine and uuid.UUID(child).version == 4


def test_ids_leave_the_shared_random_generator_alone():
    import random

    state = random.getstate()
    for _ in range(100):
        new_id()
    assert random.getstate() == state
