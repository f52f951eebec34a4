"""Faults in the middle of a run end in one line and a true run.json: a full disk (the kernel's own ENOSPC, from
/dev/full and from a real tmpfs filled to the brim) and a resume that goes on to the same LoRA; a damaged cache entry
named and rebuilt; a checkpoint with NaN weights refused on resume, naming the file; a kill during caching that leaves
no temp files; cache files with the user's umask; validation videos that never share a name; a size too big for
memory named as such, with no `.failed` marker left behind."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import tomli_w
from safetensors.torch import load_file, save_file

from conftest import tiny_config
from launcher.cli import main
from trainer.config.files import save_config, to_toml_dict
from trainer.errors import DiskFull, UserError
from trainer.loop.train import train
from trainer.outputs.export import read_lora
from trainer.rundir import checkpoint_manifest

FAST = {"validation": {"at_end": False, "eval_every_n_steps": 0}}
ROOT = Path(__file__).resolve().parents[1]


def _cfg(data, out, **sections):
    return tiny_config(data, out, **{**FAST, **sections})


def _status(run: Path) -> dict:
    return json.loads((run / "run.json").read_text())


def _same_lora(a: Path, b: Path) -> bool:
    x, y = read_lora(a)[0], read_lora(b)[0]
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _temp_files(*folders: Path) -> list[Path]:
    return [p for f in folders if f.exists() for p in f.rglob(".tmp-*")]


@pytest.fixture
def data(few_clips, tmp_path) -> Path:
    """A private copy of two clips: these tests build, damage and inspect caches."""
    target = tmp_path / "data"
    shutil.copytree(few_clips, target, ignore=shutil.ignore_patterns(".wanforge_cache"))
    return target


# ---------------------------------------------------------------- a full disk


def test_a_full_disk_mid_run_keeps_the_truth_and_resume_goes_on(data, tmp_path):
    """metrics.jsonl becomes /dev/full after step 2 (every write to it then fails with the kernel's ENOSPC)."""
    run, reference = tmp_path / "run", tmp_path / "reference"
    sections = dict(train={"max_train_steps": 4, "log_every_n_steps": 1}, checkpoint={"every_n_steps": 2})
    expected = train(_cfg(data, reference, **sections), show_progress=False).lora_file

    def disk_fills(step: int) -> None:
        if step == 2:
            (run / "metrics.jsonl").unlink()
            (run / "metrics.jsonl").symlink_to("/dev/full")

    with pytest.raises(DiskFull) as info:
        train(_cfg(data, run, **sections), show_progress=False, on_step=disk_fills)
    line = str(info.value)
    assert "\n" not in line and line.startswith("disk full: no space left on the device")
    assert f"the last good checkpoint is {run / 'checkpoints' / 'step-2'}" in line and "--resume latest" in line
    status = _status(run)
    assert status["status"] == "failed" and status["step"] == 3 and "disk full" in status["error"]
    assert status["last_good_checkpoint"] == "checkpoints/step-2"
    (run / "metrics.jsonl").unlink()  # space freed
    result = train(_cfg(data, run, **sections), resume="latest", show_progress=False)
    assert _status(run)["status"] == "completed" and _same_lora(result.lora_file, expected)


def test_a_full_disk_is_one_error_line_and_exit_2(data, tmp_path, capsys):
    run = tmp_path / "run"
    cfg = _cfg(data, run, train={"max_train_steps": 2, "log_every_n_steps": 1})
    config = tmp_path / "c.toml"
    save_config(cfg, config)
    run.mkdir()
    (run / "metrics.jsonl").symlink_to("/dev/full")  # full from the first step
    capsys.readouterr()
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: disk full") and "no checkpoint was saved yet" in errors[0]
    assert _status(run)["status"] == "failed" and _status(run)["step"] == 1


_FILL_DRIVER = '''
import json, os, shutil, sys
from pathlib import Path
import trainer.loop.periodic as periodic
from launcher.cli import main

disk, config, out, reference = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), sys.argv[4]
assert main(["train", reference]) == 0  # the same run, never stopped, on an ordinary disk (same process settings)
filler = disk / "filler"
real = periodic.PeriodicActions.after_step
filled = []

def after_step(self, step, signum):
    if step == 4 and not filled:  # the disk is full when step 4's checkpoint is written (once)
        filled.append(step)
        with filler.open("wb") as f:
            try:
                while True:
                    f.write(b"\\0" * 2**16)
                    f.flush()
            except OSError:
                pass
    return real(self, step, signum)

periodic.PeriodicActions.after_step = after_step
first = main(["train", config])
run = disk / "run"
status_after_fault = json.loads((run / "run.json").read_text())
filler.unlink()
second = main(["train", config, "--resume", "latest"])
shutil.copytree(run / "lora", out / "lora")
print(json.dumps({"first": first, "second": second, "status": status_after_fault,
                  "final": json.loads((run / "run.json").read_text())}))
'''


def test_a_real_full_filesystem_mid_checkpoint(data, tmp_path):
    """A tmpfs filled to the brim while the run saves a checkpoint (safetensors' own writer meets ENOSPC), in a
    private mount namespace; freed, the resume goes on to the same LoRA as a run that never stopped."""
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True).returncode != 0:
        pytest.skip("no user and mount namespaces here (unshare) to mount a small tmpfs")
    disk, out = tmp_path / "disk", tmp_path / "out"
    disk.mkdir()
    out.mkdir()
    sections = dict(train={"max_train_steps": 6, "log_every_n_steps": 3}, checkpoint={"every_n_steps": 2})
    config, reference = tmp_path / "c.toml", tmp_path / "reference.toml"
    save_config(_cfg(data, disk / "run", **sections), config)
    save_config(_cfg(data, tmp_path / "reference", **sections), reference)
    driver = tmp_path / "driver.py"
    driver.write_text(_FILL_DRIVER)
    script = (f'mount -t tmpfs -o size=24m tmpfs "{disk}" && exec "{sys.executable}" "{driver}" "{disk}" "{config}" '
              f'"{out}" "{reference}"')
    proc = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "Traceback" not in proc.stderr and "error: disk full" in proc.stderr, proc.stderr[-3000:]
    assert result["first"] == 2 and result["second"] == 0, proc.stderr[-3000:]
    assert result["status"]["status"] == "failed" and result["status"]["step"] == 4
    assert result["status"]["last_good_checkpoint"] == "checkpoints/step-2"
    assert result["final"]["status"] == "completed"
    expected = tmp_path / "reference" / "lora" / "wanforge_lora.safetensors"
    assert _same_lora(out / "lora" / expected.name, expected)


