#!/bin/bash
# Issue 24's remaining GPU measurements on one H100, each part under `timeout`, each writing its markdown to $OUT/<part>.md
# (logs in $OUT/log.txt); a part that fails or times out does not stop the next. Parts:
#   A5B-naive A5B-balanced A5B-fast  TI2V-5B 1280x704x121 through bench/speed_bench.py, one process per variant
#   B   train_both_experts switch cost at A14B 480p (bench/experts_bench.py)
#   C   validation render vs plain WanPipeline, 1.3B 832x480x81, 40 steps (bench/validation_bench.py --baseline)
#   D   latent caching vs plain AutoencoderKLWan.encode in bf16 (bench/cache_throughput.py)
#   T   tests/test_experts.py's GPU test: expert swaps on the GPU give each expert its own weights (needs pytest)
# Usage from the repo root on the GPU machine, wheels (diffusers, av, pydantic, ...) in $WHL:
#   WHL=.whl-gpu bash bench/issue24_gpu.sh A5B-naive A5B-balanced B     # at most 9 minutes
#   WHL=.whl-gpu bash bench/issue24_gpu.sh T C D                        # at most 9 minutes
#   WHL=.whl-gpu bash bench/issue24_gpu.sh A5B-fast                     # optional, at most 3 minutes
#   TINY=1 bash bench/issue24_gpu.sh A5B-naive B C D                    # CPU check of the plumbing (tiny shapes)
set -u
OUT=${OUT:-/tmp/issue24}
mkdir -p "$OUT"
EXTRA=()  # TINY=1: every part with --tiny (CPU, tiny shapes)
[ -n "${TINY:-}" ] && EXTRA=(--tiny)
if [ -z "${TINY:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHL"/*.whl || exit 1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
LOG=$OUT/log.txt
grep -E "MemTotal|MemAvailable" /proc/meminfo | tee -a "$LOG"

run() {  # run PART SECONDS COMMAND...: the command's output to the log (tail shown), its exit status noted
  local part=$1 seconds=$2
  shift 2
  echo "== $part (timeout $seconds s) $(date +%T)" | tee -a "$LOG"
  timeout "$seconds" "$@" >> "$LOG" 2>&1
  local rc=$?
  echo "== $part exit $rc $(date +%T); $(grep MemAvailable /proc/meminfo)" | tee -a "$LOG"
  [ -f "$OUT/$part.md" ] && cat "$OUT/$part.md"
  [ $rc -ne 0 ] && grep -v "warn" "$LOG" | tail -15
  return 0
}

for part in "$@"; do
  case $part in
    A5B-*)
      variant=${part#A5B-}
      run "$part" "$([ "$variant" = naive ] && echo 90 || echo 160)" python3 bench/speed_bench.py --model 5b \
        --shape 1280x704x121 --flavour ti2v-5b-2.2 --warmup 1 --steps 2 --variants "$variant" --out "$OUT/$part.md" ${EXTRA[@]+"${EXTRA[@]}"} ;;
    B) run B 290 python3 bench/experts_bench.py --shape 832x480x81 --preset fast --every 2 --blocks 3 --out "$OUT/B.md" ${EXTRA[@]+"${EXTRA[@]}"} ;;
    C) run C 260 python3 bench/validation_bench.py --baseline --out "$OUT/C.md" ${EXTRA[@]+"${EXTRA[@]}"} ;;
    D) run D 200 python3 bench/cache_throughput.py --clips 6 --out "$OUT/D.md" ${EXTRA[@]+"${EXTRA[@]}"} ;;
    T) run T 60 python3 -m pytest -q -p no:cacheprovider tests/test_experts.py -k gpu ;;  # the swap on a GPU
    *) echo "unknown part $part (A5B-naive A5B-balanced A5B-fast B C D T)" ;;
  esac
done
