"""The model: Wan components and flavours on disk, the LoRA / LyCORIS adapter and its names, and how the transformer is
held in memory (presets, sizing, attention kernels, fp8/int8, offload, sharding, the Wan 2.2 expert pair)."""
