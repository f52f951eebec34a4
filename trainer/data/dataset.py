"""Cached samples as a torch Dataset, and the batch sampler: same-bucket batches, datasets mixed by sampling_weight,
repeats, caption dropout; resumable at any batch and split across processes by whole batches."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from trainer.config.schema import WanforgeConfig
from trainer.data.buckets import BatchPlan, plan_batches, report_lines, step_problems
from trainer.data.cache import Sample
from trainer.errors import UserError, is_disk_full


def load_latents(path: Path) -> dict[str, torch.Tensor]:
    """A latent entry's training tensors: `latents`, and for VACE `vace_context` with the reference latents put in
    front of the clip's (trainer.data.vace_inputs.training_latents), as float32."""
    from safetensors import safe_open

    from trainer.data.vace_inputs import VACE_KEY, training_latents

    with safe_open(str(path), framework="pt") as f:
        item = {"latents": f.get_tensor("latents").float()}
        if VACE_KEY in f.keys():
            item[VACE_KEY] = f.get_tensor(VACE_KEY).float()
            item["latents"] = training_latents(item["latents"], item[VACE_KEY])
    return item


class CachedDataset(torch.utils.data.Dataset):
    """Item i < N is samples[i]; with empty_text_path, item N + i is samples[i] with the empty caption (dropout)."""

    def __init__(self, samples: list[Sample], empty_text_path: Path | None = None):
        self.unique = len(samples)
        self.empty_text_path = empty_text_path
        self.samples = list(samples) + (list(samples) if empty_text_path is not None else [])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        s = self.samples[index]
        text = self.empty_text_path if index >= self.unique else s.text_path
        item = {**read_entry(s.latent_path, load_latents), "text": read_entry(text)["embeds"]}
        for path in s.extra.values():  # more cached tensors per sample (e.g. conditioning), batched by Collate
            item.update(read_entry(path))
        return item


def read_entry(path: Path, reader=None) -> dict[str, torch.Tensor]:
    """One cache entry (through `reader`, default safetensors' load_file); one damaged since the run checked it is
    named (deleting it makes the next run build it again)."""
    try:
        return reader(path) if reader is not None else load_file(str(path))
    except Exception as err:  # safetensors' own error types, or a vanished file
        if is_disk_full(err):
            raise
        raise UserError(f"cache entry {path} is damaged ({err.__class__.__name__}: {str(err)[:120]}): delete it and "
                        "run again with --resume latest (it is built again)") from None


def pad_text(embeds: list[torch.Tensor], max_length: int) -> torch.Tensor:
    """Zero-pad UMT5 embeddings to max_length, exactly as WanPipeline pads its prompt embeddings."""
    out = embeds[0].new_zeros(len(embeds), max_length, embeds[0].shape[-1])
    for i, e in enumerate(embeds):
        n = min(len(e), max_length)
        out[i, :n] = e[:n]
    return out


class Collate:
    """Text is zero-padded to text_max_length; every other tensor is stacked (one bucket: one shape)."""

    def __init__(self, text_max_length: int):
        self.text_max_length = text_max_length

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        out = {"text": pad_text([it["text"] for it in items], self.text_max_length)}
        for key in items[0]:
            if key != "text":
                out[key] = torch.stack([it[key] for it in items])
        return out


@dataclass
class DatasetStream:
    buckets: dict[str, list[int]]  # bucket key -> indices into the dataset's samples
    repeats: int
    weight: float
    caption_dropout: float


def _seeded(*parts: int) -> torch.Generator:
    seed = 0
    for p in parts:
        seed = (seed * 1_000_003 + p) % (2**63)
    return torch.Generator().manual_seed(seed)


