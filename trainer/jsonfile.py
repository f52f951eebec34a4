"""JSON files a config names (prompt library, LyCORIS arguments): read the same way by preflight and the engine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trainer.errors import UserError


def read_json_object(path: Path, field: str, what: str) -> dict[str, Any]:
    """The JSON object in `path`; missing, a folder, not UTF-8 JSON or not an object is one UserError line naming
    `field` (a UTF-8 byte-order mark is accepted). `what` says what the file should be."""
    if path.is_dir():
        raise UserError(f"{field}: {path} is a folder: point it at {what}")
    if not path.is_file():
        raise UserError(f"{field}: {path} does not exist ({what})")
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{field}: {path} is not valid JSON ({err}): save it as UTF-8 JSON") from None
    if not isinstance(data, dict):
        raise UserError(f"{field}: {path} must hold a JSON object, not a {type(data).__name__} ({what})")
    return data


def read_lycoris_config(path: Path) -> dict[str, Any]:
    """lora.lycoris_config: lycoris.create_lycoris arguments, at least the algorithm."""
    data = read_json_object(path, "lora.lycoris_config", "a JSON file of lycoris.create_lycoris arguments")
    if "algo" not in data:
        raise UserError(f'lora.lycoris_config: {path} needs at least {{"algo": "lokr" | "loha" | "locon"}}')
    return data
