#!/bin/sh
# The one install recipe: `make install` and infra/docker/Dockerfile both run it, so the image is built exactly the
# way the tested virtual environment is.
#
#   infra/install.sh PYTHON [EXTRAS]       e.g. infra/install.sh .venv/bin/python dev
#
# TORCH_INDEX_URL (optional): where torch comes from, e.g. https://download.pytorch.org/whl/cpu for a CPU-only image;
# unset, pip's configured index (on these machines the CPU build on disk; on PyPI the CUDA build).
set -eu
python="$1"
extras="${2:-}"
cd "$(dirname "$0")/.."

"$python" -m pip install -q --upgrade pip
# torch first, exactly pinned: a bare or ranged torch would pull another (multi-GB) build
if [ -n "${TORCH_INDEX_URL:-}" ]; then
    "$python" -m pip install -q torch==2.13.0 --index-url "$TORCH_INDEX_URL"
else
    "$python" -m pip install -q torch==2.13.0
fi
"$python" -m pip install -q -e ".${extras:+[$extras]}"
# img2dataset drags in the `dataclasses` 0.6 backport, which breaks Prefect's server on 3.11
"$python" -m pip uninstall -y -q dataclasses
