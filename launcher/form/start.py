"""The config a notebook starts from: a dataset (local folder, Hugging Face dataset id, or generated demo clips) and
either the tiny CPU demo settings or a real Wan 2.1 1.3B run, as plain config data the form then edits."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from trainer.config.files import to_toml_dict

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def dataset_table(dataset: str, work: Path, demo_frames: int = 24, demo_size: int = 64) -> dict[str, Any]:
    """One [[datasets]] table: "" -> generated demo clips in work/data (long enough for the frames trained), "user/name"
    -> a Hub dataset downloaded into work/data/<name>, anything else -> a local folder."""
    if not dataset:
        from trainer.demo.world import make_demo_dataset

        folder = make_demo_dataset(work / "data", frames=demo_frames, size=demo_size)
        return {"path": str(folder.resolve())}
    if not Path(dataset).expanduser().exists() and _HUB_ID.match(dataset):
        return {"path": str((work / "data" / dataset.split("/")[1]).resolve()), "hf_repo": dataset}
    return {"path": str(Path(dataset).expanduser().resolve())}


def starting_config(dataset: str, work: Path, tiny: bool = True, steps: int | None = None,
                    num_frames: int = 81) -> dict[str, Any]:
    """Config data for the form. tiny: the demo's tiny random Wan (trains on a CPU in seconds); else Wan 2.1 1.3B
    T2V at 832x480 x num_frames with the schema's defaults (a GPU run)."""
    work = Path(work)
    table = dataset_table(dataset, work) if tiny else dataset_table(dataset, work, demo_frames=num_frames, demo_size=256)
    if tiny:
        from trainer.demo.world import demo_config

        data = to_toml_dict(demo_config(Path(table.pop("path")), (work / "run").resolve(), steps or 10))
        data["datasets"][0].update(table)
        data["validation"].update(num_inference_steps=4)
        return data
    return {
        "model": {"flavour": "t2v-480p-1.3b-2.1"},
        "datasets": [{**table, "num_frames": num_frames, "width": 832, "height": 480}],
        "train": {"output_dir": str((work / "run").resolve()), "max_train_steps": steps or 2000},
        "validation": {"every_n_steps": 250},
    }
