"""`check` before the GPU is paid for: sizes that waste money are said with how much (and never stop the run),
folders that can't work are refused, and every fault in the data (unreadable or non-UTF-8 captions, links that loop
or lead nowhere, run folders and cache folders inside a dataset, a file fixed since it was unreadable) is listed,
never raised. A config of any size checks in seconds."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import tomli_w

from launcher.cli import main
from trainer.data.video import write_mp4


def clip(path: Path, width: int, height: int, frames: int = 12, caption: str | None = "a red ball moves") -> Path:
    video = np.zeros((frames, height, width, 3), dtype=np.uint8)
    for i in range(frames):
        video[i, :, (i * width) // frames:, 0] = 200
    write_mp4(path, video, 16)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def config(data: Path, out: Path, **dataset) -> dict:
    return {"model": {"flavour": "tiny"},
            "datasets": [{"path": str(data), "num_frames": 9, "width": 64, "height": 64, **dataset}],
            "train": {"output_dir": str(out), "max_train_steps": 2},
            "optim": {"lr_warmup_steps": 0}}


def run_check(capsys, tmp_path: Path, cfg: dict, *extra: str) -> tuple[int, str, str]:
    path = tmp_path / "c.toml"
    path.write_text(tomli_w.dumps(cfg), encoding="utf-8")
    capsys.readouterr()
    code = main(["check", str(path), *extra])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out, captured.err


@pytest.fixture
def landscape(tmp_path) -> Path:
    folder = tmp_path / "landscape"
    folder.mkdir()
    for i in range(2):
        clip(folder / f"wide_{i}.mp4", 128, 64)
    return folder


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning: ")]


# ---------------------------------------------------------------- 1. sizes that waste money


def test_a_portrait_size_on_landscape_clips_says_how_much_the_crop_throws_away(landscape, tmp_path, capsys):
    code, _, err = run_check(capsys, tmp_path, config(landscape, tmp_path / "run", width=32, height=64))
    assert code == 0, err  # a warning never stops the run
    line = next(w for w in _warnings(err) if "to the crop" in w)
    assert "2 of 2 clips lose up to 75% of each frame" in line and "128x64" in line
    assert "datasets[0].width = 64 and datasets[0].height = 32" in line  # the swap, which then crops nothing
    code, _, err = run_check(capsys, tmp_path, config(landscape, tmp_path / "run", width=64, height=32))
    assert code == 0 and not any("to the crop" in w for w in _warnings(err)), err


def test_a_square_crop_and_a_stretch_are_said_too(landscape, tmp_path, capsys):
    cfg = config(landscape, tmp_path / "run", crop_aspect="square")
    del cfg["datasets"][0]["width"], cfg["datasets"][0]["height"]
    code, _, err = run_check(capsys, tmp_path, cfg)
    assert code == 0 and any("lose up to 50% of each frame" in w and 'crop_aspect = "preserve"' in w
                             for w in _warnings(err)), err
    code, _, err = run_check(capsys, tmp_path, config(landscape, tmp_path / "run", width=32, height=64, crop=False))
    assert code == 0 and any("stretches 2 of 2 clips out of shape by up to 4x" in w for w in _warnings(err)), err


def test_an_upscale_of_small_sources_names_the_factor(tmp_path, capsys):
    small = tmp_path / "small"
    small.mkdir()
    clip(small / "tiny.mp4", 32, 32)
    code, _, err = run_check(capsys, tmp_path, config(small, tmp_path / "run", width=96, height=96))
    assert code == 0, err
    line = next(w for w in _warnings(err) if "upscaled" in w)
    assert "1 of 1 clips are smaller than their bucket and are upscaled up to 3x" in line and "32x32 -> 96x96" in line
    assert "datasets[0].width = 32 and datasets[0].height = 32" in line


def test_a_size_far_beyond_training_says_the_cost(few_clips, tmp_path, capsys):
    code, _, err = run_check(capsys, tmp_path, config(few_clips, tmp_path / "run", width=256, height=256,
                                                      num_frames=33, min_frames=1))
    assert code == 0, err
    pixels = next(w for w in _warnings(err) if "the largest size tiny was trained at" in w)
    assert "256x256 is 16.0x the pixels of 64x64" in pixels and "try datasets[0].width = 64" in pixels
    frames = next(w for w in _warnings(err) if "datasets[0].num_frames = 33" in w)
    assert "3.7x the 9 frames" in frames
    code, _, err = run_check(capsys, tmp_path, config(few_clips, tmp_path / "run", width=16384, height=16384))
    assert code == 2 and "16384x16384 is far beyond any video model's frame" in err


# ---------------------------------------------------------------- 2. folders check refuses


@pytest.mark.parametrize("make, expected", [
    (lambda t: (t / "file").write_text("x") and t / "file" / "run", "is a file, not a folder"),
    (lambda t: (t / "link").symlink_to(t / "nowhere") or t / "link" / "run", "which does not exist"),
    (lambda t: t / ("n" * 300) / "run", "longer than the 255 bytes"),
], ids=["file-in-the-way", "dangling-link", "name-too-long"])
def test_an_output_folder_that_cannot_be_created_is_refused(make, expected, few_clips, tmp_path, capsys):
    out = make(tmp_path)
    code, _, err = run_check(capsys, tmp_path, config(few_clips, out))
    assert code == 2 and any(line.startswith("error: train.output_dir") and expected in line
                             for line in err.splitlines()), err


def test_an_output_folder_inside_a_dataset_is_refused_now_and_skipped_later(few_clips, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(few_clips, data, ignore=shutil.ignore_patterns(".wanforge_cache"))
    for extra in ([], ["--resume", "latest"]):
        code, _, err = run_check(capsys, tmp_path, config(data, data / "runs" / "one"), *extra)
        assert code == 2 and "train.output_dir" in err and "inside datasets[0].path" in err, err
    fix = next(line for line in err.splitlines() if "inside datasets[0].path" in line).split('train.output_dir = "')[1]
    assert run_check(capsys, tmp_path, config(data, Path(fix.rstrip('"'))))[0] == 0
    # a run folder already inside the data (an older run, another config): its videos are never scanned
    run = data / "old-run"
    (run / "validation" / "step-2").mkdir(parents=True)
    clip(run / "validation" / "step-2" / "a-red-ball.mp4", 64, 64, caption="a red ball")
    (run / "run.json").write_text("{}")
    code, out, err = run_check(capsys, tmp_path, config(data, tmp_path / "elsewhere"))
    assert code == 0, err
    assert f"  {run}: a wanforge run folder" in out and "a-red-ball.mp4" not in out.split("skipped")[0]


def test_a_cache_folder_that_is_the_dataset_folder_lists_what_it_skipped(few_clips, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(few_clips, data, ignore=shutil.ignore_patterns(".wanforge_cache"))
    code, out, err = run_check(capsys, tmp_path, config(data, tmp_path / "run", cache_dir=str(data)))
    assert code == 2, err
    warning = next(w for w in _warnings(err) if "cache_dir" in w)
    assert "is the dataset folder itself" in warning and "2 clip(s) in it are skipped (clip_00.mp4, clip_01.mp4)" in warning
    for name in ("clip_00.mp4", "clip_01.mp4"):
        assert f"{data / name}: inside datasets[0].cache_dir" in out
    fixed = warning.split('datasets[0].cache_dir = "')[1].rstrip('"')
    assert run_check(capsys, tmp_path, config(data, tmp_path / "run", cache_dir=fixed))[0] == 0


# ---------------------------------------------------------------- 3. data faults are listed, never raised


def test_captions_that_are_not_text_or_cannot_be_read_are_listed(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("good", "latin1", "folder", "dangling", "loop", "utf16", "bom"):
        clip(data / f"{name}.mp4", 64, 64, caption=None)
    (data / "good.txt").write_text("a red ball", encoding="utf-8")
    (data / "latin1.txt").write_bytes("a caf\xe9 scene".encode("latin-1"))
    (data / "folder.txt").mkdir()
    (data / "dangling.txt").symlink_to(data / "gone.txt")
    (data / "loop.txt").symlink_to(data / "loop2.txt")
    (data / "loop2.txt").symlink_to(data / "loop.txt")
    (data / "utf16.txt").write_text("a red ball", encoding="utf-16")  # Windows "Unicode": its BOM says so
    (data / "bom.txt").write_bytes(b"\xef\xbb\xbfa red ball")
    code, out, err = run_check(capsys, tmp_path, config(data, tmp_path / "run"))
    assert code == 0, err
    assert "latin1.mp4: caption latin1.txt is not UTF-8 (byte 0xe9 on line 1): save it as UTF-8" in out
    assert "folder.mp4: folder.txt is a folder, not a caption file" in out
    assert "dangling.mp4: caption dangling.txt is a link to" in out and "which does not exist" in out
    assert "loop.mp4: caption loop.txt can't be read" in out
    assert "3 samples after repeats" in out  # good.mp4, utf16.mp4 (its byte-order mark says so), bom.mp4


def test_media_links_that_loop_or_lead_nowhere_are_listed(tmp_path, capsys):
    real = tmp_path / "real"
    real.mkdir()
    clip(real / "linked.mp4", 64, 64)
    data = tmp_path / "data"
    data.mkdir()
    clip(data / "plain.mp4", 64, 64)
    (data / "nowhere.mp4").symlink_to(data / "missing.mp4")
    (data / "a.mp4").symlink_to(data / "b.mp4")
    (data / "b.mp4").symlink_to(data / "a.mp4")
    (data / "sub").mkdir()
    (data / "sub" / "up").symlink_to(data)  # a folder link back up
    (data / "more").symlink_to(real)  # a linked folder of clips is followed
    code, out, err = run_check(capsys, tmp_path, config(data, tmp_path / "run"))
    assert code == 0, err
    assert "nowhere.mp4: a link to" in out and "which does not exist" in out
    assert "a.mp4: a link that loops" in out and "b.mp4: a link that loops" in out
    assert "sub/up: a folder link that leads back into its own folder" in out
    assert "2 samples after repeats" in out  # plain.mp4 and more/linked.mp4


def test_a_metadata_table_with_a_row_that_is_no_object_is_one_line(few_clips, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(few_clips, data, ignore=shutil.ignore_patterns(".wanforge_cache", "*.txt"))
    (data / "metadata.jsonl").write_text('{"file_name": "clip_00.mp4", "caption": "x"}\n["clip_01.mp4", "y"]\n')
    code, _, err = run_check(capsys, tmp_path, config(data, tmp_path / "run", caption_strategy="metadata"))
    assert code == 2 and "line 2 is not a JSON object" in err, err


def test_a_file_fixed_after_it_was_unreadable_is_read_again(few_clips, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(few_clips, data, ignore=shutil.ignore_patterns(".wanforge_cache"))
    target = data / "clip_01.mp4"
    good = target.read_bytes()
    st = target.stat()
    target.write_bytes(b"\0" * len(good))  # damaged, same size
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the same time
    code, out, _ = run_check(capsys, tmp_path, config(data, tmp_path / "run"))
    assert "clip_01.mp4: unreadable" in out and "1 samples after repeats" in out
    target.write_bytes(good)  # fixed: restored from a backup that kept size and time (cp -p, rsync -t)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    code, out, err = run_check(capsys, tmp_path, config(data, tmp_path / "run"))
    assert code == 0 and "2 samples after repeats" in out and "unreadable" not in out, out + err


# ---------------------------------------------------------------- any config checks in seconds


def test_a_huge_config_checks_in_seconds_and_scans_each_file_once(few_clips, tmp_path, monkeypatch):
    """Thousands of datasets over one folder, a long module list, a big prompt library: each clip is listed and
    probed once, and the whole check is far from minutes (a generous bound: this guards against quadratic work)."""
    import trainer.data.discovery as discovery
    from trainer.preflight.check import check_config_file

    data = tmp_path / "data"
    shutil.copytree(few_clips, data, ignore=shutil.ignore_patterns(".wanforge_cache"))
    listings, probes = [], []
    real_list, real_probe = discovery.list_media, discovery.probe
    monkeypatch.setattr(discovery, "list_media", lambda *a, **k: listings.append(a[0]) or real_list(*a, **k))
    monkeypatch.setattr(discovery, "probe", lambda p: probes.append(p) or real_probe(p))
    library = tmp_path / "prompts.json"
    library.write_text(json.dumps({f"p{i}": f"a red ball number {i}" for i in range(5000)}))
    cfg = config(data, tmp_path / "run")
    cfg["datasets"] = [{**cfg["datasets"][0], "id": f"d{i}", "repeats": 1 + i % 3} for i in range(3000)]
    cfg["lora"] = {"target_modules": [f"attn1.to_{x}" for x in "qkv"] * 5000 + [f"blocks.{i}.ffn.net.2" for i in range(2)]}
    cfg["validation"] = {"prompt_library": str(library), "skip_layers": [1] * 20000}
    path = tmp_path / "big.toml"
    path.write_text(tomli_w.dumps(cfg))
    started = time.perf_counter()
    report = check_config_file(path, [f"datasets.{i}.repeats=2" for i in range(0, 3000, 3)])
    seconds = time.perf_counter() - started
    assert report.errors == [], report.errors[:3]
    assert len(listings) == 1 and len(probes) == 2  # one folder, two clips
    assert seconds < 30, f"check took {seconds:.0f} s"


def test_a_size_beyond_the_transformers_positions_is_refused_with_one_that_fits(few_clips, tmp_path, capsys):
    """The shipped demo Wan has 32 rotary positions per axis (its config.json): 768 pixels need 48, which would stop
    the run at its first step with a shape error."""
    from trainer.demo.world import DEMO_MODEL_DIR

    cfg = config(few_clips, tmp_path / "run", width=768, height=640)
    cfg["model"]["pretrained_model_name_or_path"] = str(DEMO_MODEL_DIR)
    code, _, err = run_check(capsys, tmp_path, cfg)
    line = next(ln for ln in err.splitlines() if "positions per side" in ln)
    assert code == 2 and "768x640 needs 48 positions per side, more than the 32" in line, err
    assert "try datasets[0].width = 512 and datasets[0].height = 416" in line
    cfg["datasets"][0].update(width=512, height=416)
    assert run_check(capsys, tmp_path, cfg)[0] == 0
