"""pydantic's validation errors as one plain line per problem, naming the field and a fix (did-you-mean, the
section a misplaced key belongs in, a default the schema accepts, a frame size written as one string).

Every fix a line proposes is itself accepted by the schema (tests/test_suggestions.py applies them)."""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from trainer.config.schema import WanforgeConfig
from trainer.flavours import FLAVOURS, resolve_flavour_name

OWN_TYPO = 0.9  # a key this close to a field of its own section is a typo there, even if another section has it


def section_model(annotation: Any) -> type[BaseModel] | None:
    """The section class a field holds (itself, or the items of a list of them)."""
    for a in (annotation, *getattr(annotation, "__args__", ())):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
        inner = next((x for x in getattr(a, "__args__", ()) if isinstance(x, type) and issubclass(x, BaseModel)), None)
        if inner is not None:
            return inner
    return None


def is_list_field(annotation: Any) -> bool:
    return getattr(annotation, "__origin__", None) is list


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The section class a location points into (list indices skipped), or None past a plain value."""
    model: type[BaseModel] | None = WanforgeConfig
    for part in loc:
        if isinstance(part, int) or (isinstance(part, str) and part.isdigit()):
            continue
        field = model.model_fields.get(str(part)) if model is not None else None
        if field is None:
            return None
        model = section_model(field.annotation)
    return model


def _section_fields(loc: tuple[Any, ...]) -> list[str]:
    """Field names of the section a validation error points into (for did-you-mean)."""
    model = _model_at(loc[:-1])
    return list(model.model_fields) if model is not None else []


# ---------------------------------------------------------------- where a misplaced key belongs


@dataclass(frozen=True)
class Home:
    """A top-level section that has a field of a given name: `[optim]` / `[[datasets]]`, and the field."""

    section: str
    field: str
    is_list: bool

    @property
    def table(self) -> str:
        return f"[[{self.section}]]" if self.is_list else f"[{self.section}]"


_UNSET = object()


def config_sections() -> list[tuple[str, type[BaseModel], bool]]:
    """(table name, its section class, whether it is a list of tables) for each section of the schema."""
    out = []
    for name, field in WanforgeConfig.model_fields.items():
        model = section_model(field.annotation)
        if model is not None:
            out.append((name, model, is_list_field(field.annotation)))
    return out


def _accepts(model: type[BaseModel], name: str, value: Any) -> bool:
    """Whether the field's type and bounds take `value` (its section-wide checks aside)."""
    if value is _UNSET:
        return True
    field = model.model_fields[name]
    try:
        TypeAdapter(Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
                    ).validate_python(value)
    except (ValidationError, TypeError):
        return False
    return True


def key_homes(key: str, exclude: str | None, value: Any = _UNSET) -> list[Home]:
    """The other sections a key belongs in: exact names first (those whose field takes the value first), then close
    ones. `exclude`: the section the key was found in."""
    exact: list[tuple[bool, Home]] = []
    close: list[tuple[float, Home]] = []
    for name, model, is_list in config_sections():
        if name == exclude:
            continue
        if key in model.model_fields:
            exact.append((not _accepts(model, key, value), Home(name, key, is_list)))
            continue
        match = difflib.get_close_matches(key, list(model.model_fields), n=1, cutoff=0.8)
        if match:
            close.append((-difflib.SequenceMatcher(None, key, match[0]).ratio(), Home(name, match[0], is_list)))
    return [h for _, h in sorted(exact, key=lambda x: x[0])] + [h for _, h in sorted(close, key=lambda x: x[0])]


def _own_close(key: str, fields: list[str]) -> tuple[str | None, float]:
    match = difflib.get_close_matches(key, fields, n=1)
    return (match[0], difflib.SequenceMatcher(None, key, match[0]).ratio()) if match else (None, 0.0)


def _already_set(home: Home, data: dict[str, Any] | None) -> bool:
    table = (data or {}).get(home.section)
    if home.is_list:
        return isinstance(table, list) and any(isinstance(t, dict) and home.field in t for t in table)
    return isinstance(table, dict) and home.field in table


