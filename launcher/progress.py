"""A live panel for a run in a notebook: status, step, loss plot, ETA and the latest validation video.

It reads only the run folder (docs/runs.md layout: run.json, metrics.jsonl, validation/step-N/*.mp4), so the same panel
follows a local run as it trains and a remote one through `wanforge sync` (called every `sync_every_s`).

    panel = ProgressPanel(run_dir, handle)    # handle: launcher.form.launch.RunHandle (optional)
    panel.watch()                             # blocks until the run ends, updating in place
    panel.follow()                            # or: updates from a background thread (the form's Launch button)
"""

from __future__ import annotations

import base64
import html
import json
import re
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.rundir import FINAL_STATUSES as FINAL

_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class Progress:
    status: str  # run.json status, "waiting" before it exists
    step: int
    total: int | None
    losses: list[tuple[int, float]] = field(default_factory=list)
    s_per_step: float | None = None  # median of the recent records
    eta_s: float | None = None
    latest_video: Path | None = None
    error: str | None = None

    @property
    def done(self) -> bool:
        return self.status in FINAL

    def line(self) -> str:
        total = f"/{self.total}" if self.total else ""
        loss = f", loss {self.losses[-1][1]:.4f}" if self.losses else ""
        speed = f", {self.s_per_step:.2f} s/step" if self.s_per_step else ""
        eta = f", ETA {format_seconds(self.eta_s)}" if self.eta_s is not None and not self.done else ""
        return f"{self.status}: step {self.step}{total}{loss}{speed}{eta}"


def format_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl records; a line still being written (no newline yet, or cut) is left for the next read."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def latest_video(run_dir: Path) -> Path | None:
    """The newest validation video: highest validation/step-N, then name."""
    best: tuple[int, str, Path] | None = None
    folder = run_dir / "validation"
    if not folder.is_dir():
        return None
    for step_dir in folder.iterdir():
        m = _STEP_DIR.match(step_dir.name)
        if not m or not step_dir.is_dir():
            continue
        for video in step_dir.glob("*.mp4"):
            key = (int(m.group(1)), video.name, video)
            if best is None or key[:2] > best[:2]:
                best = key
    return best[2] if best else None


def read_progress(run_dir: Path) -> Progress:
    run_dir = Path(run_dir)
    try:
        status = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        status = {}
    records = read_metrics(run_dir / "metrics.jsonl")
    losses = [(int(r["step"]), float(r["loss"])) for r in records if "loss" in r and "step" in r]
    speeds = [float(r["s_per_step"]) for r in records[-20:] if r.get("s_per_step")]
    step = max([int(status.get("step") or 0)] + [s for s, _ in losses])
    total = status.get("max_train_steps")
    per_step = statistics.median(speeds) if speeds else None
    eta = per_step * max(total - step, 0) if per_step is not None and total else None
    return Progress(status.get("status", "waiting"), step, total, losses, per_step, eta, latest_video(run_dir),
                    status.get("error"))


def loss_svg(losses: list[tuple[int, float]], width: int = 480, height: int = 160) -> str:
    """The loss curve (raw and smoothed) as inline SVG: one small chart needs no plotting library in the kernel."""
    if len(losses) < 2:
        return f'<svg width="{width}" height="{height}"><text x="10" y="20" fill="#777">loss: waiting for steps</text></svg>'
    steps = [s for s, _ in losses]
    values = [v for _, v in losses]
    smooth, ema = [], values[0]
    for v in values:
        ema = 0.9 * ema + 0.1 * v
        smooth.append(ema)
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    x0, x1, pad = steps[0], steps[-1], 28

    def points(ys: list[float]) -> str:
        return " ".join(f"{pad + (s - x0) / max(x1 - x0, 1) * (width - pad - 6):.1f},"
                        f"{6 + (hi - y) / span * (height - 24):.1f}" for s, y in zip(steps, ys))

    return (f'<svg class="wf-loss" width="{width}" height="{height}" style="background:#fafafa">'
            f'<polyline fill="none" stroke="#90caf9" stroke-width="1" points="{points(values)}"/>'
            f'<polyline fill="none" stroke="#1565c0" stroke-width="2" points="{points(smooth)}"/>'
            f'<text x="2" y="14" font-size="10" fill="#555">{hi:.3g}</text>'
            f'<text x="2" y="{height - 14}" font-size="10" fill="#555">{lo:.3g}</text>'
            f'<text x="{pad}" y="{height - 2}" font-size="10" fill="#555">step {x0}</text>'
            f'<text x="{width - 70}" y="{height - 2}" font-size="10" fill="#555">step {x1}</text></svg>')


def video_html(path: Path, width: int = 320) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<div>{html.escape(path.parent.name)}/{html.escape(path.name)}</div>'
            f'<video class="wf-video" width="{width}" controls autoplay loop muted>'
            f'<source src="data:video/mp4;base64,{data}" type="video/mp4"></video>')


