#!/usr/bin/env bash
# prep -> train -> eval as three Slurm jobs, each starting only once the one before it succeeded (afterok);
# a failed stage cancels the ones after it. Run it on the login node; paths are relative to the checkout:
#
#   slurm/pipeline.sh configs/demo.yaml run.output_dir=runs/big prep.url_list=urls.parquet
#
# Every stage gets the same YAML files and overrides and reads its own section of them. The config is checked
# here, before anything is queued. Prints one line per stage: "<stage> <job id>".
#
# Environment:
#   PREP_ARRAY=0-7       one prep task per URL-list part ('%a' in the arguments becomes the part number; see
#                        slurm/prep.sbatch); train.data must then name every part's shards
#   SKIP_PREP=1          the shards exist already: submit train and eval only
#   TRAIN_SCRIPT         slurm/train.sbatch (one torchrun per node, the default) or slurm/train_srun.sbatch
#                        (one srun task per GPU)
#   PREP_SBATCH_ARGS, TRAIN_SBATCH_ARGS, EVAL_SBATCH_ARGS
#                        extra sbatch options for one stage, e.g. TRAIN_SBATCH_ARGS="--nodes=4 --time=48:00:00"
#   LOG_DIR              where the jobs' output files go (default: logs/slurm in the checkout)
#   PYTHON               the Python with clipline installed (default: the checkout's .venv)
set -euo pipefail

CLIPLINE_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export CLIPLINE_DIR
cd "$CLIPLINE_DIR"
PYTHON=${PYTHON:-$CLIPLINE_DIR/.venv/bin/python}
TRAIN_SCRIPT=${TRAIN_SCRIPT:-slurm/train.sbatch}
LOG_DIR=${LOG_DIR:-$CLIPLINE_DIR/logs/slurm}

if [ $# = 0 ]; then
    sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
[ -f "$TRAIN_SCRIPT" ] || { echo "pipeline: TRAIN_SCRIPT=$TRAIN_SCRIPT does not exist" >&2; exit 2; }
# A typo in the config fails now, not hours later when its job finally starts.
"$PYTHON" -m clipline config "$@" >/dev/null
mkdir -p "$LOG_DIR"

# submit SCRIPT DEPENDENCY EXTRA_OPTIONS [clipline arguments]: prints the job id.
submit() {
    local script=$1 after=$2 extra=$3
    shift 3
    local -a options
    read -r -a options <<<"$extra"
    local dependency=()
    [ -z "$after" ] || dependency=(--dependency="afterok:$after" --kill-on-invalid-dep=yes)
    sbatch --parsable --output="$LOG_DIR/%x-%j.out" "${dependency[@]}" "${options[@]}" "$script" "$@" \
        | cut -d';' -f1
}

prep_id=""
if [ -z "${SKIP_PREP:-}" ]; then
    prep_options="${PREP_SBATCH_ARGS:-}${PREP_ARRAY:+ --array=$PREP_ARRAY}"
    prep_id=$(submit slurm/prep.sbatch "" "$prep_options" "$@")
    echo "prep $prep_id"
fi
train_id=$(submit "$TRAIN_SCRIPT" "$prep_id" "${TRAIN_SBATCH_ARGS:-}" "$@")
echo "train $train_id"
eval_id=$(submit slurm/eval.sbatch "$train_id" "${EVAL_SBATCH_ARGS:-}" "$@")
echo "eval $eval_id"
