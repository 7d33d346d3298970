#!/usr/bin/env bash
# Fill blanks with a GLM model. Every flag is listed by `bash scripts/generate.sh --help`; the defaults are
# those of the original GLM-130B scripts/generate.sh (nucleus sampling, top-p 0.7, seed 1234).
# Without --checkpoint it runs the bundled default model.
set -euo pipefail
main_dir=$(dirname "$(dirname "$(realpath "$0")")")
export PYTHONPATH="${main_dir}${PYTHONPATH:+:${PYTHONPATH}}"
# MP_SIZE=N (the original's name) runs N tensor-parallel processes on this machine under torchrun.
MP_SIZE=${MP_SIZE:-1}
if [ "$MP_SIZE" -gt 1 ]; then
    # torchrun's own process imports torch without numpy (not a dependency) and would warn about it
    export PYTHONWARNINGS="ignore:Failed to initialize NumPy${PYTHONWARNINGS:+,${PYTHONWARNINGS}}"
    exec python -m torch.distributed.run --standalone --nproc-per-node "$MP_SIZE" \
        -m glm.generate --tensor-parallel-size "$MP_SIZE" "$@"
fi
exec python -m glm.generate "$@"
