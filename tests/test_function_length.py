"""scripts/tools/function_length.py, the function-length half of `make structure`."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_SPEC = importlib.util.spec_from_file_location(
    "function_length", Path(__file__).parents[1] / "scripts/tools/function_length.py"
)
assert _SPEC is not None and _SPEC.loader is not None
tool = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(tool)


def _function(name: str, lines: int) -> str:
    body = "".join(f"    x{i} = {i}\n" for i in range(lines - 2))
    return f"def {name}():\n    '''doc'''\n{body}"


def test_counts_def_to_last_line_and_fails_only_over_the_limit(tmp_path, capsys):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "a.py").write_text(
        _function("short", 80)
        + "\n\nclass K:\n"
        + "".join("    " + line + "\n" for line in _function("method", 81).splitlines())
    )
    lengths = tool.function_lengths([pkg])
    assert [(n, w.split()[-1]) for n, w in lengths] == [(81, "method"), (80, "short")]
    assert tool.main(["--max", "81", str(pkg)]) == 0
    assert tool.main(["--max", "80", str(pkg)]) == 1
    assert "1 functions over 80 lines; longest 81" in capsys.readouterr().out
