#!/bin/bash
# One node's share of train_torchrun.sbatch (run by srun, once per node): exec torchrun, so that
# the signals SLURM sends to the step reach torchrun and its workers, not a shell.
#
# Processes per node: PMSS_NPROC_PER_NODE, else the GPUs SLURM gave this node.
nproc=${PMSS_NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
if [ -z "$nproc" ] || [ "$nproc" = 0 ]; then
    echo "pmss_dist: no GPUs allocated on $(hostname): request them (--gpus-per-node) or, for a CPU run," \
         "set PMSS_NPROC_PER_NODE" >&2
    exit 2
fi
if [ "$SLURM_NODEID" = 0 ]; then is_host=true; else is_host=false; fi
# --signals-to-handle: without SIGUSR1 in the list the agent dies of it (the default action)
# and its workers are killed mid-save; with it, the agent passes it on to the workers and waits
# up to --shutdown-timeout seconds for them to save and exit before it kills them.
exec "${PYTHON:-python}" -m torch.distributed.run \
    --nnodes "$SLURM_NNODES" --nproc-per-node "$nproc" --node-rank "$SLURM_NODEID" \
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "pmss-$SLURM_JOB_ID" \
    --rdzv-conf "is_host=$is_host" --max-restarts 0 \
    --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout "${PMSS_STOP_TIMEOUT:-100}" \
    launch/train.py "$@"
