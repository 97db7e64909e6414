"""The contract and the design live in the repo (docs/contract.md, docs/design.md): nothing may
point outside it to the team's handbook, and docs/contract.md must name every event type the
platform carries and every error code its HTTP APIs answer with."""
from __future__ import annotations

import ast
import re
import subprocess
import typing
from pathlib import Path

import pytest

from shared import events, topics

ROOT = Path(__file__).resolve().parents[2]
CONTRACT = ROOT / "docs" / "contract.md"
DESIGN = ROOT / "docs" / "design.md"

# Written so that this file does not match itself.
OUTSIDE = "../" + "shared/"
OLD_NAMES = re.compile(r"\b(?:CONTR" r"ACT|DES" r"IGN)\.md\b")

# Where the HTTP APIs' and dead letters' error codes come from.
API_SOURCES = sorted(str(p.relative_to(ROOT)) for pattern in ("shared/*.py", "services/*/*.py")
                     for p in ROOT.glob(pattern))
CODE = re.compile(r"^[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+$|^[A-Z]{4,}$")


def tracked_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout
    return [ROOT / name for name in out.decode().split("\0") if name]


def _text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
        return None  # binary, or deleted in the work tree


def test_nothing_points_outside_the_repo_or_cites_the_old_handbook():
    files = tracked_files()
    assert len(files) > 50, "git ls-files found too little: is this a checkout?"
    offenders = []
    for path in files:
        text = _text(path)
        if text is None:
            continue
        for number, line in enumerate(text.splitlines(), start=1):
            if OUTSIDE in line or OLD_NAMES.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:120]}")
    assert not offenders, ("cite docs/contract.md §N or docs/design.md instead of the handbook outside the repo:\n"
                           + "\n".join(offenders))


def test_the_old_names_pattern_catches_what_it_should():
    assert OLD_NAMES.search("see " + "CONTRACT" + ".md §3")
    assert OLD_NAMES.search("(" + "DESIGN" + ".md, Time)")
    assert not OLD_NAMES.search("see docs/contract.md §3 and docs/design.md")


def test_the_docs_exist_and_the_readme_links_them():
    readme = (ROOT / "README.md").read_text()
    assert "docs/contract.md" in readme and "docs/design.md" in readme
    contract = CONTRACT.read_text()
    for number in range(1, 8):  # code comments cite these section numbers
        assert re.search(rf"^## {number}\. ", contract, re.M), f"docs/contract.md lost its section {number}"
    assert re.search(r"^## \d+\. Deviations", contract, re.M)
    assert DESIGN.read_text().startswith("# Danbao design")


def test_contract_lists_every_event_type_and_topic():
    contract = CONTRACT.read_text()
    assert "schemas/Envelope.json" in contract
    types = {name for by_type in events.SCHEMAS.values() for name in by_type} | {"AllocationLine"}
    missing = sorted(t for t in types if f"`{t}`" not in contract)
    assert not missing, f"docs/contract.md does not list these event types: {missing}"
    for t in types:
        assert (ROOT / "docs" / "schemas" / f"{t}.json").exists(), t
    missing_topics = sorted(t for t in topics.ALL + [topics.dlq(topics.ORDERS)] if f"`{t}`" not in contract)
    assert not missing_topics, f"docs/contract.md does not list these topics: {missing_topics}"


def test_contract_lists_every_reason_code():
    contract = CONTRACT.read_text()
    codes = set(typing.get_args(events.PaymentFailureCode)) | set(typing.get_args(events.RefundRejectionCode))
    assert len(codes) == 16
    missing = sorted(c for c in codes if f"`{c}`" not in contract)
    assert not missing, f"docs/contract.md does not list these reason codes: {missing}"


# ---------------------------------------------------------------- error codes in the code
def _strings(node: ast.AST) -> set[str]:
    return {n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and CODE.match(n.value)}


def _call_name(call: ast.Call) -> str | None:
    f = call.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None


def _functions(trees: dict[str, ast.Module]) -> dict[str, list[ast.FunctionDef | ast.AsyncFunctionDef]]:
    found: dict[str, list] = {}
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found.setdefault(node.name, []).append(node)
    return found


def _codes_of_function(fn) -> set[str]:
    """First elements of the tuples a refusal helper returns: `return "CODE", "message"`."""
    codes = set()
    for node in ast.walk(fn):
        if isinstance(node, ast.Return) and isinstance(node.value, ast.Tuple) and node.value.elts:
            first = node.value.elts[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str) and CODE.match(first.value):
                codes.add(first.value)
    return codes


