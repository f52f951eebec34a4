"""Captions for a dataset's files: same-stem text files, a metadata.jsonl / .csv table, file names, or one instance prompt."""

from __future__ import annotations

import codecs
import csv
import json
import os
import re
from pathlib import Path

from trainer.config.data import DatasetConfig
from trainer.errors import UserError

FILE_COLUMNS = ("file_name", "file", "path", "video", "image")  # file_name is the Hugging Face folder-dataset name


class Captions:
    """caption_for(file) -> (caption, None) or (None, why it has none). A caption file that can't be read or is not
    text is a reason, never an exception: the file is listed with it and skipped."""

    def __init__(self, ds: DatasetConfig, folder: Path, index: int = 0):
        self.ds, self.folder, self.index = ds, folder, index
        self.table = load_metadata(ds, folder, index) if ds.caption_strategy == "metadata" else {}
        self._read: dict[Path, tuple[str | None, str | None]] = {}  # each file's caption read once per pass

    def caption_for(self, file: Path) -> tuple[str | None, str | None]:
        if file not in self._read:
            self._read[file] = self._caption_for(file)
        return self._read[file]

    def _caption_for(self, file: Path) -> tuple[str | None, str | None]:
        ds = self.ds
        if ds.caption_strategy == "instanceprompt":
            return ds.instance_prompt, None
        if ds.caption_strategy == "filename":
            return caption_from_filename(file), None
        if ds.caption_strategy == "metadata":
            rel = file.relative_to(self.folder).as_posix()
            text = self.table.get(rel)
            where = f"no row for {rel} in the metadata file"
        else:
            caption_file = file.with_name(file.stem + ds.caption_extension)
            text, problem = read_caption_file(caption_file)
            if problem is not None:
                return None, problem
            where = f"no caption: expected {caption_file.name}" if text is None else f"empty caption in {caption_file.name}"
        text = text.strip() if text else ""
        if text:
            return text, None
        if ds.instance_prompt:
            return ds.instance_prompt, None
        return None, where


def read_caption_file(path: Path) -> tuple[str | None, str | None]:
    """(text, None); (None, None) when there is no caption file; (None, why) when it can't be used: unreadable, or
    bytes that are not UTF-8 (a UTF-8 or UTF-16 byte-order mark is honoured)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if os.path.islink(path):
            return None, f"caption {path.name} is a link to {os.readlink(path)}, which does not exist"
        return None, None
    except IsADirectoryError:
        return None, f"{path.name} is a folder, not a caption file"
    except OSError as err:
        return None, f"caption {path.name} can't be read ({err.strerror or err}): check its permissions and links"
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return raw.decode("utf-16"), None
        except UnicodeDecodeError:
            pass
    try:
        return raw.decode("utf-8-sig"), None
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        return None, (f"caption {path.name} is not UTF-8 (byte 0x{raw[err.start]:02x} on line {line}): save it as "
                      "UTF-8")


def caption_from_filename(file: Path) -> str:
    """'a_red-ball_01.mp4' -> 'a red ball': separators become spaces, a trailing counter is dropped."""
    words = re.sub(r"[_\-.]+", " ", file.stem).strip()
    return re.sub(r"\s+\d+$", "", words) or words


def metadata_path(ds: DatasetConfig, folder: Path) -> Path | None:
    if ds.metadata_file:
        return folder / ds.metadata_file
    for name in ("metadata.jsonl", "metadata.csv"):
        if (folder / name).is_file():
            return folder / name
    return None


def load_metadata(ds: DatasetConfig, folder: Path, index: int = 0) -> dict[str, str]:
    """{relative file path: caption} from a jsonl or csv table with a file column and ds.caption_column."""
    path = metadata_path(ds, folder)
    field = f"datasets[{index}]"
    if path is None or not path.is_file():
        raise UserError(f"{field}: caption_strategy is metadata but {path or folder / 'metadata.jsonl'} does not exist "
                        "(write one row per file with file_name and caption, or set metadata_file)")
    rows: list[dict] = []
    try:
        if path.suffix.lower() == ".csv":
            with path.open(newline="", encoding="utf-8-sig") as f:
                rows = list(csv.DictReader(f))
        else:
            for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
                if line.strip():
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise UserError(f"{path}: line {n} is not a JSON object ({line.strip()[:60]}): write one "
                                        '{"file_name": ..., "caption": ...} object per line')
                    rows.append(row)
    except (json.JSONDecodeError, csv.Error) as err:
        raise UserError(f"{path}: not a valid {path.suffix} table ({err}): fix the file or use another caption_strategy") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: byte 0x{err.object[err.start]:02x} is not UTF-8: save the file as UTF-8") from None
    except OSError as err:
        raise UserError(f"{path}: can't be read ({err.strerror or err}): check its permissions") from None
    table: dict[str, str] = {}
    for row in rows:
        file_key = next((row[c] for c in FILE_COLUMNS if row.get(c)), None)
        if file_key is None:
            raise UserError(f"{path}: a row has no file column ({', '.join(FILE_COLUMNS)}): {str(row)[:120]}")
        if ds.caption_column not in row:
            raise UserError(f"{path}: a row has no {ds.caption_column!r} column: set {field}.caption_column "
                            f"to one of {', '.join(row)}")
        table[Path(str(file_key)).as_posix().lstrip("./")] = str(row[ds.caption_column] or "")
    return table
