"""One ipywidget per config field, chosen from the field's type in the pydantic schema, and its value back as raw data.

bool -> Checkbox, Literal -> Dropdown, int / float -> IntText / FloatText, str / Path -> Text (Textarea when long),
optional scalars -> Text (empty = the default / off), list[str] -> TagsInput, list[int] -> IntsInput, anything
nested (lists of tables) -> a JSON Textarea. The field's description is the tooltip of its label and its widget.
"""

from __future__ import annotations

import html
import json
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import ipywidgets as w
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from trainer.flavours import FLAVOURS

# str fields whose valid values are a known list (the schema keeps them str so aliases and new names validate)
CHOICES: dict[str, list[str]] = {"flavour": list(FLAVOURS)}
LONG_TEXT = 60  # characters: a default longer than this gets a Textarea
LABEL_WIDTH = "230px"

_MISSING = object()


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    """(inner type, allows None) of `X | None` / `Optional[X]`."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(get_args(annotation)) == 2:
            return args[0], True
    return annotation, False


def _is_model(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)


@dataclass
class FieldWidget:
    """A field's row: label, input widget, and the message shown beside it."""

    key: str  # "lora.rank", "datasets.0.width"
    name: str
    kind: str  # checkbox | dropdown | int | float | text | optional | tags | ints | json
    widget: w.Widget
    message: w.HTML
    row: w.HBox
    optional: bool

    @property
    def value(self) -> Any:
        """The raw value for the config data (strings are left to pydantic to convert and check); _MISSING: omit."""
        v = self.widget.value
        if self.kind in ("checkbox", "int", "float"):
            return v
        if self.kind == "dropdown":
            return None if v == "" else v
        if self.kind in ("tags", "ints"):
            return list(v)
        if self.kind == "json":
            text = v.strip()
            if not text:
                return []
            try:
                return json.loads(text)
            except json.JSONDecodeError as err:
                return _JsonError(f"not valid JSON: {err.msg} (line {err.lineno}, column {err.colno})")
        text = v.strip() if isinstance(v, str) else v
        if text == "":
            return None if self.optional else _MISSING
        return text

    def show(self, value: Any) -> None:
        """Put a config value into the widget (None shows as empty / the dropdown's default entry)."""
        if self.optional and isinstance(value, str) and value.lower() == "none":  # TOML's spelling of "unset"
            value = None
        if self.kind == "json":  # a string is the JSON text itself (what a user types)
            self.widget.value = value if isinstance(value, str) else ("" if not value else json.dumps(value))
        elif self.kind in ("tags", "ints"):
            self.widget.value = list(value or [])
        elif self.kind == "dropdown":
            shown = "" if value is None else str(value)
            if shown not in self.widget.options:  # an alias or an unknown name: keep it so its message shows
                self.widget.options = [*self.widget.options, shown]
            self.widget.value = shown
        elif self.kind in ("text", "optional"):
            self.widget.value = "" if value is None else str(value)
        else:
            self.widget.value = value

    def set_message(self, text: str) -> None:
        self.message.value = f'<span class="wf-error" style="color:#c62828">{html.escape(text)}</span>' if text else ""


@dataclass
class _JsonError:
    """A JSON field that doesn't parse: reported beside the field, not sent to pydantic."""

    message: str


def is_json_error(value: Any) -> bool:
    return isinstance(value, _JsonError)


def _make_widget(info: FieldInfo, name: str, default: Any) -> tuple[str, w.Widget, bool]:
    inner, optional = _unwrap_optional(info.annotation)
    layout = w.Layout(width="420px")
    if get_origin(inner) is Literal:
        options = [str(a) for a in get_args(inner)]
        return "dropdown", w.Dropdown(options=([""] if optional else []) + options, layout=layout), optional
    if name in CHOICES and inner is str:
        return "dropdown", w.Dropdown(options=([""] if optional else []) + CHOICES[name], layout=layout), optional
    if inner is bool and not optional:
        return "checkbox", w.Checkbox(indent=False), False
    if inner is int and not optional:
        return "int", w.IntText(layout=w.Layout(width="160px")), False
    if inner is float and not optional:
        return "float", w.FloatText(layout=w.Layout(width="160px")), False
    if inner in (str, Path, int, float):
        placeholder = "default" if optional else ""
        if isinstance(default, str) and len(default) > LONG_TEXT:
            return "optional" if optional else "text", w.Textarea(placeholder=placeholder, layout=w.Layout(
                width="420px", height="70px"), continuous_update=False), optional
        return "optional" if optional else "text", w.Text(placeholder=placeholder, layout=layout,
                                                          continuous_update=False), optional
    if get_origin(inner) is list and get_args(inner) == (str,):
        return "tags", w.TagsInput(allow_duplicates=False, layout=layout), optional
    if get_origin(inner) is list and get_args(inner) == (int,):
        return "ints", w.IntsInput(allow_duplicates=False, layout=layout), optional
    # nested tables (e.g. tread.routes): edited as JSON, checked by the schema like everything else
    return "json", w.Textarea(placeholder="JSON, e.g. []", layout=w.Layout(width="420px", height="60px"),
                              continuous_update=False), optional


def field_widget(key: str, name: str, info: FieldInfo) -> FieldWidget:
    default = info.get_default(call_default_factory=True) if not info.is_required() else None
    kind, widget, optional = _make_widget(info, name, default)
    help_text = info.description or ""
    widget.tooltip = help_text
    widget.add_class("wf-field-" + key.replace(".", "-").replace("_", "-"))
    label = w.HTML(f'<span title="{html.escape(help_text)}" style="cursor:help">{html.escape(name)}</span>',
                   layout=w.Layout(width=LABEL_WIDTH))
    message = w.HTML(layout=w.Layout(width="auto"))
    message.add_class("wf-message-" + key.replace(".", "-").replace("_", "-"))
    row = w.HBox([label, widget, message])
    fw = FieldWidget(key, name, kind, widget, message, row, optional)
    if not info.is_required():
        fw.show(default)
    return fw


def section_fields(prefix: str, model: type[BaseModel]) -> dict[str, FieldWidget]:
    """A widget for every field of a section, keyed "prefix.name"."""
    return {f"{prefix}.{name}": field_widget(f"{prefix}.{name}", name, info) for name, info in model.model_fields.items()}


def section_models() -> dict[str, tuple[type[BaseModel], bool]]:
    """Top-level sections of the schema: name -> (section class, is a list of tables)."""
    from trainer.config.schema import WanforgeConfig

    out = {}
    for name, info in WanforgeConfig.model_fields.items():
        ann = info.annotation
        if _is_model(ann):
            out[name] = (ann, False)
        elif get_origin(ann) is list and _is_model(get_args(ann)[0]):
            out[name] = (get_args(ann)[0], True)
    return out


def missing() -> Any:
    return _MISSING
