#!/usr/bin/env bash
# Create a TPU VM pod slice, install precise-jax on every worker, run the same command on all of them, collect the
# results, delete the slice. Every gcloud command is printed; --dry-run prints them without running anything.
#
#   tpu/pod.sh create  --name NAME --zone ZONE --slice v5e-16 [--project P] [--spot]
#   tpu/pod.sh install --name NAME --zone ZONE --slice v5e-16
#   tpu/pod.sh run     --name NAME --zone ZONE --slice v5e-16 --model-size 7b -- precise-jax demo
#   tpu/pod.sh collect --name NAME --zone ZONE --slice v5e-16 --remote runs/out --local results/
#   tpu/pod.sh delete  --name NAME --zone ZONE
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tpu/presets.sh
source "$HERE/presets.sh"

usage() {
  sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  echo "slices: $SLICES; model sizes: $MODEL_SIZES"
}

die() {
  echo "tpu/pod.sh: $*" >&2
  exit 2
}

ACTION="${1:-}"
[ -n "$ACTION" ] || { usage >&2; exit 2; }
shift
NAME="" ZONE="" SLICE="" PROJECT="" MODEL_SIZE="small" REMOTE="runs" LOCAL="results" DRY_RUN=0 SPOT=0
SOURCE_DIR="$(cd "$HERE/.." && pwd)"
COMMAND=()
while [ $# -gt 0 ]; do
  case "$1" in
    --name) NAME="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --slice) SLICE="$2"; shift 2 ;;
    --project) PROJECT="$2"; shift 2 ;;
    --model-size) MODEL_SIZE="$2"; shift 2 ;;
    --remote) REMOTE="$2"; shift 2 ;;
    --local) LOCAL="$2"; shift 2 ;;
    --source) SOURCE_DIR="$2"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; COMMAND=("$@"); break ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

[ -n "$NAME" ] || die "--name is required (the TPU VM's name)"
[ -n "$ZONE" ] || die "--zone is required (e.g. us-central2-b for v4, us-west4-a for v5e)"
if [ "$ACTION" != delete ]; then
  [ -n "$SLICE" ] || die "--slice is required; one of: $SLICES"
  slice_preset "$SLICE" || die "unknown slice $SLICE; one of: $SLICES"
fi
model_mesh "$MODEL_SIZE" || die "unknown model size $MODEL_SIZE; one of: $MODEL_SIZES"

GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone "$ZONE")
[ -z "$PROJECT" ] || WHERE+=(--project "$PROJECT")

# Print a command (shell-quoted, so it can be pasted), then run it unless --dry-run.
step() {
  printf '+'
  printf ' %q' "$@"
  printf '\n'
  [ "$DRY_RUN" = 1 ] || "$@"
}

on_all_workers() {
  step "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command "$1"
}

case "$ACTION" in
  create)
    extra=()
    [ "$SPOT" = 0 ] || extra+=(--spot)
    step "${GCLOUD[@]}" create "$NAME" "${WHERE[@]}" --accelerator-type "$ACCELERATOR" --version "$RUNTIME" \
      "${extra[@]+"${extra[@]}"}"
    ;;
  install)
    # The working tree as one archive (no .venv, caches or runs), copied to every worker and installed there.
    archive="${TMPDIR:-/tmp}/precise-jax-$NAME.tar.gz"
    step tar -czf "$archive" -C "$SOURCE_DIR" --exclude=.venv --exclude=.git --exclude=runs --exclude=__pycache__ .
    step "${GCLOUD[@]}" scp "$archive" "$NAME:precise-jax.tar.gz" "${WHERE[@]}" --worker=all
    on_all_workers "mkdir -p precise-jax && tar -xzf precise-jax.tar.gz -C precise-jax && python3 -m pip install -U pip && python3 -m pip install 'jax[tpu]' -e ./precise-jax"
    ;;
  run)
    [ ${#COMMAND[@]} -gt 0 ] || die "run needs a command after --, e.g. -- precise-jax demo"
    printf -v quoted ' %q' "${COMMAND[@]}"
    # Every worker runs the same program; jax.distributed.initialize() finds its peers from the TPU metadata.
    on_all_workers "cd precise-jax && PRECISE_JAX_MESH='$MESH' PATH=\$HOME/.local/bin:\$PATH${quoted}"
    ;;
  collect)
    step mkdir -p "$LOCAL"
    for ((w = 0; w < WORKERS; w++)); do
      step mkdir -p "$LOCAL/worker-$w"
      step "${GCLOUD[@]}" scp --recurse "$NAME:precise-jax/$REMOTE" "$LOCAL/worker-$w/" "${WHERE[@]}" --worker="$w"
    done
    ;;
  delete)
    step "${GCLOUD[@]}" delete "$NAME" "${WHERE[@]}" --quiet
    ;;
  *)
    usage >&2
    die "unknown action $ACTION; one of: create install run collect delete"
    ;;
esac
