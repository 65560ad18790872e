#!/bin/sh
# Entrypoint of the Quickstep GPU image (docker/Dockerfile.gpu).
#
# TensorRT engines are tied to the GPU model and the TensorRT version that built them, so they cannot
# ship inside the image. At start-up this script:
#   1. finds the bundles to serve (QUICKSTEP_BUNDLE='a,b', else every bundle in QUICKSTEP_MODELS_DIR,
#      else the bundled default model inside the package) - name them through these variables, not
#      through --bundle/--models-dir arguments, which go to quickstep-serve unseen by this script;
#   2. with QUICKSTEP_BACKEND=tensorrt and a usable GPU: for each bundle, looks for a copy with engines
#      in the cache volume under a key naming this GPU and TensorRT version
#      ($QUICKSTEP_ENGINE_CACHE/<gpu>-sm<cc>-trt<version>/<bundle>); if none exists, copies the bundle
#      there and runs `quickstep-export tensorrt --bundle <copy>` once (atomic rename, so concurrent
#      replicas sharing the volume never see half-built engines; the timing cache stays beside them);
#   3. execs `quickstep-serve "$@"` on the engine-carrying copies (QUICKSTEP_BUNDLE is rewritten).
# Without a usable GPU or TensorRT it falls back to onnxruntime (QUICKSTEP_TRT_FALLBACK=onnxruntime,
# the default) or stops with an error (QUICKSTEP_TRT_FALLBACK=fail).
#
# Environment: QUICKSTEP_ENGINE_CACHE (default /cache/engines), QUICKSTEP_GPU_KEY (skip detection and
# use this cache key), QUICKSTEP_TRT_EXPORT_ARGS (extra arguments for `quickstep-export tensorrt`,
# e.g. '--batch 1,8,32,64'),
# QUICKSTEP_PYTHON (interpreter for the detection, default python), plus every QUICKSTEP_* of the server.
set -eu

log() { printf 'quickstep-gpu-entrypoint: %s\n' "$*" >&2; }

# A failed or interrupted engine build leaves nothing behind in the cache volume.
tmp=""
cleanup() { if [ -n "$tmp" ]; then rm -rf "$tmp"; fi; }
trap cleanup EXIT
trap 'exit 143' TERM INT

cache=${QUICKSTEP_ENGINE_CACHE:-/cache/engines}
backend=${QUICKSTEP_BACKEND:-tensorrt}
fallback=${QUICKSTEP_TRT_FALLBACK:-onnxruntime}
py=${QUICKSTEP_PYTHON:-python}

case $fallback in
  onnxruntime | fail) ;;
  *) log "QUICKSTEP_TRT_FALLBACK must be 'onnxruntime' or 'fail', got '$fallback'"; exit 2 ;;
esac

# The bundles to serve, one per line.
bundles() {
  if [ -n "${QUICKSTEP_BUNDLE:-}" ]; then
    printf '%s\n' "$QUICKSTEP_BUNDLE" | tr ',' '\n' | sed -e 's/^ *//' -e 's/ *$//' -e '/^$/d'
  elif [ -n "${QUICKSTEP_MODELS_DIR:-}" ]; then
    for d in "$QUICKSTEP_MODELS_DIR"/*/; do
      if [ -f "${d}manifest.json" ]; then printf '%s\n' "${d%/}"; fi
    done
  else
    "$py" -c 'import sys
from quickstep.serve.bundle import BundleError, bundled_default
try:
    print(bundled_default())
except BundleError as e:
    sys.exit(f"quickstep-gpu-entrypoint: {e}")'
  fi
}

# "<gpu name>-sm<major><minor>-trt<version>" for GPU 0, or nothing when TensorRT cannot run here.
gpu_key() {
  if [ -n "${QUICKSTEP_GPU_KEY:-}" ]; then
    printf '%s\n' "$QUICKSTEP_GPU_KEY"
    return 0
  fi
  "$py" - <<'EOF' 2>/dev/null || true
import tensorrt
import torch

if torch.cuda.is_available():
    major, minor = torch.cuda.get_device_capability(0)
    print(f"{torch.cuda.get_device_name(0)}-sm{major}{minor}-trt{tensorrt.__version__}")
EOF
}

if [ "$backend" = tensorrt ]; then
  key=$(gpu_key | tr -c 'A-Za-z0-9._\n-' '_')
  if [ -z "$key" ]; then
    if [ "$fallback" = fail ]; then
      log "QUICKSTEP_BACKEND=tensorrt but no CUDA GPU with TensorRT is usable here (QUICKSTEP_TRT_FALLBACK=fail)"
      exit 1
    fi
    log "no CUDA GPU with TensorRT is usable here: serving with onnxruntime instead of tensorrt"
    backend=onnxruntime
  else
    list=$(bundles)
    if [ -z "$list" ]; then log "no bundle to serve"; exit 1; fi
    served=""
    nl='
'
    old_ifs=$IFS
    IFS=$nl
    for src in $list; do
      IFS=$old_ifs
      src=${src%/}
      name=$(basename "$src")
      dest="$cache/$key/$name"
      if [ -f "$dest/.engines-complete" ]; then
        log "using cached TensorRT engines for $name in $dest"
      else
        log "building TensorRT engines for $name on $key (once; cached in $dest)"
        mkdir -p "$cache/$key"
        tmp="$dest.tmp.$$"
        rm -rf "$tmp"
        cp -R "$src" "$tmp"
        chmod -R u+w "$tmp"
        # shellcheck disable=SC2086  # QUICKSTEP_TRT_EXPORT_ARGS is a list of arguments, split on purpose
        quickstep-export tensorrt --bundle "$tmp" --timing-cache "$cache/$key/timing.cache" \
          ${QUICKSTEP_TRT_EXPORT_ARGS:-}
        touch "$tmp/.engines-complete"
        if ! mv -T "$tmp" "$dest" 2>/dev/null; then
          log "another replica finished $dest first; using its engines"
          rm -rf "$tmp"
        fi
        tmp=""
      fi
      served=${served:+$served,}$dest
    done
    IFS=$old_ifs
    export QUICKSTEP_BUNDLE="$served"
    unset QUICKSTEP_MODELS_DIR
  fi
fi

export QUICKSTEP_BACKEND="$backend"
exec quickstep-serve "$@"
