"""VACE datasets: which control clip, mask and reference images go with each training clip, and every file that is
unpaired or does not match its clip (frames, size, frame rate) with the reason. Torch-free (`wanforge check` uses it).

Pairing by stem: the control of `<path>/<dir>/<stem>.mp4` is `<control_path>/<dir>/<stem>.<any video or image ext>`,
its mask `<mask_path>/<dir>/<stem>.*` (a video, or one image for every frame), its references
`<reference_path>/<dir>/<stem>.<image ext>`, `<stem>_<n>.<image ext>` (ordered by n) or every image in `<stem>/`.
Pairing by metadata: the rows of the dataset's metadata table name them in the "control", "mask" and "reference"
columns (paths relative to the dataset folder). Files a pairing uses are never training clips themselves.

A control clip must show the same moments as its clip: a video for a video (an image for an image), the same frame
count and frame rate, and the same aspect ratio (both are fitted to the bucket the same way, so a smaller control of
the same aspect lines up; another aspect would be cropped differently). A video mask follows the same rules; an image
mask and the references need only be readable images (references are letterboxed as the pipeline does).
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from trainer.config.data import DatasetConfig
from trainer.data.captions import FILE_COLUMNS, metadata_path
from trainer.data.probe import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, MediaError, MediaInfo
from trainer.errors import UserError

METADATA_COLUMNS = ("control", "mask", "reference")
ASPECT_TOLERANCE = 0.01  # relative: 832x480 vs 416x240 is the same picture; 854x480 vs 832x480 is not
FPS_TOLERANCE = 0.01  # relative: 29.97 vs 30 is a container rounding, 24 vs 30 is another clip
_NUMBERED = re.compile(r"^(?P<stem>.+)_(?P<n>\d+)$")
_MEDIA = VIDEO_EXTENSIONS | IMAGE_EXTENSIONS


@dataclass(frozen=True)
class ControlFiles:
    """A clip's VACE inputs: the control clip, an optional mask, and reference images in the order they are given."""

    control: Path
    mask: Path | None = None
    references: tuple[Path, ...] = ()

    def identity(self) -> list:
        """What makes a cache entry stale: each file's path, size and modification time."""
        files = [self.control, self.mask, *self.references]
        return [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] if f is not None else None for f in files]


def resolve_folder(ds: DatasetConfig, folder: Path, value: str | None) -> Path | None:
    """A control / mask / reference folder: relative to the dataset folder, or absolute."""
    if value is None:
        return None
    path = Path(value).expanduser()
    return path if path.is_absolute() else folder / path


Probe = Callable[[Path], MediaInfo]  # trainer.data.discovery's cached probe


