#!/usr/bin/env bash
# Quickstep device suite (issue 21): every GPU path and every GPU figure in one command, time-boxed.
#
#   bash scripts/device_suite.sh                # on a CUDA machine (the H200): <= ~5 minutes, results in $OUT
#   bash scripts/device_suite.sh --smoke        # here, on CPU, tiny sizes, about a minute (tests/test_device_suite.py)
#   make device-prep                            # here, once: the wheelhouse .whl/ that travels with the tree
#
# Options: --smoke | --out DIR (default $OUT, else a temp dir) | --budget SECONDS (default 300; smoke 240)
#          | --install (smoke: install like on the device too) | -h
# Environment: SERVE_ARGS (quickstep-serve flags for the serving stage; GPU default "--torch-dtype=bfloat16
# --torch-channels-last", e.g. add --torch-compile --torch-compile-mode=reduce-overhead), PY (python to use).
#
# Writes into the output folder (at most 8 files, for the device tool): suite.log (every stage's output, tee'd as it
# runs, so a timeout still returns it), results.json + results.md (stages, pytest -m gpu, targets, tables),
# bench_generation.json, bench_training.json, train.json, serve.json.  Every stage runs under `timeout`, capped by
# what is left of the budget, so one failure cannot eat the rest; the suite's exit status is 0 when every stage
# passed, 1 otherwise (results are written either way).
#
# On the device (python3 3.12 with torch+CUDA, no package index): the project is installed with
# `pip install --no-deps` (editable, no build isolation; a package-dir finder if that fails) and the wheelhouse
# (fastapi, starlette, uvicorn, pydantic, pydantic-settings, ...) is unpacked with --no-index --no-deps into /tmp.
# shellcheck disable=SC2054  # the commas inside the argument arrays are part of the arguments
set -u -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
ROOT=$(pwd)

MODE=gpu
BUDGET=""
OUTDIR="${OUT:-}"
INSTALL=""
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) MODE=smoke ;;
    --out) OUTDIR="$2"; shift ;;
    --budget) BUDGET="$2"; shift ;;
    --install) INSTALL=1 ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "device_suite.sh: unknown option '$1' (allowed: --smoke, --out DIR, --budget SECONDS, --install, -h)" >&2
       exit 2 ;;
  esac
  shift
done
[ -n "$BUDGET" ] || BUDGET=$([ "$MODE" = smoke ] && echo 240 || echo 300)
[ -n "$INSTALL" ] || INSTALL=$([ "$MODE" = gpu ] && echo 1 || echo 0)
if [ -z "$OUTDIR" ]; then OUTDIR=$(mktemp -d /tmp/quickstep-suite.XXXXXX); fi
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
WORK=$(mktemp -d /tmp/quickstep-work.XXXXXX)
LOG="$OUTDIR/suite.log"
: > "$LOG"
STAGES="$WORK/stages.jsonl"
RESERVE=8  # seconds kept for the report
START=$SECONDS
FAILED=0
export PYTHONUNBUFFERED=1 GRADIO_ANALYTICS_ENABLED=False OMP_NUM_THREADS="${OMP_NUM_THREADS:-$([ "$MODE" = smoke ] && echo 1 || echo 8)}"
if [ -z "${PY:-}" ]; then
  if [ "$MODE" = smoke ] && [ -x .venv/bin/python ]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi

say() { echo "[suite +$((SECONDS - START))s] $*" | tee -a "$LOG"; }

record() {  # record NAME STATUS RC SECONDS TIMEOUT
  printf '{"stage": "%s", "status": "%s", "rc": %s, "seconds": %s, "timeout": %s}\n' "$1" "$2" "$3" "$4" "$5" >> "$STAGES"
}

