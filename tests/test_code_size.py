"""The code stays readable in pieces: no function in `jaxcai/` longer than about 80
lines and no module longer than about 450 (data files and tests aside)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "jaxcai"
MAX_FUNCTION, MAX_MODULE = 80, 450


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "files" not in p.parts)


def test_no_module_is_too_long():
    long = {str(p.relative_to(PACKAGE)): n for p in _modules()
            if (n := len(p.read_text().splitlines())) > MAX_MODULE}  # fmt: skip
    assert not long, f"modules over {MAX_MODULE} lines (split them by concern): {long}"


def test_no_function_is_too_long():
    long = {}
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION:
                    long[f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}"] = n
    assert not long, f"functions over {MAX_FUNCTION} lines: {long}"
