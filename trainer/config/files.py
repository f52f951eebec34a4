"""Reading, overriding and writing config files: TOML in, `--set a.b=v` on top, TOML out."""

from __future__ import annotations

import difflib
import re
import sys
from pathlib import Path
from typing import Any

import tomli_w
from pydantic import BaseModel, ValidationError

from trainer.config.messages import OWN_TYPO, format_errors, is_list_field, key_homes, section_model
from trainer.config.schema import WanforgeConfig
from trainer.errors import UserError


if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


def parse_value(text: str) -> Any:
    """A `--set` value as TOML would read it (numbers, booleans, lists, quoted strings); bare words stay strings."""
    if text.lower() in ("none", "null"):
        return None
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _override_problem(parts: list[str], value: Any, text: str, data: dict[str, Any]) -> str | None:
    """Why `--set a.b.c=value` names no field of the schema (None: it does), ending in a `--set` that would apply
    where there is one (`text`: the value as given)."""
    model: type[BaseModel] = WanforgeConfig
    node: Any = data
    i = 0

    def use(*path: str) -> str:
        return f"--set {'.'.join(path)}={text}"

    while i < len(parts):
        part = parts[i]
        field = model.model_fields.get(part)
        if field is None:
            return _unknown_field(parts, i, model, value, use)
        name, sub, last = ".".join(parts[: i + 1]), section_model(field.annotation), i == len(parts) - 1
        node = node.get(part) if isinstance(node, dict) else None
        if sub is None:
            return None if last else f"{name} is a value, not a section: set it directly: {use(*parts[: i + 1])}"
        if is_list_field(field.annotation):
            if last:
                return None if isinstance(value, list) else \
                    f"{name} is a list of tables: set a field of one item, e.g. --set {name}.0.FIELD=VALUE"
            items = len(node) if isinstance(node, list) else 0
            index = parts[i + 1]
            if not re.fullmatch(r"-?\d+", index):
                return (f"{name} is a list: name an item by its index (from 0): "
                        + (use(name, "0", *parts[i + 1:]) if items else f"add a [[{name}]] table in the file first"))
            if not 0 <= int(index) < items:
                if not items:
                    return f"{name} has no items in the file: add a [[{name}]] table in the file first"
                nearest = str(min(max(int(index) + (items if int(index) < 0 else 0), 0), items - 1))
                return (f'"{index}" is not an index of {name} (indices 0..{items - 1}, counted from 0; negative ones '
                        f"are not read): {use(name, nearest, *parts[i + 2:])}")
            node = node[int(index)]
            i += 1
            if i == len(parts) - 1:
                return None if isinstance(value, dict) else \
                    f"{name}.{parts[i]} is a table: set a field inside it, e.g. --set {name}.{parts[i]}.FIELD=VALUE"
        elif last:
            return None if isinstance(value, dict) else \
                f"{name} is a section, not a value: set a field inside it, e.g. --set {name}.FIELD=VALUE"
        model = sub
        i += 1
    return None


