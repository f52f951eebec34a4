"""The notebook config form: ipywidgets generated from the pydantic schema, checked on every change.

    from launcher.form.config_form import ConfigForm
    form = ConfigForm.from_file("my.toml")      # or ConfigForm(cfg), ConfigForm() for an empty one
    form                                         # shows: sections, dataset scan, estimate, load/save/import, launch
    form.set("lora.rank", 16); form.config       # the validated WanforgeConfig, or None while anything is wrong

Each section is a collapsible group (the advanced ones start collapsed); a field's description is its tooltip; a
wrong value shows the schema's message beside the field and the Launch button stays disabled until every message
is gone. Imports no torch: scanning and estimating import their (torch-free) modules when first used.
"""

from __future__ import annotations

import html
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ipywidgets as w
from pydantic import ValidationError

from launcher.form.fields import FieldWidget, is_json_error, missing, section_fields, section_models
from trainer.config.files import config_from_dict, load_config, save_config
from trainer.config.schema import WanforgeConfig
from trainer.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ESSENTIAL = ("model", "datasets", "lora", "train", "validation")  # open at start; the other sections start collapsed


def _error_text(e: dict[str, Any], rest: list[str]) -> str:
    msg = str(e["msg"]).removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        msg = "unknown key (not in the schema)"
    where = ".".join(rest)
    return f"{where}: {msg}" if where else msg


