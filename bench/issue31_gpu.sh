#!/bin/bash
# Issue 31's one-GPU rows, in parts, each under `timeout`, each writing its markdown to $OUT/<part>.md (log in
# $OUT/log.txt); a part that fails or times out does not stop the next. Wheels: .whl-gpu (diffusers, pydantic,
# torchao, optimum-quanto, tomli-w, ...) and FlashAttention 4's (flash-attn-4 4.0.0b10, nvidia-cutlass-dsl 4.5.0,
# quack-kernels 0.4.0, apache-tvm-ffi, torch-c-dlpack-ext, einops). The cutlass-dsl libs wheel (74.5 MB) is more than one
# device call carries: `split` cuts it in two here; part `setup1` stores the first piece on the machine, `setup2`
# (the next call, on the same warm machine) joins the second piece and installs FlashAttention 4.
#   bash bench/issue31_gpu.sh split                       # here, once: .fa4a/ (small wheels + piece 1), .fa4b/ (piece 2)
#   bash bench/issue31_gpu.sh setup1 floor-cudnn          # device call 1, carry .whl-gpu .fa4a
#   bash bench/issue31_gpu.sh setup2 floor-fa4 13b        # device call 2, carry .fa4b
#   bash bench/issue31_gpu.sh a14b-t2v a14b-t2v-fp8 a14b-i2v   # device call 3 (FlashAttention 4 still in /tmp/site)
# Without FlashAttention 4 (cuDNN attention), one call carrying .whl-gpu and .whl-av (PyAV, pytest):
#   bash bench/issue31_gpu.sh setup-av 16gb cache validation 5b
set -u
OUT=${OUT:-/tmp/issue31}
mkdir -p "$OUT"
LIBS=nvidia_cutlass_dsl_libs_base-4.5.0-cp312-cp312-manylinux_2_28_x86_64.whl
export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/python_packages:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
LOG=$OUT/log.txt
quiet() { grep -v "^  warnings.warn\|UserWarning\|FutureWarning\|it/s\]"; }

run() {  # run PART SECONDS COMMAND...: output to the log, the part's table shown, the exit status noted
  local part=$1 seconds=$2
  shift 2
  echo "== $part (timeout $seconds s) $(date +%T)" | tee -a "$LOG"
  timeout "$seconds" "$@" 2>&1 | quiet >> "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "== $part exit $rc $(date +%T); $(grep MemAvailable /proc/meminfo)" | tee -a "$LOG"
  [ -f "$OUT/$part.md" ] && cat "$OUT/$part.md"
  [ "$rc" -ne 0 ] && tail -25 "$LOG"
  return 0
}

install() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$@"; }

