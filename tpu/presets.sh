# shellcheck shell=bash disable=SC2034  # the variables are read by pod.sh, which sources this file
# Presets sourced by pod.sh: TPU slices and, per model size, the mesh (data, fsdp, tensor) to run with.

# slice_preset SLICE: sets ACCELERATOR (gcloud --accelerator-type), RUNTIME (--version), WORKERS (hosts) and
# CHIPS (jax devices over all hosts). Unknown slice: returns 1.
slice_preset() {
  case "$1" in
    v4-8)    ACCELERATOR=v4-8;          RUNTIME=tpu-ubuntu2204-base;  WORKERS=1;  CHIPS=4 ;;
    v5e-16)  ACCELERATOR=v5litepod-16;  RUNTIME=v2-alpha-tpuv5-lite;  WORKERS=4;  CHIPS=16 ;;
    v5e-64)  ACCELERATOR=v5litepod-64;  RUNTIME=v2-alpha-tpuv5-lite;  WORKERS=16; CHIPS=64 ;;
    v5p-128) ACCELERATOR=v5p-128;       RUNTIME=v2-alpha-tpuv5;       WORKERS=16; CHIPS=64 ;;
    *) return 1 ;;
  esac
}

# model_mesh SIZE: sets MESH, a precise_jax.distributed mesh spec (-1: the remaining devices). Small models are
# replicated (data parallel); 7B-13B are sharded FSDP over all chips (bf16 weights + statistics fit in 16 GiB per
# v5e chip only when sharded); 34B-72B add 4-way tensor parallelism inside each 4-chip host.
model_mesh() {
  case "$1" in
    small) MESH="data=-1,fsdp=1,tensor=1" ;;
    7b)    MESH="data=1,fsdp=-1,tensor=1" ;;
    13b)   MESH="data=1,fsdp=-1,tensor=1" ;;
    34b)   MESH="data=1,fsdp=-1,tensor=4" ;;
    72b)   MESH="data=1,fsdp=-1,tensor=4" ;;
    *) return 1 ;;
  esac
}

SLICES="v4-8 v5e-16 v5e-64 v5p-128"
MODEL_SIZES="small 7b 13b 34b 72b"
