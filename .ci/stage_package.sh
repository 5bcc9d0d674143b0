#!/usr/bin/env bash
# CI stage: the package as users get it. Builds the wheel and the sdist (`python -m build`),
# installs the wheel into a fresh venv, and runs the quick start from outside the checkout, so a
# module or data file missing from the wheel (package-data, an import-time file) fails here.
#
# The venv sees the system site-packages for torch (and the other dependencies), so no multi-GB
# download happens and the stage takes well under a minute; the wheel itself goes into the venv,
# which shadows any other xattention on the path (the check below makes sure it is the wheel's).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."   # the repository root
start=$(date +%s)
# As a user runs it: .ci/run exports TRITON_INTERPRET=1 for the test suite, under which `auto`
# picks the Triton kernels on the CPU interpreter and the quick start took 4.4 minutes, not 2 s.
unset TRITON_INTERPRET XATTENTION_POISON_OUTPUTS
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

python -m pip install -q build
# --no-isolation: the build backend (setuptools) is already here; an isolated build would fetch it
# (and recent setuptools builds wheels without the `wheel` package pyproject still lists).
python -m build --no-isolation --skip-dependency-check --sdist --wheel --outdir "$tmp/dist" . > "$tmp/build.log" 2>&1 \
    || { cat "$tmp/build.log" >&2; echo "stage_package: build failed" >&2; exit 1; }
wheel=$(ls "$tmp"/dist/*.whl)
ls "$tmp"/dist/*.tar.gz > /dev/null

python -m venv --system-site-packages "$tmp/venv"
"$tmp/venv/bin/python" -m pip install -q --no-deps "$wheel"

# From an empty directory: nothing of the checkout is importable from there.
mkdir "$tmp/run" && cp examples/quickstart.py "$tmp/run/"
cd "$tmp/run"
where=$(PYTHONPATH= "$tmp/venv/bin/python" -c "import xattention; print(xattention.__file__)")
case "$where" in
    "$tmp/venv/"*) ;;
    *) echo "stage_package: imported xattention from $where, not the wheel" >&2; exit 1 ;;
esac
PYTHONPATH= "$tmp/venv/bin/python" quickstart.py
PYTHONPATH= "$tmp/venv/bin/xattention" --help > /dev/null
echo "== stage_package: wheel and sdist built, wheel's quick start ran in $(( $(date +%s) - start )) s"