class ConfigForm:
    """A config as widgets. `config` is the validated config or None; `errors` maps field keys to their messages."""

    def __init__(self, cfg: WanforgeConfig | dict[str, Any] | None = None, base_dir: Path | None = None):
        from launcher.form.panels import EstimatePanel, FilePanel, LaunchPanel, ScanPanel

        self.base_dir = base_dir  # relative paths in the fields are relative to this (the loaded file's folder)
        self.config: WanforgeConfig | None = None
        self.errors: dict[str, str] = {}
        self.fields: dict[str, FieldWidget] = {}
        self.section_messages: dict[str, w.HTML] = {"": w.HTML()}
        self._listeners: list[Callable[[WanforgeConfig | None], None]] = []
        self._loading = False
        self._models = section_models()
        self._dataset_count = 0
        self._datasets_box = w.VBox()
        self.status = w.HTML()
        self.status.add_class("wf-status")
        self.launch_button = w.Button(description="Launch", button_style="success", icon="rocket", disabled=True)
        self.launch_button.add_class("wf-launch")

        sections = []
        for name, (model, is_list) in self._models.items():
            if is_list:
                self.section_messages[name] = w.HTML()
                add = w.Button(description=f"add {name[:-1]}", icon="plus")
                add.on_click(lambda _b: self.add_dataset())
                sections.append(w.VBox([self.section_messages[name], self._datasets_box, add]))
                continue
            fields = section_fields(name, model)
            self._watch(fields)
            sections.append(self._group(name, fields, open_=name in ESSENTIAL))
        self.scan_panel = ScanPanel(self)
        self.estimate_panel = EstimatePanel(self)
        self.file_panel = FilePanel(self)
        self.launch_panel = LaunchPanel(self)
        self.widget = w.VBox([
            self.file_panel.widget,
            *sections,
            self.section_messages[""],
            self.scan_panel.widget,
            self.estimate_panel.widget,
            self.status,
            self.launch_panel.widget,
        ])
        if cfg is None:
            self._set_datasets([{}])
            self.validate()
        else:
            self.set_raw(cfg.model_dump(mode="json") if isinstance(cfg, WanforgeConfig) else cfg)

    # ---------------------------------------------------------------- building
    @classmethod
    def from_file(cls, path: str | Path) -> ConfigForm:
        form = cls()
        form.load_toml(path)
        return form

    def _group(self, name: str, fields: dict[str, FieldWidget], open_: bool, extra: list[w.Widget] | None = None,
               title: str | None = None) -> w.Accordion:
        self.section_messages.setdefault(name, w.HTML())
        body = w.VBox([self.section_messages[name], *(extra or []), *(f.row for f in fields.values())])
        group = w.Accordion(children=[body], titles=(title or f"[{name}]",))
        group.selected_index = 0 if open_ else None
        group.add_class("wf-section-" + name.replace(".", "-"))
        return group

    def _watch(self, fields: dict[str, FieldWidget]) -> None:
        self.fields.update(fields)
        for fw in fields.values():
            fw.widget.observe(self._changed, names="value")

    def _set_datasets(self, tables: list[dict[str, Any]]) -> None:
        """(Re)build one group per [[datasets]] table and fill it."""
        for key in [k for k in self.fields if k.startswith("datasets.")]:
            self.fields.pop(key).widget.unobserve(self._changed, names="value")
        for key in [k for k in self.section_messages if k.startswith("datasets.")]:
            del self.section_messages[key]
        model, _ = self._models["datasets"]
        groups = []
        for i, table in enumerate(tables):
            fields = section_fields(f"datasets.{i}", model)
            for key, fw in fields.items():
                if fw.name in table:
                    fw.show(table[fw.name])
            self._watch(fields)
            remove = w.Button(description=f"remove datasets[{i}]", icon="trash", layout=w.Layout(width="auto"))
            remove.on_click(lambda _b, i=i: self.remove_dataset(i))
            groups.append(self._group(f"datasets.{i}", fields, open_=True, extra=[remove],
                                      title=f"[[datasets]] {i}: {table.get('path') or 'new'}"))
        self._dataset_count = len(tables)
        self._datasets_box.children = groups

    def _dataset_tables(self) -> list[dict[str, Any]]:
        data, _ = self.raw()
        return data.get("datasets", [])

    def add_dataset(self) -> None:
        self._set_datasets([*self._dataset_tables(), {}])
        self.validate()

    def remove_dataset(self, index: int) -> None:
        tables = self._dataset_tables()
        del tables[index]
        self._set_datasets(tables)
        self.validate()

    # ---------------------------------------------------------------- values
    def raw(self) -> tuple[dict[str, Any], dict[str, str]]:
        """The config data the widgets hold (not yet validated), and fields whose text can't even be parsed."""
        data: dict[str, Any] = {"datasets": [{} for _ in range(self._dataset_count)]}
        unparsed: dict[str, str] = {}
        for key, fw in self.fields.items():
            value = fw.value
            if value is missing():
                continue
            if is_json_error(value):
                unparsed[key] = value.message
                continue
            parts = key.split(".")
            table = data["datasets"][int(parts[1])] if parts[0] == "datasets" else data.setdefault(parts[0], {})
            table[parts[-1]] = value
        return data, unparsed

    def set(self, key: str, value: Any) -> None:
        """Set one field as a user would ("train.max_train_steps", "datasets.0.width"); validates."""
        if key not in self.fields:
            import difflib

            close = difflib.get_close_matches(key, list(self.fields), n=1)
            raise KeyError(f"no field {key!r}" + (f": did you mean {close[0]!r}?" if close else ""))
        self.fields[key].show(value)

    def set_raw(self, data: dict[str, Any]) -> None:
        """Fill every field from config data (absent keys get their defaults) and validate once."""
        self._loading = True
        try:
            self._set_datasets(list(data.get("datasets") or []))
            for name, (model, is_list) in self._models.items():
                if is_list:
                    continue
                table = data.get(name) or {}
                for field_name, info in model.model_fields.items():
                    fw = self.fields[f"{name}.{field_name}"]
                    if field_name in table:
                        fw.show(table[field_name])
                    elif not info.is_required():
                        fw.show(info.get_default(call_default_factory=True))
        finally:
            self._loading = False
        self.validate()

    def set_config(self, cfg: WanforgeConfig) -> None:
        self.set_raw(cfg.model_dump(mode="json"))

    # ---------------------------------------------------------------- checking
    def _changed(self, _change: dict[str, Any]) -> None:
        if not self._loading:
            self.validate()

    def _place(self, loc: tuple[Any, ...]) -> tuple[str, list[str]]:
        """Where an error shows: the deepest field (or section) its location names, and the rest of the location."""
        parts = [str(p) for p in loc]
        for n in range(len(parts), 0, -1):
            key = ".".join(parts[:n])
            if key in self.fields or key in self.section_messages:
                return key, [p if not p.isdigit() else f"[{p}]" for p in parts[n:]]
        return "", parts

    def validate(self) -> WanforgeConfig | None:
        data, unparsed = self.raw()
        errors: dict[str, list[str]] = {k: [v] for k, v in unparsed.items()}
        cfg = None
        try:
            WanforgeConfig.model_validate(data)
            if not unparsed:
                cfg = config_from_dict(data, source="form", base_dir=self.base_dir)
        except ValidationError as err:
            for e in err.errors():
                key, rest = self._place(tuple(e["loc"]))
                errors.setdefault(key, []).append(_error_text(e, rest))
        self.errors = {k: "; ".join(v) for k, v in errors.items()}
        for key, fw in self.fields.items():
            fw.set_message(self.errors.get(key, ""))
        for key, box in self.section_messages.items():
            text = self.errors.get(key, "")
            box.value = f'<div class="wf-error" style="color:#c62828">{html.escape(text)}</div>' if text else ""
        self.config = cfg
        self._show_status()
        for listener in self._listeners:
            listener(cfg)
        return cfg

    def _show_status(self) -> None:
        cfg = self.config
        if cfg is not None:
            self.status.value = (
                f'<b class="wf-ok" style="color:#2e7d32">config OK</b>: {html.escape(cfg.model.flavour)}, LoRA rank '
                f"{cfg.lora.rank}, {cfg.train.max_train_steps} steps, {len(cfg.datasets)} dataset(s) &rarr; "
                f"{html.escape(str(cfg.train.output_dir))}")
        else:
            first = "; ".join(f"{k or 'config'}: {v}" for k, v in list(self.errors.items())[:3])
            self.status.value = (f'<b class="wf-invalid" style="color:#c62828">{len(self.errors)} problem(s)</b>: '
                                 f"{html.escape(first)}")
        self.launch_button.disabled = cfg is None

    def on_change(self, listener: Callable[[WanforgeConfig | None], None]) -> None:
        """Call listener(config or None) after every check."""
        self._listeners.append(listener)

    def check(self) -> list[str]:
        """The preflight a user runs before launching: config, referenced files and model names (trainer.preflight),
        dataset scan, estimate. Returns every problem found."""
        cfg = self.validate()
        if cfg is None:
            return [f"{k or 'config'}: {v}" for k, v in self.errors.items()]
        from trainer.preflight.check import preflight  # torch-free: the files and names the config refers to

        problems = list(preflight(cfg, here=False, scan=False, torch_free=True).errors)
        problems += self.scan_panel.scan().errors
        est = self.estimate_panel.update(cfg)
        if est is not None and not est.fits:
            problems.append(f"estimate: {est.vram_gib:.1f} GiB per GPU does not fit {est.gpu}")
        return problems

    # ---------------------------------------------------------------- files
    def load_toml(self, path: str | Path) -> None:
        """Load a TOML config. A file with mistakes still loads: every mistake shows beside its field."""
        path = Path(path)
        self.base_dir = path.parent.resolve()
        try:
            self.set_config(load_config(path))
            self.file_panel.say(f"loaded {path}")
        except UserError as err:
            if not path.is_file():
                raise
            try:
                data = tomllib.loads(path.read_text(encoding="utf-8"))
            except tomllib.TOMLDecodeError:
                raise err from None
            self.set_raw(data)
            self.file_panel.say(f"loaded {path} with problems:\n{err}", error=True)

    def save_toml(self, path: str | Path) -> Path:
        if self.config is None:
            raise UserError(f"{path}: not saved, the config has problems: " + "; ".join(self.errors.values()))
        save_config(self.config, Path(path))
        self.file_panel.say(f"saved {path}")
        return Path(path)

    def import_simpletuner(self, config_json: str | Path, backend_json: str | Path | None = None,
                           out: str | Path | None = None, root: str | Path | None = None) -> Path:
        """Convert a SimpleTuner config.json (+ multidatabackend.json) with launcher/simpletuner.py, write the TOML
        (default: the TOML path of the file panel) and load it. `root`: where SimpleTuner ran (default: here)."""
        from launcher.simpletuner import import_simpletuner

        out = Path(out or self.file_panel.path.value)
        conv = import_simpletuner(config_json, out, backend_json or None, root or None)
        self.load_toml(out)
        said = [f"imported {config_json} -> {out}", *conv.fixes, *conv.notes]
        if conv.warning():
            said.append(conv.warning())
        self.file_panel.say("\n".join(said))
        return out

    # ---------------------------------------------------------------- launching
    def launch(self, **options: Any) -> Any:
        """What the Launch button does (options override the launch panel's target / gpu / output / name)."""
        return self.launch_panel.launch(**options)

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)