class BucketBatchSampler(torch.utils.data.Sampler[list[int]]):
    """An endless stream of batches, each from one bucket of one dataset.

    Global batch b: its dataset is drawn by sampling_weight (seeded by b); it is that dataset's next batch, where
    a dataset's epoch is every bucket's samples x repeats, shuffled, cut into whole batches, the batches shuffled.
    Everything is a pure function of (seed, b), so starting at `start_batch` reproduces an uninterrupted run.
    Rank r of world_size takes global batches r, r + world_size, ...: whole same-shape batches on every rank.
    """

    CHOICE_CHUNK = 4096

    def __init__(self, streams: list[DatasetStream], batch_size: int, seed: int, num_samples: int,
                 start_batch: int = 0, rank: int = 0, world_size: int = 1):
        self.streams, self.batch_size, self.seed, self.num_samples = streams, batch_size, seed, num_samples
        self.start_batch, self.rank, self.world_size = start_batch, rank, world_size
        self.weights = torch.tensor([s.weight if self._epoch_size(s) else 0.0 for s in streams], dtype=torch.float64)
        if self.weights.sum() <= 0:
            raise ValueError("no dataset holds a whole batch")
        self._epochs: dict[int, tuple[int, list[list[int]]]] = {}

    def _epoch_size(self, s: DatasetStream) -> int:
        return sum(len(v) * s.repeats // self.batch_size for v in s.buckets.values())

    def _epoch(self, d: int, epoch: int) -> list[list[int]]:
        cached = self._epochs.get(d)
        if cached is not None and cached[0] == epoch:
            return cached[1]
        s = self.streams[d]
        g = _seeded(self.seed, d, epoch)
        batches = []
        for key in sorted(s.buckets):
            items = s.buckets[key] * s.repeats
            order = torch.randperm(len(items), generator=g).tolist()
            whole = len(items) // self.batch_size * self.batch_size
            batches += [[items[i] for i in order[j : j + self.batch_size]] for j in range(0, whole, self.batch_size)]
        batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        self._epochs[d] = (epoch, batches)
        return batches

    def _choices(self, chunk: int) -> list[int]:
        if len(self.streams) == 1:
            return [0] * self.CHOICE_CHUNK
        g = _seeded(self.seed, 7919, chunk)
        return torch.multinomial(self.weights, self.CHOICE_CHUNK, replacement=True, generator=g).tolist()

    def _batch(self, b: int, d: int, k: int) -> list[int]:
        epoch, j = divmod(k, self._epoch_size(self.streams[d]))
        batch = self._epoch(d, epoch)[j]
        p = self.streams[d].caption_dropout
        if p > 0:
            drop = torch.rand(len(batch), generator=_seeded(self.seed, 104729, b)).tolist()
            batch = [i + self.num_samples if u < p else i for i, u in zip(batch, drop)]
        return batch

    def __iter__(self) -> Iterator[list[int]]:
        counts = [0] * len(self.streams)  # batches each dataset has given before global batch b
        first = self.start_batch * self.world_size + self.rank
        b, chunk = 0, 0
        while True:
            for d in self._choices(chunk):
                if b >= first and (b - self.rank) % self.world_size == 0:
                    yield self._batch(b, d, counts[d])
                counts[d] += 1
                b += 1
            chunk += 1


@dataclass
class TrainingData:
    """The samples to train on, how they batch, and the bucket report; a dataset too small to train is a UserError."""

    samples: list[Sample]
    streams: list[DatasetStream]
    plan: BatchPlan
    report: list[str]
    batch_size: int
    empty_text_path: Path | None

    @classmethod
    def build(cls, cfg: WanforgeConfig, per_dataset: list[list[Sample]], skipped: list[tuple[Path, str]] = (),
              num_processes: int = 1, empty_text_path: Path | None = None) -> TrainingData:
        batch = cfg.train.train_batch_size
        samples, streams, keys = [], [], {}
        for d, ds_samples in enumerate(per_dataset):
            ds = cfg.datasets[d]
            if ds.disabled or not ds_samples:
                continue
            buckets: dict[str, list[int]] = {}
            for s in ds_samples:
                buckets.setdefault(s.bucket, []).append(len(samples))
                samples.append(s)
            streams.append(DatasetStream(buckets, ds.repeats, ds.sampling_weight, ds.caption_dropout_probability))
            keys[d] = [s.bucket for s in ds_samples]
        plan = plan_batches(keys, {d: cfg.datasets[d].repeats for d in keys}, batch)
        names = [f"datasets[{d}] ({ds.name})" for d, ds in enumerate(cfg.datasets)]
        report = report_lines(names, plan, [(str(p), why) for p, why in skipped], batch)
        needed = cfg.train.gradient_accumulation_steps * num_processes  # whole batches in one optimizer step
        problems = step_problems(plan, names, {d: cfg.datasets[d].repeats for d in keys}, batch, needed)
        if problems:
            raise UserError("\n".join(problems))
        return cls(samples, streams, plan, report, batch, empty_text_path)

    def dataset(self) -> CachedDataset:
        return CachedDataset(self.samples, self.empty_text_path)

    def batch_sampler(self, seed: int, start_batch: int = 0, rank: int = 0, world_size: int = 1) -> BucketBatchSampler:
        return BucketBatchSampler(self.streams, self.batch_size, seed, len(self.samples), start_batch, rank, world_size)
