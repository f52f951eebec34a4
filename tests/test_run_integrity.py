"""A run never ends in a lie: non-finite training fails and saves nothing non-finite, one writer per run folder,
resumes that say what they do (settings, rewinds, torn metrics, a kill during the final validation), checkpoints
that hold no pickle, outputs with the user's umask."""

from __future__ import annotations

import json
import os
import pickle
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_config
from trainer.config.files import save_config
from trainer.errors import UserError
from trainer.loop.train import train
from trainer.outputs.export import read_lora, save_lora
from trainer.outputs.finite import NonFiniteError

FAST = {"validation": {"at_end": False, "eval_every_n_steps": 0}}


def _cfg(data, out, **sections):
    merged = {**FAST, **sections}
    return tiny_config(data, out, **merged)


def _status(run: Path) -> dict:
    return json.loads((run / "run.json").read_text())


def _metric_steps(run: Path) -> list[int]:
    if not (run / "metrics.jsonl").is_file():
        return []
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "loss" in r]


def _checkpoints(run: Path) -> list[str]:
    return sorted((p.name for p in (run / "checkpoints").iterdir()), key=lambda n: (len(n), n))


class Crash(RuntimeError):
    pass


def _crash_at(step: int):
    def on_step(s):
        if s == step:
            raise Crash(f"simulated crash after step {s}")
    return on_step


