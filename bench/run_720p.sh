#!/bin/bash
# One device call: the 14B 1280x720x81 floor rates, the naive loop and wanforge presets, each in its own process (host
# peak = the process's VmHWM). Usage (repo root on the GPU machine, wheels in $WHL): bash bench/run_720p.sh VARIANT...
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHL"/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
FLAVOUR=${FLAVOUR:-t2v-14b-2.2-high}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
grep -E "MemTotal|MemAvailable" /proc/meminfo; cat /sys/fs/cgroup/memory.max 2>/dev/null
# what `[memory] preset = "auto"` resolves to on this node (its GPU, its free host RAM) for the flavour's default clip
python3 -c "
import torch; from trainer.flavours import get_flavour; from trainer.config.model import MemoryConfig
from trainer.model.preset_choice import resolve_memory; from trainer.model.presets import preset_of; from trainer.model.sizing import host_memory_gib
gpu = torch.cuda.get_device_properties(0).total_memory / 2**30; host = host_memory_gib()
m = resolve_memory(MemoryConfig(), get_flavour('$FLAVOUR'), gpu, host_gib=host)
print(f'auto on this node ({gpu:.1f} GiB GPU, {host:.1f} GiB host free): {preset_of(m)}')"
[ -n "${FLOOR:-}" ] && python3 bench/attention_bench.py --tokens 75600 --heads 40 --kernels cudnn --gemm --reps 3 | tee $OUT/floor.md
for v in "$@"; do
  name=${v%%:*}; t=${v#*:}
  steps="--warmup 1 --steps 2"; [ "$name" = naive ] && steps="--warmup 0 --steps 1"
  echo "== $name (timeout $t s) $(date +%T)"
  timeout "$t" python3 bench/speed_bench.py --model 14b --shape 1280x720x81 --flavour "$FLAVOUR" $steps \
    --variants "$name" --out "$OUT/$FLAVOUR-$name.md" 2>&1 | grep -v "^  warnings.warn\|UserWarning\|FutureWarning" | tail -40
  echo "exit ${PIPESTATUS[0]} $(date +%T)"; grep -E "MemAvailable" /proc/meminfo
done
