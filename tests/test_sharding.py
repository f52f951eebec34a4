"""`[memory] shard_base`: two gloo processes (torchrun on CPU) train the tiny model with the frozen base sharded by
FSDP2, and everything a run produces matches the unsharded two-process (DDP) run: the losses and gradient norms, the
eval loss and the validation video (rank 0 renders, rank 1 runs the sharded forwards with it), the checkpoints, a resume
from one of them, and the exported LoRA file, gathered whole from both ranks' halves."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import tiny_config
from tests.test_multiprocess import UPDATE_NOISE, _losses, _metric, _train
from trainer.config.files import save_config
from trainer.outputs.export import INTERCHANGE_FILE, check_lora_file, read_lora

STEPS = 4


def _config(clips, root: Path, name: str, shard: bool) -> Path:
    cfg = tiny_config(clips, root / name,
                      train={"max_train_steps": STEPS, "train_batch_size": 1, "log_every_n_steps": 1},
                      checkpoint={"every_n_steps": 2},
                      validation={"at_end": True, "num_inference_steps": 2, "every_n_steps": 1000},
                      memory={"shard_base": shard, "gradient_checkpointing": "selective"})
    save_config(cfg, root / f"{name}.toml")
    return root / f"{name}.toml"


@pytest.fixture(scope="module")
def runs(few_clips, tmp_path_factory) -> dict[str, Path]:
    """The same two-process run with the base sharded and unsharded, and a sharded resume from step 2."""
    root = tmp_path_factory.mktemp("sharding")
    _train([str(_config(few_clips, root, "sharded", True))], processes=2)
    _train([str(_config(few_clips, root, "ddp", False))], processes=2)
    _train([str(_config(few_clips, root, "resumed", True)), "--resume", str(root / "sharded/checkpoints/step-2"),
            "--set", "validation.at_end=false"], processes=2)
    # the same checkpoint on one unsharded process, accumulating the two ranks' micro-batches
    _train([str(_config(few_clips, root, "unsharded", False)), "--resume", str(root / "sharded/checkpoints/step-2"),
            "--set", "validation.at_end=false", "--set", "train.gradient_accumulation_steps=2"])
    return {name: root / name for name in ("sharded", "ddp", "resumed", "unsharded")}


def _lora(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "lora" / INTERCHANGE_FILE))


def _tolerance(run: Path) -> float:
    """What fp32 summation order can move a weight (tests/test_multiprocess.py UPDATE_NOISE): DDP averages the
    gradients with an all-reduce, FSDP with a reduce-scatter, so the sums may round differently. Measured: equal."""
    return UPDATE_NOISE * sum(_metric(run, "lr").values())


def _frames(video: Path) -> np.ndarray:
    with av.open(str(video)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]).astype(np.int16)


def test_sharded_run_trains_like_the_unsharded_one(runs):
    sharded, ddp = runs["sharded"], runs["ddp"]
    assert sorted(_losses(sharded)) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):  # same micro-batches and noise per rank; only the gradient reduction differs
        assert _losses(sharded)[step] == pytest.approx(_losses(ddp)[step], rel=1e-6), step
        assert _metric(sharded, "grad_norm")[step] == pytest.approx(_metric(ddp, "grad_norm")[step], rel=1e-5), step
    assert _metric(sharded, "eval_loss")[STEPS] == pytest.approx(_metric(ddp, "eval_loss")[STEPS], rel=1e-6)
    a, b, tolerance = _lora(sharded), _lora(ddp), _tolerance(ddp)
    assert a.keys() == b.keys()
    assert max(v.abs().max() for k, v in b.items() if "lora_B" in k) > 100 * tolerance  # the LoRA moved
    for key in a:
        assert a[key].shape == b[key].shape, key  # whole tensors, not one rank's half
        assert (a[key] - b[key]).abs().max() <= tolerance, key


def test_exported_lora_is_the_gathered_adapter_and_loads(runs):
    sharded = runs["sharded"]
    path = sharded / "lora" / INTERCHANGE_FILE
    tensors = load_file(str(path))
    check_lora_file(tensors)  # the trainer's own save-time check (names, shapes, diffusers' converter)
    weights, alpha, _ = read_lora(path)
    gathered = load_file(str(sharded / "checkpoints" / f"step-{STEPS}" / "adapter.safetensors"))
    assert set(gathered) == set(weights)
    for key, value in gathered.items():
        assert torch.equal(weights[key].float(), value.float()), key
    status = json.loads((sharded / "run.json").read_text())
    assert status["status"] == "completed" and status["lora"] == f"lora/{INTERCHANGE_FILE}"
    assert sorted(p.name for p in (sharded / "checkpoints").iterdir()) == ["step-2", f"step-{STEPS}"]


def test_validation_under_sharding_renders_on_rank_0_like_unsharded(runs):
    sharded, ddp = runs["sharded"], runs["ddp"]
    videos = json.loads((sharded / "run.json").read_text())["videos"]
    assert len(videos) == 1
    reference = json.loads((ddp / "run.json").read_text())["videos"][0]
    a, b = _frames(sharded / videos[0]), _frames(ddp / reference)
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= 2  # the same LoRA and seed: only encoder rounding of nearly equal frames


@pytest.mark.parametrize("resume", ["resumed", "unsharded"])
def test_sharded_checkpoint_resumes_like_the_uninterrupted_run(runs, resume):
    """Sharded on two processes, or unsharded on one (checkpoints hold whole tensors whatever the layout)."""
    sharded, resumed = runs["sharded"], runs[resume]
    rel = 1e-6 if resume == "resumed" else 1e-4  # one process sums the two micro-batches' gradients in another order
    for step in range(3, STEPS + 1):
        assert _losses(resumed)[step] == pytest.approx(_losses(sharded)[step], rel=rel), step
    a, b, tolerance = _lora(resumed), _lora(sharded), _tolerance(sharded)
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max() <= tolerance, key
    if resume == "unsharded":
        return
    state = load_file(str(resumed / "checkpoints" / f"step-{STEPS}" / "state.safetensors"))
    first = load_file(str(sharded / "checkpoints" / f"step-{STEPS}" / "state.safetensors"))
    moments = [k for k in first if "exp_avg" in k]
    assert moments and all(state[k].shape == first[k].shape for k in moments)  # whole optimizer moments saved
    for key in moments:
        assert torch.allclose(state[key], first[key], rtol=1e-5, atol=1e-12), key


@pytest.mark.parametrize(("memory", "other", "field"), [
    ({}, {}, "2 or more training processes"),
    ({"base_quantization": "int8"}, {}, "memory.base_quantization"),
    ({"compile": True}, {}, "memory.compile"),
    ({}, {"ema": {"use_ema": True}}, "ema.use_ema"),
    ({}, {"scheduled_sampling": {"probability": 0.5}}, "scheduled_sampling.probability"),
])
def test_preflight_refuses_what_sharding_cannot_train(clips, tmp_path, memory, other, field):
    from trainer.preflight.check import preflight

    cfg = tiny_config(clips, tmp_path / "run", memory={"shard_base": True, **memory}, **other)
    errors = preflight(cfg, here=False, scan=False, num_processes=1 if not memory and not other else 2).errors
    lines = [e for e in errors if field in e]
    assert len(lines) == 1, errors
    assert "memory.shard_base = false" in lines[0]  # a fix that is itself valid
    assert not preflight(tiny_config(clips, tmp_path / "ok", memory={"shard_base": True}), here=False, scan=False,
                         num_processes=2).errors


def test_presets_under_sharding_keep_bf16_weights_and_no_compile():
    from trainer.config.model import MemoryConfig
    from trainer.flavours import get_flavour
    from trainer.model.preset_choice import resolve_memory

    resolved = resolve_memory(MemoryConfig(preset="low-int8", shard_base=True), get_flavour("t2v-480p-14b-2.1"), 24.0)
    assert resolved.shard_base and resolved.activation_offload
    assert resolved.base_quantization == "none" and not resolved.compile


def test_sharded_sizing_is_extrapolated_until_a_sharded_row_is_measured(monkeypatch, clips, tmp_path):
    """`wanforge estimate --gpu RTX4090:2` with shard_base: each GPU holds half the weights plus two gathered blocks,
    labelled "not measured (extrapolated)"; a `[[measured]]` row with `shards = 2` at that shape makes it measured."""
    from launcher.estimate import estimate
    from trainer.model import sizing

    shape = sizing.flavour_shape("t2v-480p-14b-2.1")
    tokens = shape.tokens(81, 480, 832)
    whole, half = (sizing.predict_memory(shape, "low", tokens, shards=n) for n in (1, 2))
    saved = shape.params * 2 / 2 / 2**30 - 2 * shape.block_params * 2 / 2**30
    assert half.gpu_gib == pytest.approx(whole.gpu_gib - saved, abs=0.02)
    assert not half.gpu_measured and half.label == "not measured (extrapolated)"

    cfg = tiny_config(clips, tmp_path / "run", model={"flavour": "t2v-480p-14b-2.1"},
                      datasets={"num_frames": 81, "width": 832, "height": 480}, memory={"shard_base": True})
    est = estimate(cfg, "RTX4090:2")
    assert est.memory_preset.endswith("base sharded over 2") and not est.measured and not est.gpu_measured
    assert est.fit_label in ("DOES NOT FIT", "not measured (extrapolated)")

    data = dict(sizing.load_calibration())
    row = {"trainer": "wanforge", "gpu": "H100", "flavour": "t2v-480p-14b-2.1", "num_frames": 81, "width": 832,
           "height": 480, "batch": 1, "lora_rank": 16, "preset": "low", "gradient_checkpointing": "selective",
           "shards": 2, "s_per_step": 10.0, "peak_gib": 21.5, "offload_gib": 49.73, "date": "2099-01-01",
           "source": "test"}
    monkeypatch.setattr(sizing, "load_calibration", lambda: {**data, "measured": [*data["measured"], row]})
    measured = sizing.predict_memory(shape, "low", tokens, shards=2)
    assert measured.gpu_measured and measured.gpu_gib == pytest.approx(21.5, abs=0.01)
    assert sizing.predict_memory(shape, "low", tokens).gpu_gib == whole.gpu_gib  # unsharded keeps its own row


def test_a_measured_sharded_out_of_memory_rules_the_card_out(clips, tmp_path):
    """The 14B base sharded over two processes ran out of memory under a 30 GiB cap (bench/RESULTS.md): a card with
    at most that much per process is "does not fit" with the measurement named, whatever the sizing model predicts;
    more memory, more processes or fewer tokens than the measured run are not ruled out by it."""
    from launcher.estimate import estimate
    from trainer.model import sizing

    shape = sizing.flavour_shape("t2v-480p-14b-2.1")
    tokens = shape.tokens(81, 480, 832)
    row = sizing.sharded_out_of_memory(shape, tokens, 2, 24)
    assert row is not None and row["cap_gib"] == 30 and "bench/RESULTS.md" in row["source"]
    assert sizing.sharded_out_of_memory(shape, tokens, 2, 30) is row
    assert sizing.sharded_out_of_memory(shape, tokens, 2, 32) is None
    assert sizing.sharded_out_of_memory(shape, tokens, 4, 24) is None
    assert sizing.sharded_out_of_memory(shape, shape.tokens(33, 480, 832), 2, 24) is None
    assert sizing.sharded_out_of_memory(sizing.flavour_shape("t2v-480p-1.3b-2.1"), tokens, 2, 24) is None

    cfg = tiny_config(clips, tmp_path / "run", model={"flavour": "t2v-480p-14b-2.1"},
                      datasets={"num_frames": 81, "width": 832, "height": 480}, memory={"shard_base": True})
    est = estimate(cfg, "RTX4090:2")
    assert not est.fits and "ran out of GPU memory under a 30 GiB cap" in est.basis
    assert "ran out of GPU memory" not in estimate(cfg, "H100:2").basis


def test_sharded_gradient_accumulation_matches_one_process(few_clips, tmp_path):
    """Two sharded processes accumulating 2 micro-batches per step see the same 4 samples and noise per step as one
    unsharded process accumulating 4: the same losses, gradient norms and LoRA up to fp32 summation order (FSDP
    reduce-scatters every micro-batch's gradient; the one process sums all four locally)."""
    steps = ["--set", "train.max_train_steps=2", "--set", "validation.at_end=false", "--set", "datasets[0].repeats=2"]
    _train([str(_config(few_clips, tmp_path, "sharded", True)), *steps, "--set", "train.gradient_accumulation_steps=2"],
           processes=2)
    _train([str(_config(few_clips, tmp_path, "single", False)), *steps, "--set", "train.gradient_accumulation_steps=4"])
    sharded, single = tmp_path / "sharded", tmp_path / "single"
    assert sorted(_losses(sharded)) == [1, 2]
    for step in (1, 2):
        assert _losses(sharded)[step] == pytest.approx(_losses(single)[step], rel=1e-6), step
        assert _metric(sharded, "grad_norm")[step] == pytest.approx(_metric(single, "grad_norm")[step], rel=1e-5), step
    a, b, tolerance = _lora(sharded), _lora(single), _tolerance(single)
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max() <= tolerance, key
