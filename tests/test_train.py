"""End-to-end training on the tiny Wan (the demo itself: test_demo.py): learning, exact resume, cache reuse, run layout."""

import json

import numpy as np
import pytest
import torch
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from conftest import tiny_config
from trainer.data.cache import build_caches
from trainer.errors import UserError
from trainer.loop.eval_loss import fixed_eval_loss
from trainer.loop.train import train
from trainer.model.components import load_transformer
from trainer.model.lora import add_lora
from trainer.outputs.export import read_lora


def test_training_loss_falls_on_demo_clips(clips, tmp_path):
    """Fixed-noise eval loss over the clips, base model vs base + trained LoRA.

    Measured: 1.53 -> 1.16 (ratio 0.75) after 100 steps. We assert ratio < 0.85: a LoRA that does not train
    (no gradient, wrong target, optimizer not stepping) stays at 1.0, while the margin leaves room for
    platform-level float differences.
    """
    cfg = tiny_config(clips, tmp_path / "run", train={"max_train_steps": 100}, validation={"at_end": False})
    result = train(cfg, show_progress=False)
    samples = build_caches(cfg, torch.device("cpu"), show_progress=False).samples[0]
    model = load_transformer(cfg.model)
    before = fixed_eval_loss(model, samples, cfg.train.text_max_length, torch.device("cpu"))
    add_lora(model, cfg.lora)
    weights, _, _ = read_lora(result.lora_file)
    set_peft_model_state_dict(model, weights)
    after = fixed_eval_loss(model, samples, cfg.train.text_max_length, torch.device("cpu"))
    mean_before, mean_after = np.mean(list(before.values())), np.mean(list(after.values()))
    assert mean_after < 0.85 * mean_before, (before, after)
    assert all(after[s] < before[s] for s in before)  # better at every noise level, not just on average


class Crash(RuntimeError):
    pass


def test_resume_after_a_crash_continues_the_same_run(clips, tmp_path):
    """Crash after step 12 (checkpoint at 10), resume latest: same adapter and loss curve as an uninterrupted run."""
    settings = dict(train={"max_train_steps": 20, "gradient_accumulation_steps": 2},
                    lora={"dropout": 0.1}, checkpoint={"every_n_steps": 5, "total_limit": 2},
                    validation={"every_n_steps": 10, "at_end": False, "num_inference_steps": 2})
    straight = train(tiny_config(clips, tmp_path / "straight", **settings), show_progress=False)

    cfg = tiny_config(clips, tmp_path / "crashed", **settings)

    def crash_at_12(step):
        if step == 12:
            raise Crash("simulated crash")

    with pytest.raises(Crash):
        train(cfg, show_progress=False, on_step=crash_at_12)
    run = tmp_path / "crashed"
    assert json.loads((run / "run.json").read_text())["status"] == "failed"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-10", "step-5"]
    with pytest.raises(UserError, match="--resume latest"):
        train(cfg, show_progress=False)  # never silently restart over existing checkpoints
    resumed = train(cfg, resume="latest", show_progress=False)

    a, _, _ = read_lora(straight.lora_file)
    b, _, _ = read_lora(resumed.lora_file)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
    def curve(run_dir):
        records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
        return [(r["step"], r["loss"]) for r in records if "loss" in r]

    straight_curve, resumed_curve = curve(tmp_path / "straight"), curve(run)
    assert [s for s, _ in resumed_curve] == list(range(1, 21))  # the crashed tail (11, 12) was replaced
    np.testing.assert_allclose([l for _, l in resumed_curve], [l for _, l in straight_curve], rtol=1e-5)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-15", "step-20"]  # total_limit


def test_second_run_builds_no_cache_entries(dataset_copy, tmp_path):
    cfg = tiny_config(dataset_copy, tmp_path / "a", train={"max_train_steps": 2}, validation={"at_end": False})
    first = train(cfg, show_progress=False)
    assert first.cache_entries_built == 8 + 8 + 1  # latents, captions, the negative prompt
    cfg2 = tiny_config(dataset_copy, tmp_path / "b", train={"max_train_steps": 2}, validation={"at_end": False})
    assert train(cfg2, show_progress=False).cache_entries_built == 0
    # a changed clip is re-encoded; nothing else is
    victim = dataset_copy / "clip_03.mp4"
    victim.write_bytes((dataset_copy / "clip_04.mp4").read_bytes())
    cfg3 = tiny_config(dataset_copy, tmp_path / "c", train={"max_train_steps": 2}, validation={"at_end": False})
    assert train(cfg3, show_progress=False).cache_entries_built == 1


def test_too_small_dataset_suggests_repeats(dataset_copy, tmp_path):
    for extra in sorted(dataset_copy.glob("clip_0[1-7].*")):
        extra.unlink()
    cfg = tiny_config(dataset_copy, tmp_path / "run", train={"max_train_steps": 2, "train_batch_size": 2})
    with pytest.raises(UserError, match="raise datasets.repeats"):
        train(cfg, show_progress=False)
    cfg = tiny_config(dataset_copy, tmp_path / "run2", train={"max_train_steps": 2, "train_batch_size": 2},
                      datasets={"repeats": 2}, validation={"at_end": False})
    assert train(cfg, show_progress=False).final_step == 2


def test_broken_and_uncaptioned_clips_are_skipped_not_fatal(dataset_copy, tmp_path):
    (dataset_copy / "broken.mp4").write_bytes(b"not a video at all")
    (dataset_copy / "broken.txt").write_text("a broken clip")
    (dataset_copy / "nocaption.mp4").write_bytes((dataset_copy / "clip_00.mp4").read_bytes())
    cfg = tiny_config(dataset_copy, tmp_path / "run", train={"max_train_steps": 2}, validation={"at_end": False})
    report = build_caches(cfg, torch.device("cpu"), show_progress=False)
    skipped = {p.name: why for p, why in report.skipped}
    assert "unreadable video" in skipped["broken.mp4"]
    assert "no caption" in skipped["nocaption.mp4"]
    assert len(report.samples[0]) == 8


def test_trained_adapter_matches_the_checkpoint(clips, tmp_path):
    """The final LoRA equals the adapter in the last checkpoint (same tensors, saved in fp32)."""
    from safetensors.torch import load_file

    cfg = tiny_config(clips, tmp_path / "run", train={"max_train_steps": 4}, checkpoint={"every_n_steps": 4},
                      validation={"at_end": False})
    result = train(cfg, show_progress=False)
    ckpt = load_file(str(tmp_path / "run" / "checkpoints" / "step-4" / "adapter.safetensors"))
    final, alpha, _ = read_lora(result.lora_file)
    assert alpha == cfg.lora.rank
    assert ckpt.keys() == final.keys()
    for k in ckpt:
        torch.testing.assert_close(final[k], ckpt[k])
