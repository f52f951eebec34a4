"""Dataset sources and captions, images with videos, broken files, the bucket report, and caches that rebuild only
what changed."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_config
from trainer.config.data import DatasetConfig
from trainer.config.files import config_from_dict
from trainer.data.cache import build_caches
from trainer.data.discovery import scan_dataset
from trainer.data.video import write_mp4
from trainer.demo.world import make_demo_dataset
from trainer.errors import UserError


def gradient(h: int, w: int, frames: int = 1) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) * 127 // (h + w)], -1)
    return np.stack([np.roll(base, f, axis=1) for f in range(frames)]).astype(np.uint8)


def test_caption_sources(tmp_path):
    for name in ("a_red_ball_01", "blue-cube", "green cone"):
        Image.fromarray(gradient(32, 48)[0]).save(tmp_path / f"{name}.png")
    (tmp_path / "a_red_ball_01.txt").write_text("  a red ball bouncing \n")
    (tmp_path / "blue-cube.txt").write_text("   ")

    scan = scan_dataset(DatasetConfig(path=tmp_path), 0)
    assert [(c.video.name, c.caption) for c in scan.clips] == [("a_red_ball_01.png", "a red ball bouncing")]
    reasons = {p.name: why for p, why in scan.problems}
    assert reasons == {"blue-cube.png": "empty caption in blue-cube.txt", "green cone.png": "no caption: expected green cone.txt"}
    # an instance prompt fills in where a caption is missing
    filled = scan_dataset(DatasetConfig(path=tmp_path, instance_prompt="sks toy"), 0)
    assert {c.video.name: c.caption for c in filled.clips}["green cone.png"] == "sks toy"

    names = scan_dataset(DatasetConfig(path=tmp_path, caption_strategy="filename"), 0)
    assert {c.caption for c in names.clips} == {"a red ball", "blue cube", "green cone"}
    same = scan_dataset(DatasetConfig(path=tmp_path, caption_strategy="instanceprompt", instance_prompt="sks"), 0)
    assert {c.caption for c in same.clips} == {"sks"}

    rows = [{"file_name": "a_red_ball_01.png", "caption": "from jsonl"}, {"file_name": "blue-cube.png", "caption": "cube"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    meta = scan_dataset(DatasetConfig(path=tmp_path, caption_strategy="metadata"), 0)
    assert {c.video.name: c.caption for c in meta.clips} == {"a_red_ball_01.png": "from jsonl", "blue-cube.png": "cube"}
    assert "no row for green cone.png" in dict((p.name, w) for p, w in meta.problems)["green cone.png"]
    (tmp_path / "meta.csv").write_text("file_name,text\ngreen cone.png,\"a cone, green\"\n")
    csv_scan = scan_dataset(DatasetConfig(path=tmp_path, caption_strategy="metadata", metadata_file="meta.csv",
                                          caption_column="text"), 0)
    assert [(c.video.name, c.caption) for c in csv_scan.clips] == [("green cone.png", "a cone, green")]
    with pytest.raises(UserError, match="caption_column"):
        scan_dataset(DatasetConfig(path=tmp_path, caption_strategy="metadata", metadata_file="meta.csv"), 0)
    with pytest.raises(UserError, match="instanceprompt"):
        config_from_dict({"datasets": [{"path": "x", "caption_strategy": "instanceprompt"}]})


def test_hub_dataset_downloads_into_the_data_folder(clips, tmp_path):
    """The real huggingface_hub call; offline (HF_HUB_OFFLINE=1, as in the tests) it uses what is already there."""
    ds = DatasetConfig(path=clips, hf_repo="someone/shapes")
    assert len(scan_dataset(ds, 0).clips) == 8
    with pytest.raises(UserError, match=r"datasets\[0\].hf_repo: someone/shapes is not downloaded"):
        scan_dataset(DatasetConfig(path=tmp_path / "empty", hf_repo="someone/shapes"), 0)


def mixed_dataset(folder):
    """4 square videos, 4 square images, 2 wide videos, one corrupt video and one image without a caption."""
    make_demo_dataset(folder, num_clips=4)
    for i in range(4):
        Image.fromarray(gradient(80, 80)[0]).save(folder / f"still_{i}.{'png' if i % 2 else 'jpg'}")
        (folder / f"still_{i}.txt").write_text(f"a still picture number {i}")
    for i in range(2):
        write_mp4(folder / f"wide_{i}.mp4", gradient(64, 128, frames=24), fps=16)
        (folder / f"wide_{i}.txt").write_text("a wide moving gradient")
    (folder / "broken.mp4").write_bytes((folder / "clip_00.mp4").read_bytes()[:300])  # truncated
    (folder / "broken.txt").write_text("a broken clip")
    Image.fromarray(gradient(64, 64)[0]).save(folder / "uncaptioned.webp")
    return folder


def test_images_and_videos_train_together_and_broken_files_do_not_stop_training(tmp_path, capsys):
    data = mixed_dataset(tmp_path / "data")
    cfg = tiny_config(data, tmp_path / "run", train={"max_train_steps": 5},
                      datasets={"width": None, "height": None, "resolution": 64, "delete_problematic": True},
                      validation={"at_end": False, "eval_every_n_steps": 0})
    from trainer.data import dataset as dataset_module

    shapes = []
    collate = dataset_module.Collate.__call__

    def recording(self, items):
        out = collate(self, items)
        shapes.append(tuple(out["latents"].shape))
        return out

    dataset_module.Collate.__call__ = recording
    try:
        from trainer.loop.train import train

        result = train(cfg, show_progress=True)
    finally:
        dataset_module.Collate.__call__ = collate
    assert result.final_step == 5
    printed = capsys.readouterr().out
    assert "64x64@9" in printed and "64x64@1" in printed and "80x48@9" in printed  # the bucket report
    assert "broken.mp4: unreadable video" in printed and "uncaptioned.webp: no caption" in printed
    # one epoch is 2 + 2 + 1 whole batches: every bucket trained (1-frame images and 9-frame videos), one shape each
    assert sorted(shapes) == sorted([(2, 16, 3, 8, 8)] * 2 + [(2, 16, 1, 8, 8)] * 2 + [(2, 16, 3, 6, 10)])
    # delete_problematic moved the broken files (with their captions and the reason) to .quarantine/
    quarantine = data / ".quarantine"
    assert sorted(p.name for p in quarantine.iterdir()) == [
        "broken.mp4", "broken.mp4.why.txt", "broken.txt", "uncaptioned.webp", "uncaptioned.webp.why.txt"]
    assert "no caption" in (quarantine / "uncaptioned.webp.why.txt").read_text()
    assert not (data / "broken.mp4").exists()


def test_corrupt_file_listed_while_training_goes_on(dataset_copy, tmp_path):
    (dataset_copy / "zz_corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    (dataset_copy / "zz_corrupt.txt").write_text("corrupt")
    (dataset_copy / "empty.mp4").write_bytes(b"")
    (dataset_copy / "empty.txt").write_text("empty")
    cfg = tiny_config(dataset_copy, tmp_path / "run", train={"max_train_steps": 2}, validation={"at_end": False})
    report = build_caches(cfg, torch.device("cpu"), show_progress=False)
    skipped = {p.name: why for p, why in report.skipped}
    assert skipped["empty.mp4"] == "empty file" and "unreadable video" in skipped["zz_corrupt.mp4"]
    assert len(report.samples[0]) == 8 and (dataset_copy / "zz_corrupt.mp4").exists()  # listed, never deleted
    proc = subprocess.run([sys.executable, "-m", "launcher.cli", "check", str(_save(cfg, tmp_path))],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "64x64@9" in proc.stdout and "zz_corrupt.mp4: unreadable video" in proc.stdout


def _save(cfg, tmp_path):
    from trainer.config.files import save_config

    save_config(cfg, tmp_path / "cfg.toml")
    return tmp_path / "cfg.toml"


def test_too_small_dataset_is_a_clear_error(dataset_copy, tmp_path):
    cfg = tiny_config(dataset_copy, tmp_path / "run", train={"train_batch_size": 4, "gradient_accumulation_steps": 3})
    proc = subprocess.run([sys.executable, "-m", "launcher.cli", "check", str(_save(cfg, tmp_path))],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "holds 8 samples after repeats" in proc.stderr and "datasets[0].repeats = 2" in proc.stderr


def test_cache_rebuilds_only_entries_whose_resolution_changed(tmp_path):
    data = tmp_path / "data"
    make_demo_dataset(data, num_clips=3)  # 64x64
    write_mp4(data / "wide.mp4", gradient(64, 96, frames=24), fps=16)  # 3:2
    (data / "wide.txt").write_text("a wide clip")
    by_pixel = dict(width=None, height=None, resolution=64, resolution_type="pixel")
    cfg = tiny_config(data, tmp_path / "run", datasets=by_pixel)
    first = build_caches(cfg, torch.device("cpu"), show_progress=False)
    assert sorted({s.bucket for s in first.samples[0]}) == ["64x64@9", "96x64@9"] and first.built_latents == 4
    assert build_caches(cfg, torch.device("cpu"), show_progress=False).built == 0
    # the same target as an area: squares stay 64x64, the 3:2 clip becomes 80x48 -> one entry rebuilt
    cfg = tiny_config(data, tmp_path / "run", datasets={**by_pixel, "resolution_type": "pixel_area"})
    second = build_caches(cfg, torch.device("cpu"), show_progress=False)
    assert sorted({s.bucket for s in second.samples[0]}) == ["64x64@9", "80x48@9"]
    assert (second.built_latents, second.built_texts) == (1, 0)
    manifest = json.loads((data / ".wanforge_cache" / "manifest.json").read_text())
    wide = [e for e in manifest.values() if e["source"].endswith("wide.mp4")]
    assert wide == [{"source": str(data / "wide.mp4"), "bucket": "80x48@9", "caption": "a wide clip",
                     "text": wide[0]["text"]}]


def test_cache_split_across_processes_writes_disjoint_entries(dataset_copy, tmp_path):
    """Two 'ranks' build their halves (no file written twice); then both see every sample."""
    cfg = tiny_config(dataset_copy, tmp_path / "run")
    written = []
    from trainer.data import cache as cache_module

    save = cache_module._save_atomic

    def recording(tensors, path):
        written.append(path)
        save(tensors, path)

    cache_module._save_atomic = recording
    try:
        rank1 = build_caches(cfg, torch.device("cpu"), show_progress=False, rank=1, world_size=2)
        rank0 = build_caches(cfg, torch.device("cpu"), show_progress=False, rank=0, world_size=2)
    finally:
        cache_module._save_atomic = save
    assert len(written) == len(set(written))  # no entry written by both
    assert (rank1.built_latents, rank1.built_texts, rank0.built_latents, rank0.built_texts) == (4, 4, 4, 4)
    assert len(rank1.samples[0]) == 4 and len(rank0.samples[0]) == 8  # without a barrier rank 1 saw only its half
