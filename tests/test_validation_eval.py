"""The fixed-noise eval loss: per timestep bucket, logged every N steps, identical across runs with the same seed."""

import json

import pytest

from conftest import tiny_config
from trainer.data.cache import Sample
from trainer.loop.eval_loss import bucket_label, bucket_sigmas, split_eval_samples
from trainer.loop.train import train

BUCKETS = ["eval_loss/t0-200", "eval_loss/t200-400", "eval_loss/t400-600", "eval_loss/t600-800", "eval_loss/t800-1000"]


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_eval_loss_is_identical_across_two_runs_with_the_same_seed(clips, tmp_path):
    settings = dict(train={"max_train_steps": 4}, validation={"at_end": False, "eval_every_n_steps": 2, "eval_samples": 2})
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        train(tiny_config(clips, run, **settings), show_progress=False)
    evals = [[r for r in _records(run) if "eval_loss" in r] for run in runs]
    assert all(r.pop("eval_s") >= 0 for run_evals in evals for r in run_evals)  # its wall time, for the bench's share
    assert [r["step"] for r in evals[0]] == [2, 4]
    assert evals[0] == evals[1]  # exactly equal, every bucket
    first, second = evals[0]
    assert sorted(k for k in first if k.startswith("eval_loss/")) == BUCKETS
    assert first["eval_loss"] == pytest.approx(sum(first[k] for k in BUCKETS) / 5)
    assert second["eval_loss"] != first["eval_loss"]  # it moves with the adapter

    # measuring does not disturb training: the loss curve equals a run without eval
    quiet = tmp_path / "quiet"
    train(tiny_config(clips, quiet, train={"max_train_steps": 4}, validation={"at_end": False, "eval_every_n_steps": 0}),
          show_progress=False)
    curve = lambda run: [(r["step"], r["loss"]) for r in _records(run) if "loss" in r]  # noqa: E731
    assert curve(quiet) == curve(runs[0])
    assert not any("eval_loss" in r for r in _records(quiet))


def test_buckets_and_held_out_samples(clips, tmp_path):
    assert bucket_sigmas(5) == pytest.approx((0.1, 0.3, 0.5, 0.7, 0.9))
    assert [bucket_label(s, 5) for s in bucket_sigmas(5)] == BUCKETS
    assert bucket_label(0.05, 4) == "eval_loss/t0-250"
    samples = [Sample(tmp_path / f"{i}.l", tmp_path / f"{i}.t", f"c{i}", tmp_path / f"{i}.mp4") for i in range(5)]
    other = samples[:2]

    def split(**validation):
        return split_eval_samples(tiny_config(clips, tmp_path, validation=validation), [samples, other])

    train_sets, held = split(eval_samples=2)
    assert held == samples[-2:] and train_sets == [samples, other]  # measured on clips it also trains on
    train_sets, held = split(eval_samples=2, eval_holdout=True)
    assert held == samples[-2:] and train_sets == [samples[:3], other]  # held out of training
    train_sets, held = split(eval_samples=9, eval_holdout=True)
    assert len(held) == 4 and train_sets[0] == samples[:1]  # one clip always stays to train on
    assert split(eval_every_n_steps=0) == ([samples, other], [])
