"""`[memory] context_parallel`: each sample's tokens split over the processes of a group (Ulysses, through diffusers'
`enable_parallelism`), on CPU with gloo.

- The LoRA gradients of one micro-step with context parallel equal those without (tests/context_parallel_worker.py,
  two processes: the trainer's own model assembly, training step, noise stream, backward scale and DDP).
- `wanforge train` on two processes in one context-parallel group trains like one process: same losses, gradient
  norms, eval loss, validation video and LoRA; its checkpoint resumes on one process without it. Four processes
  (two groups of two) train like two data-parallel processes.
- The preflight refuses what it cannot train, one line each, naming the field and a valid fix.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from safetensors.torch import load_file

from tests.conftest import tiny_config
from tests.context_parallel_worker import CASES, LATENT
from tests.test_multiprocess import UPDATE_NOISE, _losses, _metric, _train
from trainer.config.files import save_config
from trainer.outputs.export import INTERCHANGE_FILE

ROOT = Path(__file__).resolve().parents[1]

# How close the context-parallel gradient can be in fp32. The two computations do the same arithmetic per token and
# differ in how sums are grouped: a weight gradient sum_t x_t dy_t is summed by each rank over its half of the tokens
# and the halves added by DDP's all-reduce (the x2 backward scale and DDP's /2 are exact), and the matmuls run on fewer
# rows. Regrouping a sum of N terms moves it by at most 2(N-1)u times the sum of the terms' magnitudes (u = 2^-24, the
# fp32 unit roundoff); with N = batch x tokens (2 x 48 here) and each tensor's largest gradient of the order of that
# magnitude sum, 2 N u (1.1e-5 of the tensor's largest element) bounds it. Measured: at most 4.7e-7 over the cases.
# What a broken context parallel gives is >= 1e4 times larger: a missing backward scale halves every gradient (0.5),
# ranks on different samples or noise, or a shard in the wrong place, change them at O(1).
def grad_tolerance(batch: int) -> float:
    tokens = LATENT[0] * (LATENT[1] // 2) * (LATENT[2] // 2)
    return 2 * batch * tokens * 2.0**-24


@pytest.fixture(scope="module")
def parity(tmp_path_factory) -> list[list[dict]]:
    out = tmp_path_factory.mktemp("cp_parity") / "parity.json"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                           "tests.context_parallel_worker", str(out)], capture_output=True, text=True, timeout=600,
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-20000:]
    return json.loads(out.read_text())["ranks"]


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{c[0]}-{next(iter(c[1].values()))}-b{c[2]}" for c in CASES])
def test_lora_gradients_with_context_parallel_equal_those_without(parity, case):
    for rank, results in enumerate(parity):
        r = results[case]
        assert r["world"] == 2 and r["dp_size"] == 1  # both ranks in one group: one sample, split in two
        assert r["split_loss"] == pytest.approx(r["loss"], rel=1e-6)  # the prediction gathered whole on every rank
        tolerance = grad_tolerance(r["batch"])
        assert len(r["grads"]) == 2 * 10 * 2  # lora_A and lora_B of the ten targets in both blocks
        for name, g in r["grads"].items():
            assert g["max_ref"] > 1e-5, (rank, name)  # a gradient that means something (lora_B is not zero)
            assert g["max_diff"] <= tolerance * g["max_ref"], (rank, name, g)


# ---------------------------------------------------------------- wanforge train under context parallel


def _config(clips, root: Path, name: str, degree: int, steps: int = 4, validation: bool = True) -> Path:
    cfg = tiny_config(clips, root / name,
                      datasets={"caption_dropout_probability": 0.3},  # the group's ranks must drop alike
                      scheduled_sampling={"probability": 0.5},  # its rollout forwards are split too
                      train={"max_train_steps": steps, "train_batch_size": 1, "log_every_n_steps": 1},
                      checkpoint={"every_n_steps": 2},
                      validation={"at_end": validation, "num_inference_steps": 2, "every_n_steps": 1000,
                                  "eval_every_n_steps": steps if validation else 0},
                      memory={"context_parallel": degree, "gradient_checkpointing": "selective"})
    save_config(cfg, root / f"{name}.toml")
    return root / f"{name}.toml"


@pytest.fixture(scope="module")
def runs(few_clips, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("context_parallel")
    _train([str(_config(few_clips, root, "one", 1))])
    _train([str(_config(few_clips, root, "split", 2))], processes=2)
    # the context-parallel checkpoint on one process without it
    _train([str(_config(few_clips, root, "resumed", 1)), "--resume", str(root / "split/checkpoints/step-2"),
            "--set", "validation.at_end=false"])
    return {name: root / name for name in ("one", "split", "resumed")}


def _frames(video: Path) -> np.ndarray:
    with av.open(str(video)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]).astype(np.int16)


def _lora(run: Path):
    return load_file(str(run / "lora" / INTERCHANGE_FILE))


def test_one_context_parallel_group_trains_like_one_process(runs):
    """Same samples, caption dropout and noise on both ranks of the group: one process's step, with the gradient
    summed from the two halves of each clip (fp32 summation order only: the LoRA within test_multiprocess's
    UPDATE_NOISE bound)."""
    one, split = runs["one"], runs["split"]
    assert sorted(_losses(split)) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        assert _losses(split)[step] == pytest.approx(_losses(one)[step], rel=1e-6), step
        assert _metric(split, "grad_norm")[step] == pytest.approx(_metric(one, "grad_norm")[step], rel=1e-5), step
    assert _metric(split, "eval_loss")[4] == pytest.approx(_metric(one, "eval_loss")[4], rel=1e-6)
    a, b = _lora(split), _lora(one)
    tolerance = UPDATE_NOISE * sum(_metric(one, "lr").values())
    assert a.keys() == b.keys() and max(v.abs().max() for k, v in b.items() if "lora_B" in k) > 100 * tolerance
    for key in a:
        assert (a[key] - b[key]).abs().max() <= tolerance, key
    status = json.loads((split / "run.json").read_text())
    assert status["status"] == "completed" and sorted(p.name for p in (split / "checkpoints").iterdir()) == [
        "step-2", "step-4"]
    video = _frames(split / status["videos"][0])  # rank 0 rendered it, rank 1 ran the split forwards with it
    reference = _frames(one / json.loads((one / "run.json").read_text())["videos"][0])
    # the same frames up to the encoder: LoRAs 5e-8 apart can flip an H.264 decision (a few values move by up to ~5
    # levels); a wrong split or gather changes the whole video
    difference = np.abs(video - reference)
    assert video.shape == reference.shape and difference.mean() < 0.05 and (difference > 2).mean() < 1e-3


def test_context_parallel_checkpoint_resumes_on_one_process(runs):
    one, resumed = runs["one"], runs["resumed"]
    for step in (3, 4):
        assert _losses(resumed)[step] == pytest.approx(_losses(one)[step], rel=1e-6), step
    tolerance = UPDATE_NOISE * sum(_metric(one, "lr").values())
    a, b = _lora(resumed), _lora(one)
    for key in a:
        assert (a[key] - b[key]).abs().max() <= tolerance, key


def test_two_groups_of_two_train_like_two_data_parallel_processes(few_clips, tmp_path):
    """Four processes, context_parallel = 2: ranks 0-1 and 2-3 are the groups; each group takes the micro-batches and
    noise the data-parallel rank of the same index takes in a two-process run without context parallel."""
    _train([str(_config(few_clips, tmp_path, "pair", 1, steps=2, validation=False))], processes=2)
    _train([str(_config(few_clips, tmp_path, "groups", 2, steps=2, validation=False))], processes=4)
    pair, groups = tmp_path / "pair", tmp_path / "groups"
    for step in (1, 2):
        assert _losses(groups)[step] == pytest.approx(_losses(pair)[step], rel=1e-6), step
        assert _metric(groups, "grad_norm")[step] == pytest.approx(_metric(pair, "grad_norm")[step], rel=1e-5), step


# ---------------------------------------------------------------- what the preflight refuses


def _errors(cfg, processes: int) -> list[str]:
    from trainer.preflight.check import preflight

    return preflight(cfg, here=False, scan=False, num_processes=processes).errors


@pytest.mark.parametrize(("memory", "other", "processes", "field", "fix"), [
    ({"context_parallel": 2}, {}, 1, "does not divide the 1 training process", "one of [1]"),
    ({"context_parallel": 2}, {}, 3, "does not divide the 3 training process", "one of [1]"),
    ({"context_parallel": 4}, {}, 4, "the model's 2 attention heads", "one of [1, 2]"),
    ({"context_parallel": 2, "shard_base": True}, {}, 2, "memory.shard_base: not supported",
     "memory.shard_base = false"),
    ({"context_parallel": 2}, {"tread": {"routes": [{"selection_ratio": 0.5, "start_layer_idx": 0,
                                                     "end_layer_idx": 1}]}}, 2, "tread.routes: not supported",
     "tread.routes = []"),
    ({"context_parallel": 2}, {"crepa": {"enabled": True}}, 2, "crepa.enabled: not supported", "crepa.enabled = false"),
    ({"context_parallel": 2, "attention_backend": "flash_4_hub"}, {}, 2, "has no context-parallel path",
     'use "auto"'),
    ({"context_parallel": 2, "attention_backend": "flex"}, {}, 2, "has no context-parallel path", "_native_cudnn"),
])
def test_preflight_refuses_what_context_parallel_cannot_train(clips, tmp_path, memory, other, processes, field, fix):
    cfg = tiny_config(clips, tmp_path / "run", memory=memory, **other)
    errors = _errors(cfg, processes)
    lines = [e for e in errors if field in e]
    assert len(lines) == 1, errors
    assert fix in lines[0] and "memory.context_parallel" in lines[0]


def test_the_fixes_the_refusals_name_are_valid(clips, tmp_path):
    assert not _errors(tiny_config(clips, tmp_path / "ok", memory={"context_parallel": 2}), 2)
    assert not _errors(tiny_config(clips, tmp_path / "ok", memory={"context_parallel": 2}), 4)  # 2 groups of 2
    assert not _errors(tiny_config(clips, tmp_path / "ok", memory={"context_parallel": 2,
                                                                    "attention_backend": "_native_cudnn"}), 2)
    assert not _errors(tiny_config(clips, tmp_path / "ok", memory={"context_parallel": 1, "shard_base": True}), 2)


def test_14b_heads_and_processes():
    """40 heads: 2, 4, 5, 8 divide them; 3 does not (on 3 or 6 GPUs)."""
    from trainer.config.files import config_from_dict
    from trainer.model.context_parallel import context_parallel_problems

    def problems(degree: int, processes: int) -> list[str]:
        cfg = config_from_dict({"model": {"flavour": "t2v-480p-14b-2.1"}, "memory": {"context_parallel": degree},
                                "datasets": [{"path": "/x"}]})
        return context_parallel_problems(cfg, processes)

    assert not problems(2, 2) and not problems(8, 8) and not problems(4, 8)
    (line,) = problems(3, 6)
    assert "40 attention heads" in line and "one of [1, 2]" in line


@pytest.mark.parametrize("where", ["datasets", "validation"])
def test_token_counts_that_do_not_split_are_refused_with_a_frame_count_that_does(clips, tmp_path, where):
    """The tiny model at 48x48: 3x3 patches a frame; 9 frames are 3 latent frames, 27 tokens: not even. The line names
    the bucket (or the validation shape) and a frame count whose tokens split, and that frame count passes."""
    from trainer.preflight.check import preflight

    sizes = {"width": 48, "height": 48, "num_frames": 9}
    odd = tiny_config(clips, tmp_path / "odd", memory={"context_parallel": 2},
                      **({"datasets": sizes} if where == "datasets" else {"validation": sizes}))
    errors = preflight(odd, here=False, num_processes=2).errors
    start = "validation: 48x48x9" if where == "validation" else "datasets[0] ("  # (validation takes datasets[0]'s)
    (line,) = [e for e in errors if "do not split evenly" in e and e.startswith(start)]
    assert "27 tokens (3 latent frames x 9 patches)" in line
    field = "validation.num_frames" if where == "validation" else "datasets[0].num_frames"
    assert f"set {field} = 13 (4 latent frames)" in line and "memory.context_parallel = 1" in line
    fixed = {**sizes, "num_frames": 13}
    ok = tiny_config(clips, tmp_path / "ok", memory={"context_parallel": 2},
                     **({"datasets": fixed} if where == "datasets" else {"validation": fixed}))
    assert not [e for e in preflight(ok, here=False, num_processes=2).errors if "split evenly" in e]
    no_validation = tiny_config(clips, tmp_path / "nv", memory={"context_parallel": 2},
                                validation={**sizes, "at_end": False})
    if where == "validation":  # no render, nothing to refuse
        assert not [e for e in preflight(no_validation, here=False, num_processes=2).errors if "split evenly" in e]


def test_context_parallel_is_a_number_of_processes():
    from trainer.config.files import config_from_dict
    from trainer.errors import UserError

    with pytest.raises(UserError, match="context_parallel = 2; 1 turns it off"):
        config_from_dict({"memory": {"context_parallel": True}, "datasets": [{"path": "/x"}]})
    with pytest.raises(UserError, match="greater than or equal to 1"):
        config_from_dict({"memory": {"context_parallel": 0}, "datasets": [{"path": "/x"}]})


def test_data_parallel_layout():
    from trainer.model.context_parallel import data_parallel

    assert [data_parallel(r, 4, 2) for r in range(4)] == [(0, 2), (0, 2), (1, 2), (1, 2)]
    assert [data_parallel(r, 2, 1) for r in range(2)] == [(0, 2), (1, 2)]
    with pytest.raises(ValueError):
        data_parallel(0, 3, 2)
