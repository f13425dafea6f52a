#!/usr/bin/env bash
# Check that a built wheel works outside the checkout (issue 14): build it, install it into a fresh
# temporary venv, and run `npbml demo` from a temporary folder (no configs/ or data beside it).
#
#   scripts/check_wheel.sh [PYTHON] [DEMO ARGS...]    # default: .venv/bin/python, --minutes 0.3 --tasks 20
#
# torch is not installed into the temporary venv: a CPU torch is large and PyPI may resolve it to
# a CUDA build. The venv reuses the packages of PYTHON's environment (torch, numpy, ...) through a
# .pth file that points at a folder of links to them, without their metadata and without npbml
# itself, so that pip and Python see only the npbml installed from the wheel. The wheel's own
# dependencies are therefore not resolved by pip here (--no-deps); `pip install .` does that.
# Takes about 40 s with the default demo arguments; nothing outside the temporary folder changes.
# `make check-wheel` runs it; `make test` (CI) too.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${1:-$REPO/.venv/bin/python}"
shift || true
DEMO_ARGS=("$@")
[ ${#DEMO_ARGS[@]} -eq 0 ] && DEMO_ARGS=(--minutes 0.3 --tasks 20)

TMP="$(mktemp -d "${TMPDIR:-/tmp}/npbml-wheel.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT
step() { echo "check_wheel: $*" >&2; }

# 1. Build from a copy of the tracked and new (not ignored) files, so that a stale build/ or
#    egg-info in the checkout cannot leak into the wheel.
step "building the wheel from a copy of $REPO"
mkdir -p "$TMP/src"
(cd "$REPO" && git ls-files -co --exclude-standard -z | xargs -0 cp --parents -P -t "$TMP/src")
# setuptools >= 70.1 builds wheels by itself: build offline with PYTHON's. An older one (the
# setuptools 65 of a Python 3.11 venv) needs the wheel package: let pip fetch both (isolation).
if "$PYTHON" -c 'import importlib.util as u, setuptools as s, sys
v = tuple(int(x) for x in s.__version__.split(".")[:2])
sys.exit(0 if v >= (70, 1) or u.find_spec("wheel") else 1)' 2>/dev/null; then
  ISOLATION=(--no-build-isolation)
else
  ISOLATION=()
fi
"$PYTHON" -m pip wheel "$TMP/src" --no-deps "${ISOLATION[@]}" -q -w "$TMP/dist"
WHEEL="$(ls "$TMP"/dist/npbml-*.whl)"
step "built $(basename "$WHEEL") ($(du -h "$WHEEL" | cut -f1))"

# 2. A fresh venv that sees PYTHON's packages (not their metadata, not npbml) through links.
"$PYTHON" -m venv "$TMP/venv"
SITE="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
mkdir -p "$TMP/shared"
for entry in "$SITE"/*; do
  name="$(basename "$entry")"
  case "$name" in
    npbml* | tasks | tasks-* | __editable__* | *.dist-info | *.egg-info | *.pth | pip | setuptools \
      | pkg_resources | _distutils_hack | __pycache__) ;;
    *) ln -s "$entry" "$TMP/shared/$name" ;;
  esac
done
VSITE="$("$TMP/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$TMP/shared" > "$VSITE/zz-npbml-check-shared.pth"  # after the venv's own packages
"$TMP/venv/bin/python" -m pip install -q --no-deps "$WHEEL"

# 3. Run the demo from an empty folder: configs and data must come from the installed package.
mkdir -p "$TMP/elsewhere"
cd "$TMP/elsewhere"
"$TMP/venv/bin/python" - <<'PY'
import npbml, tasks, sys
for mod in (npbml, tasks):
    if "/venv/" not in mod.__file__:
        sys.exit(f"check_wheel: {mod.__name__} imported from {mod.__file__}, not the wheel")
print(f"check_wheel: npbml {npbml.__version__} from {npbml.__file__}", file=sys.stderr)
PY
step "npbml demo ${DEMO_ARGS[*]} in $PWD"
"$TMP/venv/bin/npbml" demo --out "$TMP/elsewhere/runs" "${DEMO_ARGS[@]}"
test -s "$TMP/elsewhere/runs/summary.json"
step "OK: the wheel installs and its demo runs outside the checkout"