class ProgressPanel:
    """Widgets showing a run folder; `refresh()` re-reads it, `watch()` / `follow()` keep it fresh."""

    def __init__(self, run_dir: str | Path, handle: Any = None, sync_every_s: float = 60.0):
        import ipywidgets as w

        self.run_dir = Path(run_dir)
        self.handle = handle  # a RunHandle: its exit code, log tail, and sync for remote runs
        self.sync_every_s = sync_every_s
        self.sync_note = ""
        self._last_sync = 0.0
        self._shown_video: Path | None = None
        self._thread: threading.Thread | None = None
        self.status = w.HTML()
        self.status.add_class("wf-progress")
        self.video = w.HTML()
        self.log = w.HTML()
        self.widget = w.VBox([self.status, self.video, self.log])
        self.progress = read_progress(self.run_dir)

    def _maybe_sync(self, force: bool = False) -> None:
        if self.handle is None or not self.handle.remote:
            return
        if force or time.monotonic() - self._last_sync >= self.sync_every_s:
            self._last_sync = time.monotonic()
            ok, text = self.handle.sync()
            self.sync_note = (f"synced {time.strftime('%H:%M:%S')}" if ok
                              else f"sync: {text.splitlines()[-1] if text else 'failed'}")
            logs = "\n".join(self.handle.logs().splitlines()[-12:])  # the node's own output, between syncs
            self.log.value = f'<pre style="font-size:11px;max-height:180px;overflow:auto">{html.escape(logs)}</pre>'

    def launch_failed(self) -> bool:
        """The launch process ended with an error before the run could say anything itself."""
        code = self.handle.returncode() if self.handle is not None else None
        return code not in (None, 0) and not self.progress.done

    def refresh(self, force_sync: bool = False) -> Progress:
        self._maybe_sync(force_sync)
        p = self.progress = read_progress(self.run_dir)
        colour = {"completed": "#2e7d32", "failed": "#c62828"}.get(p.status, "#1565c0")
        error = f'<div style="color:#c62828">{html.escape(p.error)}</div>' if p.error else ""
        if self.launch_failed():
            error += f'<div style="color:#c62828">launch exited {self.handle.returncode()}: see the log below</div>'
        note = f' <span style="color:#777">({html.escape(self.sync_note)})</span>' if self.sync_note else ""
        self.status.value = (f'<b style="color:{colour}">{html.escape(p.line())}</b>{note}{error}'
                             f"<div>{loss_svg(p.losses)}</div>")
        if p.latest_video is not None and p.latest_video != self._shown_video:
            self.video.value = video_html(p.latest_video)
            self._shown_video = p.latest_video
        if self.handle is not None and (self.launch_failed() or not self.handle.remote):
            tail = self.handle.log_tail(12)
            self.log.value = f'<pre style="font-size:11px;max-height:180px;overflow:auto">{html.escape(tail)}</pre>'
        return p

    def finished(self) -> bool:
        if self.handle is not None and not self.handle.remote:
            return self.handle.returncode() is not None  # the local launch process ends when the run does
        return self.progress.done or self.launch_failed()

    def watch(self, interval_s: float = 1.0, timeout_s: float | None = None, display_panel: bool = True) -> Progress:
        """Show the panel and update it until the run ends (or timeout); returns the last progress."""
        from IPython.display import display

        if display_panel:
            display(self.widget)
        started = time.monotonic()
        while True:
            self.refresh()
            if self.finished():
                break
            if timeout_s is not None and time.monotonic() - started > timeout_s:
                break
            time.sleep(interval_s)
        self.refresh(force_sync=True)
        print(self.progress.line())
        return self.progress

    def follow(self, interval_s: float = 2.0) -> None:
        """Keep the panel fresh from a background thread until the run ends (the cell returns at once)."""
        if self._thread is not None and self._thread.is_alive():
            return

        def loop() -> None:
            while not self.finished():
                self.refresh()
                time.sleep(interval_s)
            self.refresh(force_sync=True)

        self._thread = threading.Thread(target=loop, daemon=True, name="wanforge-progress")
        self._thread.start()

    def _ipython_display_(self) -> None:
        from IPython.display import display

        self.refresh()
        display(self.widget)


def show_videos(run_dir: str | Path, width: int = 320) -> list[Path]:
    """Play every validation video of a run inline (after a run, or after `sync`); returns them oldest first."""
    from IPython.display import HTML, display

    run_dir = Path(run_dir)
    videos = sorted(run_dir.glob("validation/step-*/*.mp4"),
                    key=lambda p: (int(_STEP_DIR.match(p.parent.name).group(1)) if _STEP_DIR.match(p.parent.name) else -1, p.name))
    for video in videos:
        display(HTML(video_html(video, width)))
    if not videos:
        print(f"no validation videos in {run_dir / 'validation'} yet")
    return videos
