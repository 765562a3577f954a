#!/bin/bash
# Session 12, call B (x4): the harness's plan on the final code, in two commands. Usage: s12b.sh NAME GPUS CONFIGS
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
W=/tmp/s12b-$1; rm -rf $W; mkdir -p $W/logs/runs $W/res
{ nvidia-smi --query-gpu=name,driver_version --format=csv; nproc; nvidia-smi topo -m; git log --oneline -1; } > $W/logs/machine.txt 2>&1
timeout -s INT ${4:-560} python bench/run.py --gpus $2 --configs $3 --run-timeout 200 \
  --results-dir $W/res --log-dir $W/logs/runs > $W/logs/bench.log 2>&1
cp $W/res/*.json $OUT/ 2>/dev/null; tar czf $OUT/logs-$1.tgz -C $W logs; tail -12 $W/logs/bench.log
