"""The panels under the config form: dataset scan, estimate, load / save / import, and launch.

Each panel is a small class holding its widgets and a reference to the form; the trainer's discovery / bucket code
and the launcher's estimate are imported when first used (both are torch-free).
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import ipywidgets as w

from launcher.estimate_table import ESTIMATE_HEADER, TEXT_COLUMNS, cpu_trial_note, estimate_cells
from trainer.config.schema import WanforgeConfig
from trainer.errors import UserError

if TYPE_CHECKING:
    from launcher.estimate import Estimate


class ConfigForm(Protocol):
    """What the panels use of the form they sit under (launcher/form/config_form.py's ConfigForm)."""

    config: WanforgeConfig | None
    launch_button: w.Button
    estimate_panel: EstimatePanel

    def on_change(self, listener: Callable[[WanforgeConfig | None], None]) -> None: ...
    def validate(self) -> WanforgeConfig | None: ...
    def load_toml(self, path: str | Path) -> None: ...
    def save_toml(self, path: str | Path) -> Path: ...
    def import_simpletuner(self, config_json: str | Path, backend_json: str | Path | None = None,
                           out: str | Path | None = None, root: str | Path | None = None) -> Path: ...


def _pre(lines: list[str]) -> str:
    return f'<pre style="font-size:12px;max-height:260px;overflow:auto">{html.escape(chr(10).join(lines))}</pre>'


def _say(box: w.HTML, text: str, error: bool = False) -> None:
    colour = "#c62828" if error else "#2e7d32"
    box.value = f'<pre style="color:{colour};white-space:pre-wrap;margin:0">{html.escape(text)}</pre>' if text else ""


# ---------------------------------------------------------------- dataset scan


@dataclass
class ScanSummary:
    clips_per_dataset: list[int] = field(default_factory=list)
    buckets: dict[int, dict[str, int]] = field(default_factory=dict)  # dataset -> bucket key -> samples (x repeats)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (file, why it is skipped)
    errors: list[str] = field(default_factory=list)  # what stops training (as `wanforge check` says it)
    lines: list[str] = field(default_factory=list)

    @property
    def clips(self) -> int:
        return sum(self.clips_per_dataset)


def scan_config(cfg: WanforgeConfig) -> ScanSummary:
    """The trainer's own check (`wanforge check`: bucket report and what stops training) plus the counts for the
    summary line. The second scan per dataset is cheap: probe results are cached beside the data."""
    from collections import Counter

    from trainer.data.discovery import check_datasets, scan_dataset

    summary = ScanSummary()
    try:
        report, summary.errors = check_datasets(cfg)
    except UserError as err:  # e.g. a dataset folder that isn't there
        summary.errors = [str(err)]
        summary.clips_per_dataset = [0] * len(cfg.datasets)
        summary.lines = [str(err)]
        return summary
    for i, ds in enumerate(cfg.datasets):
        try:
            scan = None if ds.disabled else scan_dataset(ds, i, cfg.model.flavour)
        except UserError:  # a folder that isn't there: already among the errors
            scan = None
        clips = scan.clips if scan is not None else []
        summary.clips_per_dataset.append(len(clips))
        if clips:
            summary.buckets[i] = {k: n * ds.repeats for k, n in Counter(c.bucket.key for c in clips).items()}
        summary.problems += [(str(path), why) for path, why in (scan.problems if scan is not None else [])]
    head = (f"{summary.clips} usable clip(s) in {len(cfg.datasets)} dataset(s), "
            f"{sum(len(b) for b in summary.buckets.values())} bucket(s), {len(summary.problems)} skipped file(s)")
    summary.lines = [head, *report, *(f"error: {e}" for e in summary.errors)]
    return summary


class ScanPanel:
    def __init__(self, form: ConfigForm):
        self.form = form
        self.button = w.Button(description="Scan dataset", icon="search")
        self.button.on_click(lambda _b: self.scan())
        self.output = w.HTML()
        self.output.add_class("wf-scan")
        self.summary: ScanSummary | None = None
        self.widget = w.VBox([w.HTML("<b>Dataset</b>"), self.button, self.output])

    def scan(self) -> ScanSummary:
        cfg = self.form.config
        if cfg is None:
            self.output.value = _pre(["fix the config first: the scan needs valid [[datasets]] tables"])
            return ScanSummary(errors=["the config has problems"])
        self.output.value = _pre(["scanning ..."])
        self.summary = scan_config(cfg)
        self.output.value = _pre(self.summary.lines)
        return self.summary


# ---------------------------------------------------------------- estimate


class EstimatePanel:
    """VRAM, s/step, total time and cost on a chosen GPU; recomputed on every valid change (no torch, cheap)."""

    def __init__(self, form: ConfigForm, gpu: str = "H100"):
        from launcher.estimate import known_gpus

        gpus = list(known_gpus())
        self.form = form
        self.gpu = w.Dropdown(options=gpus, value=gpu if gpu in gpus else gpus[0], description="GPU",
                              layout=w.Layout(width="220px"))
        self.count = w.BoundedIntText(1, min=1, max=64, description="count", layout=w.Layout(width="160px"))
        self.output = w.HTML()
        self.output.add_class("wf-estimate")
        self.last: Estimate | None = None
        for widget in (self.gpu, self.count):
            widget.observe(lambda _c: self.update(self.form.config), names="value")
        form.on_change(self.update)
        self.widget = w.VBox([w.HTML("<b>Estimate</b>"), w.HBox([self.gpu, self.count]), self.output])

    @property
    def spec(self) -> str:
        return f"{self.gpu.value}:{self.count.value}"

    def update(self, cfg: WanforgeConfig | None) -> Estimate | None:
        from launcher.estimate import estimate

        self.last = None
        if cfg is None:
            self.output.value = '<span style="color:#777">fix the config to see the estimate</span>'
            return None
        note = cpu_trial_note(cfg)
        if note:
            self.output.value = f"<span>{html.escape(note)}</span>"
            return None
        try:
            est = estimate(cfg, self.spec)
        except UserError as err:
            self.output.value = f'<span style="color:#c62828">{html.escape(str(err))}</span>'
            return None
        fits = ESTIMATE_HEADER.index("fits")
        colour = "color:#c62828" if not est.fits else "color:#2e7d32" if est.measured else "color:#b26a00"

        def cell(tag: str, i: int, text: str) -> str:
            align = "left" if i in TEXT_COLUMNS else "right"
            return (f'<{tag} style="text-align:{align};padding:0 8px;{colour if i == fits and tag == "td" else ""}">'
                    f"{html.escape(text)}</{tag}>")

        from launcher.estimate import cited_rows

        head = "".join(cell("th", i, h) for i, h in enumerate(ESTIMATE_HEADER))
        body = "".join(cell("td", i, c) for i, c in enumerate(estimate_cells(est)))
        self.output.value = (f"<table><tr>{head}</tr><tr>{body}</tr></table>"
                             f'<div style="color:#777;font-size:11px">'
                             + "<br>".join(html.escape(line) for line in cited_rows([est]))
                             + f"<br>scaled from {html.escape(est.basis)}; training steps only</div>")
        self.last = est
        return est


# ---------------------------------------------------------------- load / save / import


class FilePanel:
    def __init__(self, form: ConfigForm):
        self.form = form
        self.path = w.Text(value="config.toml", description="TOML", layout=w.Layout(width="420px"))
        self.st_config = w.Text(placeholder="SimpleTuner config.json", description="SimpleTuner",
                                layout=w.Layout(width="420px"))
        self.st_backend = w.Text(placeholder="multidatabackend.json (default: the one config.json names)",
                                 layout=w.Layout(width="300px"))
        self.st_root = w.Text(placeholder="SimpleTuner folder (its relative paths; default: here)",
                              layout=w.Layout(width="300px"))
        load, save, imp = (w.Button(description=d, icon=i) for d, i in
                           (("Load", "folder-open"), ("Save", "save"), ("Import", "file-import")))
        load.on_click(lambda _b: self._guard(lambda: form.load_toml(self.path.value)))
        save.on_click(lambda _b: self._guard(lambda: form.save_toml(self.path.value)))
        imp.on_click(lambda _b: self._guard(lambda: form.import_simpletuner(
            self.st_config.value, self.st_backend.value or None, root=self.st_root.value or None)))
        self.message = w.HTML()
        self.widget = w.VBox([w.HBox([self.path, load, save]),
                              w.HBox([self.st_config, self.st_backend, self.st_root, imp]), self.message])

    def _guard(self, action: Any) -> None:
        try:
            action()
        except UserError as err:
            self.say(str(err), error=True)

    def say(self, text: str, error: bool = False) -> None:
        _say(self.message, text, error)


# ---------------------------------------------------------------- launch


class LaunchPanel:
    """Where the run goes (local, or a SkyPilot target with the estimate panel's GPU) and the Launch button."""

    def __init__(self, form: ConfigForm):
        from launcher.targets import TARGETS

        self.form = form
        self.target = w.Dropdown(options=list(TARGETS), value="local", description="target",
                                 layout=w.Layout(width="220px"))
        self.output = w.Text(placeholder="hf://USER/REPO or s3://BUCKET/PREFIX (cloud targets)",
                             description="outputs", layout=w.Layout(width="420px"))
        self.name = w.Text(placeholder="run name (default: from the run folder)", layout=w.Layout(width="300px"))
        self.message = w.HTML()
        self.area = w.VBox()
        self.handle: Any = None
        self.panel: Any = None
        form.launch_button.on_click(lambda _b: self._clicked())
        self.widget = w.VBox([w.HTML("<b>Launch</b>"), w.HBox([self.target, self.output]),
                              w.HBox([self.name, form.launch_button]), self.message, self.area])

    def _clicked(self) -> None:
        try:
            self.launch(follow=True)
        except UserError as err:
            _say(self.message, str(err), error=True)

    def launch(self, target: str | None = None, gpu: str | None = None, output: str | None = None,
               name: str | None = None, follow: bool = False, **extra: Any) -> Any:
        """Start the run (see launcher.form.launch.start_run) and put its progress panel under the button."""
        from launcher.form.launch import start_run
        from launcher.progress import ProgressPanel

        cfg = self.form.validate()
        if cfg is None:
            raise UserError("not launched: the config has problems (see the messages beside the fields)")
        if self.handle is not None and self.handle.returncode() is None and not self.handle.remote:
            raise UserError(f"{self.handle.name} is still running here: wait for it or stop it first")
        target = target or self.target.value
        gpu = gpu or (self.form.estimate_panel.spec if target != "local" else None)
        self.handle = start_run(cfg, target, gpu, output or self.output.value.strip() or None,
                                name or self.name.value.strip() or None, **extra)
        self.panel = ProgressPanel(cfg.train.output_dir, self.handle)
        self.area.children = [self.panel.widget]
        _say(self.message, f"launched {self.handle.name} ({target}); log: {self.handle.log_file}")
        if follow:
            self.panel.follow()
        return self.handle