for part in "$@"; do
  case $part in
    split)  # here, not on the device
      mkdir -p .fa4a .fa4b && cp .fa4/*.whl .fa4a/ && rm .fa4a/$LIBS
      head -c 42000000 .fa4/$LIBS > .fa4a/libs.part1 && tail -c +42000001 .fa4/$LIBS > .fa4b/libs.part2
      md5sum .fa4/$LIBS ;;
    setup1)
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$LOG"
      grep -E "MemTotal|MemAvailable" /proc/meminfo | tee -a "$LOG"
      install .whl-gpu/*.whl .fa4a/*.whl && mkdir -p /tmp/fa4 && cp .fa4a/libs.part1 /tmp/fa4/ && echo "setup1 ok" ;;
    setup2)
      cat /tmp/fa4/libs.part1 .fa4b/libs.part2 > /tmp/fa4/$LIBS && md5sum /tmp/fa4/$LIBS && install /tmp/fa4/$LIBS \
        && python3 -c "import flash_attn.cute.interface; print('flash-attn-4 imports')" ;;
    setup-av)
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$LOG"
      grep -E "MemTotal|MemAvailable" /proc/meminfo | tee -a "$LOG"
      install .whl-gpu/*.whl .whl-av/*.whl && echo "setup-av ok" ;;
    16gb)  # 14B on a 16 GB card: the allocator capped at 15 GiB; then the streaming tests that need a GPU
      run 16gb 300 python3 bench/speed_bench.py --model 14b --warmup 1 --steps 2 --cap-gib 15 --variants low-16gb \
        --out "$OUT/16gb.md"
      run 16gb-tests 120 python3 -m pytest -q -p no:cacheprovider tests/test_weight_streaming.py -k gpu ;;
    cache)  # latent caching beside plain AutoencoderKLWan.encode, alone on the GPU
      run cache 200 python3 bench/cache_throughput.py --clips 6 --out "$OUT/cache.md" ;;
    validation)  # issue 32: 40 steps against 4 steps with a speed-LoRA-shaped adapter, and validation's share of a run
      run validation 280 python3 bench/validation_speed_bench.py --out "$OUT/validation.md" ;;
    5b)  # TI2V-5B at its own 1280x704x121: naive beside balanced (the estimate's 5B preset row)
      run 5b 300 python3 bench/speed_bench.py --model 5b --shape 1280x704x121 --flavour ti2v-5b-2.2 --warmup 1 --steps 2 \
        --variants naive,balanced --out "$OUT/5b.md" ;;
    vace)  # issue 33: VACE 1.3B at 832x480x81 beside the naive loop
      run vace 300 python3 bench/speed_bench.py --model 1.3b --flavour vace-1.3b-2.1 --warmup 2 --steps 3 \
        --variants naive,balanced --out "$OUT/vace.md" ;;
    floor-cudnn)
      run floor-cudnn-1.3b 120 python3 bench/attention_bench.py --tokens 32760 --heads 12 --kernels cudnn --gemm --reps 5
      run floor-cudnn-a14b 150 python3 bench/attention_bench.py --tokens 75600 --heads 40 --kernels cudnn --gemm --reps 3 ;;
    floor-fa4)
      run floor-fa4-1.3b 120 python3 bench/attention_bench.py --tokens 32760 --heads 12 --kernels flash-attn-4,cudnn --gemm --reps 5
      run floor-fa4-a14b 150 python3 bench/attention_bench.py --tokens 75600 --heads 40 --kernels flash-attn-4 --gemm --reps 3 ;;
    13b)
      run 13b 420 python3 bench/speed_bench.py --model 1.3b --warmup 2 --steps 5 --out "$OUT/13b.md" --variants \
        naive,balanced-fa4,balanced-fp8-fa4,low-fa4,low-int8-fa4,fp8-selective-compile-offload-sublayers-ffchunk-fa4,fp8-partial10-compile-sublayers-fa4 ;;
    13b-profile)
      run 13b-profile 200 python3 bench/speed_bench.py --model 1.3b --warmup 2 --steps 2 --profile --out "$OUT/13b-profile.md" \
        --variants fp8-partial10-compile-sublayers-fa4 ;;
    a14b-t2v)
      run a14b-t2v 260 python3 bench/speed_bench.py --model 14b --shape 1280x720x81 --flavour t2v-14b-2.2-high \
        --warmup 1 --steps 1 --variants balanced-lean-fa4 --out "$OUT/a14b-t2v.md" ;;
    a14b-t2v-fp8)
      run a14b-t2v-fp8 260 python3 bench/speed_bench.py --model 14b --shape 1280x720x81 --flavour t2v-14b-2.2-high \
        --warmup 1 --steps 1 --variants fp8-balanced-lean-fa4 --out "$OUT/a14b-t2v-fp8.md" ;;
    a14b-i2v)
      run a14b-i2v 260 python3 bench/speed_bench.py --model 14b --shape 1280x720x81 --flavour i2v-14b-2.2-high \
        --warmup 1 --steps 1 --variants balanced-lean-fa4 --out "$OUT/a14b-i2v.md" ;;
    *) echo "unknown part $part" ;;
  esac
done