class ControlPairing:
    """The control inputs of one dataset's clips (`pair`) and the files no clip uses (`orphans`)."""

    def __init__(self, ds: DatasetConfig, folder: Path, index: int = 0):
        self.ds, self.folder, self.index = ds, folder, index
        self.used: set[Path] = set()
        self.rows: dict[str, dict] = {}
        self.folders: dict[str, Path] = {}
        self.inputs: set[Path] = set()  # files the metadata table names as controls, masks or references
        if ds.control_pairing == "metadata":
            self.rows = _metadata_rows(ds, folder, index)
            self.inputs = {p.resolve() for row in self.rows.values() for p in _row_files(folder, row)}
        else:
            for kind, value in (("control", ds.control_path), ("mask", ds.mask_path),
                                ("reference", ds.reference_path)):
                path = resolve_folder(ds, folder, value)
                if path is None:
                    continue
                if not path.is_dir():
                    field = {"control": "control_path", "mask": "mask_path", "reference": "reference_path"}[kind]
                    raise UserError(f"datasets[{index}].{field}: {path} is not a folder (a folder of {kind} files "
                                    "named like the clips, relative to the dataset's path)")
                self.folders[kind] = path
            self._refuse_overlaps()

    def _refuse_overlaps(self) -> None:
        """Each kind of input in a folder of its own, apart from the clips: pairing by stem can't tell them apart."""
        field = {"control": "control_path", "mask": "mask_path", "reference": "reference_path"}
        where = f"datasets[{self.index}]"
        clips = self.folder.resolve()
        for kind, path in self.folders.items():
            resolved = path.resolve()
            if resolved == clips or resolved in clips.parents:
                raise UserError(f"{where}.{field[kind]}: {path} holds the clips themselves; put the {kind} files in a "
                                f'folder of their own inside the dataset folder, e.g. {field[kind]} = "{kind}"')
        kinds = list(self.folders.items())
        for i, (a, path_a) in enumerate(kinds):
            for b, path_b in kinds[i + 1:]:
                ra, rb = path_a.resolve(), path_b.resolve()
                if ra == rb or ra in rb.parents or rb in ra.parents:
                    raise UserError(f"{where}.{field[a]} ({path_a}) and {field[b]} ({path_b}) overlap: files of one "
                                    "stem would count as both; give each a folder of its own, side by side")

    # ---------------------------------------------------------------- which files are not training clips

    def skip_folders(self) -> tuple[Path, ...]:
        """Folders of control, mask and reference files (stem pairing): list_media leaves them out of the clips."""
        return tuple(self.folders.values())

    def is_input_file(self, file: Path) -> bool:
        """A file the metadata table names as some clip's control, mask or reference (not a clip itself)."""
        return bool(self.inputs) and file.resolve() in self.inputs

    # ---------------------------------------------------------------- pairing one clip

    def pair(self, clip: Path, info: MediaInfo, probe: Probe) -> tuple[ControlFiles | None, str | None]:
        """(the clip's control inputs, None) or (None, why it has none / why they do not match it)."""
        if self.ds.control_pairing == "metadata":
            found = self._from_metadata(clip)
        else:
            found = self._from_stems(clip)
        if isinstance(found, str):
            return None, found
        why = self._mismatch(found, info, probe)
        if why:
            return None, why
        self.used.update(f.resolve() for f in (found.control, found.mask, *found.references) if f is not None)
        return found, None

    def _from_stems(self, clip: Path) -> ControlFiles | str:
        rel = clip.relative_to(self.folder).with_suffix("")
        control = _one_by_stem(self.folders.get("control"), rel, _MEDIA, "control")
        if control is None:
            where = self.folders.get("control")
            return f"no control clip: expected {where / rel}.mp4 (or another video / image extension) in control_path"
        if isinstance(control, str):
            return control
        mask = _one_by_stem(self.folders.get("mask"), rel, _MEDIA, "mask")
        if isinstance(mask, str):
            return mask
        return ControlFiles(control, mask, _references(self.folders.get("reference"), rel))

    def _from_metadata(self, clip: Path) -> ControlFiles | str:
        rel = clip.relative_to(self.folder).as_posix()
        row = self.rows.get(rel)
        table = metadata_path(self.ds, self.folder)
        if row is None or not row.get("control"):
            return f'no control clip: no "control" for {rel} in {table.name if table else "the metadata table"}'
        control = self.folder / str(row["control"])
        if not control.is_file():
            return f"control clip {control} (metadata) does not exist"
        mask = self.folder / str(row["mask"]) if row.get("mask") else None
        if mask is not None and not mask.is_file():
            return f"mask {mask} (metadata) does not exist"
        refs = tuple(self.folder / r for r in _reference_list(row.get("reference")))
        missing = [r for r in refs if not r.is_file()]
        if missing:
            return f"reference image {missing[0]} (metadata) does not exist"
        return ControlFiles(control, mask, refs)

    def _mismatch(self, files: ControlFiles, info: MediaInfo, probe: Probe) -> str | None:
        for what, path in (("control clip", files.control), ("mask", files.mask)):
            if path is None:
                continue
            try:
                other = probe(path)
            except MediaError as err:
                return f"{what} {path.name}: {err}"
            why = media_mismatch(info, other, image_ok=what == "mask")
            if why:
                return f"{what} {path.name} does not match the clip: {why}"
        for ref in files.references:
            if ref.suffix.lower() not in IMAGE_EXTENSIONS:
                return f"reference {ref.name} is not an image ({', '.join(sorted(IMAGE_EXTENSIONS))})"
            try:
                probe(ref)
            except MediaError as err:
                return f"reference image {ref.name}: {err}"
        return None

    # ---------------------------------------------------------------- files no clip uses

    def orphans(self) -> list[tuple[Path, str]]:
        """Control, mask and reference files (stem pairing) that belong to no usable clip, with why (a skipped clip's
        files too: its own line says why the clip is skipped)."""
        out = []
        for kind, folder in self.folders.items():
            for file in sorted(folder.rglob("*")):
                if not file.is_file() or file.suffix.lower() not in _MEDIA or file.resolve() in self.used:
                    continue
                if any(part.startswith(".") for part in file.relative_to(folder).parts):
                    continue
                out.append((file, f"{kind} file no training clip uses (no clip of its stem in {self.folder}, or "
                                  "that clip was skipped: see its line)"))
        return out