# ---------------------------------------------------------------- the caches


def _entries(data: Path, kind: str) -> list[Path]:
    folder = data / ".wanforge_cache" / kind
    return sorted(folder.glob("*.safetensors"))


def test_a_damaged_cache_entry_is_named_and_rebuilt(data, tmp_path, caplog):
    cfg = _cfg(data, tmp_path / "run", train={"max_train_steps": 1})
    train(cfg, show_progress=False)
    latent, text = _entries(data, "latents")[0], _entries(data, "text")[0]
    latent.write_bytes(latent.read_bytes()[:-64])  # truncated (a full disk, a killed copy)
    good_text = load_file(str(text))
    save_file({"embeds": torch.zeros(3)}, str(text))  # a foreign file of the wrong shape
    caplog.set_level("WARNING")
    result = train(_cfg(data, tmp_path / "run2", train={"max_train_steps": 1}), show_progress=False)
    named = [r.getMessage() for r in caplog.records if "damaged cache entry" in r.getMessage()]
    assert any(str(latent) in m and "unreadable" in m for m in named), named
    assert any(str(text) in m and "1 dimensions, not 2" in m for m in named), named
    assert result.cache_entries_built == 2
    assert load_file(str(latent))["latents"].ndim == 4 and torch.equal(load_file(str(text))["embeds"], good_text["embeds"])


