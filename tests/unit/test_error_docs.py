"""docs/errors.md lists every error code the code can raise, and no code it cannot.

The codes are read from the source, not from a list kept by hand: every call of a
GatewayError subclass (wherever it is defined in app/) gives its code, either a literal or a
name whose every value can be read off the code — a local assigned from literals, an
existing error's ``.code`` passed on, or a helper's parameter, followed to the helper's calls.
A code the test cannot follow fails it, with the place to make readable.
"""

from __future__ import annotations

import ast
import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "errors.md"
ROW = re.compile(r"^\|\s*([^|`]+?)\s*\|\s*`([a-z0-9_]+)`\s*\|", re.MULTILINE)


@dataclass
class Scan:
    codes: dict[str, set[str]] = field(default_factory=dict)  # code -> raising classes
    places: dict[str, set[str]] = field(default_factory=dict)  # code -> file:line
    unreadable: list[str] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)  # class -> HTTP status


def _modules() -> dict[str, ast.Module]:
    return {
        str(path.relative_to(REPO)): ast.parse(path.read_text(encoding="utf-8"), str(path))
        for path in sorted((REPO / "app").rglob("*.py"))
    }


def _name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def _error_classes(modules: dict[str, ast.Module]) -> dict[str, int]:
    """Every GatewayError subclass in app/ and its status (inherited where not set)."""
    bases: dict[str, list[str]] = {}
    own: dict[str, int] = {}
    for tree in modules.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                bases[node.name] = [n for b in node.bases if (n := _name(b))]
                for stmt in node.body:
                    target = stmt.target if isinstance(stmt, ast.AnnAssign) else (
                        stmt.targets[0] if isinstance(stmt, ast.Assign) else None
                    )
                    value = getattr(stmt, "value", None)
                    if (isinstance(target, ast.Name) and target.id == "status"
                            and isinstance(value, ast.Constant) and isinstance(value.value, int)):
                        own[node.name] = value.value
    statuses: dict[str, int] = {"GatewayError": own["GatewayError"]}
    grew = True
    while grew:
        grew = False
        for cls, parents in bases.items():
            parent = next((p for p in parents if p in statuses), None)
            if cls not in statuses and parent is not None:
                statuses[cls] = own.get(cls, statuses[parent])
                grew = True
    return statuses


def _functions(tree: ast.AST) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def _enclosing(tree: ast.Module, target: ast.AST) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
    best = None
    for func in _functions(tree):
        if any(node is target for node in ast.walk(func)):
            best = func  # ast.walk is breadth-first: the last match is the innermost
    return best


def _values(
    expr: ast.expr | None, modules: dict[str, ast.Module], tree: ast.Module, depth: int = 0
) -> set[str] | None:
    """The string values ``expr`` can take; None when they cannot be read off the code."""
    if expr is None or depth > 5:
        return None
    if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
        return {expr.value}
    if isinstance(expr, ast.Attribute) and expr.attr == "code":
        return set()  # an existing error's code passed on: counted where it was raised
    if isinstance(expr, ast.IfExp):
        body = _values(expr.body, modules, tree, depth + 1)
        orelse = _values(expr.orelse, modules, tree, depth + 1)
        return None if body is None or orelse is None else body | orelse
    if isinstance(expr, ast.Name):
        func = _enclosing(tree, expr)
        scope: ast.AST = func if func is not None else tree
        assigned = [
            node.value for node in ast.walk(scope)
            if isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None
            and any(isinstance(t, ast.Name) and t.id == expr.id
                    for t in (node.targets if isinstance(node, ast.Assign) else [node.target]))
        ]
        if assigned:
            found: set[str] = set()
            for value in assigned:
                got = _values(value, modules, tree, depth + 1)
                if got is None:
                    return None
                found |= got
            return found
        if func is not None:
            return _parameter_values(func, expr.id, modules, depth + 1)
    return None


