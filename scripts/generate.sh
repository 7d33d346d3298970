#!/usr/bin/env bash
# Fill blanks with a GLM model. Every flag is listed by `bash scripts/generate.sh --help`; the defaults are
# those of the original GLM-130B scripts/generate.sh (nucleus sampling, top-p 0.7, seed 1234).
# Without --checkpoint it runs the bundled default model.
set -euo pipefail
main_dir=$(dirname "$(dirname "$(realpath "$0")")")
export PYTHONPATH="${main_dir}${PYTHONPATH:+:${PYTHONPATH}}"
exec python -m glm.generate "$@"
