#!/usr/bin/env bash
# Zeng et al. (2023) Table 1: two_stage vs dreambooth, SD 2.1-base, 30 subjects x 2 methods = 60 jobs,
# then the report. About 15 GPU-hours on one A100-class GPU (experiments/README.md).
#   experiments/zeng2023_table1.sh                        # sequential, this machine
#   experiments/zeng2023_table1.sh slurm <partition>      # SLURM array, one GPU per job
#   experiments/zeng2023_table1.sh local-gpus             # one sweep per visible GPU
#   experiments/zeng2023_table1.sh smoke                  # the CPU twin (tiny model, 2 sample dogs), ~1 min
set -euo pipefail
here="$(dirname "$0")"
if [ "${1:-}" = "smoke" ]; then shift; exec "$here/launch.sh" zeng2023_table1_smoke "$@"; fi
exec "$here/launch.sh" zeng2023_table1 "$@"