def _constants(trees: dict[str, ast.Module]) -> dict[str, set[str]]:
    """Module- and class-level `NAME = "CODE"` (constants, enum members), by name."""
    found: dict[str, set[str]] = {}
    for tree in trees.values():
        for holder in [tree, *(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef))]:
            for node in holder.body:
                if isinstance(node, ast.Assign):
                    for target in node.targets:
                        if isinstance(target, ast.Name):
                            found.setdefault(target.id, set()).update(_strings(node.value))
    return found


def _resolve(expr: ast.AST, scope: ast.AST, functions, constants) -> set[str]:
    """The codes an expression may evaluate to: a literal, a local name assigned from literals
    (also inside a conditional or a dict lookup), a constant or enum member (`ErrorCode.X`), or
    `*helper(...)` returning (code, message)."""
    if isinstance(expr, ast.Attribute) and expr.attr in constants:
        return set(constants[expr.attr])
    if isinstance(expr, ast.Constant):
        return _strings(expr)
    if isinstance(expr, ast.Starred):
        return _resolve(expr.value, scope, functions, constants)
    if isinstance(expr, ast.Call):  # a helper returning (code, message)
        return set().union(*(_codes_of_function(fn) for fn in functions.get(_call_name(expr), [])))
    if isinstance(expr, ast.Name):
        codes = set()
        for node in ast.walk(scope):
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == expr.id for t in node.targets):
                codes |= _strings(node.value)
                if isinstance(node.value, ast.Call):
                    codes |= _resolve(node.value, scope, functions, constants)
        return codes or set(constants.get(expr.id, ()))
    return _strings(expr)


def _scopes(tree: ast.Module):
    """(node, its innermost enclosing function or the module)."""
    def visit(node, scope):
        for child in ast.iter_child_nodes(node):
            inner = child if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else scope
            yield child, inner
            yield from visit(child, inner)
    yield from visit(tree, tree)


def error_codes_in_code() -> dict[str, set[str]]:
    """code -> files: every error code an HTTP API or a dead letter can carry, found in the code:
    ApiError(status, "CODE", ...), _error(status, "CODE", ...), {"error": {"code": "CODE"}},
    DecodeError("CODE", ...), _dead_letter(conn, record, "CODE", ...), including codes that come
    through a local variable or a `return "CODE", message` helper."""
    trees = {path: ast.parse((ROOT / path).read_text(), filename=path) for path in API_SOURCES}
    functions, constants = _functions(trees), _constants(trees)
    found: dict[str, set[str]] = {}
    for path, tree in trees.items():
        for node, scope in _scopes(tree):
            exprs = []
            if isinstance(node, ast.Call):
                name = _call_name(node)
                if name in ("ApiError", "_error") and len(node.args) >= 2:
                    exprs.append(node.args[1])
                elif name == "DecodeError" and node.args:
                    exprs.append(node.args[0])
                elif name == "_dead_letter" and len(node.args) >= 3:
                    exprs.append(node.args[2])
            elif isinstance(node, ast.Dict):
                for key, value in zip(node.keys, node.values):
                    if isinstance(key, ast.Constant) and key.value == "code":
                        exprs.append(value)
            for expr in exprs:
                for code in _resolve(expr, scope, functions, constants):
                    found.setdefault(code, set()).add(path)
    return found


def test_the_error_code_scan_finds_the_known_codes():
    found = error_codes_in_code()
    expected = {"INVALID_REQUEST", "UNAUTHENTICATED", "FORBIDDEN", "CARD_DECLINED", "CHANNEL_TIMEOUT",
                "INSUFFICIENT_BALANCE", "IDEMPOTENCY_CONFLICT", "USER_EXISTS", "USER_NOT_FOUND", "NOT_IN_REVIEW",
                "CLOCK_MOVED_BACK", "HUABEI_NOT_ELIGIBLE", "STATEMENT_NOT_ISSUED", "STATEMENT_PAST_DUE",
                "NOT_FOUND", "INVALID_JSON", "HANDLER_ERROR"}
    assert expected <= set(found), f"the scan no longer sees {sorted(expected - set(found))}: fix the scan"


@pytest.mark.parametrize("code", sorted(error_codes_in_code()))
def test_contract_lists_every_error_code_the_code_uses(code):
    assert f"`{code}`" in CONTRACT.read_text(), (
        f"{code} (used in {', '.join(sorted(error_codes_in_code()[code]))}) is not in docs/contract.md")