def _unknown_field(parts: list[str], i: int, model: type[BaseModel], value: Any, use) -> str:
    """`--set` named a field its section lacks: a typo there, the section that has it, or the fields to choose from."""
    part, where = parts[i], ".".join(parts[:i]) or "the config"
    own = difflib.get_close_matches(part, list(model.model_fields), n=1)
    own_ratio = difflib.SequenceMatcher(None, part, own[0]).ratio() if own else 0.0
    in_a_section = i <= 1 or (i == 2 and parts[0] == "datasets")
    homes = key_homes(part, parts[0] if i else None, value) if in_a_section else []
    exact = [h for h in homes if h.field == part]
    if own and (own_ratio >= OWN_TYPO or not exact):
        return f'{where} has no field "{part}": did you mean {".".join([*parts[:i], own[0]])}? ' \
               f"({use(*parts[:i], own[0], *parts[i + 1:])})"
    if homes:
        h = homes[0]
        path = [h.section, "0", h.field] if h.is_list else [h.section, h.field]
        return f'{where} has no field "{part}" (it is a field of {h.table}): did you mean {".".join(path)}? ' \
               f"({use(*path, *parts[i + 1:])})"
    return f'{where} has no field "{part}": its fields: ' + ", ".join(model.model_fields)


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one `a.b=v` (or `datasets.0.path=v` / `datasets[0].path=v`) to raw config data, in place. A key the schema
    does not have, a value set into a section, a field set inside a value or an index the file lacks is a UserError
    naming the fix (a `--set` that applies)."""
    key, sep, value = assignment.partition("=")
    if not sep or not key.strip():
        raise UserError(f'--set "{assignment}": expected section.key=value, for example --set train.max_train_steps=500')
    key = re.sub(r"\[\s*(-?\d+)\s*\]", r".\1", key)  # datasets[0].repeats, as the error messages name it
    parts = [p.strip() for p in key.strip().split(".")]
    if not all(parts):
        raise UserError(f'--set "{assignment}": "{key.strip()}" has an empty name between dots: write '
                        "section.key=value, for example --set train.max_train_steps=500")
    parsed = parse_value(value.strip())
    problem = _override_problem(parts, parsed, value.strip(), data)
    if problem:
        raise UserError(f'--set "{assignment}": {problem}')
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = node[int(part)]  # checked above
        elif isinstance(node, dict):
            node = node.setdefault(part, [] if parts[i + 1].isdigit() else {})
        else:
            raise UserError(f'--set "{assignment}": {".".join(parts[:i])} holds {node!r} in the file, not a table')
    if not isinstance(node, dict):
        raise UserError(f'--set "{assignment}": {".".join(parts[:-1])} holds {node!r} in the file, not a table')
    node[parts[-1]] = parsed


def config_from_dict(data: dict[str, Any], source: str = "config", base_dir: Path | None = None) -> WanforgeConfig:
    try:
        cfg = WanforgeConfig.model_validate(data)
    except ValidationError as err:
        raise UserError(format_errors(err, source, data)) from None
    if base_dir is not None:
        _resolve_paths(cfg, base_dir)
    return cfg


def _resolve_paths(cfg: WanforgeConfig, base_dir: Path) -> None:
    """Relative paths in a file are relative to that file, so a config works from any working directory."""
    for d in cfg.datasets:
        if not d.path.is_absolute():
            d.path = (base_dir / d.path).resolve()
        if d.cache_dir is not None and not d.cache_dir.is_absolute():
            d.cache_dir = (base_dir / d.cache_dir).resolve()
        if d.text_cache_dir is not None and not d.text_cache_dir.is_absolute():
            d.text_cache_dir = (base_dir / d.text_cache_dir).resolve()
    for section, name in (("validation", "prompt_library"), ("tracking", "webhook_config"),
                          ("validation", "control_video"), ("validation", "control_mask")):
        value = getattr(getattr(cfg, section), name)
        if value is not None and not value.is_absolute():
            setattr(getattr(cfg, section), name, (base_dir / value).resolve())
    cfg.validation.reference_images = [p if Path(p).is_absolute() else str((base_dir / p).resolve())
                                       for p in cfg.validation.reference_images]
    for render in cfg.validation.renders:
        for adapter in render.adapters:
            if adapter.hub_file is None and not Path(adapter.path).is_absolute():
                adapter.path = str((base_dir / adapter.path).resolve())
    if not cfg.train.output_dir.is_absolute():
        cfg.train.output_dir = (base_dir / cfg.train.output_dir).resolve()
    if cfg.lora.lycoris_config is not None and not cfg.lora.lycoris_config.is_absolute():
        cfg.lora.lycoris_config = (base_dir / cfg.lora.lycoris_config).resolve()
    for section, name in (("model", "pretrained_model_name_or_path"), ("model", "pretrained_transformer_model_name_or_path"),
                          ("model", "pretrained_vae_model_name_or_path"), ("crepa", "encoder_path")):
        value = getattr(getattr(cfg, section), name)
        if value and (value.startswith(".") or (base_dir / value).exists()):
            setattr(getattr(cfg, section), name, str((base_dir / value).resolve()))


def read_config_data(path: str | Path) -> dict[str, Any]:
    """The raw tables of a TOML config file. A missing file, a folder, bytes that are not UTF-8 and bad TOML are each
    a one-line UserError with the fix; a UTF-8 byte-order mark (Windows editors write one) is accepted."""
    path = Path(path)
    if path.is_dir():
        inside = sorted(path.glob("*.toml"))
        hint = f"e.g. {inside[0]}" if inside else "a .toml file, not the folder it is in"
        raise UserError(f"{path}: is a folder, not a config file: give the config file itself ({hint})")
    if not path.is_file():
        near = difflib.get_close_matches(path.name, [p.name for p in path.parent.glob("*.toml")], n=1) \
            if path.parent.is_dir() else []
        hint = f"did you mean {path.parent / near[0]}?" if near else "write one, or start from `wanforge demo --out DIR`"
        raise UserError(f"{path}: no such config file ({hint})")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise UserError(f"{path}: cannot be read ({err.strerror}): check its permissions") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise UserError(f"{path}: byte 0x{raw[err.start]:02x} on line {line} is not UTF-8: save the file as UTF-8 "
                        "(TOML files are UTF-8)") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        hint = ": for a SimpleTuner config.json use `wanforge import-simpletuner`" if path.suffix.lower() == ".json" else ""
        raise UserError(f"{path}: not valid TOML: {err}{hint}") from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> WanforgeConfig:
    """Read a TOML config, apply `--set` overrides, validate. Every problem is a UserError naming the field."""
    path = Path(path)
    data = read_config_data(path)
    for assignment in overrides or []:
        apply_override(data, assignment)
    return config_from_dict(data, source=str(path), base_dir=path.parent.resolve())


def _absent_to_none(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _absent_to_none(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_absent_to_none(v) for v in data]
    return "none" if data is None else data  # read back as None by Section._none_word_is_null


def to_toml_dict(cfg: WanforgeConfig) -> dict[str, Any]:
    """Plain data for TOML: paths as strings, None written as "none" (TOML has no null) so it reads back the same."""
    return _absent_to_none(cfg.model_dump(mode="json"))


def save_config(cfg: WanforgeConfig, path: str | Path) -> None:
    from trainer.fileio import atomic_write_text

    atomic_write_text(Path(path), tomli_w.dumps(to_toml_dict(cfg)))