def test_a_clip_fixed_after_it_failed_to_decode_is_cached_again(data, tmp_path):
    """The `.failed` note of a clip that would not decode holds for that very file only: restored from a backup
    with its old size and time, it is decoded again (its inode and ctime tell)."""
    from trainer.data.cache import build_caches

    cfg = _cfg(data, tmp_path / "run")
    target = data / "clip_01.mp4"
    good, st = target.read_bytes(), target.stat()
    start, end = good.find(b"mdat") + 64, good.find(b"moov") - 64  # the frames' bytes, between the two boxes
    assert 0 < start < end
    broken = bytearray(good)
    broken[start:end] = b"\0" * (end - start)  # its index reads (the scan passes), its frames do not decode
    target.write_bytes(bytes(broken))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    report = build_caches(cfg, torch.device("cpu"), show_progress=False)
    assert [p.name for p, _ in report.skipped] == ["clip_01.mp4"] and list(data.rglob("*.failed"))
    restored = tmp_path / "restored.mp4"
    restored.write_bytes(good)
    os.utime(restored, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(restored, target)  # same size, same mtime
    report = build_caches(cfg, torch.device("cpu"), show_progress=False)
    assert report.skipped == [] and sum(len(s) for s in report.samples) == 2 and report.built_latents == 1


def test_cache_files_follow_the_umask(data, tmp_path):
    old = os.umask(0o027)
    try:
        train(_cfg(data, tmp_path / "run", train={"max_train_steps": 1}), show_progress=False)
    finally:
        os.umask(old)
    files = [p for p in (data / ".wanforge_cache").rglob("*") if p.is_file()]
    assert len(files) >= 5  # latents, texts, probe.json, manifest.json
    modes = {str(p.relative_to(data)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {"0o640"}, modes


_KILL_WHILE_CACHING = '''
import os, signal, sys
import trainer.fileio as fileio
from launcher.cli import main

real = fileio.atomic_save_safetensors
count = 0

def save(tensors, path, metadata=None):
    global count
    count += 1
    if count == int(os.environ["KILL_AT"]):  # the temp file is written, the rename not yet done
        from safetensors.torch import save_file
        tmp = fileio.temp_path_beside(path)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        os.kill(os.getpid(), signal.SIGKILL)
    return real(tensors, path, metadata)

import trainer.data.cache as cache
cache.atomic_save_safetensors = save
sys.exit(main(sys.argv[1:]))
'''


def test_a_kill_during_caching_leaves_no_temp_files_after_the_resume(data, tmp_path):
    run = tmp_path / "run"
    config = tmp_path / "c.toml"
    save_config(_cfg(data, run, train={"max_train_steps": 1}), config)
    driver = tmp_path / "driver.py"
    driver.write_text(_KILL_WHILE_CACHING)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "KILL_AT": "2"}
    killed = subprocess.run([sys.executable, str(driver), "train", str(config)], env=env, capture_output=True,
                            timeout=600)
    assert killed.returncode == -9
    assert _temp_files(data / ".wanforge_cache")  # the killed writer's leftover
    resumed = subprocess.run([sys.executable, "-m", "launcher.cli", "train", str(config), "--resume", "latest"],
                             env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _temp_files(data / ".wanforge_cache", run) == []
    assert _status(run)["status"] == "completed"


def test_a_live_writers_temp_files_are_never_removed(tmp_path):
    from trainer.fileio import temp_path_beside, writing_into

    cache = tmp_path / "cache"
    with writing_into([cache]):
        live = temp_path_beside(cache / "latents" / "x.safetensors")  # a writer at work
        with writing_into([cache]) as removed:  # a second process starting meanwhile
            assert removed == [] and live.exists()
    with writing_into([cache]) as removed:  # no one writing: it is a leftover
        assert removed == [live] and not live.exists()


# ---------------------------------------------------------------- non-finite checkpoints


def test_a_checkpoint_with_nan_weights_is_refused_on_resume_naming_the_file(data, tmp_path, capsys):
    run = tmp_path / "run"
    cfg = _cfg(data, run, train={"max_train_steps": 3}, checkpoint={"every_n_steps": 1, "total_limit": None})
    train(cfg, show_progress=False)
    adapter = run / "checkpoints" / "step-3" / "adapter.safetensors"
    tensors = load_file(str(adapter))
    name = sorted(tensors)[1]
    tensors[name][0, 0] = float("nan")  # what an overflow mid-run, or another tool, leaves in a complete checkpoint
    save_file(tensors, str(adapter))
    marker = adapter.parent / "wanforge_state.json"
    state = json.loads(marker.read_text())
    if "files" in state:  # its file list says so too: a checkpoint complete as written, not a partial copy
        state["files"] = checkpoint_manifest(adapter.parent, list(state["files"]))
        marker.write_text(json.dumps(state))
    longer = _cfg(data, run, train={"max_train_steps": 5}, checkpoint={"every_n_steps": 1, "total_limit": None})
    config = tmp_path / "c.toml"
    config.write_text(tomli_w.dumps(to_toml_dict(longer)))
    capsys.readouterr()
    assert main(["check", str(config), "--resume", "latest"]) == 2
    err = capsys.readouterr().err
    assert f"{adapter}: tensor {name!r} holds NaN or inf" in err and "Traceback" not in err
    fix = f"--resume {run / 'checkpoints' / 'step-2'}"
    assert fix in err
    with pytest.raises(UserError, match=f"{adapter}: tensor .* holds NaN or inf.*{fix}"):
        train(longer, resume="latest", show_progress=False)
    assert _status(run)["status"] == "completed"  # the refusal changed nothing
    assert main(["check", str(config), "--resume", str(run / "checkpoints" / "step-2")]) == 0
    train(longer, resume=str(run / "checkpoints" / "step-2"), show_progress=False)
    assert _status(run)["status"] == "completed" and _status(run)["step"] == 5


def test_the_checkpoint_files_checked_are_the_ones_resumed():
    from trainer.loop.checkpointing import ADAPTER_FILE, STATE_FILE
    from trainer.preflight.tensors import RESUMED_FILES

    assert RESUMED_FILES == (ADAPTER_FILE, STATE_FILE)


# ---------------------------------------------------------------- validation video names


def test_two_validation_prompts_never_write_the_same_video(data, tmp_path):
    from trainer.outputs.validation_videos import validation_prompts

    library = tmp_path / "prompts.json"
    library.write_text(json.dumps({"A red ball": "one", "a-red-ball": "two", "a red ball-2": "three",
                                   "a red ball-ema": "four", "A_RED_BALL": "five"}))
    cfg = _cfg(data, tmp_path / "run", validation={"prompt": "a red ball", "prompt_library": str(library)})
    names = [p.name for p in validation_prompts(cfg, None)]
    files = {n.lower() for n in names} | {f"{n}-ema".lower() for n in names}  # the EMA variant of each, too
    assert len(files) == 2 * len(names) == 12, names


# ---------------------------------------------------------------- a size too big for memory

_OOM_DRIVER = '''
import os, resource, sys
import torch, trainer.data.cache, trainer.loop.train, trainer.model.components  # loaded before the limit
from launcher.cli import main
size = [int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmSize")][0] * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + 250 * 2**20,) * 2)  # 250 MiB more address space than now
sys.exit(main(sys.argv[1:]))
'''


def _limited(driver: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(driver), *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmSize from /proc")
def test_a_size_too_big_for_memory_is_named_and_leaves_no_failed_marker(data, tmp_path):
    config = tmp_path / "c.toml"
    save_config(_cfg(data, tmp_path / "run", datasets={"width": 512, "height": 512},
                     cache={"decode_workers": 0}), config)
    driver = tmp_path / "driver.py"
    driver.write_text(_OOM_DRIVER)
    proc = _limited(driver, "cache", str(config))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    line = next(ln for ln in proc.stderr.splitlines() if ln.startswith("error: "))
    assert "out of" in line and "memory" in line and "512x512x9" in line and "not a fault of the clips" in line
    assert not list((data / ".wanforge_cache").rglob("*.failed"))


def test_a_training_step_out_of_gpu_memory_is_named_in_the_line_and_run_json(data, tmp_path, monkeypatch, capsys):
    """The GPU's own error (torch.OutOfMemoryError, what CUDA's allocator raises) at the first step: exit 2, one line
    naming the size in hand and blaming no clip, run.json `failed` with it. (A real allocation failure is the cache
    test above; a CPU can't run out of GPU memory.)"""
    import trainer.loop.train as loop_train

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(loop_train, "training_step", out_of_memory)
    run = tmp_path / "run"
    config = tmp_path / "c.toml"
    save_config(_cfg(data, run, train={"max_train_steps": 2}), config)
    capsys.readouterr()
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = next(ln for ln in err.splitlines() if ln.startswith("error: "))
    assert "out of CPU memory at step 1 training 2 clip(s) of 64x64x9" in line and "the clips are fine" in line
    status = _status(run)
    assert status["status"] == "failed" and "out of CPU memory" in status["error"] and status["step"] == 0
    assert not list((data / ".wanforge_cache").rglob("*.failed"))
