"""Every changed byte range carries a stable `code` beside its prose `kind`: each shape
`classify_range` names and each reason the patch verifiers give for an unverified
change maps to a code of its own (never `other`), and codes are identifiers."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from scanner.check.classify import KIND_CODES, classify_range, kind_code

ROOT = Path(__file__).resolve().parent.parent


def test_every_classified_shape_has_a_code() -> None:
    page = bytes(4096)
    cases = {
        ("idt", b"\x01"): "idt_gate_changed",
        ("__ex_table", b"\x01"): "ex_table_changed",
        (".rodata", b"\x01"): "rodata_changed",
        (".text", b"\xcc"): "int3_planted",
        (".text", b"\x01"): "code_changed",
    }
    for (region, new), want in cases.items():
        after = new + page[len(new):]
        assert kind_code(classify_range(page, after, 0, 1, region)) == want
    nop = bytes.fromhex("0f1f440000")
    call = bytes.fromhex("e811223344")
    assert kind_code(classify_range(nop + page[5:], call + page[5:], 1, 5, ".text")) == \
        "ftrace_enabled"
    assert kind_code(classify_range(call + page[5:], nop + page[5:], 1, 5, ".text")) == \
        "ftrace_disabled"


def _reason_literals() -> set[str]:
    """String constants the patch verifiers give as reasons: `reason=`/`why =` values,
    `reasons.setdefault(_, "...")` and the text of `return False, "..."`, in every module
    of the scanner.check.patching package."""
    trees = [ast.parse(f.read_text())
             for f in sorted((ROOT / "scanner" / "check" / "patching").glob("*.py"))]
    out: set[str] = set()

    def text(node: ast.AST) -> str | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        if isinstance(node, ast.JoinedStr):  # f-string: its leading literal
            first = node.values[0] if node.values else None
            return first.value if isinstance(first, ast.Constant) else None
        if isinstance(node, ast.BinOp):  # "a" + b
            return text(node.left)
        return None

    for node in (n for tree in trees for n in ast.walk(tree)):
        named = isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id in ("why", "reason") for t in node.targets)
        if (isinstance(node, ast.keyword) and node.arg == "reason") or named:
            assert isinstance(node, ast.keyword | ast.Assign)
            t = text(node.value)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "setdefault" and len(node.args) == 2):
            t = text(node.args[1])
        elif (isinstance(node, ast.Return) and isinstance(node.value, ast.Tuple)
              and node.value.elts and isinstance(node.value.elts[0], ast.Constant)
              and node.value.elts[0].value is False and len(node.value.elts) > 1):
            t = text(node.value.elts[1])
        else:
            continue
        if t:
            out.add(t)
    return out


def test_every_verifier_reason_has_a_code() -> None:
    reasons = _reason_literals()
    assert len(reasons) > 30  # the scan finds them
    assert kind_code("not a known patch site or form") == "unexplained_change"
    missing = sorted(r for r in reasons if kind_code(r) == "other")
    assert not missing, missing


def test_codes_are_identifiers_and_unknown_prose_is_other() -> None:
    assert all(re.fullmatch(r"[a-z0-9_]+", code) for _, code in KIND_CODES)
    assert kind_code("something new") == "other"
