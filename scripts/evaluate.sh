#!/usr/bin/env bash
# Evaluate a GLM model on YAML task configs: `bash scripts/evaluate.sh tasks/offline/zh_idiom_cloze.yaml`.
# Positional arguments are task files or folders (as the original script); every flag is listed by
# `bash scripts/evaluate.sh --help`. Without --checkpoint it runs the bundled default model; task paths are
# relative to the repository root unless --data-path says otherwise. Results go to logs/evaluate-<time>.json.
set -euo pipefail
main_dir=$(dirname "$(dirname "$(realpath "$0")")")
export PYTHONPATH="${main_dir}${PYTHONPATH:+:${PYTHONPATH}}"
# MP_SIZE=N (the original's name) runs N tensor-parallel processes on this machine under torchrun;
# NPROC=M (default MP_SIZE) runs M processes, M / N data-parallel replicas that share the samples.
MP_SIZE=${MP_SIZE:-1}
NPROC=${NPROC:-$MP_SIZE}
if [ "$NPROC" -gt 1 ]; then
    # torchrun's own process imports torch without numpy (not a dependency) and would warn about it
    export PYTHONWARNINGS="ignore:Failed to initialize NumPy${PYTHONWARNINGS:+,${PYTHONWARNINGS}}"
    exec python -m torch.distributed.run --standalone --nproc-per-node "$NPROC" \
        -m glm.evaluate --tensor-parallel-size "$MP_SIZE" "$@"
fi
exec python -m glm.evaluate "$@"
