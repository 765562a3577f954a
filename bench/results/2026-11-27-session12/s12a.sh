#!/bin/bash
# Session 12, call A (x2): target 1 in one run, three interleaved rounds of the seed-equivalent and the default.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
W=/tmp/s12a; rm -rf $W; mkdir -p $W/logs/runs $W/res
{ nvidia-smi --query-gpu=name,driver_version --format=csv; nproc; python -c "import torch, triton; print(torch.__version__, triton.__version__)"; git log --oneline -1; } > $W/logs/machine.txt 2>&1
timeout -s INT 540 python bench/run.py --gpus 2 --configs seed-equivalent,default --repeat 3 --run-timeout 120 \
  --results-dir $W/res --log-dir $W/logs/runs > $W/logs/bench.log 2>&1
cp $W/res/*.json $OUT/ 2>/dev/null; tar czf $OUT/logs.tgz -C $W logs; cat $W/logs/machine.txt; tail -12 $W/logs/bench.log
