"""Start a run from a notebook without blocking it: `wanforge launch` in a background process, and its handle.

The notebook goes through the same command as the terminal (launcher/launch.py): `--target local` runs the task's
setup/run scripts on this machine, a cloud target renders the SkyPilot task and launches it. SkyPilot lives in its
own environment (its click pin clashes with wandb), so cloud launches, logs and syncs run with
`launch_python` (default: $WANFORGE_LAUNCH_PYTHON, else this Python).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from trainer.config.files import save_config
from trainer.config.schema import WanforgeConfig


def launch_python() -> str:
    return os.environ.get("WANFORGE_LAUNCH_PYTHON") or sys.executable


@dataclass
class RunHandle:
    """A launched run: its name (for `wanforge status|logs|sync|down`), run folder here, and the launch process."""

    name: str
    target: str
    run_dir: Path  # the config's train.output_dir: where the run is (local) or where `sync` brings it (remote)
    log_file: Path  # what the launch process printed
    process: subprocess.Popen | None = None
    python: str = field(default_factory=launch_python)

    @property
    def remote(self) -> bool:
        return self.target != "local"

    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def log_tail(self, lines: int = 15) -> str:
        if not self.log_file.is_file():
            return ""
        return "\n".join(self.log_file.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])

    def _cli(self, *args: str, timeout: float = 600) -> tuple[int, str]:
        done = subprocess.run([self.python, "-m", "launcher.cli", *args], capture_output=True, text=True,
                              timeout=timeout)
        return done.returncode, (done.stdout + done.stderr).strip()

    def sync(self) -> tuple[bool, str]:
        """`wanforge sync NAME`: bring the remote run folder into run_dir. (ok, what it said)."""
        if not self.remote:
            return True, f"{self.name} runs here: {self.run_dir} is already the run folder"
        code, text = self._cli("sync", self.name)
        return code == 0, text

    def logs(self) -> str:
        """The run's logs so far (`wanforge logs NAME --no-follow`); a local run's are in log_file."""
        if not self.remote:
            return self.log_tail(200)
        return self._cli("logs", self.name, "--no-follow", timeout=120)[1]

    def wait(self, timeout: float | None = None) -> int | None:
        if self.process is None:
            return None
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        """Stop a local run: SIGTERM lets the trainer finish its step and save a checkpoint."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()


def launch_args(config_file: Path, name: str, target: str, gpu: str | None = None, output: str | None = None,
                hub_dataset: str | None = None, managed: bool = False, spot: bool = False) -> list[str]:
    args = ["launch", str(config_file), "--target", target, "--name", name]
    if target != "local":
        args += ["--gpu", gpu or "auto"]
    for flag, value in (("--output", output), ("--hub-dataset", hub_dataset)):
        if value:
            args += [flag, value]
    if managed:
        args.append("--managed")
    if spot:
        args.append("--spot")
    return args


def start_run(cfg: WanforgeConfig, target: str = "local", gpu: str | None = None, output: str | None = None,
              name: str | None = None, hub_dataset: str | None = None, managed: bool = False, spot: bool = False,
              python: str | None = None) -> RunHandle:
    """Save the config beside its run folder and start `wanforge launch` on it; returns at once."""
    run_dir = Path(cfg.train.output_dir)
    from launcher.launch import default_run_name

    name = name or default_run_name(run_dir.name)
    config_file = run_dir.parent / f"{run_dir.name}.launch.toml"
    save_config(cfg, config_file)
    log_file = run_dir.parent / f"{run_dir.name}.launch.log"
    python = python or (sys.executable if target == "local" else launch_python())
    args = launch_args(config_file, name, target, gpu, output, hub_dataset, managed, spot)
    with log_file.open("w", encoding="utf-8") as log:
        log.write(f"$ wanforge {' '.join(args)}\n")
        log.flush()
        process = subprocess.Popen([python, "-u", "-m", "launcher.cli", *args], stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return RunHandle(name, target, run_dir, log_file, process, python)
