#!/usr/bin/env bash
# One device call: every GPU figure of the benchmarks, SD 2.1-base architecture with random weights, fp16.
# Usage on a lent GPU machine (wheels carried in .whl, see the device tool's README):
#   bash bench/gpu_check.sh 2>&1 | tee $OUT/gpu.log
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# Generation cost per step vs plain diffusers SD with CFG, batch 1 and 8 (targets: joint <= 1.08x, compositional < 1.55x).
python bench/method.py --model sd21-random --device cuda --dtype fp16 --resolution 512 --batch 1 --steps 20 --skip caching
python bench/method.py --model sd21-random --device cuda --dtype fp16 --resolution 512 --batch 8 --steps 20 --cache-images 64 --cache-batch 32
# Caching job vs the bare loop, data read from and written to S3 (target >= 0.9).
python bench/caching_job.py --model sd21-random --subjects 512 --batch-size 32 --actors 1 --gpus-per-actor 1 --s3
# Training: samples/s vs the bare forward+backward loop, peak memory, batch 8/16, checkpointing off/on.
python bench/training.py --model sd21-random --device cuda --batches 8,16 --checkpointing both --steps 6 --data-workers 8
