# Sourced by examples/slurm/*.sbatch. Each script sets NODES, GPUS_PER_NODE and ARGS (the flags
# of examples/pretrain_dsv3.py), then calls `launch "$@"`: flags given to the script come last
# and override its own.
#   sbatch:     one torchrun per node (srun), GPUS_PER_NODE processes each.
#   DRY_RUN=1:  here, without GPUs or srun: Megatron-LM's parser and megatron_dsv3.launch's checks
#               over the same flags as on NODES x GPUS_PER_NODE GPUs, then the parallel layout.

PYTHON=${PYTHON:-python}

launch() {
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
        echo "dry run of $(basename "$0"): $NODES nodes x $GPUS_PER_NODE GPUs"
        WORLD_SIZE=$((NODES * GPUS_PER_NODE)) RANK=0 LOCAL_WORLD_SIZE=$GPUS_PER_NODE \
            exec "$PYTHON" "$REPO/examples/pretrain_dsv3.py" --dry-run "${ARGS[@]}" "$@"
    fi
    local master
    master=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    srun --nodes="$NODES" --ntasks-per-node=1 \
        "$PYTHON" -m torch.distributed.run --nnodes="$NODES" --nproc-per-node="$GPUS_PER_NODE" \
        --rdzv-backend=c10d --rdzv-endpoint="$master:${MASTER_PORT:-29500}" --rdzv-id="$SLURM_JOB_ID" \
        "$REPO/examples/pretrain_dsv3.py" "${ARGS[@]}" "$@"
}
