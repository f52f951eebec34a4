"""Validation prompts as the config gives them: the prompt library file and the <token> trigger-word placeholder.

Torch-free, so preflight reads and checks them exactly as validation will (trainer.outputs.validation_videos renders them).
"""

from __future__ import annotations

import re
from pathlib import Path

from trainer.errors import UserError
from trainer.jsonfile import read_json_object

TOKEN = "<token>"


def slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-zA-Z0-9]+", "-", text).strip("-").lower()[:limit] or "prompt"


def load_prompt_library(path: Path) -> dict[str, str]:
    """{nickname: prompt} from a JSON file; nicknames become file names, so they are slugged."""
    data = read_json_object(path, "validation.prompt_library", "a JSON file of nickname -> prompt")
    if not isinstance(data, dict) or not data or not all(isinstance(v, str) and v.strip() for v in data.values()):
        raise UserError(f'validation.prompt_library: {path} must be a non-empty object like {{"nickname": "a prompt"}}')
    return {str(k): v for k, v in data.items()}


def fill_token(text: str, instance_prompt: str | None, where: str) -> str:
    if TOKEN not in text:
        return text
    if not instance_prompt:
        raise UserError(f"{where} uses {TOKEN}: set validation.instance_prompt to the trigger word it stands for")
    return text.replace(TOKEN, instance_prompt)
