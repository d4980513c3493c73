"""Masking: apply the decision's per-source-column strategies to every output by lineage.

The decision names *source* columns (``public.customers.email → email``); which outputs carry
them is the facts' lineage, never the output's name, so an alias, a cast or a subquery cannot
route a value around its mask:

- an output whose every masked source is passed through unchanged (``direct``) gets the
  source's strategy (different strategies on one output, e.g. a UNION of email and ssn, get
  the full mask);
- an output computed from a masked source (``expression``/``aggregate``) gets the full mask
  the policy chose (``derived_mask``: ``redact`` or ``null``), or the query is denied
  (``derived_mask: deny`` → 403 ``masked_derivation``);
- a masked source used in a predicate can leak by inference (``WHERE ssn LIKE '1%'``) and is
  denied (403 ``masked_column_predicate``) unless the decision lists it in
  ``masked_predicates_allowed``.

Types stay honest: a strategy that keeps the original type (``null``, and ``redact`` on
non-text columns, which becomes null) reports the original type; one that produces text
(``hash``, ``partial``, ``email``, ``pan``, ``redact`` on text) reports ``text``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from app.errors import Forbidden
from app.facts import QueryFacts
from app.policy import Decision
from app.results import Column

Masker = Callable[[Any], Any]

TEXT_TYPES = frozenset({"text", "varchar", "bpchar", "name", "citext", "char"})
_PARTIAL = re.compile(r"^partial(?::(\d{1,2}):(\d{1,2}))?$")


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    return str(value)


def make_masker(strategy: str, source_type: str, key: bytes, token: str) -> tuple[Masker, str]:
    """The function masking one value, and the type name the masked column reports."""
    is_text = source_type in TEXT_TYPES
    if strategy == "null" or (strategy == "redact" and not is_text):
        return (lambda _value: None), source_type
    if strategy == "redact":
        return (lambda value: None if value is None else token), source_type
    if strategy == "hash":
        def hashed(value: Any) -> Any:
            if value is None:
                return None
            return hmac.new(key, _text(value).encode(), hashlib.sha256).hexdigest()

        return hashed, "text"
    if strategy == "email":
        def email(value: Any) -> Any:
            if value is None:
                return None
            text = _text(value)
            local, at, domain = text.rpartition("@")
            if not at or not local:
                return token
            return f"{local[0]}***@{domain}"

        return email, "text"
    if strategy == "pan":
        def pan(value: Any) -> Any:
            if value is None:
                return None
            text = _text(value)
            # ASCII digits, as the database's querygate_mask.pan() counts them.
            digits = sum("0" <= ch <= "9" for ch in text)
            keep = 4 if digits >= 12 else 0  # too short to be a card: keep nothing
            out, seen = [], 0
            for ch in text:
                if "0" <= ch <= "9":
                    seen += 1
                    out.append(ch if seen > digits - keep else "*")
                else:
                    out.append(ch)
            return "".join(out)

        return pan, "text"
    match = _PARTIAL.match(strategy)
    if match:
        first = int(match.group(1) or 0)
        last = int(match.group(2) or 4)

        def partial(value: Any) -> Any:
            if value is None:
                return None
            text = _text(value)
            # Short values would be revealed whole: show no more than a third of them.
            if first + last >= len(text) or (first + last) * 3 > len(text) * 2:
                return "*" * len(text)
            return text[:first] + "*" * (len(text) - first - last) + text[len(text) - last:]

        return partial, "text"
    raise Forbidden("masking_unavailable", f"unknown masking strategy {strategy!r}")


@dataclass(frozen=True, slots=True)
class MaskPlan:
    """Per output column: the masker (or None) and the reported type."""

    maskers: tuple[tuple[int, Masker], ...]
    columns: tuple[Column, ...]
    masked: dict[str, str]

    def apply(self, row: Sequence[Any]) -> list[Any]:
        values = list(row)
        for index, masker in self.maskers:
            values[index] = masker(values[index])
        return values

    def apply_all(self, rows: Sequence[Sequence[Any]]) -> list[list[Any]]:
        if not self.maskers:
            return [list(r) for r in rows]
        return [self.apply(r) for r in rows]


def check_predicates(facts: QueryFacts, decision: Decision) -> None:
    """Deny masked columns in predicates unless the decision allows each one."""
    allowed = set(decision.masked_predicates_allowed)
    leaking = sorted(
        col for col in facts.columns_predicate if col in decision.masks and col not in allowed
    )
    if leaking:
        raise Forbidden(
            "masked_column_predicate",
            "masked columns may not be used to filter, join, group or sort rows: "
            + ", ".join(leaking),
            columns=leaking,
            decision_id=decision.id,
        )


def masked_here(facts: QueryFacts, decision: Decision, enforced: frozenset[str]) -> frozenset[int]:
    """The outputs ``plan`` masks in the gateway (those the database cannot: computed from
    a masked column, or masked by a strategy of the decision's own), by position; known
    before the server described the statement (the wire protocol asks for them in text)."""
    if not decision.masks or facts.introspection:
        return frozenset()
    here = set()
    for index, output in enumerate(facts.outputs):
        strategies = {decision.masks[s] for s in output.sources if s in decision.masks}
        if not strategies:
            continue
        if output.derivation == "direct" and len(strategies) == 1 and {
            src for src in output.sources if src in decision.masks
        } <= enforced:
            continue
        here.add(index)
    return frozenset(here)


def plan(
    facts: QueryFacts,
    decision: Decision,
    columns: Sequence[Column],
    key: bytes,
    token: str,
    enforced: frozenset[str] = frozenset(),
) -> MaskPlan:
    """Build the masking plan for this result; deny where the policy said so.

    ``enforced`` names the source columns the database already masks (the statement ran
    under a masking profile, app/profiles.py): an output passing one through unchanged
    is masked by PostgreSQL and only named here; masking it again would hash a hash. Outputs
    computed from masked columns still get the policy's full ``derived_mask`` on top.
    """
    maskers: list[tuple[int, Masker]] = []
    reported: list[Column] = []
    masked: dict[str, str] = {}
    if not decision.masks or facts.introspection:
        # A system catalog holds no column policy classifies (the values-bearing ones are
        # never read: app/introspection.py).
        return MaskPlan((), tuple(columns), {})
    # Columns and outputs have been cross-checked to agree in number and order.
    for index, (column, output) in enumerate(zip(columns, facts.outputs, strict=True)):
        strategies = {decision.masks[s] for s in output.sources if s in decision.masks}
        if not strategies:
            reported.append(column)
            continue
        if output.derivation == "direct" and len(strategies) == 1:
            strategy = strategies.pop()
            if {src for src in output.sources if src in decision.masks} <= enforced:
                reported.append(column)
                masked[column.name] = strategy
                continue
        elif decision.derived_mask == "deny":
            raise Forbidden(
                "masked_derivation",
                f"output {column.name!r} is computed from masked columns and policy "
                "denies such outputs",
                decision_id=decision.id,
            )
        else:
            strategy = decision.derived_mask
        masker, type_name = make_masker(strategy, column.type, key, token)
        maskers.append((index, masker))
        reported.append(Column(column.name, type_name))
        masked[column.name] = strategy
    return MaskPlan(tuple(maskers), tuple(reported), masked)


@dataclass(frozen=True, slots=True)
class Rules:
    """What masking needs besides the server's columns: plain values, no callback.

    The executor builds the plan from these once PostgreSQL has described the statement
    (before it runs), and applies it to every batch.
    """

    decision: Decision
    key: bytes
    token: str
    enforced: frozenset[str] = frozenset()

    def for_columns(self, facts: QueryFacts, columns: Sequence[Column]) -> MaskPlan:
        """The plan for these server columns (may refuse: masked_derivation)."""
        return plan(facts, self.decision, columns, self.key, self.token, self.enforced)


def unmasked(columns: Sequence[Column]) -> MaskPlan:
    """The plan that masks nothing."""
    return MaskPlan((), tuple(columns), {})