def _unknown_key_fix(loc: tuple[Any, ...], value: Any, data: dict[str, Any] | None) -> str:
    """The fix for an unknown key: a typo in its own section, the section it belongs in, or remove it."""
    key = str(loc[-1])
    section = str(loc[0]) if len(loc) > 1 else None
    own, ratio = _own_close(key, _section_fields(loc))
    homes = key_homes(key, section, value) if len(loc) <= 3 and not (len(loc) == 3 and section != "datasets") else []
    exact = [h for h in homes if h.field == key]
    if own is not None and (ratio >= OWN_TYPO or not exact):
        return f'did you mean "{own}"?'
    if homes:
        home = homes[0]
        if _already_set(home, data):
            return f"it belongs in {home.table} as {home.field}, which {home.table} already sets: remove it here"
        also = [h.table for h in exact[1:]]
        return f"it belongs in {home.table} as {home.field}" + (f" (or in {', '.join(also)})" if also else "")
    return "remove it (the fields of each section are listed in docs/configuration.md)"


# ---------------------------------------------------------------- a frame size written as one string

SIZE_FIELDS = ("resolution", "width", "height", "minimum_image_size", "maximum_image_size", "target_downsample_size")
_SIZE = re.compile(r"^\s*(\d{2,5})\s*(?:px)?\s*[x×X*,]\s*(\d{2,5})\s*(?:px)?\s*$")
_SHORT_EDGE = re.compile(r"^\s*(\d{3,4})\s*[pP]\s*$")


def _size_multiple(data: dict[str, Any] | None) -> int:
    model = (data or {}).get("model")
    name = model.get("flavour") if isinstance(model, dict) else None
    resolved = resolve_flavour_name(name) if isinstance(name, str) else None
    return FLAVOURS[resolved].vae_spatial * 2 if resolved else 16


def _two_numbers(value: Any) -> tuple[int, int] | None:
    if isinstance(value, str):
        m = _SIZE.match(value)
        return (int(m.group(1)), int(m.group(2))) if m else None
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 16 for v in value):
        return int(value[0]), int(value[1])
    return None


def _dataset_value(data: dict[str, Any] | None, loc: tuple[Any, ...], key: str) -> Any:
    tables = (data or {}).get("datasets")
    index = loc[1] if len(loc) > 2 and isinstance(loc[1], int) else 0
    if isinstance(tables, list) and index < len(tables) and isinstance(tables[index], dict):
        return tables[index].get(key)
    return None


def size_string_fix(loc: tuple[Any, ...], value: Any, data: dict[str, Any] | None) -> str | None:
    """`resolution = "1280x720"`, `width = "1280x720"`, `resolution = [1280, 720]`, `resolution = "720p"`: the two
    number fields to write instead (rounded to the flavour's multiple), or None if it is no such size."""
    name = str(loc[-1]) if loc else ""
    if name not in SIZE_FIELDS:
        return None
    shown = f'"{value}"' if isinstance(value, str) else repr(value)
    pair = _two_numbers(value)
    if pair is not None and (name in ("resolution", "width", "height") and
                             (loc[0] == "datasets" or (loc[0] == "validation" and name != "resolution"))):
        m = _size_multiple(data)
        width, height = (max(m, round(v / m) * m) for v in pair)
        rounded = "" if (width, height) == pair else f" (multiples of {m}: {pair[0]}x{pair[1]} rounds to {width}x{height})"
        drop = ", and remove resolution" if name == "resolution" else ""
        return (f"{name} = {shown} is a frame size written as one value: write two numbers instead, "
                f"width = {width} and height = {height}{drop}{rounded}")
    if pair is not None and loc[0] == "datasets" and name in SIZE_FIELDS[3:]:  # one number in resolution_type units
        kind = _dataset_value(data, loc, "resolution_type")
        kind = kind if kind in ("pixel", "area") else "pixel_area"
        w, h = pair  # trainer.data.buckets.size_in_units, which this layer does not import
        units = min(w, h) if kind == "pixel" else w * h / 1e6 if kind == "area" else math.sqrt(w * h)
        shown_units = f"{units:.2f}".rstrip("0").rstrip(".") if kind == "area" else str(round(units))
        return (f"{name} = {shown} is a frame size written as one value: write one number in resolution_type "
                f"units, {name} = {shown_units} ({pair[0]}x{pair[1]} as {kind})")
    m = _SHORT_EDGE.match(value) if isinstance(value, str) else None
    if m is not None and name == "resolution" and loc[0] == "datasets":
        return (f'{name} = {shown} names a video height: write resolution = {m.group(1)} and resolution_type = '
                f'"pixel" (the shorter edge in pixels)')
    return None


