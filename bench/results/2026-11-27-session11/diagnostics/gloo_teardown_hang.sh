#!/bin/bash
# Session 11 (CPU, this repository's 2-core machine): how often a 2-rank CPU preflight job hangs at exit.
# PY: a python with torch 2.2.2 / torchvision 0.17.2 / numpy<2 (a separate venv). Usage: gloo_teardown_hang.sh RUNS
# Without the pause in distributed.destroy_process_group: 5 of 15 runs hung (an earlier loop of the same command),
# then 1 of 8 with this script (rank 1 in ~ProcessGroupGloo holding the GIL, a gloo worker waiting for it to free
# a finished all-gather's tensors; py-spy dump --native). With it (a1fba67): 0 of 20, then 0 of 4.
cd "$(git rev-parse --show-toplevel)"
hangs=0
for i in $(seq 1 "$1"); do
  rm -rf /tmp/gloo-hang
  # its own session, so that a hung launcher and its ranks can be killed together
  RESNET_DDP_TEST_SLOW_RANK=1:0.1 setsid "${PY:-python}" train.py --cpu --nproc-per-node 2 --arch resnet18 \
    --image-size 32 --dataset-size 64 --batch-size 8 --epochs 2 --num-workers 0 --num-classes 10 --lr 0.01 \
    --preflight-only --save-dir /tmp/gloo-hang > /tmp/gloo-hang.log 2>&1 &
  job=$!
  for _ in $(seq 1 30); do sleep 1; kill -0 $job 2>/dev/null || break; done
  if kill -0 $job 2>/dev/null; then hangs=$((hangs + 1)); kill -9 -- -$job; fi
done
echo "runs=$1 hangs=$hangs (a run still alive after 30 s counts as hung; a healthy one ends in about 5 s)"