def media_mismatch(clip: MediaInfo, other: MediaInfo, image_ok: bool = False) -> str | None:
    """Why `other` cannot stand beside `clip` frame for frame (None: it can). `image_ok`: one image may stand for
    every frame of a video (a static mask)."""
    if other.kind != clip.kind and not (image_ok and other.kind == "image"):
        return f"it is {'an' if other.kind == 'image' else 'a'} {other.kind}, the clip {'an' if clip.kind == 'image' else 'a'} {clip.kind}"
    aspect, their = clip.width / clip.height, other.width / other.height
    if abs(their - aspect) > ASPECT_TOLERANCE * aspect:
        return (f"size {other.width}x{other.height} has another aspect than the clip's {clip.width}x{clip.height} "
                "(they would be cropped differently): export it at the clip's size")
    if other.kind == "image" or clip.kind == "image":
        return None
    if abs(other.fps - clip.fps) > FPS_TOLERANCE * clip.fps:
        return (f"{other.fps:g} fps, the clip {clip.fps:g} fps (frames would be matched by time and drift apart): "
                "export it at the clip's frame rate")
    if other.frames != clip.frames:
        return (f"{other.frames} frames, the clip {clip.frames} (the control must cover the clip frame for frame): "
                "export it from the same frames")
    return None


def _one_by_stem(folder: Path | None, rel: Path, extensions: set[str], kind: str) -> Path | None | str:
    """The single file `<folder>/<rel>.<ext>`; None when there is none; a reason when there are several."""
    if folder is None:
        return None
    parent = folder / rel.parent
    if not parent.is_dir():
        return None
    found = sorted(p for p in parent.iterdir() if p.is_file() and p.stem == rel.name and p.suffix.lower() in extensions)
    if len(found) > 1:
        return f"several {kind} files for one clip: {', '.join(p.name for p in found)} (keep one)"
    return found[0] if found else None


def _references(folder: Path | None, rel: Path) -> tuple[Path, ...]:
    """`<rel>.<img>`, then `<rel>_<n>.<img>` by n, then the images in `<rel>/`, in that order."""
    if folder is None:
        return ()
    parent = folder / rel.parent
    if not parent.is_dir():
        return ()
    images = [p for p in parent.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    own = sorted(p for p in images if p.stem == rel.name)
    numbered = sorted((int(m["n"]), p.name, p) for p in images
                      if (m := _NUMBERED.match(p.stem)) and m["stem"] == rel.name)
    sub = parent / rel.name
    inside = sorted(p for p in sub.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS) \
        if sub.is_dir() else []
    return tuple(own + [p for _, _, p in numbered] + inside)


def _reference_list(value) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, list):
        return [str(v) for v in value if str(v).strip()]
    return [v.strip() for v in str(value).split("|") if v.strip()]


def _row_files(folder: Path, row: dict) -> list[Path]:
    files = [folder / str(row[c]) for c in ("control", "mask") if row.get(c)]
    return files + [folder / r for r in _reference_list(row.get("reference"))]


def _metadata_rows(ds: DatasetConfig, folder: Path, index: int) -> dict[str, dict]:
    """{relative clip path: its row} from the metadata table (jsonl or csv), for the control/mask/reference columns."""
    path = metadata_path(ds, folder)
    field = f"datasets[{index}]"
    if path is None or not path.is_file():
        raise UserError(f'{field}: control_pairing = "metadata" but {path or folder / "metadata.jsonl"} does not exist '
                        '(one row per clip with file_name and control, optionally mask and reference)')
    try:
        if path.suffix.lower() == ".csv":
            with path.open(newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        else:
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (json.JSONDecodeError, csv.Error, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not a valid {path.suffix} table ({err}): fix the file") from None
    if rows and not any(isinstance(r, dict) and "control" in r for r in rows):
        raise UserError(f'{path}: no "control" column: give each clip\'s control clip in a "control" column (paths '
                        f'relative to {folder}), or set {field}.control_path and control_pairing = "stem"')
    table = {}
    for row in rows:
        if not isinstance(row, dict):
            raise UserError(f"{path}: every row must be a JSON object, not {str(row)[:80]}")
        key = next((row[c] for c in FILE_COLUMNS if row.get(c)), None)
        if key is not None:
            table[Path(str(key)).as_posix().lstrip("./")] = row
    return table
