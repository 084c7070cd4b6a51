#!/usr/bin/env bash
# The GPU check of issue 13, as one prepared command for the device tool (a lent H200; its image has CUDA JAX,
# equinox, optax, pandas, scipy, statsmodels, pytest and hypothesis, but nothing can be fetched there):
#
#   bash bench/gpu_check.sh --prepare     # here: downloads the missing wheels into bench/.gpu_wheels (ignored)
#   device run: command="bash bench/gpu_check.sh", carry=["bench/.gpu_wheels"], timeout_s=560
#
# USP_GPU_CHECK_SECONDS (default 520) bounds the whole check: the tests get at most a third of it and the bench
# the rest, writing its tables after every measurement, so a run cut short still brings back what it measured.
#
# On the device it installs the carried wheels, runs the correctness subset on the GPU (vmap parity, step ==
# run, AOT == run, the float32 DGM against float64), then `usp bench` there, which writes latest_gpu.md and
# bench.json into $OUT (bench/results without it): copy them into bench/results here. JAX never pre-allocates
# the device.
# USP_GPU_CHECK_ALLOW_CPU=1 runs the same flow on a CPU (to check the script, with a quick bench).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=bench/.gpu_wheels
# packages usp_core needs that the device image lacks, downloaded with their dependencies (so that versions
# agree, e.g. pydantic and pydantic-core) less those the image holds (device/KINDS.md)
NEEDED="signax tomlkit arch pandera duckdb optuna"
IN_IMAGE="numpy scipy pandas statsmodels patsy jax jaxlib equinox jaxtyping optax wadler_lindig typing_extensions
packaging python_dateutil pytz tzdata six typing_inspect mypy_extensions markupsafe pyyaml tqdm ml_dtypes opt_einsum
formulaic interface_meta narwhals wrapt"

if [[ "${1:-}" == "--prepare" ]]; then
  mkdir -p "$WHEELS"
  python3 -m pip download --quiet --dest "$WHEELS" --only-binary=:all: \
    --python-version 3.12 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_28_x86_64 --platform any $NEEDED 2>/dev/null
  for name in $IN_IMAGE; do rm -f "$WHEELS/$name"-[0-9]*.whl; done
  ls "$WHEELS"; du -sh "$WHEELS"
  exit 0
fi

export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
OUT=${OUT:-bench/results}
if ! $PY -c "import signax, tomlkit, arch, pandera, duckdb, optuna" 2>/dev/null; then
  $PY -m pip install --quiet --no-index --find-links "$WHEELS" --no-deps "$WHEELS"/*.whl
fi
backend=$($PY -c "import jax; print(jax.default_backend())")
$PY -c "import jax; print('jax', jax.__version__, jax.devices())"
quick=()
if [[ "$backend" != "gpu" ]]; then
  [[ "${USP_GPU_CHECK_ALLOW_CPU:-}" == "1" ]] || { echo "no GPU backend (got $backend)"; exit 2; }
  quick=(--quick)
fi

total=${USP_GPU_CHECK_SECONDS:-520}
set -o pipefail
tests_rc=0
timeout $((total / 3)) $PY -m pytest -q -p no:cacheprovider -n 6 tests/core/engine/test_predictor.py \
  tests/core/kernels/test_dgm.py -k "vmap_parity or step_loop or compile_run or float32" 2>&1 \
  | tee "$OUT/gpu_check_tests.log" || tests_rc=$?
budget=$((total - SECONDS - 30))
echo "gpu_check: tests rc $tests_rc after ${SECONDS} s; bench budget ${budget} s"
$PY -m usp_core.bench --out "$OUT" --budget "$budget" "${quick[@]}" 2>&1 | tee "$OUT/gpu_check_bench.log"
exit "$tests_rc"
