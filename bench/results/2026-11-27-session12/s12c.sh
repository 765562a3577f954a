#!/bin/bash
# Session 12, call C (x1): the first step with torch's kernel cache empty, filled, and empty again (nothing else changes).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
W=/tmp/s12c; rm -rf $W /tmp/kc-*; mkdir -p $W
run() {  # name cache
  local t0=$(date +%s)
  PYTORCH_KERNEL_CACHE_PATH=$2 timeout -s INT 100 python train.py --min-gpus 1 --max-steps 4 --dataset-size 3200 --save-dir /tmp/r-$1 > $W/$1.log 2>&1
  echo "$1 rc=$? wall $(( $(date +%s) - t0 )) s" >> $W/times.txt
  ls $2 > $W/$1-cache.txt 2>&1
}
run empty /tmp/kc-a; run filled /tmp/kc-a; run empty-again /tmp/kc-b
cp $W/* $OUT/; cat $W/times.txt; grep -h "step 1/\|NVRTC" $W/*.log | cut -c1-150; head -5 $W/empty-cache.txt
