#!/usr/bin/env bash
# The prepared GPU check (bench/gpu_check.py): versions, NCCL, `pytest -m cuda`, the CUDA quantized kernels,
# the bundled model on CUDA (fp32, INT8/INT4, offload, compile / CUDA graphs) against the CPU, and the
# tensor-parallel checks with 2+ GPUs. Each step in its own process under its own timeout, within 8.5
# minutes; always ends with a JSON summary (--summary PATH, default bench/results/gpu-check.json) and a
# table. Without CUDA it is a dry run (exit status 0). `--only STEP ...` runs some steps; `--help` lists them.
set -uo pipefail
cd "$(dirname "$(dirname "$(realpath "$0")")")"
# The driver keeps to its own budget; this is a backstop: SIGTERM (the driver records the running step as
# timed out, writes the summary and the table), then SIGKILL (the summary holds the finished steps).
exec timeout --kill-after=15 540 "${PYTHON:-python}" -m bench.gpu_check "$@"