stage() {  # stage NAME CAP_SECONDS CMD...: time-boxed by min(CAP, budget left); output into suite.log as it runs
  local name=$1 cap=$2
  shift 2
  local left=$((BUDGET - (SECONDS - START) - RESERVE))
  local t=$cap
  [ "$left" -lt "$t" ] && t=$left
  if [ "$t" -lt 5 ]; then
    say "SKIP $name: the budget is spent"
    record "$name" skipped 0 0 "$cap"
    FAILED=1
    return 0
  fi
  say "BEGIN $name (timeout ${t}s): $*"
  local t0=$SECONDS rc status=ok
  timeout -k 10 "$t" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status=timeout; elif [ "$rc" -ne 0 ]; then status="failed"; fi
  [ "$status" = ok ] || FAILED=1
  say "END $name: $status (rc $rc) in $((SECONDS - t0))s"
  record "$name" "$status" "$rc" $((SECONDS - t0)) "$t"
}

# ------------------------------------------------------------------------------------------------ environment
say "Quickstep device suite, mode $MODE, budget ${BUDGET}s, output $OUTDIR, python $PY"
"$PY" - "$WORK/env.json" "$MODE" <<'EOF' 2>&1 | tee -a "$LOG"
import json, platform, sys, time
info = {"mode": sys.argv[2], "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
try:
    import torch
    info["torch"] = torch.__version__
    info["cuda"] = torch.cuda.is_available()
    info["device"] = torch.cuda.get_device_name(0) if info["cuda"] else f"CPU ({platform.processor() or platform.machine()})"
    info["cuda_version"] = torch.version.cuda
except Exception as e:  # noqa: BLE001
    info["torch_error"] = repr(e)
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(json.dumps(info))
EOF
if [ "$MODE" = gpu ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  say "no CUDA device here: run with --smoke on a CPU machine"
  record env "failed: no CUDA" 1 0 0
  "$PY" scripts/device_report.py report "$WORK" "$OUTDIR" >> "$LOG" 2>&1
  exit 1
fi

# ------------------------------------------------------------------------------------------------ install
if [ "$INSTALL" = 1 ]; then
  t0=$SECONDS
  SITE=/tmp/quickstep-site
  status=ok
  if ls .whl/*.whl > /dev/null 2>&1; then
    timeout 90 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      .whl/*.whl 2>&1 | tee -a "$LOG" || status="failed: wheelhouse"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    export PATH="$SITE/bin:$PATH"
  else
    say "no wheelhouse in .whl/ (run 'make device-prep' before the device run); serving stages will fail"
    status="failed: no wheelhouse"
  fi
  if ! timeout 90 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tee -a "$LOG" \
      || ! (cd /tmp && "$PY" -c "import quickstep.train.core") 2>/dev/null; then
    # what setuptools' editable install does: a finder for pyproject's package-dir mapping, here loaded by a
    # sitecustomize module on PYTHONPATH (the repo's own quickstep/ then gets its subpackages from the tree)
    say "pip install -e . did not work here; importing the project through a package-dir finder (sitecustomize)"
    mkdir -p "$SITE"
    cat > "$SITE/sitecustomize.py" <<PYEOF
import importlib.abc, importlib.util, sys
_MAP = {"quickstep": "$ROOT/quickstep", "quickstep.train": "$ROOT/train", "quickstep.export": "$ROOT/export",
        "quickstep.serve": "$ROOT/serve", "quickstep.client": "$ROOT/client"}
class _QuickstepFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        d = _MAP.get(name)
        return None if d is None else importlib.util.spec_from_file_location(
            name, d + "/__init__.py", submodule_search_locations=[d])
sys.meta_path.insert(0, _QuickstepFinder())
PYEOF
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  fi
  (cd /tmp && "$PY" -c "import quickstep.train.loop, quickstep.serve.app, quickstep.export.aoti; print('quickstep importable')") \
    2>&1 | tee -a "$LOG" || status="failed: import"
  say "install: $status in $((SECONDS - t0))s"
  record install "$status" 0 $((SECONDS - t0)) 180
  [ "$status" = ok ] || FAILED=1
fi

# ------------------------------------------------------------------------------------------------ stages
if [ "$MODE" = gpu ]; then
  DEV=cuda
  GEN_ARGS=(--models digits,cifar --batches 1,8,64,256 --backends eager,compile,aoti --steps 1
            --precision fp32,bf16,bf16w --compile-precisions bf16w --compile-models digits,cifar
            --compile-batches 1,8,64,256 --compile-dynamic --repeats 5 --max-call-s 5 --cell-budget-s 6)
  TRAIN_BENCH=(--model cifar --batch 256 --iters 3)
  TRAIN_SETS=(--set device=cuda --set batch_size=256 --set max_seconds=20)
  SERVE=(--requests 100 --seconds 2 --clients 1,32 --max-batch 32 --ready-s 30 --route-requests 100 --route-repeats 3)
  DEFAULT_SERVE_ARGS="--torch-dtype=bfloat16 --torch-channels-last"
  CAPS=(100 70 35 55 35)  # seconds: pytest, generation, training bench, teacher + sCD, serving
else
  DEV=cpu
  GEN_ARGS=(--models digits --batches 2 --backends eager --steps 1,2 --precision fp32,bf16w --repeats 1
            --threads 1 --peak-sizes 256)
  TRAIN_BENCH=(--model digits --batch 4 --iters 1 --threads 1)
  TRAIN_SETS=(--set device=cpu --set batch_size=8 --set max_seconds=2 --set log.every=1)
  SERVE=(--requests 5 --seconds 0.5 --clients 1,2 --max-batch 2 --ready-s 100 --route-requests 0)
  DEFAULT_SERVE_ARGS=""
  CAPS=(120 120 120 180 120)  # generous: on shared CPU cores the budget, not a stage cap, should bound the run
fi
# the gpu-marked tests (on CPU they are collected and skipped: the smoke run keeps their imports honest)
GPU_TESTS=(tests/train/core/test_model.py tests/train/core/test_fast_path.py tests/train/test_gpu_options.py
           tests/serve/test_gpu.py tests/export/test_aoti_trt.py)
[ "$MODE" = gpu ] && GPU_TESTS=(tests/train tests/serve tests/export)
COMMON_TRAIN=(--steps 100000 --set log.progress=false --set log.tensorboard=false --set log.samples=false
              --set log.ckpt_every=1000000)

stage pytest_gpu "${CAPS[0]}" "$PY" -m pytest -m gpu -v -rs -p no:cacheprovider --junitxml="$WORK/pytest.xml" \
  "${GPU_TESTS[@]}"

stage bench_generation "${CAPS[1]}" "$PY" tests/benchmarks/bench_generation.py --device "$DEV" "${GEN_ARGS[@]}" \
  --json "$OUTDIR/bench_generation.json"

stage bench_training "${CAPS[2]}" "$PY" tests/benchmarks/bench_training.py --device "$DEV" "${TRAIN_BENCH[@]}" \
  --variants DSM,DSM+CP,DSM+FP,STF,sCT,sCD --json "$OUTDIR/bench_training.json"

# shellcheck disable=SC2016  # expanded by the inner bash
stage train_teacher_scd "${CAPS[3]}" bash -c '
  set -e -o pipefail
  "$0" -m quickstep.train.cli fit --preset digits-stf --out "$1/teacher" "${@:3}"
  "$0" -m quickstep.train.cli fit --preset digits-scd --teacher "$1/teacher" --out "$1/student" "${@:3}"
  "$0" scripts/device_report.py train "$1/teacher" "$1/student" --out "$2"
' "$PY" "$WORK" "$OUTDIR/train.json" "${TRAIN_SETS[@]}" "${COMMON_TRAIN[@]}"

SERVE_FLAGS=()
# shellcheck disable=SC2086  # SERVE_ARGS is a space-separated list of flags
for a in ${SERVE_ARGS-$DEFAULT_SERVE_ARGS}; do SERVE_FLAGS+=("--server-arg=$a"); done
stage serve "${CAPS[4]}" "$PY" tests/benchmarks/bench_serve.py --backend torch --device "$DEV" \
  --bundle serve/bundled/digits-direct-cm --batching on "${SERVE[@]}" ${SERVE_FLAGS[@]+"${SERVE_FLAGS[@]}"} \
  --json "$OUTDIR/serve.json"

# ------------------------------------------------------------------------------------------------ report
"$PY" scripts/device_report.py report "$WORK" "$OUTDIR" 2>&1 | tee -a "$LOG" || FAILED=1
say "done in $((SECONDS - START))s; results in $OUTDIR (results.md, results.json); failed stages: $FAILED"
rm -rf "$WORK"
exit "$FAILED"
