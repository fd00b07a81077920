#!/usr/bin/env bash
# Single-node multi-GPU training of crate_jax: one process that sees all local GPUs.
#
#   launch/gpu_local.sh CONFIG WORKDIR [--config.KEY=VALUE ...]
#   DRY_RUN=1 launch/gpu_local.sh CONFIG WORKDIR ...    # print the command, run nothing
#
# e.g. launch/gpu_local.sh 'configs/clipa.py:variant=B/16,stage=pretrain,fsdp=-1,remat=full,txt_len=32,shards=/data/datacomp/{00000..00099}.tar,vocab=/data/vocab.txt' runs/clipa_b16
#
# Uses <repo>/.venv/bin/python if it exists, else python3 (override with PYTHON). Choose GPUs
# with CUDA_VISIBLE_DEVICES. No jax.distributed set-up is needed for one process; the SLURM task
# variables are removed so that neither crate_jax.train (which initialises jax.distributed when
# SLURM_NTASKS > 1) nor jax's SLURM detection mistakes an interactive allocation (salloc,
# srun --pty) for a multi-process job and restricts the process to one GPU.
# Ctrl-C or SIGTERM makes training save a checkpoint at the next step and exit; rerunning the
# same command on the same WORKDIR resumes.
set -euo pipefail

if [ $# -lt 2 ]; then
  echo "gpu_local.sh: error: CONFIG and WORKDIR are required" >&2
  echo "usage: launch/gpu_local.sh CONFIG WORKDIR [--config.KEY=VALUE ...]" >&2
  exit 2
fi
CONFIG=$1
WORKDIR=$2
shift 2
config_file=${CONFIG%%:*}
case "$config_file" in
  /*|../*|*/../*) echo "gpu_local.sh: error: CONFIG '$CONFIG' must be FILE.py[:ARGS] relative to the repository root" >&2; exit 2 ;;
  *.py) ;;
  *) echo "gpu_local.sh: error: CONFIG '$CONFIG' must be FILE.py[:ARGS], e.g. configs/clipa.py:variant=B/16" >&2; exit 2 ;;
esac
case "$WORKDIR" in
  /*|*://*) ;;
  *) WORKDIR=$PWD/$WORKDIR ;;  # the job runs from the repository root
esac
for arg in "$@"; do
  case "$arg" in
    --config.*=*) ;;
    *) echo "gpu_local.sh: error: extra argument '$arg' is not of the form --config.KEY=VALUE" >&2; exit 2 ;;
  esac
done

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$REPO_DIR/.venv/bin/python" ]; then PYTHON=$REPO_DIR/.venv/bin/python; else PYTHON=python3; fi
fi

cmd=(env -u SLURM_NTASKS -u SLURM_STEP_NODELIST -u SLURM_PROCID -u SLURM_LOCALID PYTHONUNBUFFERED=1
     "$PYTHON" -m crate_jax.train --config "$CONFIG" --workdir "$WORKDIR" "$@")

print_cmd() {  # the quoting of Python's shlex.join: plain words bare, others in '...'
  local out="" a
  for a in "$@"; do
    if [[ -n "$a" && "$a" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then out+="$a "; else out+="${a@Q} "; fi
  done
  echo "${out% }"
}

if [ "${DRY_RUN:-0}" = 1 ]; then
  print_cmd "${cmd[@]}"
  exit 0
fi
cd "$REPO_DIR"
exec "${cmd[@]}"
