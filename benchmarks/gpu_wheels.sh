#!/usr/bin/env bash
# The Python packages the GPU machine lacks, as wheels for its Python 3.12 (x86-64), downloaded
# here on the CPU machine into one folder that the device call carries (nothing can be fetched
# there). The GPU machine has torch 2.11 (CUDA 13), transformers 5.17, lightning 2.6.6,
# torchmetrics, peft, pytest, numpy, pandas, pyarrow, requests, httpx, anyio, click, pyyaml,
# protobuf, sympy, fsspec, huggingface-hub 1.33, tokenizers 0.23 (see the device notes' package
# list); it lacks hydra-core, omegaconf, antlr4-python3-runtime, datasets (and dill,
# multiprocess), math-verify, latex2sympy2-extended and wandb (and the dependencies listed below).
#
#   bash benchmarks/gpu_wheels.sh [DEST]          # DEST defaults to .whl (git-ignored: /.whl/)
#   GPU_WHEELS_ONLY="hydra-core omegaconf" bash benchmarks/gpu_wheels.sh /tmp/w   # a subset
#
# Versions: this project's pins (pyproject.toml) and, for their dependencies, the versions its
# CPU environment resolved, so the GPU job runs what CI tests. One version of each package
# (two stop the install). About 30 MB in all, wandb (~20 MB, its wandb-core binary) the most.
#
# The GPU job (one device call, `carry: [".whl"]`) installs them before anything else, into a
# folder of its own that goes first on the path:
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; \
#   PYTHONUNBUFFERED=1 python3 -m benchmarks.gpu_check --out $OUT --budget-s 540
#
# --no-index: nothing is fetched there; --no-deps: only these wheels, the machine's own torch,
# transformers and lightning stay as they are.
set -euo pipefail

DEST=${1:-.whl}
PY=${PYTHON:-python3}

# pure-Python wheels (py3-none-any or py312-none-any)
PURE=(
  hydra-core==1.3.8
  omegaconf==2.3.1
  antlr4-python3-runtime==4.9.3      # sdist only on the index: built into a wheel below
  datasets==5.2.0
  dill==0.4.1
  multiprocess==0.70.19
  math-verify==0.9.0
  latex2sympy2_extended==1.11.0
  # wandb's dependencies the GPU machine lacks or has too old
  cwevals==0.0.1b1
  distro==1.9.0
  sniffio==1.3.1
  platformdirs==4.14.9
  pydantic==2.14.4
  annotated-types==0.8.0
  typing-inspection==0.4.5
  typing-extensions==4.16.0
  opentelemetry-api==1.45.2
  opentelemetry-sdk==1.45.2
  opentelemetry-semantic-conventions==0.66b2
  opentelemetry-proto==1.45.2
  opentelemetry-exporter-otlp-proto-http==1.45.2
  opentelemetry-exporter-otlp-proto-common==1.45.2
  opentelemetry-exporter-http-transport==0.66b2
  opentelemetry-exporter-otlp-common==0.66b2
  googleapis-common-protos==1.76.0
)
# wheels with compiled parts, for CPython 3.12 on manylinux x86-64
BINARY=(
  wandb==0.31.0
  pydantic-core==2.50.5
  protobuf==7.36.2                   # googleapis-common-protos needs >= 6.33.5
)
PLATFORMS=(
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64
)

wanted() {  # is package spec $1 in GPU_WHEELS_ONLY (all when unset)?
  [ -z "${GPU_WHEELS_ONLY:-}" ] && return 0
  local name=${1%%==*}
  for w in $GPU_WHEELS_ONLY; do [ "$w" = "$name" ] && return 0; done
  return 1
}

mkdir -p "$DEST"
for spec in "${PURE[@]}" "${BINARY[@]}"; do
  wanted "$spec" || continue
  if "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      "${PLATFORMS[@]}" -d "$DEST" "$spec" 2>/dev/null; then
    echo "got $spec"
  elif [ "$spec" = "antlr4-python3-runtime==4.9.3" ]; then
    # no wheel on the index: build the (pure-Python) wheel from its sdist here
    "$PY" -m pip wheel -q --no-deps -w "$DEST" "$spec"
    echo "built $spec"
  else
    echo "error: no Python 3.12 x86-64 wheel for $spec" >&2
    exit 1
  fi
done
echo "$(ls "$DEST" | wc -l) wheels in $DEST ($(du -sh "$DEST" | cut -f1)); carry it with the device call: carry: [\"$DEST\"]"
