#!/bin/bash
# Second of two device calls on one warm machine (issue 24): FlashAttention 4 rows. The cutlass-dsl libs wheel (74.5 MB)
# is larger than one call may carry, so the first call leaves its first 17 MB in /tmp/fa4/libs.part1 and installs
# .whl-gpu into /tmp/site; this call carries the rest (.fa4b) and joins them. Usage (repo root): bash bench/run_fa4.sh
set -u
W=nvidia_cutlass_dsl_libs_base-4.5.0-cp312-cp312-manylinux_2_28_x86_64.whl
cat /tmp/fa4/libs.part1 .fa4b/libs.part2 > /tmp/fa4/$W && cp .fa4b/*.whl /tmp/fa4/ || exit 1
echo "$(md5sum /tmp/fa4/$W)  (expected a1c580700b37b9fd2298d05601dd8ff6)"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site /tmp/fa4/*.whl || exit 1
export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/python_packages:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
quiet() { grep -v "^  warnings.warn\|UserWarning\|FutureWarning\|it/s\]"; }
echo "== floor rates at 75,600 tokens $(date +%T)"
timeout 80 python3 bench/attention_bench.py --tokens 75600 --heads 40 --kernels cudnn,flash-attn-4 --gemm --reps 3 \
  2>&1 | quiet | tee $OUT/floor720.md
echo "== 14B 1280x720x81 balanced-lean with FA4 $(date +%T)"
timeout 200 python3 bench/speed_bench.py --model 14b --shape 1280x720x81 --flavour t2v-14b-2.2-high --warmup 1 \
  --steps 1 --variants balanced-lean-fa4 --out $OUT/t2v720-fa4.md 2>&1 | quiet | tail -30
echo "== 1.3B 832x480x81: big-card candidates beside naive and balanced $(date +%T)"
timeout 280 python3 bench/speed_bench.py --model 1.3b --warmup 2 --steps 5 \
  --variants naive,none-compile-fa4,fp8-none-compile-fa4,balanced-fa4,balanced-fp8-fa4 --out $OUT/13b-fa4.md \
  2>&1 | quiet | tail -30
echo "== done $(date +%T)"
