"""Bucket sizes from the pixel target and aspect, frame buckets, and the batch sampler (one shape per batch)."""

import itertools
from collections import Counter
from pathlib import Path

import pytest
import torch

from trainer.config.data import DatasetConfig
from trainer.data.buckets import Bucket, frame_size, plan_batches, step_problems
from trainer.data.dataset import BucketBatchSampler, DatasetStream
from trainer.flavours import FLAVOURS

WAN = FLAVOURS["t2v-480p-1.3b-2.1"]


def ds(**kw) -> DatasetConfig:
    return DatasetConfig(path=Path("x"), **kw)


@pytest.mark.parametrize(
    "source, expected",
    [
        ((1920, 1080), (832, 480)),  # 16:9 at the Wan 480p area is the native 832x480
        ((1080, 1920), (480, 832)),
        ((1000, 1000), (624, 624)),
        ((640, 480), (736, 544)),  # 4:3
        ((2560, 1080), (960, 416)),  # 21:9
        ((1850, 1000), (832, 480)),  # 1.85 snaps to 16:9
    ],
)
def test_aspect_buckets_at_the_pixel_area_target(source, expected):
    assert frame_size(ds(), WAN, *source) == expected


def test_every_size_is_a_multiple_of_16_near_the_target_area():
    area = 832 * 480
    for w, h in itertools.product(range(200, 3000, 137), range(200, 3000, 151)):
        for strategy in ("aspect_ratio", "resolution_frames"):
            bw, bh = frame_size(ds(bucket_strategy=strategy), WAN, w, h)
            assert bw % 16 == 0 and bh % 16 == 0
            assert 0.85 * area < bw * bh < 1.15 * area, (w, h, bw, bh)


def test_resolution_frames_keeps_the_aspect_and_ti2v_uses_32():
    assert frame_size(ds(bucket_strategy="resolution_frames"), WAN, 1850, 1000) == (864, 464)  # 1.86, not 16:9
    w, h = frame_size(ds(), FLAVOURS["ti2v-5b-2.2"], 1920, 1080)
    assert (w, h) == (1280, 704) and w % 32 == 0 and h % 32 == 0  # the Wan 2.2 VAE is 16x: sizes step by 32


def test_resolution_types_and_fixed_sizes():
    assert frame_size(ds(resolution=480, resolution_type="pixel"), WAN, 1920, 1080) == (848, 480)  # shorter edge
    assert frame_size(ds(resolution=480, resolution_type="pixel"), WAN, 1080, 1920) == (480, 848)
    w, h = frame_size(ds(resolution=0.25, resolution_type="area"), WAN, 1000, 1000)
    assert (w, h) == (496, 496)  # 0.25 megapixels
    assert frame_size(ds(resolution=512), WAN, 1000, 1000) == (512, 512)  # pixel_area: side of the square
    assert frame_size(ds(crop_aspect="square"), WAN, 1920, 1080) == (624, 624)
    assert frame_size(ds(width=320, height=192), WAN, 1920, 1080) == (320, 192)


def test_too_small_dataset_names_the_repeats_that_fix_it():
    plan = plan_batches({0: ["64x64@9"] * 3}, {0: 1}, batch_size=2)
    assert plan.batches[0] == {"64x64@9": 1}
    [problem] = step_problems(plan, ["datasets[0] (clips)"], {0: 1}, batch_size=2, needed=4)
    assert "holds 3 samples" in problem and "raise datasets.repeats (datasets[0].repeats = 3)" in problem
    plan = plan_batches({0: ["64x64@9"] * 3}, {0: 3}, batch_size=2)  # 9 samples: 4 batches
    assert step_problems(plan, ["d"], {0: 3}, batch_size=2, needed=4) == []
    odd = plan_batches({0: ["64x64@9", "64x64@9", "96x48@9"]}, {0: 1}, batch_size=2)
    assert odd.dropped == [(0, "96x48@9", 1)]  # a bucket with less than one batch is reported, not trained


