"""No function in the package is longer than 100 lines (issue 15: split by job, not by defect).

A long function is several jobs in one; past this size it is split, as the POP3 protocol (one
279-line function before) and the IMAP server's compatibility class were.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "gateway"
LIMIT = 100


def long_functions(root: Path, limit: int) -> list[str]:
    """``path:line name (n lines)`` of every function or method over ``limit`` lines."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                assert node.end_lineno is not None
                length = node.end_lineno - node.lineno + 1
                if length > limit:
                    where = path.relative_to(root.parent)
                    found.append(f"{where}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_function_over_100_lines() -> None:
    assert long_functions(PACKAGE, LIMIT) == []


def test_the_check_sees_a_long_function(tmp_path: Path) -> None:
    """The walk finds nested and async functions (a check that finds nothing proves nothing)."""
    body = "\n".join(f"        x{i} = {i}" for i in range(LIMIT))
    (tmp_path / "mod.py").write_text(f"class C:\n    async def run(self):\n{body}\n")
    assert long_functions(tmp_path, LIMIT) == [f"{tmp_path.name}/mod.py:2 run (101 lines)"]
