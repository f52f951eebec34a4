"""The one sizing model: GPU memory, host memory and step time of a LoRA run, from measured rows. No torch.

Both `[memory] preset = "auto"` (trainer/presets.py, on the node) and `wanforge estimate` / `--gpu auto`
(launcher/estimate.py, on the user's machine) ask this module, so they cannot disagree.

Measured rows (launcher/calibration.toml `[[measured]]`, each naming its command in bench/RESULTS.md) give, for one
model, clip shape, preset and GPU: s/step, peak GPU GiB (torch max_memory_allocated), host GiB the activation offload
copied per step, and (newer rows) the process's peak resident set. A question about another shape is answered from
the nearest measured row of the same preset and model width:
  GPU GiB   = weights (params x bytes per weight) + (row peak - row weights) x (tokens x dim x layers) / (row's)
  host GiB  = process base (measured: RSS without offload) + offloaded bytes x (tokens x dim x layers) / (row's)
  s/step    = row s/step x FLOPs / row FLOPs x (row GPU datasheet bf16 TFLOP/s / target's)
and every answer says whether it is `measured` (a row at this model, shape and preset) or `extrapolated` (scaled).
"""

from __future__ import annotations

from pathlib import Path

HOST_SHARE = 0.6  # the activation offload may use at most this share of the free host RAM (dataloader, page cache)
HEADROOM = 0.92  # of the GPU's memory: the allocator's fragmentation and the CUDA context


def _meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes (empty where there is none: not Linux)."""
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        key, _, value = line.partition(":")
        parts = value.split()
        if parts and parts[0].isdigit():
            out[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return out


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_free(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes this container may still allocate under its cgroup memory limit (None: no limit set). Containers (RunPod,
    Vast, Kubernetes pods) see the whole machine in /proc/meminfo, but their OOM killer acts at the cgroup limit."""
    for limit_file, usage_file in (("memory.max", "memory.current"),  # cgroup v2
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):  # v1
        limit, usage = _read_int(root / limit_file), _read_int(root / usage_file)
        if limit is None or usage is None or limit >= 1 << 60:  # "max" or v1's "unlimited" page-rounded int64
            continue
        reclaimable = 0
        stat = root / ("memory.stat" if limit_file == "memory.max" else "memory/memory.stat")
        try:
            for line in stat.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key in ("inactive_file", "total_inactive_file") and value.strip().isdigit():
                    reclaimable = int(value)
        except OSError:
            pass
        return max(limit - usage + reclaimable, 0)
    return None


def host_memory_gib(meminfo: dict[str, int] | None = None, cgroup_free: int | None = -1) -> float:
    """Host RAM this process can still use, GiB: /proc/meminfo's MemAvailable, capped by the container's cgroup limit."""
    info = _meminfo() if meminfo is None else meminfo
    available = info.get("MemAvailable", info.get("MemFree", 0))
    limit = _cgroup_free() if cgroup_free == -1 else cgroup_free
    if limit is not None:
        available = min(available, limit) if available else limit
    return available / 2**30