def streams() -> list[DatasetStream]:
    return [
        DatasetStream({"64x64@9": [0, 1, 2, 3, 4], "96x48@9": [5, 6, 7], "64x64@1": [8, 9]}, 2, 3.0, 0.0),
        DatasetStream({"48x96@9": [10, 11, 12, 13]}, 1, 1.0, 0.5),
    ]


def shapes(batch, n=14):
    index_bucket = {}
    for s in streams():
        for key, idx in s.buckets.items():
            index_bucket.update({i: key for i in idx})
    return {index_bucket[i % n] for i in batch}


def test_batches_never_mix_shapes_and_resume_exactly():
    full = list(itertools.islice(iter(BucketBatchSampler(streams(), 2, seed=3, num_samples=14)), 400))
    assert all(len(b) == 2 and len(shapes(b)) == 1 for b in full)
    later = list(itertools.islice(iter(BucketBatchSampler(streams(), 2, seed=3, num_samples=14, start_batch=123)), 50))
    assert later == full[123:173]
    other_seed = list(itertools.islice(iter(BucketBatchSampler(streams(), 2, seed=4, num_samples=14)), 400))
    assert other_seed != full


def test_ranks_take_whole_batches_of_the_global_stream():
    full = list(itertools.islice(iter(BucketBatchSampler(streams(), 2, seed=3, num_samples=14)), 300))
    ranks = [list(itertools.islice(iter(BucketBatchSampler(streams(), 2, 3, 14, start_batch=10, rank=r, world_size=3)), 90))
             for r in range(3)]
    for r in range(3):
        assert ranks[r] == full[30 + r :: 3][:90]


def test_weights_repeats_and_caption_dropout():
    batches = list(itertools.islice(iter(BucketBatchSampler(streams(), 2, seed=0, num_samples=14)), 4000))
    from_second = sum(1 for b in batches if shapes(b) == {"48x96@9"})
    assert 0.2 < from_second / len(batches) < 0.3  # weights 3 : 1
    first = [i % 14 for b in batches if shapes(b) != {"48x96@9"} for i in b]
    seen = Counter(first)
    assert set(seen) == set(range(10))  # every sample of the first dataset, images (64x64@1) included
    dropped = [i for b in batches for i in b if i >= 14]
    assert all(10 <= i - 14 <= 13 for i in dropped)  # only the dataset with caption_dropout_probability
    second_items = sum(len(b) for b in batches if shapes(b) == {"48x96@9"})
    assert 0.4 < len(dropped) / second_items < 0.6


def test_bucket_key_round_trip():
    assert Bucket.parse("832x480@81") == Bucket(832, 480, 81) and Bucket(832, 480, 81).key == "832x480@81"


def test_dropped_captions_load_the_empty_caption(tmp_path):
    from safetensors.torch import save_file

    from trainer.data.cache import Sample
    from trainer.data.dataset import CachedDataset, Collate

    save_file({"latents": torch.ones(16, 3, 2, 2)}, str(tmp_path / "z.safetensors"))
    save_file({"embeds": torch.full((5, 4), 2.0)}, str(tmp_path / "t.safetensors"))
    save_file({"embeds": torch.full((1, 4), -1.0)}, str(tmp_path / "empty.safetensors"))
    save_file({"condition": torch.zeros(20, 3, 2, 2)}, str(tmp_path / "c.safetensors"))
    sample = Sample(tmp_path / "z.safetensors", tmp_path / "t.safetensors", "cap", tmp_path / "v.mp4", "32x32@9", 0,
                    {"condition": tmp_path / "c.safetensors"})
    data = CachedDataset([sample], empty_text_path=tmp_path / "empty.safetensors")
    assert len(data) == 2 and data.samples[1] is sample
    batch = Collate(8)([data[0], data[1]])
    assert batch["text"][0, :5].eq(2).all() and batch["text"][1, 0].eq(-1).all() and batch["text"][1, 1:].eq(0).all()
    assert batch["latents"].shape == (2, 16, 3, 2, 2) and batch["condition"].shape == (2, 20, 3, 2, 2)
