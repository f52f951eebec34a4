"""Cached samples as a torch Dataset, and a batch sampler that can start at any batch (for exact resume)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from safetensors.torch import load_file

from trainer.cache import Sample


class CachedDataset(torch.utils.data.Dataset):
    def __init__(self, samples: list[Sample]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        s = self.samples[index]
        return {"latents": load_file(str(s.latent_path))["latents"], "text": load_file(str(s.text_path))["embeds"]}


def pad_text(embeds: list[torch.Tensor], max_length: int) -> torch.Tensor:
    """Zero-pad UMT5 embeddings to max_length, exactly as WanPipeline pads its prompt embeddings."""
    out = embeds[0].new_zeros(len(embeds), max_length, embeds[0].shape[-1])
    for i, e in enumerate(embeds):
        n = min(len(e), max_length)
        out[i, :n] = e[:n]
    return out


class Collate:
    def __init__(self, text_max_length: int):
        self.text_max_length = text_max_length

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {
            "latents": torch.stack([it["latents"] for it in items]),
            "text": pad_text([it["text"] for it in items], self.text_max_length),
        }


class ResumableBatchSampler(torch.utils.data.Sampler[list[int]]):
    """An endless stream of batches: each epoch a fresh seeded permutation, consecutive batches across epochs.

    Batch b is a pure function of (seed, b), so starting at `start_batch` reproduces an uninterrupted run.
    With several processes each rank takes every world_size-th batch of the global stream.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, start_batch: int = 0, rank: int = 0, world_size: int = 1):
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.start_batch, self.rank, self.world_size = start_batch, rank, world_size

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_items)
        if getattr(self, "_perm_epoch", None) != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.num_items, generator=g).tolist(), epoch
        return self._perm[offset]

    def __iter__(self) -> Iterator[list[int]]:
        b = self.start_batch * self.world_size + self.rank
        while True:
            start = b * self.batch_size
            yield [self._index(p) for p in range(start, start + self.batch_size)]
            b += self.world_size
