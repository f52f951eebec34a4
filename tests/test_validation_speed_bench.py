"""bench/validation_speed_bench.py (issue 32's GPU measurement) runs its own code path on the CPU with the tiny Wan, and
its share of a run's wall time reads the trainer's metrics.jsonl timings. No timing is asserted (the lead measures)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import validation_speed_bench as bench  # noqa: E402


def test_tiny_mode_renders_both_ways_and_prints_the_rows(tmp_path):
    out = tmp_path / "rows.md"
    assert bench.main(["--tiny", "--full-steps", "3", "--speed-steps", "1", "--train-steps", "1", "--out", str(out)]) == 0
    text = out.read_text()
    assert "| full | 3 | 5 |" in text and "| speed LoRA | 1 | 1 |" in text and "x faster" in text
    shares = [line for line in text.splitlines() if line.startswith("| a default run")]
    assert len(shares) == 2 and all("| 2000 | 1 | 8 |" in line for line in shares)  # the config defaults


def test_share_from_a_runs_metrics(tmp_path):
    rows = [{"step": 10, "loss": 0.1, "s_per_step": 2.0}, {"step": 10, "eval_loss": 0.2, "eval_s": 5.0},
            {"step": 20, "loss": 0.1, "s_per_step": 3.0},
            {"step": 20, "validation_videos": ["v.mp4"], "validation_s": 15.0}]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    share = bench.metrics_share(metrics)
    assert share["train_s"] == 50.0 and share["total_s"] == 70.0 and (share["rounds"], share["evals"]) == (1, 1)
    assert share["validation_share"] == pytest.approx(15 / 70) and share["eval_share"] == pytest.approx(5 / 70)
    metrics.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "validation_s"}) + "\n" for r in rows))
    with pytest.raises(SystemExit, match="validation_s"):
        bench.metrics_share(metrics)
    assert bench.default_share(2.0, 60.0, 10.0)["rounds"] == 1  # every_n_steps 0: only at the end