# ---------------------------------------------------------------- the lines


def _default_hint(loc: tuple[Any, ...]) -> str:
    """' (default: X)' for a field whose default is a plain number: a value the schema itself accepts."""
    model = _model_at(loc[:-1])
    field = model.model_fields.get(str(loc[-1])) if model is not None else None
    default = getattr(field, "default", None)
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        return f": try the default, {default!r}"
    return ""


def where_of(loc: tuple[Any, ...]) -> str:
    """("datasets", 0, "width") -> "datasets[0].width", as messages and --set name a field."""
    return ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in loc).replace(".[", "[") or "config"


def format_errors(err: ValidationError, source: str, data: dict[str, Any] | None = None) -> str:
    """One line per problem. `data`: the raw config the errors are about (for fixes that depend on it: the flavour's
    size multiple, whether a key is already set where it belongs)."""
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        where = where_of(loc)
        kind = e["type"]
        if kind == "extra_forbidden":
            lines.append(f"{source}: unknown key {where}: {_unknown_key_fix(loc, e.get('input', _UNSET), data)}")
            continue
        if kind == "missing":
            lines.append(f"{source}: {where}: required field is missing")
            continue
        if kind == "model_type" or kind == "model_attributes_type":
            homes = key_homes(str(loc[-1]), None, e.get("input")) if len(loc) == 1 else []
            exact = [h for h in homes if h.field == str(loc[-1])]
            fix = (f"it belongs in {exact[0].table} as {exact[0].field}" if exact else
                   f"set the fields inside it, e.g. [{where}] in the file or --set {where}.FIELD=VALUE")
            lines.append(f"{source}: {where} is a section (a table), not a value (got {_shown(e.get('input'))}): {fix}")
            continue
        size = size_string_fix(loc, e.get("input"), data)
        if size is not None:
            lines.append(f"{source}: {where_of(loc[:-1]) + '.' if len(loc) > 1 else ''}{size}")
            continue
        msg = str(e["msg"]).removeprefix("Value error, ")
        if kind == "finite_number":
            msg = "must be a finite number, not nan or inf"
        fix = ""
        if kind == "literal_error":
            expected = [x.strip(" '\"") for x in str(e.get("ctx", {}).get("expected", "")).replace(" or ", ",").split(",")]
            by_lower = {x.lower(): x for x in expected if x}
            close = difflib.get_close_matches(str(e.get("input")).lower(), list(by_lower), n=1)
            fix = f': did you mean "{by_lower[close[0]]}"?' if close else ""
        elif kind == "list_type" and isinstance(e.get("input"), dict):
            fix = f": write [[{where}]] with double brackets (a list of tables), or {where} = [...]"
        elif kind == "list_type" and isinstance(e.get("input"), (str, int, float)):
            fix = f": write a list, {where} = [{e.get('input')!r}]".replace("'", '"')
        elif kind in ("finite_number", "greater_than", "greater_than_equal", "less_than", "less_than_equal",
                      "int_parsing", "float_parsing", "int_from_float", "int_type", "float_type"):
            fix = _default_hint(loc)
        if not loc:  # a check of the whole config: its message names the fields
            lines.append(f"{source}: {msg}{fix}")
        elif isinstance(e.get("input"), dict):  # a check of a whole section: the table is no help to show
            lines.append(f"{source}: {where}: {msg}{fix}")
        else:
            lines.append(f"{source}: {where}: {msg} (got {_shown(e.get('input'))}){fix}")
    return "\n".join(lines)


def _shown(value: Any, limit: int = 120) -> str:
    """A value as a message shows it: repr, cut short (a huge list stays one readable line)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + " ...)"
