#!/usr/bin/env bash
# Multi-node training with torchrun: run this on every node with the same MASTER_ADDR and its own NODE_RANK.
#   MASTER_ADDR=node0 NODE_RANK=0 NNODES=4 bash launch/multinode.sh configs/cc3m_isogclr.yaml data.batch_size=16
# The global batch is NNODES x GPUS_PER_NODE x data.batch_size; the per-sample state is sharded: each
# process keeps the ids it owns (id % processes) and fetches a step's rows with one all-reduce (docs/design.md §5.2).
set -euo pipefail
CONFIG=${1:?usage: multinode.sh CONFIG [key=value ...]}; shift
: "${MASTER_ADDR:?set MASTER_ADDR to the hostname of the first node}"
: "${NODE_RANK:?set NODE_RANK (0..NNODES-1)}"
NNODES=${NNODES:-2}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_PORT=${MASTER_PORT:-29500}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
exec torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS_PER_NODE" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  -m clip_dro.cli train --config "$CONFIG" train.resume=latest "$@"
