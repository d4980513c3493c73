"""The statement fingerprint: values and layout fold away, structure and parameters do not."""

from __future__ import annotations

from app.facts import _fingerprint


def test_literals_case_spacing_and_comments_fold():
    assert _fingerprint("SELECT id FROM customers WHERE id = 5") == _fingerprint(
        "select  id\nfrom customers -- who\nwhere id = 7"
    )
    assert _fingerprint("SELECT 'a'") == _fingerprint("SELECT 'b'")


def test_parameters_and_structure_do_not():
    assert _fingerprint("SELECT $1, $2") != _fingerprint("SELECT $2, $1")
    assert _fingerprint("SELECT id FROM customers") != _fingerprint("SELECT id FROM orders")
    assert _fingerprint('SELECT "Id" FROM t') != _fingerprint('SELECT "id" FROM t')
