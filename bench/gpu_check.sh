#!/usr/bin/env bash
# The tensor-parallel checks with CUDA and NCCL (bench/gpu_check.py), bounded at 8 minutes.
set -euo pipefail
cd "$(dirname "$(dirname "$(realpath "$0")")")"
exec timeout 480 python bench/gpu_check.py "$@"
