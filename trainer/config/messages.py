"""pydantic's validation errors as one plain line per problem, naming the field and a fix (did-you-mean, the
section a misplaced key belongs in, a default the schema accepts)."""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ValidationError

from trainer.config.schema import WanforgeConfig


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


def _section_holding(key: str) -> tuple[str, str] | None:
    """The section that has (a close match of) a key, for keys put in the wrong section."""
    for name, field in WanforgeConfig.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            close = difflib.get_close_matches(key, list(ann.model_fields), n=1, cutoff=0.8)
            if close:
                return name, close[0]
    return None


def _default_hint(loc: tuple[Any, ...]) -> str:
    """' (default: X)' for a field whose default is a plain number: a value the schema itself accepts."""
    model = _model_at(loc[:-1])
    field = model.model_fields.get(str(loc[-1])) if model is not None else None
    default = getattr(field, "default", None)
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        return f": try the default, {default!r}"
    return ""


def format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        where = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in loc).replace(".[", "[") or "config"
        kind = e["type"]
        if kind == "extra_forbidden":
            close = difflib.get_close_matches(str(loc[-1]), _section_fields(loc), n=1)
            elsewhere = _section_holding(str(loc[-1])) if len(loc) == 2 else None
            if close:
                fix = f'did you mean "{close[0]}"?'
            elif elsewhere:
                fix = f"it belongs in [{elsewhere[0]}] as {elsewhere[1]}"
            else:
                fix = "remove it (the fields of each section are listed in trainer/config/)"
            lines.append(f"{source}: unknown key {where}: {fix}")
        elif kind == "missing":
            lines.append(f"{source}: {where}: required field is missing")
        elif kind == "model_type" or kind == "model_attributes_type":
            lines.append(f"{source}: {where} is a section (a table), not a value (got {e.get('input')!r}): set the "
                         f"fields inside it, e.g. [{where}] in the file or --set {where}.FIELD=VALUE")
        else:
            msg = str(e["msg"]).removeprefix("Value error, ")
            if kind == "finite_number":
                msg = "must be a finite number, not nan or inf"
            fix = ""
            if kind == "literal_error":
                expected = [x.strip(" '\"") for x in str(e.get("ctx", {}).get("expected", "")).replace(" or ", ",").split(",")]
                close = difflib.get_close_matches(str(e.get("input")), [x for x in expected if x], n=1)
                fix = f': did you mean "{close[0]}"?' if close else ""
            elif kind == "list_type" and isinstance(e.get("input"), dict):
                fix = f": write [[{where}]] with double brackets (a list of tables), or {where} = [...]"
            elif kind == "list_type" and isinstance(e.get("input"), (str, int, float)):
                fix = f": write a list, {where} = [{e.get('input')!r}]".replace("'", '"')
            elif kind in ("finite_number", "greater_than", "greater_than_equal", "less_than", "less_than_equal",
                          "int_parsing", "float_parsing", "int_from_float", "int_type", "float_type"):
                fix = _default_hint(loc)
            lines.append(f"{source}: {where}: {msg} (got {e.get('input')!r}){fix}")
    return "\n".join(lines)
