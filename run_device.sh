#!/bin/bash
export PYTHONPATH=. XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 PYTHONUNBUFFERED=1
for shape in 8192,4096,4096,64,4 8192,4096,4096,64,64; do
  timeout 110 ncu --clock-control none --kernel-name regex:lora_seg --section SpeedOfLight --section Occupancy \
    --section MemoryWorkloadAnalysis --section WarpStateStats --section LaunchStats \
    python benchmarks/kernel_counters.py --shape $shape --mode delta --calls 1 > $OUT/ncu_$shape.txt 2>&1
  echo "ncu $shape rc $?"
done
mkdir -p $OUT/r64
timeout 130 python benchmarks/kernels.py --out $OUT/r64 --only prefill --prefill-modes delta --profile --trials 5 --prefill-ranks 64 --configs "[{}, {'reduce_h': False}, {}, {'reduce_h': False}]" > $OUT/r64.txt 2>&1
echo "r64 rc $?"
grep -E "cfg|ceilings" $OUT/r64.txt | cut -c1-200
for f in $OUT/ncu_*.txt; do echo "== $f"; grep -E "^  lora|Duration|DRAM Throughput|L2 Cache Throughput|Memory Throughput|Achieved Occupancy|Theoretical Occupancy|Registers Per|Block Limit|Waves Per SM|Stall|Warp Cycles Per Issued|Mem Busy|Max Bandwidth|L1/TEX Hit|L2 Hit" $f | head -80; done