def _cli(*args: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher.cli", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, **kwargs)


# ---------------------------------------------------------------- 2. non-finite guard
def test_diverging_run_fails_and_keeps_the_last_good_checkpoint(few_clips, tmp_path, monkeypatch):
    """A weight blown up mid-run (what a loss spike with clipping off does; `check` refuses the classic cause, a
    learning rate of 1e6, before any run): `failed`, no LoRA, only finite checkpoints before the bad step."""
    run = tmp_path / "run"
    cfg = _cfg(few_clips, run, train={"max_train_steps": 12, "max_grad_norm": None, "log_every_n_steps": 4},
               checkpoint={"every_n_steps": 1, "total_limit": None})

    def spike(transformer):
        def on_step(step):
            if step == 5:
                with torch.no_grad():
                    next(p for n, p in transformer.named_parameters() if "lora_B" in n).mul_(1e38).add_(1e38)
        return on_step

    import trainer.model.trainable as trainable

    real_add_lora = trainable.add_lora
    hooks = []

    def add_lora_and_remember(transformer, lora_cfg):
        real_add_lora(transformer, lora_cfg)
        hooks.append(spike(transformer))

    monkeypatch.setattr(trainable, "add_lora", add_lora_and_remember)  # the run's own adapter, to blow up
    with pytest.raises(NonFiniteError, match=r"NaN/inf at step \d+.*learning rate.*Last good checkpoint") as info:
        train(cfg, show_progress=False, on_step=lambda step: hooks[0](step))
    status = _status(run)
    assert status["status"] == "failed" and "diverged" in status["error"]
    bad = status["failed_at_step"]
    assert 1 <= bad <= 12 and info.value.step == bad
    assert not any((run / "lora").rglob("*.safetensors"))  # no LoRA of NaNs
    steps = [int(name.split("-")[1]) for name in _checkpoints(run)]
    assert steps and max(steps) < bad  # nothing saved at or after the bad step
    assert status["last_good_checkpoint"] == f"checkpoints/step-{max(steps)}"
    for name in _checkpoints(run):
        for file in (run / "checkpoints" / name).glob("*.safetensors"):
            assert all(torch.isfinite(t).all() for t in load_file(str(file)).values() if t.is_floating_point())
    assert all(r < bad for r in _metric_steps(run))  # no NaN loss row either
    assert f"--resume {run / 'checkpoints' / f'step-{max(steps)}'} --set optim.learning_rate=0.0001" in str(info.value)


def test_export_and_hub_refuse_non_finite_tensors(tmp_path):
    good = {"blocks.0.attn1.to_q.lora_A.weight": torch.ones(2, 8), "blocks.0.attn1.to_q.lora_B.weight": torch.ones(8, 2)}
    nan = {**good, "blocks.0.attn1.to_q.lora_B.weight": torch.full((8, 2), float("nan"))}
    with pytest.raises(NonFiniteError, match="NaN or inf"):
        save_lora(nan, tmp_path / "out", rank=2, alpha=2)
    with pytest.raises(NonFiniteError):
        save_lora({**good, "blocks.0.attn1.to_q.lora_A.weight": torch.full((2, 8), float("inf"))}, tmp_path / "out",
                  rank=2, alpha=2, fmt="diffusers")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    # `wanforge export` of a NaN file made elsewhere: refused, exit 2, nothing written
    bad_file = tmp_path / "bad.safetensors"
    save_file({f"diffusion_model.blocks.0.self_attn.q.{k.split('.')[-2]}.weight": v for k, v in nan.items()},
              str(bad_file))
    done = _cli("export", str(bad_file), "--format", "diffusers", "--out", str(tmp_path / "exported"))
    assert done.returncode == 2 and "NaN or inf" in done.stderr and "Traceback" not in done.stderr
    assert not any((tmp_path / "exported").glob("*.safetensors")) if (tmp_path / "exported").exists() else True
    # the Hub publisher refuses before anything is queued
    from trainer.outputs.hub import HubPublisher
    from trainer.rundir import RunDir

    class NoNetwork:  # the refusal must come before any call reaches the Hub client
        def __getattr__(self, name):
            raise AssertionError(f"the Hub was called ({name})")

    checkpoint = tmp_path / "run" / "checkpoints" / "step-1"
    checkpoint.mkdir(parents=True)
    save_file(nan, str(checkpoint / "adapter.safetensors"))
    publisher = HubPublisher.__new__(HubPublisher)
    publisher.cfg = _cfg(tmp_path, tmp_path / "run", hub={"push_checkpoints_to_hub": True, "push_to_hub": True,
                                                         "hub_model_id": "me/x"})
    publisher.run, publisher.api, publisher.repo_id = RunDir(tmp_path / "run"), NoNetwork(), "me/x"
    publisher.staging, publisher.futures = tmp_path / "run" / ".hub-staging", []
    with pytest.raises(NonFiniteError, match="checkpoint step 1"):
        publisher.push_checkpoint(checkpoint, 1)
    with pytest.raises(NonFiniteError, match="final upload"):
        publisher.push_final({"wanforge_lora.safetensors": checkpoint / "adapter.safetensors"}, "card", 1)


# ---------------------------------------------------------------- 3. one writer per run folder
def _wait_for(predicate, timeout: float = 300, proc: subprocess.Popen | None = None) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the first run ended early: {proc.stderr.read()[-3000:]}")
        if time.monotonic() > end:
            raise AssertionError("timed out")
        time.sleep(0.5)


def test_second_writer_is_refused_and_sigterm_stops_resumably(few_clips, tmp_path):
    """Two `wanforge train` on one folder: the second exits 2 at once naming the first's PID; SIGTERM on the first
    saves a checkpoint, leaves `stopped` (exit 143), and the run resumes from it, saying so once."""
    run = tmp_path / "run"
    cfg = _cfg(few_clips, run, train={"max_train_steps": 100000}, checkpoint={"every_n_steps": 100000})
    save_config(cfg, tmp_path / "a.toml")
    first = subprocess.Popen([sys.executable, "-m", "launcher.cli", "train", str(tmp_path / "a.toml")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        _wait_for(lambda: (run / "metrics.jsonl").is_file() and len(_metric_steps(run)) >= 2, proc=first)
        started = time.monotonic()
        second = _cli("train", str(tmp_path / "a.toml"), "--resume", "latest")
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"PID {first.pid}" in second.stderr and "in use" in second.stderr and "Traceback" not in second.stderr
        assert time.monotonic() - started < 120  # at once: no caching, no model load
        assert _status(run)["status"] == "training"  # the second process wrote nothing
        first.send_signal(signal.SIGTERM)
        out, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 143, err[-3000:]
    status = _status(run)
    stopped_at = status["step"]
    assert status["status"] == "stopped" and _checkpoints(run) == [f"step-{stopped_at}"]
    assert _metric_steps(run) == list(range(1, stopped_at + 1))
    done = _cli("train", str(tmp_path / "a.toml"), "--resume", "latest",
                "--set", f"train.max_train_steps={stopped_at + 2}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (done.stdout + done.stderr).count(f"resumed from step {stopped_at}") == 1
    assert _status(run)["status"] == "completed" and _metric_steps(run) == list(range(1, stopped_at + 3))


def test_a_dead_holder_never_blocks(tmp_path):
    from trainer.rundir import RunDir

    code = ("import sys, time; from pathlib import Path; from trainer.rundir import RunDir; "
            "RunDir(Path(sys.argv[1])).lock('train'); print('locked', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"PID {holder.pid}"):
            RunDir(tmp_path).lock("cache")
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        run = RunDir(tmp_path)
        run.lock("train")  # the kernel dropped the dead process's lock
        run.unlock()
    finally:
        if holder.poll() is None:
            holder.kill()


# ---------------------------------------------------------------- 4. resume says what it does
def test_resume_applies_the_learning_rate_and_refuses_the_lora_rank(few_clips, tmp_path, capsys):
    run = tmp_path / "run"
    base = dict(train={"max_train_steps": 4, "gradient_accumulation_steps": 1}, optim={"lr_warmup_steps": 0},
                checkpoint={"every_n_steps": 2})
    train(_cfg(few_clips, run, **base), show_progress=False)
    extended = _cfg(few_clips, run, **{**base, "train": {"max_train_steps": 6},
                                       "optim": {"lr_warmup_steps": 0, "learning_rate": 2.5e-4}})
    with pytest.raises(UserError, match=r"lora\.rank \(16 -> 8\)"):
        train(extended.model_copy(update={"lora": extended.lora.model_copy(update={"rank": 8})}), resume="latest",
              show_progress=False)
    assert "rank = 16" in (run / "config.toml").read_text()  # a refused resume writes nothing
    train(extended, resume="latest", show_progress=True)
    out = capsys.readouterr().out
    assert out.count("resumed from step 4") == 1 and "optim.learning_rate: 0.001 -> 0.00025" in out
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in rows if "lr" in r}
    assert lrs == {1: 1e-3, 2: 1e-3, 3: 1e-3, 4: 1e-3, 5: 2.5e-4, 6: 2.5e-4}  # what trained, step by step
    assert "learning_rate = 0.00025" in (run / "config.toml").read_text()
    assert "learning_rate = 0.00025" in (run / "checkpoints" / "step-6" / "config.toml").read_text()


def test_rewind_then_crash_resumes_the_rewound_branch(few_clips, tmp_path):
    """--resume checkpoints/step-2 of a finished 6-step run with a new learning rate, a crash at step 5, then
    --resume latest: it continues the new branch (step-4 of the rewind), never the abandoned step-6."""
    settings = dict(train={"max_train_steps": 6}, optim={"lr_warmup_steps": 0},
                    checkpoint={"every_n_steps": 2, "total_limit": None})
    slower = {**settings, "optim": {"lr_warmup_steps": 0, "learning_rate": 3e-4}}
    run = tmp_path / "run"
    first = train(_cfg(few_clips, run, **settings), show_progress=False)
    abandoned_lora = read_lora(first.lora_file)[0]
    with pytest.raises(Crash):
        train(_cfg(few_clips, run, **slower), resume=str(run / "checkpoints" / "step-2"), show_progress=False,
              on_step=_crash_at(5))
    aside = sorted(run.glob("abandoned-*"))
    assert len(aside) == 1 and sorted(p.name for p in (aside[0] / "checkpoints").iterdir()) == ["step-4", "step-6"]
    assert (aside[0] / "lora" / "wanforge_lora.safetensors").is_file() and not (run / "lora").exists() or \
        not any((run / "lora").iterdir())
    assert _checkpoints(run) == ["step-2", "step-4"]
    resumed = train(_cfg(few_clips, run, **slower), resume="latest", show_progress=False)
    assert _status(run)["resumed_from"].endswith("step-4") and _metric_steps(run) == [1, 2, 3, 4, 5, 6]
    # the same as rewinding without a crash: train to 2, then on at the new rate
    straight = tmp_path / "straight"
    with pytest.raises(Crash):
        train(_cfg(few_clips, straight, **settings), show_progress=False, on_step=_crash_at(2))
    reference = train(_cfg(few_clips, straight, **slower), resume="latest", show_progress=False)
    a, b = read_lora(reference.lora_file)[0], read_lora(resumed.lora_file)[0]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(abandoned_lora[k], b[k]) for k in b)  # and not the abandoned branch


def test_torn_metrics_stale_temp_and_a_kill_before_the_first_checkpoint(few_clips, tmp_path):
    run = tmp_path / "run"
    cfg = _cfg(few_clips, run, train={"max_train_steps": 4}, checkpoint={"every_n_steps": 2})
    with pytest.raises(Crash):
        train(cfg, show_progress=False, on_step=_crash_at(1))  # before any checkpoint
    with pytest.raises(Crash):
        train(cfg, resume="latest", show_progress=False, on_step=_crash_at(3))  # a fresh start: no checkpoint yet
    assert _metric_steps(run) == [1, 2, 3]
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "loss": 0.12')  # killed mid-line
    stale = [run / "checkpoints" / ".tmp-step-4", run / "lora" / ".tmp-wanforge_lora.1a2b3c4d.safetensors",
             run / ".tmp-run.5e6f7a8b.json"]
    stale[0].mkdir(parents=True)
    (stale[0] / "adapter.safetensors").write_bytes(b"half")
    for path in stale[1:]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
    train(cfg, resume="latest", show_progress=False)
    assert _metric_steps(run) == [1, 2, 3, 4]  # no duplicate, no torn line
    assert all(json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())
    assert not any(p.exists() for p in stale)
    assert _status(run)["status"] == "completed"


def test_a_kill_during_the_final_validation_is_rendered_on_resume(few_clips, tmp_path, monkeypatch):
    import trainer.outputs.validation_round

    run = tmp_path / "run"
    cfg = _cfg(few_clips, run, train={"max_train_steps": 2},
               validation={"at_end": True, "num_inference_steps": 2, "eval_every_n_steps": 0})
    real_round = trainer.outputs.validation_round.validation_round

    def killed(*args, **kwargs):
        raise Crash("killed while rendering")

    monkeypatch.setattr(trainer.outputs.validation_round, "validation_round", killed)
    with pytest.raises(Crash):
        train(cfg, show_progress=False)
    assert _status(run)["status"] == "failed" and _checkpoints(run) == ["step-2"]
    monkeypatch.setattr(trainer.outputs.validation_round, "validation_round", real_round)
    result = train(cfg, resume="latest", show_progress=False)
    status = _status(run)
    assert status["status"] == "completed" and status["videos"] and result.videos
    assert all((run / v).is_file() for v in status["videos"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum("validation_videos" in r for r in rows) == 1


# ---------------------------------------------------------------- 5. no code in checkpoints
class _Payload:
    """Unpickling this creates `marker`: the proof that a loader ran code from the checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_crafted_checkpoint_never_runs_code(few_clips, tmp_path, monkeypatch):
    run = tmp_path / "run"
    cfg = _cfg(few_clips, run, train={"max_train_steps": 2}, checkpoint={"every_n_steps": 2})
    train(cfg, show_progress=False)
    checkpoint = run / "checkpoints" / "step-2"
    assert not [p.name for p in checkpoint.iterdir() if p.suffix in (".pkl", ".bin", ".pt")]  # nothing pickled
    marker = tmp_path / "code-ran"
    for name in ("optimizer.bin", "scheduler.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl", "pytorch_model.bin"):
        (checkpoint / name).write_bytes(pickle.dumps(_Payload(marker)))
    # tripwires: a resume must not reach any unpickler
    for module, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(module, name, lambda *a, **k: (_ for _ in ()).throw(AssertionError("unpickler called")))
    extended = _cfg(few_clips, run, train={"max_train_steps": 3}, checkpoint={"every_n_steps": 2})
    train(extended, resume="latest", show_progress=False)
    assert not marker.exists()
    # a state file swapped for a pickle: it no longer matches the marker's file list, so the checkpoint is refused
    victim = run / "checkpoints" / "step-3"
    (victim / "state.safetensors").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(UserError, match=r"not a complete checkpoint folder \(state.safetensors has"):
        train(_cfg(few_clips, run, train={"max_train_steps": 4}, checkpoint={"every_n_steps": 2}), resume=str(victim),
              show_progress=False)
    # with a marker that lists no files (an older wanforge's): the file itself is refused by name, never unpickled
    old_marker = json.loads((victim / "wanforge_state.json").read_text())
    del old_marker["files"]
    (victim / "wanforge_state.json").write_text(json.dumps(old_marker))
    with pytest.raises(UserError, match="state.safetensors: not a readable wanforge checkpoint file"):
        train(_cfg(few_clips, run, train={"max_train_steps": 4}, checkpoint={"every_n_steps": 2}), resume="latest",
              show_progress=False)
    assert not marker.exists()
    # a checkpoint of the old pickled format is refused, not loaded
    (victim / "wanforge_state.json").write_text(json.dumps({"step": 3}))
    with pytest.raises(UserError, match="older wanforge as pickles"):
        train(_cfg(few_clips, run, train={"max_train_steps": 4}, checkpoint={"every_n_steps": 2}), resume="latest",
              show_progress=False)
    assert not marker.exists()


# ---------------------------------------------------------------- 6. the user's umask
def test_outputs_follow_the_umask(few_clips, tmp_path):
    run = tmp_path / "run"
    cfg = _cfg(few_clips, run, train={"max_train_steps": 2}, checkpoint={"every_n_steps": 2},
               validation={"at_end": True, "num_inference_steps": 2, "eval_every_n_steps": 0})
    old = os.umask(0o022)
    try:
        result = train(cfg, show_progress=False)
    finally:
        os.umask(old)
    files = [result.lora_file, *result.videos, run / "config.toml", run / "run.json", run / "metrics.jsonl",
             *(run / "checkpoints" / "step-2").iterdir(), *(run / "validation" / "step-2").iterdir()]
    assert len(files) >= 11
    modes = {str(p.relative_to(run)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {"0o644"}, modes


def test_atomic_writes_follow_any_umask(tmp_path):
    from trainer.fileio import atomic_write_text, temp_path_beside

    for mask, expected in ((0o077, 0o600), (0o027, 0o640), (0o002, 0o664)):
        old = os.umask(mask)
        try:
            atomic_write_text(tmp_path / f"{mask}.txt", "x")
            tmp = temp_path_beside(tmp_path / f"{mask}.mp4")
        finally:
            os.umask(old)
        assert stat.S_IMODE((tmp_path / f"{mask}.txt").stat().st_mode) == expected
        assert stat.S_IMODE(tmp.stat().st_mode) == expected and tmp.name.startswith(".tmp-")


# ---------------------------------------------------------------- checkpoints under DDP (two gloo processes)
_KILLER = '''
import os, signal, sys
import trainer.loop.checkpointing as ck
import trainer.loop.periodic as tt

def arm(kill_rank, step, where):
    """SIGKILL this rank at checkpoint `step`: before it contributes its part, or (rank 0) after writing every part
    but before the marker and the rename."""
    if int(os.environ["RANK"]) != kill_rank:
        return
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    if where == "before_contributing":
        real = tt.save_checkpoint
        def save(accelerator, run, s, *args, **kwargs):
            if s == step:
                die()
            return real(accelerator, run, s, *args, **kwargs)
        tt.save_checkpoint = save
    else:
        real_json = ck.atomic_write_json
        def write(path, data):
            if path.name == ck.CHECKPOINT_MARKER and data["step"] == step:
                die()
            return real_json(path, data)
        ck.atomic_write_json = write

if os.environ.get("KILL"):
    rank, step, where = os.environ["KILL"].split(":")
    arm(int(rank), int(step), where)
from launcher.cli import main
sys.exit(main(sys.argv[1:]))
'''


def test_a_kill_on_either_rank_mid_checkpoint_resumes_identically(few_clips, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(_KILLER)
    settings = dict(train={"max_train_steps": 4, "train_batch_size": 1, "log_every_n_steps": 1},
                    checkpoint={"every_n_steps": 2, "total_limit": None})

    def torchrun(config: Path, *args: str, kill: str = "") -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               str(driver), "train", str(config), *args], capture_output=True, text=True, timeout=600,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "KILL": kill,
                                   "PYTHONPATH": os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")])})

    for name in ("straight", "killed"):
        save_config(_cfg(few_clips, tmp_path / name, **settings), tmp_path / f"{name}.toml")
    done = torchrun(tmp_path / "straight.toml")
    assert done.returncode == 0, done.stderr[-5000:]
    killed = tmp_path / "killed"
    assert torchrun(tmp_path / "killed.toml", kill="1:4:before_contributing").returncode != 0
    assert _checkpoints(killed) == ["step-2"]  # rank 0 wrote nothing for step 4 without rank 1's part
    assert torchrun(tmp_path / "killed.toml", "--resume", "latest", kill="0:4:before_marker").returncode != 0
    assert set(_checkpoints(killed)) == {".tmp-step-4", "step-2"}  # complete parts, never renamed
    done = torchrun(tmp_path / "killed.toml", "--resume", "latest")
    assert done.returncode == 0, done.stderr[-5000:]
    assert _checkpoints(killed) == ["step-2", "step-4"] and _metric_steps(killed) == [1, 2, 3, 4]
    a = load_file(str(tmp_path / "straight" / "lora" / "wanforge_lora.safetensors"))
    b = load_file(str(killed / "lora" / "wanforge_lora.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_skips_a_partial_newest_checkpoint(few_clips, tmp_path, caplog):
    """A bucket mount uploads asynchronously: after a preemption the newest checkpoint in the bucket can have files
    missing or cut short while its marker is there. `--resume latest` checks every file the marker lists (size, then
    sha256), skips such a checkpoint with a line saying so and resumes from the newest complete one."""
    import logging

    from trainer.rundir import RunDir, checkpoint_problem

    settings = dict(train={"max_train_steps": 4}, optim={"lr_warmup_steps": 0},
                    checkpoint={"every_n_steps": 2, "total_limit": None})
    run = tmp_path / "run"
    train(_cfg(few_clips, run, **settings), show_progress=False)
    step2, step4 = run / "checkpoints" / "step-2", run / "checkpoints" / "step-4"
    marker = json.loads((step4 / "wanforge_state.json").read_text())
    assert set(marker["files"]) == {"adapter.safetensors", "state.safetensors", "rng.safetensors", "config.toml"}
    # made partial on purpose, as an unfinished upload leaves it: one file cut short, one not there yet
    state = (step4 / "state.safetensors").read_bytes()
    (step4 / "state.safetensors").write_bytes(state[: len(state) // 2])
    (step4 / "rng.safetensors").unlink()
    assert checkpoint_problem(step4) == f"rng.safetensors is missing, state.safetensors has {len(state) // 2} of its " \
        f"{len(state)} bytes"
    assert checkpoint_problem(step2) is None and RunDir(run).complete_checkpoints() == [(2, step2)]

    longer = _cfg(few_clips, run, **{**settings, "train": {"max_train_steps": 6}})
    with caplog.at_level(logging.WARNING, logger="trainer.rundir"):
        train(longer, resume="latest", show_progress=False)
    skipped = [r.getMessage() for r in caplog.records if "skipping checkpoint" in r.getMessage()]
    assert len(skipped) == 1 and str(step4) in skipped[0] and "state.safetensors has" in skipped[0]
    assert _status(run)["resumed_from"] == str(step2) and _status(run)["status"] == "completed"
    assert _metric_steps(run) == [1, 2, 3, 4, 5, 6] and _checkpoints(run) == ["step-2", "step-4", "step-6"]
    assert checkpoint_problem(step4, verify_hashes=True) is None  # written again, whole

    # same sizes, other bytes (a copy that went wrong): only the sha256 tells, and latest skips it too
    adapter = bytearray((run / "checkpoints" / "step-6" / "adapter.safetensors").read_bytes())
    adapter[-1] ^= 0xFF
    (run / "checkpoints" / "step-6" / "adapter.safetensors").write_bytes(bytes(adapter))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trainer.rundir"):
        assert RunDir(run).resolve_resume("latest") == step4
    assert "adapter.safetensors does not match its sha256" in caplog.text
    with pytest.raises(UserError, match="not a complete checkpoint folder .adapter.safetensors does not match"):
        RunDir(run).resolve_resume(str(run / "checkpoints" / "step-6"))
