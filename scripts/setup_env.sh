#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment in .venv and installs
# everything d2_distill needs: torch, torchvision, detectron2, the pure-Python
# dependencies, pytest and the package itself in editable mode.
#
# Idempotent: a second run checks each part with one import and skips it.
# Called by `make test` and `make demo`; safe to run by hand.
#
# Installer: uv (installed into .venv by pip, a 20 MB wheel) when it can be had,
# because it unpacks wheels in parallel: torch with its CUDA libraries (about 4 GB
# unpacked) installs in about 25 s against 90 s with pip on a 2-core machine.
# Every install falls back to pip when uv is missing or fails (for example where
# only a pip-configured mirror is reachable: uv does not read pip.conf).
# D2_DISTILL_INSTALLER=pip uses pip only.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${D2_DISTILL_VENV:-$ROOT/.venv}"
PY_BOOT="${PYTHON:-python3}"

TORCH_VERSION=2.14.1
TORCHVISION_VERSION=0.29.1
D2_WHEEL=sal_detectron2-0.7.2-cp310-none-any.whl
D2_SHA256=491af0c7f79bdb2d178e46f6cb16a97c4ac968d45c41ea3f6b6435d59bbee561

say() { echo "[setup] $*"; }

if [ ! -x "$VENV/bin/python" ]; then
  say "creating virtual environment $VENV"
  "$PY_BOOT" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check -q)

USE_UV=""   # decided on the first install, so a complete .venv never touches the network

# A complete environment is recognised by one interpreter (each check below
# starts its own and imports torch again: about 40 s on a 2-core machine).
if ready="$("$PY" - 2>/dev/null <<EOF
import importlib.metadata as m
import wheel, setuptools
assert int(m.version("setuptools").split(".")[0]) < 81
import torch, torchvision
assert torch.__version__.startswith("$TORCH_VERSION") and torchvision.__version__.startswith("$TORCHVISION_VERSION")
import detectron2, d2_distill, pytest, fvcore, iopath, pycocotools, cv2, matplotlib
print("torch", torch.__version__, "detectron2", detectron2.__version__)
EOF
)"; then
  say "environment ready: $VENV ($ready)"
  exit 0
fi

# install ARGS...: `pip install ARGS` through uv when available, else (or when uv fails) pip.
install() {
  if [ -z "$USE_UV" ]; then
    USE_UV=0
    if [ "${D2_DISTILL_INSTALLER:-uv}" != "pip" ]; then
      if "$PY" -m uv --version >/dev/null 2>&1 || "${PIP[@]}" install "uv>=0.4" >/dev/null 2>&1; then
        USE_UV=1
      else
        say "uv is not available; installing with pip"
      fi
    fi
  fi
  if [ "$USE_UV" = 1 ]; then
    if "$PY" -m uv pip install -q --python "$PY" "$@"; then
      return 0
    fi
    say "uv failed on: $*; retrying with pip (and using pip from here on)"
    USE_UV=0
  fi
  "${PIP[@]}" install "$@"
}

if ! "$PY" -c 'import wheel, setuptools, sys; import importlib.metadata as m; sys.exit(int(m.version("setuptools").split(".")[0]) >= 81)' 2>/dev/null; then
  say "installing build tools (setuptools<81: detectron2 imports pkg_resources)"
  install --upgrade "pip<25" wheel "setuptools<81"
fi

if ! "$PY" -c "import torch, torchvision, sys; sys.exit(not (torch.__version__.startswith('$TORCH_VERSION') and torchvision.__version__.startswith('$TORCHVISION_VERSION')))" 2>/dev/null; then
  say "installing torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION"
  install "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
fi

# detectron2: an importable one wins (e.g. upstream installed from GitHub);
# otherwise the PyPI upload of upstream commit a59f0563, repacked without its
# compiled extension (built for another torch) and its stray `tools` package.
if ! "$PY" -c 'import detectron2' 2>/dev/null; then
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  say "downloading $D2_WHEEL"
  "${PIP[@]}" download --no-deps --only-binary=:all: --python-version 3.10 \
      "sal-detectron2==0.7.2" -d "$work/dl"
  got="$(sha256sum "$work/dl/$D2_WHEEL" | cut -d' ' -f1)"
  if [ "$got" != "$D2_SHA256" ]; then
    echo "[setup] ERROR: $D2_WHEEL has sha256 $got, expected $D2_SHA256." >&2
    echo "[setup] Refusing to install an unverified detectron2. Install upstream detectron2 yourself (see README) and re-run." >&2
    exit 1
  fi
  say "sha256 verified; repacking without detectron2/_C and tools/"
  "$PY" -m wheel unpack -d "$work/unpacked" "$work/dl/$D2_WHEEL" >/dev/null
  pkg="$work/unpacked/sal_detectron2-0.7.2"
  rm -rf "$pkg"/tools "$pkg"/detectron2/_C*.so
  info="$pkg/sal_detectron2-0.7.2.dist-info"
  sed -i -e '/^tools\//d' -e '/^detectron2\/_C.*\.so,/d' "$info/RECORD"
  sed -i -e '/^tools$/d' "$info/top_level.txt"
  sed -i -e 's/^Root-Is-Purelib: .*/Root-Is-Purelib: true/' -e 's/^Tag: .*/Tag: py3-none-any/' "$info/WHEEL"
  mkdir -p "$work/packed"; "$PY" -m wheel pack -d "$work/packed" "$pkg" >/dev/null
  install --no-deps "$work"/packed/*.whl
fi

# Everything else comes from pyproject.toml (pure-Python pins) plus the test runner;
# the editable install is built through setuptools' PEP 660 hook (no `setup.py develop`).
if ! "$PY" -c 'import d2_distill, pytest, fvcore, iopath, pycocotools, cv2, matplotlib' 2>/dev/null; then
  say "installing d2_distill (editable) and its dependencies"
  install -e "$ROOT[test]"
fi
say "environment ready: $VENV ($("$PY" -c 'import torch, detectron2; print("torch", torch.__version__, "detectron2", detectron2.__version__)'))"
