#!/usr/bin/env bash
# Jindal (2023) Table 1: textual_inversion vs finetune vs lora, SD 1.4, the DreamBooth dog, batch 2:
# 3 jobs, then the report. About 1.5 GPU-hours on one A100-class GPU (experiments/README.md).
# FID/IS need the Inception extra: pip install -e '.[fidelity]'
#   experiments/jindal2023_table1.sh                      # sequential, this machine
#   experiments/jindal2023_table1.sh parallel 3           # the 3 jobs at once (one GPU: if memory allows)
#   experiments/jindal2023_table1.sh slurm <partition>
#   experiments/jindal2023_table1.sh smoke                # the CPU twin (tiny model, 2 sample dogs), ~1 min
set -euo pipefail
here="$(dirname "$0")"
if [ "${1:-}" = "smoke" ]; then shift; exec "$here/launch.sh" jindal2023_table1_smoke "$@"; fi
exec "$here/launch.sh" jindal2023_table1 "$@"
