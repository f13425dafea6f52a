"""Fail when a function in the given packages is longer than a limit (default 80 lines).

``python scripts/tools/function_length.py [--max N] [PATH ...]`` (default paths: ``npbml tasks``);
``make structure`` runs it. A function's length is ``end_lineno - lineno + 1`` of its ``def``,
docstring and comments included, the way a reader meets it. Import cycles are checked by
import-linter's ``acyclic_siblings`` contract in ``.importlinter``; no maintained linter counts
function *lines* (ruff's and pylint's rules count statements, flake8 reads no pyproject.toml),
hence this short script.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path


def function_lengths(paths: list[Path]) -> list[tuple[int, str]]:
    """``(lines, "file:line name")`` of every function and method under ``paths``, longest first."""
    found = []
    for path in paths:
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            for node in ast.walk(ast.parse(file.read_text(), filename=str(file))):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    n = (node.end_lineno or node.lineno) - node.lineno + 1
                    found.append((n, f"{file}:{node.lineno} {node.name}"))
    return sorted(found, reverse=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("paths", nargs="*", type=Path, default=[Path("npbml"), Path("tasks")])
    p.add_argument("--max", type=int, default=80, help="longest allowed function (lines)")
    args = p.parse_args(argv)
    lengths = function_lengths(args.paths)
    too_long = [(n, w) for n, w in lengths if n > args.max]
    for n, where in too_long or lengths[:3]:
        print(f"{n:4d} lines  {where}")
    longest = lengths[0][0] if lengths else 0
    print(f"{len(too_long)} functions over {args.max} lines; longest {longest}")
    return 1 if too_long else 0


if __name__ == "__main__":
    sys.exit(main())
