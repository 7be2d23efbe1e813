#!/usr/bin/env bash
# Download the project's pure-Python dependencies that a stock GPU image lacks into .whl/
# (git-ignored), for benchmarks/gpu_suite.sh to install offline with
#   pip install --no-index --no-deps --target <dir> .whl/*.whl
# Run on a machine with internet. PYTHON_VERSION (default 3.12, the GPU image's) selects the
# interpreter the binary wheel (PyYAML) is for; hydra-core, omegaconf and antlr4 are pure Python.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-$REPO/.whl}"
PYV="${PYTHON_VERSION:-3.12}"
mkdir -p "$DEST"
# Versions tested with this repository (hydra-core 1.3 needs omegaconf < 2.4); packaging, which
# hydra also needs, comes with pytest on the image.
python -m pip download --no-deps --dest "$DEST" "hydra-core==1.3.8" "omegaconf==2.3.1" "antlr4-python3-runtime==4.9.3"
python -m pip download --no-deps --dest "$DEST" --only-binary=:all: --python-version "$PYV" \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 PyYAML
# antlr4-python3-runtime 4.9.3 is an sdist only: build it into a wheel so --no-index installs work.
for sd in "$DEST"/antlr4-python3-runtime-*.tar.gz; do
  [[ -e "$sd" ]] || continue
  python -m pip wheel --no-deps --no-build-isolation --wheel-dir "$DEST" "$sd" && rm -f "$sd"
done
ls -l "$DEST"
