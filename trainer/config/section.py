"""The base of every config section: unknown keys refused, nan/inf refused, "none" read as null, `~` as home."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator, model_validator


SEED_MAX = 2**32 - 1  # numpy's seed range (accelerate's set_seed seeds numpy too)
# str fields that name a file or folder when they are not a Hub id (a Hub id never starts with "~")
PATH_STRINGS = ("pretrained_model_name_or_path", "pretrained_transformer_model_name_or_path",
                "pretrained_vae_model_name_or_path", "encoder_path", "path")
# str fields where an empty value means something ("" negative prompt: none; "" subfolder: the folder itself)
EMPTY_ALLOWED = ("negative_prompt", "pretrained_transformer_subfolder")


class Section(BaseModel):
    # nan / inf are refused everywhere: no library underneath trains on them
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _none_word_is_null(cls, data: Any) -> Any:
        """TOML has no null: `key = "none"` turns an optional setting off (fields that allow None only). A path
        starting with `~` is the user's home, as in a shell."""
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for name, value in data.items():
            field = cls.model_fields.get(name)
            if field is None or not isinstance(value, str):
                continue
            if value.lower() == "none" and _allows_none(field.annotation):
                out[name] = None
            elif value.startswith("~") and (name in PATH_STRINGS or _is_path(field.annotation)):
                out[name] = os.path.expanduser(value)
        return out

    @field_validator("*", mode="before")
    @classmethod
    def _no_empty_values(cls, value: Any, info: ValidationInfo) -> Any:
        """An empty value is never what a user means (an empty path would be the config's own folder, an empty
        name a silent default): refused, naming the fix. Runs after each field's own checks."""
        name = info.field_name or ""
        if isinstance(value, str) and "\x00" in value:
            raise ValueError("holds a NUL character (\\x00), which no file name or text may hold: remove it")
        if isinstance(value, str) and not value.strip() and name not in EMPTY_ALLOWED:
            raise ValueError(f"is empty: {_empty_fix(cls, name)}")
        if isinstance(value, list) and any(isinstance(v, str) and not v.strip() for v in value):
            kept = [v for v in value if not (isinstance(v, str) and not v.strip())]
            fix = (f"{name} = {json.dumps(kept)}" if kept and len(kept) <= 12 else
                   "remove the empty items" if kept else _empty_fix(cls, name))
            raise ValueError(f"holds an empty name: {fix}")
        return value


def _empty_fix(cls: type[BaseModel], name: str) -> str:
    field = cls.model_fields.get(name)
    if field is None or field.is_required():
        return "give a value"
    default = field.get_default(call_default_factory=True)
    if default is None or default == []:
        return "remove the key (unset is the default)"
    shown = str(default) if isinstance(default, Path) else repr(default)
    return f"remove the key to use the default ({shown})".replace("'", '"')


def _allows_none(annotation: Any) -> bool:
    return type(None) in getattr(annotation, "__args__", ())


def not_empty(value: Any, what: str) -> Any:
    """An empty path would silently mean the config's own folder."""
    if isinstance(value, str) and not value.strip():
        raise ValueError(f"is empty: give {what}")
    return value


def _is_path(annotation: Any) -> bool:
    return annotation is Path or Path in getattr(annotation, "__args__", ())
