"""Colab helpers for the quick-trial notebook: where we run, which GPU, pinned installs (and the restart they may
need), Drive, secrets from Colab's userdata, and a training preset per GPU (bf16 only where the GPU computes it).

Everything here also runs outside Colab: `detect()` then says so, installs are skipped, and with no GPU the notebook
trains the tiny CPU model (that is how the tests run it).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

SECRETS = ("HF_TOKEN", "WANDB_API_KEY")
DRIVE_ROOT = Path("/content/drive")


@dataclass(frozen=True)
class GpuInfo:
    name: str
    capability: tuple[int, int]
    memory_gib: float

    @property
    def bf16(self) -> bool:
        """Real bf16 needs compute capability 8.0+ (a T4 reports bf16 "supported" through slow emulation)."""
        return self.capability >= (8, 0)

    @property
    def kind(self) -> str:
        """The Colab GPU family: T4, L4, A100 (40 or 80 GB) or other."""
        for family in ("A100", "L4", "T4"):
            if family in self.name.upper():
                return family
        return "other"


@dataclass(frozen=True)
class Environment:
    in_colab: bool
    gpu: GpuInfo | None

    def describe(self) -> str:
        where = "Google Colab" if self.in_colab else "not Colab (this Python, its packages as they are)"
        if self.gpu is None:
            return f"{where}; no CUDA GPU: CPU tiny mode (the tiny random Wan, a few seconds)"
        g = self.gpu
        precision = "bf16" if g.bf16 else "fp16 (no real bf16 below compute capability 8.0)"
        return (f"{where}; GPU {g.name} ({g.kind}), {g.memory_gib:.1f} GiB, compute capability "
                f"{g.capability[0]}.{g.capability[1]}: {precision}")


def in_colab() -> bool:
    if "google.colab" in sys.modules:
        return True
    try:
        import google.colab  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        return False
    return True


def gpu_info() -> GpuInfo | None:
    """The first CUDA GPU as torch sees it (torch imported here only)."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return GpuInfo(props.name, (props.major, props.minor), props.total_memory / 2**30)


def detect() -> Environment:
    return Environment(in_colab(), gpu_info())


# ---------------------------------------------------------------- pinned installs


def read_constraints(path: Path) -> dict[str, str]:
    """constraints.txt -> {normalised name: pinned version} for the lines whose markers apply to this Python."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate():
            continue
        exact = [s.version for s in req.specifier if s.operator == "=="]
        if exact:
            pins[canonicalize_name(req.name)] = exact[0]
    return pins


def tested_torch(path: Path) -> str | None:
    """The torch version the constraints file says the project is tested with (torch is installed separately)."""
    m = re.search(r"torch is installed first and separately: (\d[\w.+-]*)", path.read_text(encoding="utf-8"))
    return m.group(1) if m else None


def _installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def planned_installs(constraints: Path, extras: tuple[str, ...] = ("train",), dist: str = "wanforge") -> list[str]:
    """What `install_pinned` would install: each requirement of the extras (torch left to the runtime) that is
    missing or not at its pinned version, as name==pin (or the requirement itself where nothing is pinned)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = read_constraints(constraints)
    wanted = []
    for text in metadata.requires(dist) or []:
        req = Requirement(text)
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in ("", *extras)):
            continue
        name = canonicalize_name(req.name)
        if name == "torch":
            continue
        have, pin = _installed(req.name), pins.get(name)
        if pin is not None and have != pin:
            wanted.append(f"{req.name}=={pin}")
        elif pin is None and (have is None or (req.specifier and not req.specifier.contains(have, prereleases=True))):
            wanted.append(f"{req.name}{req.specifier}")
    return wanted


def torch_check(constraints: Path) -> str:
    """One line about the runtime's torch: the installs keep it, so say whether it is the tested one."""
    have, tested = _installed("torch"), tested_torch(constraints)
    if have is None:
        return "torch is not installed: pip install torch (the CUDA build for this runtime) first"
    from packaging.version import Version

    if Version(have).release[:2] < (2, 5):
        return f"torch {have} is too old for wanforge (needs >= 2.5): pip install -U torch, then restart the runtime"
    if tested and Version(have).release[:2] != Version(tested).release[:2]:
        return f"torch {have} (this runtime's) is kept; wanforge is tested with {tested}: if something breaks, " \
               f"pip install torch=={tested} and restart"
    return f"torch {have}: the tested version"