def _parameter_values(
    func: ast.FunctionDef | ast.AsyncFunctionDef, param: str, modules: dict[str, ast.Module],
    depth: int,
) -> set[str] | None:
    """A helper's parameter: the values its callers pass (none found: unreadable)."""
    names = [a.arg for a in (*func.args.posonlyargs, *func.args.args)]
    if param not in names and param not in {a.arg for a in func.args.kwonlyargs}:
        return None
    index = names.index(param) if param in names else None
    positional = func.args.posonlyargs + func.args.args
    defaults = dict(zip([a.arg for a in positional[len(positional) - len(func.args.defaults):]],
                        func.args.defaults, strict=True))
    defaults |= {a.arg: d for a, d in zip(func.args.kwonlyargs, func.args.kw_defaults,
                                           strict=True) if d is not None}
    if index is not None and names[:1] in (["self"], ["cls"]):
        index -= 1
    found: set[str] = set()
    calls = 0
    for tree in modules.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _name(node.func) == func.name:
                arg = next((k.value for k in node.keywords if k.arg == param), None)
                if arg is None and index is not None and index < len(node.args):
                    arg = node.args[index]
                if arg is None:
                    arg = defaults.get(param)  # the caller left the default
                got = _values(arg, modules, tree, depth)
                if got is None:
                    return None
                found |= got
                calls += 1
    return found if calls else None


@functools.cache
def scan_app() -> Scan:
    return scan(_modules())


def scan(modules: dict[str, ast.Module]) -> Scan:
    """The codes the calls of error classes in ``modules`` can raise."""
    result = Scan(statuses=_error_classes(modules))
    for path, tree in modules.items():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or _name(node.func) not in result.statuses:
                continue
            cls = _name(node.func)
            assert cls is not None
            arg = node.args[0] if node.args else next(
                (k.value for k in node.keywords if k.arg == "code"), None
            )
            codes = _values(arg, modules, tree)
            if codes is None:
                result.unreadable.append(f"{path}:{node.lineno} {ast.unparse(node)[:80]}")
                continue
            for code in codes:
                result.codes.setdefault(code, set()).add(cls)
                result.places.setdefault(code, set()).add(f"{path}:{node.lineno}")
    return result


def documented() -> list[tuple[str, str]]:
    """(status, code) of every row of the table in docs/errors.md."""
    return [(status, code) for status, code in ROW.findall(DOC.read_text(encoding="utf-8"))]


def test_the_scan_finds_the_codes_it_should():
    found = scan_app()
    # A literal, a helper (facts._deny), a class defined outside app/errors.py (ProfileError),
    # and an on-behalf-of failure that passes a code on.
    for code in ("invalid_json", "unsupported_construct", "unknown_object", "policy_unavailable",
                 "database_error", "invalid_token"):
        assert code in found.codes, code
    assert found.statuses["Forbidden"] == 403
    assert found.statuses["ProfileError"] == 503


def test_the_scan_follows_locals_and_helpers_and_refuses_the_rest():
    source = """
class GatewayError(Exception):
    status = 500
class Forbidden(GatewayError):
    status = 403
def _deny(message, code="fixed_default"):
    return Forbidden(code, message)
def check(flag, exc):
    code = "from_local_a" if flag else "from_local_b"
    raise Forbidden(code, "m")
def passes_on(exc):
    raise Forbidden(exc.code, "m")
def callers():
    _deny("m", code="via_helper")
    _deny("m", "via_helper_positional")
    _deny("m")
def unreadable(name):
    raise Forbidden(name.lower(), "m")
"""
    found = scan({"fake.py": ast.parse(source)})
    assert set(found.codes) == {
        "from_local_a", "from_local_b", "via_helper", "via_helper_positional", "fixed_default",
    }
    assert [u.split()[0] for u in found.unreadable] == ["fake.py:18"]


def test_every_raised_code_can_be_read_off_the_code():
    assert not scan_app().unreadable, "make these codes literals (or teach this test to read them)"


def test_every_raised_code_is_documented():
    rows = {code for _, code in documented()}
    missing = {code: sorted(places) for code, places in scan_app().places.items() if code not in rows}
    assert not missing, f"codes raised but not in docs/errors.md: {missing}"


def test_every_documented_code_is_raised():
    raised = scan_app().codes
    extra = sorted(code for _, code in documented() if code not in raised)
    assert not extra, f"docs/errors.md lists codes nothing raises: {extra}"


def test_each_code_has_one_row_with_its_status():
    found = scan_app()
    rows = documented()
    codes = [code for _, code in rows]
    assert len(codes) == len(set(codes)), sorted({c for c in codes if codes.count(c) > 1})
    wrong = {}
    for status, code in rows:
        statuses = {found.statuses[cls] for cls in found.codes.get(code, ())}
        # A status set at run time (http_error) is documented in words, not a number.
        if status.isdigit() and statuses and int(status) not in statuses:
            wrong[code] = (status, sorted(statuses))
    assert not wrong, f"documented status differs from the raising class: {wrong}"
