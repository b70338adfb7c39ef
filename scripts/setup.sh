#!/usr/bin/env bash
# Set up a development/CI environment for block_sgl: a virtualenv with SGLang 0.5.23 and block_sgl
# installed in editable mode (the Cython extension built). Idempotent: re-running skips what is
# already installed. Prints every step it takes.
#
#   bash scripts/setup.sh            # venv at ./.venv (override with BLOCK_SGL_VENV)
#
# On a machine with a working NVIDIA GPU it does the normal `pip install sglang==0.5.23`.
# Without one it follows the CPU path verified in SGLANG_NOTES.md: torch 2.14.1 + torchvision
# 0.29.1, sglang 0.5.23 --no-deps, the pinned serving dependencies, and the pure-PyTorch
# `sgl_kernel` shim (block_sgl/testing/cpu_shim) put on the path by a .pth file — only if no
# real sgl_kernel is importable.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${BLOCK_SGL_VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3.11}
SGLANG_VERSION=0.5.23
step() { echo "[setup] $*"; }
start=$(date +%s)

if [ ! -x "$VENV/bin/python" ]; then
  step "creating virtualenv $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
else
  step "virtualenv $VENV exists"
fi
PY="$VENV/bin/python"
PIP="$PY -m pip --disable-pip-version-check"

have() { $PY -c "import importlib.metadata as m,sys; sys.exit(0 if m.version('$1')=='$2' else 1)" 2>/dev/null; }

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  MODE=gpu
else
  MODE=cpu
fi
step "mode: $MODE"

# The CPU path installs torch's CUDA wheels from PyPI (SGLang pins torch==2.14.1; PyPI has no CPU
# build of it): ~7 GB in the venv. Fail up front with the numbers instead of pip's "No space left on
# device" halfway through (what a CI run on a nearly full shared disk printed).
need_gb=${BLOCK_SGL_SETUP_MIN_FREE_GB:-9}
if ! have sglang "$SGLANG_VERSION"; then
  free_kb=$(df -Pk "$(dirname "$VENV")" | awk 'NR==2 {print $4}')
  step "free disk at $(dirname "$VENV"): $(( free_kb / 1024 / 1024 )) GiB (need ~${need_gb} GiB for the install)"
  if [ "$free_kb" -lt $(( need_gb * 1024 * 1024 )) ]; then
    echo "[setup] ERROR: not enough free disk for torch + SGLang (~${need_gb} GiB); free some space" \
         "or set BLOCK_SGL_SETUP_MIN_FREE_GB to override" >&2
    df -h "$(dirname "$VENV")" >&2
    exit 1
  fi
fi

if have sglang "$SGLANG_VERSION"; then
  step "sglang $SGLANG_VERSION already installed"
elif [ "$MODE" = gpu ]; then
  step "installing sglang==$SGLANG_VERSION (full GPU install)"
  $PIP install "sglang==$SGLANG_VERSION"
else
  step "installing torch==2.14.1 torchvision==0.29.1 (CPU path)"
  $PIP install torch==2.14.1 torchvision==0.29.1
  step "installing sglang==$SGLANG_VERSION --no-deps"
  $PIP install --no-deps "sglang==$SGLANG_VERSION"
  step "installing pinned serving dependencies (requirements/sglang-cpu.txt)"
  $PIP install -r requirements/sglang-cpu.txt
fi

step "installing build + test dependencies (requirements/dev.txt)"
$PIP install -q "cython>=3.0" "setuptools>=68" wheel numpy==2.4.6 -r requirements/dev.txt

# C headers the compiled extensions need: install them where apt can (CI, fresh Debian
# machines), else stop with the package to install.
#   need_headers HEADER DEBIAN_PACKAGE OTHER_NAMES WHO [OVERRIDE_ENV]
need_headers() {
  [ -f "/usr/include/$1" ] && return 0
  [ -n "${5:-}" ] && [ -n "${!5:-}" ] && return 0
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    step "installing $2 (headers of $4)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$2" >/dev/null \
      || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$2" >/dev/null; }
  else
    echo "[setup] ERROR: $1 missing (needed by $4): install $2 (or $3)${5:+, or set $5}" >&2
    exit 1
  fi
}
# _page_hash links OpenSSL's libcrypto (CPython's hashlib uses it); _features links zlib.
need_headers openssl/sha.h libssl-dev openssl-devel block_sgl/_page_hash OPENSSL_INCLUDE_DIR
need_headers zlib.h zlib1g-dev zlib-devel block_sgl/_features

step "installing block_sgl in editable mode with its dependencies (builds block_sgl/_fastsim, block_sgl/_page_hash, block_sgl/_capture, block_sgl/_features)"
$PIP install -q --no-build-isolation -e .
$PY -c "import block_sgl._fastsim as f, block_sgl._page_hash as h, block_sgl._capture as c, block_sgl._features as ft; print('[setup] compiled extensions:', f.__file__, h.__file__, c.__file__, ft.__file__)"

SITE=$($PY -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
PTH="$SITE/block_sgl_cpu_shim.pth"
if [ "$MODE" = cpu ]; then
  if [ -f "$PTH" ]; then
    step "CPU sgl_kernel shim already on the path ($PTH)"
  elif $PY -c "import importlib.util,sys; sys.exit(0 if importlib.util.find_spec('sgl_kernel') else 1)"; then
    step "a real sgl_kernel is importable: NOT installing the CPU shim"
  else
    echo "$ROOT/block_sgl/testing/cpu_shim" > "$PTH"
    step "CPU sgl_kernel shim put on the path ($PTH)"
  fi
fi
step "done in $(( $(date +%s) - start )) s; activate with: source $VENV/bin/activate"