def install_pinned(constraints: Path, extras: tuple[str, ...] = ("train",), restart: bool = True) -> list[str]:
    """pip install the missing / differently-versioned requirements at their pins. If a package that this Python
    had already imported was replaced, the runtime must restart to use it: with restart=True the process exits and
    Colab restarts it (run the notebook again from the top; the second time nothing is installed)."""
    wanted = planned_installs(constraints, extras)
    print(torch_check(constraints))
    if not wanted:
        print("all pinned packages are already installed")
        return []
    before = {d.metadata["Name"]: d.version for d in metadata.distributions()}
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "-c", str(constraints), *wanted], check=True)
    after = {d.metadata["Name"]: d.version for d in metadata.distributions()}
    changed = sorted(n for n, v in before.items() if after.get(n) != v)
    providers = metadata.packages_distributions()
    stale = sorted({m for m in list(sys.modules) if "." not in m and set(providers.get(m, [])) & set(changed)})
    print(f"installed {len(wanted)} pinned package(s); replaced: {', '.join(changed) or 'none'}")
    if stale and restart:
        print(f"restarting the runtime: {', '.join(stale)} were imported before the install. Run the notebook "
              "again from the top when it reconnects.", flush=True)
        os.kill(os.getpid(), 9)  # Colab brings a killed kernel back up with the new packages
    return changed


# ---------------------------------------------------------------- Drive and secrets


def mount_drive(folder: str = "wanforge") -> Path:
    """Mount Google Drive and return MyDrive/<folder> (runs and data there survive the runtime)."""
    from google.colab import drive  # type: ignore[import-not-found]

    drive.mount(str(DRIVE_ROOT))
    path = DRIVE_ROOT / "MyDrive" / folder
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_secrets(names: tuple[str, ...] = SECRETS) -> list[str]:
    """Copy Colab secrets (the key icon; "notebook access" on) into this process's environment, where
    huggingface_hub and wandb read them. Never printed. Outside Colab the environment is used as it is.
    Returns the names that are set."""
    if in_colab():
        from google.colab import userdata  # type: ignore[import-not-found]

        for name in names:
            if os.environ.get(name):
                continue
            try:
                value = userdata.get(name)
            except Exception:  # SecretNotFoundError / NotebookAccessError: the secret is optional here
                value = None
            if value:
                os.environ[name] = value
    return [n for n in names if os.environ.get(n)]


# ---------------------------------------------------------------- presets


def gpu_preset(gpu: GpuInfo) -> dict[str, Any]:
    """Config sections for a Wan 2.1 1.3B LoRA trial that fits the GPU (clip size, precision, checkpointing)."""
    precision = "bf16" if gpu.bf16 else "fp16"
    dtype = "bfloat16" if gpu.bf16 else "float16"
    if gpu.memory_gib < 20:  # T4 (~14.5 GiB usable): small clips, everything recomputed
        size, frames, checkpointing, rank = (480, 272), 17, "full", 16
    elif gpu.memory_gib < 30:  # L4 24 GB
        size, frames, checkpointing, rank = (832, 480), 33, "full", 32
    elif gpu.memory_gib < 60:  # A100 40 GB
        size, frames, checkpointing, rank = (832, 480), 49, "selective", 32
    else:  # A100 80 GB
        size, frames, checkpointing, rank = (832, 480), 81, "selective", 32
    return {
        "model": {"flavour": "t2v-480p-1.3b-2.1", "base_dtype": dtype},
        "datasets": [{"width": size[0], "height": size[1], "num_frames": frames}],
        "lora": {"rank": rank},
        "train": {"mixed_precision": precision, "max_train_steps": 300},
        "memory": {"gradient_checkpointing": checkpointing},
        "validation": {"num_inference_steps": 30},
        "checkpoint": {"every_n_steps": 100},
    }


def quick_trial_config(env: Environment, dataset: str, work: Path, steps: int | None = None) -> dict[str, Any]:
    """Config data for the trial: the GPU's preset on a real 1.3B run, or the tiny CPU demo without a GPU."""
    from launcher.form.start import starting_config

    if env.gpu is None:
        return starting_config(dataset, work, tiny=True, steps=steps or 10)
    preset = gpu_preset(env.gpu)
    data = starting_config(dataset, work, tiny=False, steps=steps, num_frames=preset["datasets"][0]["num_frames"])
    for section, values in preset.items():
        if section == "datasets":
            data["datasets"][0].update(values[0])
        else:
            data.setdefault(section, {}).update(values)
    if steps:
        data["train"]["max_train_steps"] = steps
    return data
