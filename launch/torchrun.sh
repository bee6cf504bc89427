#!/usr/bin/env bash
# Multi-GPU / multi-node launch with torchrun. Lightning reads torchrun's environment
# (TorchElasticEnvironment); devices and nodes are passed to the trainer so both agree.
#
#   NPROC=4 bash launch/torchrun.sh configs/mnist_pde.yaml                      # one node, 4 GPUs
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 NPROC=4 bash launch/torchrun.sh ...    # on node 0 (and NODE_RANK=1 on node 1)
#   ACCELERATOR=cpu NPROC=2 bash launch/torchrun.sh configs/quickstart.yaml       # 2 CPU processes (gloo)
# Extra arguments go to `pdelightning fit`, e.g. -c callbacks/all.yaml.
set -euo pipefail
CONFIG="${1:?usage: launch/torchrun.sh CONFIG [extra pdelightning args]}"; shift
NPROC="${NPROC:-$(python3 -c 'import torch; print(max(torch.cuda.device_count(), 1))' 2>/dev/null || echo 1)}"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
ACCELERATOR="${ACCELERATOR:-auto}"
TORCHRUN="${TORCHRUN:-$(dirname "$0")/../.venv/bin/torchrun}"
[ -x "$TORCHRUN" ] || TORCHRUN=torchrun
exec "$TORCHRUN" --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$NPROC" \
  --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
  -m pdelightning fit --config "$CONFIG" \
  --trainer.accelerator="$ACCELERATOR" --trainer.devices="$NPROC" --trainer.num_nodes="$NNODES" --trainer.strategy=ddp "$@"
