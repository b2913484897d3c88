#!/usr/bin/env bash
# Launch a paper-table sweep and print its report.
#
#   experiments/launch.sh EXPERIMENT [MODE [ARG]] [-- hydra overrides...]
#
#   MODE        how the jobs run
#   local       one after the other in this process (Hydra's basic launcher; the default)
#   parallel N  N at a time on this machine (hydra/launcher=local_parallel, joblib)
#   local-gpus  one sequential sweep per visible GPU, the table's subjects dealt out between them
#   slurm [P]   one SLURM job per sweep job, one GPU each, on partition P (hydra/launcher=slurm)
#   slurm-local the SLURM launcher's code path on this machine (submitit's local executor)
#
# Examples:
#   experiments/launch.sh zeng2023_table1_smoke                   # CPU, about a minute
#   experiments/launch.sh zeng2023_table1 slurm gpu -- logger=wandb
#   experiments/launch.sh jindal2023_table1 local-gpus -- hardware=gpu_bf16
#
# Every mode first generates the DreamBooth class images once per class (prepare_class_images.py),
# so parallel jobs of one class find them made. A failing job leaves FAILED in its run dir and the
# others go on; the report then lists it under "Missing". Outputs: ${PERSONALIZE_OUTPUTS:-outputs}/.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
bin="${VENV:-$root/.venv}/bin"
[ -x "$bin/personalize" ] || bin="$(dirname "$(command -v personalize)")"

[ $# -ge 1 ] || { sed -n '2,23p' "$0"; exit 2; }
experiment="$1"; shift
mode="local"; arg=""
if [ $# -ge 1 ] && [ "$1" != "--" ]; then mode="$1"; shift; fi
if [ $# -ge 1 ] && [ "$1" != "--" ]; then arg="$1"; shift; fi
[ "${1:-}" = "--" ] && shift
overrides=("experiment=$experiment" "$@")

"$bin/python" "$here/prepare_class_images.py" "${overrides[@]}"

status=0
case "$mode" in
  local)
    "$bin/personalize" -m "${overrides[@]}" || status=$? ;;
  parallel)
    "$bin/personalize" -m "${overrides[@]}" hydra/launcher=local_parallel "hydra.launcher.n_jobs=${arg:-2}" || status=$? ;;
  slurm)
    extra=(); [ -n "$arg" ] && extra=("hydra.launcher.partition=$arg")
    "$bin/personalize" -m "${overrides[@]}" hydra/launcher=slurm "${extra[@]}" || status=$? ;;
  slurm-local)
    "$bin/personalize" -m "${overrides[@]}" hydra/launcher=slurm_local || status=$? ;;
  local-gpus)
    if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then IFS=',' read -r -a gpus <<< "$CUDA_VISIBLE_DEVICES"
    else mapfile -t gpus < <(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null || true); fi
    [ ${#gpus[@]} -gt 0 ] || { echo "local-gpus: no GPU visible (nvidia-smi, CUDA_VISIBLE_DEVICES)" >&2; exit 2; }
    read -r -a subjects <<< "$("$bin/python" -c "import sys; from personalize.config import compose
c = compose('train', sys.argv[1:], output_dir='/unused'); print(' '.join(c.table.subjects))" "${overrides[@]}")"
    stamp="$(date +%Y-%m-%d_%H-%M-%S)"
    pids=()
    for k in "${!gpus[@]}"; do
      mine=(); for i in "${!subjects[@]}"; do [ $((i % ${#gpus[@]})) -eq "$k" ] && mine+=("${subjects[$i]}"); done
      [ ${#mine[@]} -gt 0 ] || continue
      list="$(IFS=,; echo "${mine[*]}")"
      # its own sweep dir per GPU: two sweeps started in the same second never share a folder
      CUDA_VISIBLE_DEVICES="${gpus[$k]}" "$bin/personalize" -m "${overrides[@]}" "subject=$list" \
        "hydra.sweep.dir=\${paths.log_dir}/\${task_name}/multiruns/\${group}/${stamp}_gpu${gpus[$k]}" \
        > "sweep-gpu${gpus[$k]}-$stamp.log" 2>&1 &
      pids+=($!)
      echo "GPU ${gpus[$k]}: ${#mine[@]} subject(s), log sweep-gpu${gpus[$k]}-$stamp.log"
    done
    for pid in "${pids[@]}"; do wait "$pid" || status=$?; done ;;
  *)
    echo "unknown mode '$mode': local | parallel N | local-gpus | slurm [PARTITION] | slurm-local" >&2; exit 2 ;;
esac

[ $status -eq 0 ] || echo "some jobs failed (exit $status): their run dirs hold FAILED; the report lists them" >&2
# the report takes the overrides that say where runs are and how to log (paths.*, logger)
report_overrides=(); for o in "$@"; do case "$o" in logger=*|logger.*|paths.*) report_overrides+=("$o");; esac; done
"$bin/personalize-report" "experiment=$experiment" "${report_overrides[@]}"
exit $status
