"""Trackers: W&B (offline) gets the validation videos and contact sheet, under one run id across a resume."""

import re

import numpy as np
import pytest

from trainer.config.files import config_from_dict
from trainer.data.video import write_mp4
from trainer.outputs.contact_sheet import contact_sheet
from trainer.outputs.tracking import init_trackers, log_validation, run_id_for, tracker_init_kwargs
from trainer.rundir import RunDir


def test_run_id_comes_from_skypilot_then_stays(tmp_path, monkeypatch):
    run = RunDir(tmp_path / "run")
    run.create()
    monkeypatch.setenv("SKYPILOT_TASK_ID", "sky-managed-123")
    assert run_id_for(run) == "sky-managed-123"
    monkeypatch.delenv("SKYPILOT_TASK_ID")
    first = run_id_for(run)
    assert len(first) == 12 and run_id_for(run) != first  # nothing stored yet: a fresh id each time
    run.write_status(run_id=first)
    assert run_id_for(run) == first  # a resume finds the stored id
    cfg = config_from_dict({"datasets": [{"path": "x"}], "tracking": {"report_to": "wandb", "entity": "team"}})
    kwargs = tracker_init_kwargs(cfg, run)["wandb"]
    assert kwargs["id"] == first and kwargs["resume"] == "allow" and kwargs["name"] == "run" and kwargs["entity"] == "team"


def test_wandb_offline_logs_videos_under_one_run_id_across_restarts(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from accelerate import Accelerator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = RunDir(tmp_path / "run")
    run.create()
    run.write_status(run_id=run_id_for(run))
    cfg = config_from_dict({"datasets": [{"path": "x"}], "tracking": {"report_to": "wandb"}})
    video = write_mp4(run.root / "v.mp4", np.zeros((5, 32, 32, 3), np.uint8), 16)
    sheet = contact_sheet([("v", np.zeros((5, 32, 32, 3), np.uint8))], run.root / "sheet.png")
    for step in (3, 6):  # a start, then a resume in a new process-like accelerator
        accelerator = Accelerator(log_with="wandb", project_dir=str(run.root))
        init_trackers(cfg, run, accelerator)
        log_validation(accelerator, cfg, [("v", video)], sheet, step)
        accelerator.end_training()
    run_dirs = sorted(p for p in (run.root / "wandb").glob("offline-run-*"))
    # wandb names them offline-run-<time>-<run id>, and adds "-1" when both starts fall in the same second
    run_id = run.read_status()["run_id"]
    assert len(run_dirs) == 2 and all(re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{run_id}(-\d+)?", p.name)
                                      for p in run_dirs), [p.name for p in run_dirs]
    media = [p.name for p in (run_dirs[-1] / "files" / "media").rglob("*") if p.is_file()]
    assert any(n.endswith(".mp4") for n in media) and any(n.endswith(".png") for n in media)
