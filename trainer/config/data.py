"""[[datasets]] and [cache]: where the clips are, the size they train at, and where their latents are kept."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from trainer.config.section import Section, not_empty

_log = logging.getLogger(__name__)


def four_k_plus_one(frames: int) -> int:
    """The frame count the Wan VAE takes (4k+1) nearest to `frames`, the smaller one on a tie (84 -> 85, 83 -> 81).
    The one rounding rule of the schema and the SimpleTuner importer."""
    return max(1, frames // 4 * 4 + 1)


class DatasetConfig(Section):
    """One [[datasets]] table. Names follow SimpleTuner's multidatabackend.json where they are clear."""

    # ---- where the samples come from
    id: str | None = Field(None, description="Name in reports and logs (default: the folder's name).")
    path: Path = Field(
        description="Folder of videos (mp4/mov/webm/mkv/avi) and images (png/jpg/webp, one-frame samples); "
        "with hf_repo: the folder the Hub dataset is downloaded into."
    )
    hf_repo: str | None = Field(
        None, description='Hugging Face dataset repo id ("user/name"), downloaded into `path` with huggingface_hub.'
    )
    hf_revision: str | None = Field(None, description="Branch, tag or commit of hf_repo (default: main).")
    disabled: bool = Field(False, description="Leave this dataset out (its caches are kept).")
    repeats: int = Field(
        1, ge=1, description="How many times each sample is seen per epoch (SimpleTuner's repeats=N is N+1 here)."
    )
    sampling_weight: float = Field(
        1.0, gt=0, description="Relative chance that a batch comes from this dataset (SimpleTuner's probability)."
    )
    # ---- captions
    caption_strategy: Literal["textfile", "metadata", "filename", "instanceprompt"] = Field(
        "textfile",
        description="textfile: same-stem caption file; metadata: metadata.jsonl/.csv rows (file_name + caption "
        "column); filename: the file name with _ and - as spaces; instanceprompt: instance_prompt for every sample.",
    )
    caption_extension: str = Field(".txt", description="textfile: caption files sit beside each sample with this extension.")
    metadata_file: str | None = Field(
        None, description="metadata: file inside the folder (default: metadata.jsonl, else metadata.csv)."
    )
    caption_column: str = Field("caption", description="metadata: the column holding the caption (file column: file_name).")
    instance_prompt: str | None = Field(
        None, description="instanceprompt: the caption of every sample; other strategies: used where a caption is missing."
    )
    caption_dropout_probability: float = Field(
        0.0, ge=0.0, lt=1.0, description="Chance a sample trains with the empty caption (0.05-0.1 helps guidance)."
    )
    # ---- frame size and buckets
    resolution: float | None = Field(
        None,
        description="Target size in resolution_type units (default: the flavour's area, 832x480 for Wan 2.1 480p). "
        "Ignored when width and height are both set.",
    )
    resolution_type: Literal["pixel_area", "pixel", "area"] = Field(
        "pixel_area",
        description="pixel_area: resolution is the side of a square of the target area (632 ~ 832x480); "
        "pixel: the shorter edge in pixels; area: megapixels.",
    )
    width: int | None = Field(None, description="With height: one fixed sample size (multiple of 16) instead of buckets.")
    height: int | None = Field(None, description="With width: one fixed sample size (multiple of 16) instead of buckets.")
    bucket_strategy: Literal["aspect_ratio", "resolution_frames"] = Field(
        "aspect_ratio",
        description="aspect_ratio: sizes snap to common aspect ratios (fewer, fuller buckets); resolution_frames: "
        "each sample keeps its own aspect rounded to 16 px, buckets named WxH@F (less cropping, more buckets).",
    )
    crop: bool = Field(True, description="Crop to the bucket's aspect (false: resize to it, a slight stretch).")
    crop_style: Literal["center", "random"] = Field(
        "center", description="Where the crop window sits: centre, or a random place fixed per sample (cached)."
    )
    crop_aspect: Literal["preserve", "square"] = Field(
        "preserve", description="preserve: the bucket nearest the sample's aspect; square: every sample cropped square."
    )
    minimum_image_size: float | None = Field(
        None, description="Skip samples smaller than this (resolution_type units) instead of upscaling them."
    )
    maximum_image_size: float | None = Field(
        None, description="Samples larger than this (resolution_type units) are first downsampled to target_downsample_size."
    )
    target_downsample_size: float | None = Field(
        None, description="With maximum_image_size: the size large samples are scaled to before the bucket-sized crop "
        "(larger than resolution: crops show detail)."
    )
    # ---- frames
    num_frames: int | None = Field(
        None, description="Frames per sample, 4k+1; other values are rounded (default: the flavour's, 81 for Wan 2.1)."
    )
    min_frames: int | None = Field(
        None, ge=1, description="Clips shorter than this (frames at the model's fps) are skipped; clips between "
        "min_frames and num_frames train at their own length (a frame bucket). Default: num_frames.",
    )
    max_frames: int | None = Field(None, ge=1, description="Skip clips longer than this many frames at the model's fps.")
    frame_interval: int = Field(
        4, ge=4, description="Frame buckets step: shorter clips use 1 + a multiple of this many frames (multiple of 4)."
    )
    target_fps: float | None = Field(
        None, gt=0, description="Clips are resampled to this frame rate by timestamps (default: the model's, 16 for Wan 2.1)."
    )
    window_start: Literal["beginning", "random"] = Field(
        "beginning", description="Where the frames of a longer clip start: at 0 s, or a random time fixed per clip (cached)."
    )
    # ---- VACE: the control inputs of each clip (VACE flavours only; docs/models.md "VACE datasets")
    control_path: str | None = Field(
        None, description="VACE: folder of control clips (depth, pose, edges, a masked copy...), one per clip with the "
        "clip's file stem (any video or image extension); relative to path (keep it inside, so it travels with the "
        "dataset) or absolute.",
    )
    mask_path: str | None = Field(
        None, description="VACE, optional: folder of masks by the clip's stem, a video (a mask per frame) or an image "
        "(the same mask on every frame): white = the region to generate, black = kept from the control clip.",
    )
    reference_path: str | None = Field(
        None, description="VACE, optional: folder of reference images by the clip's stem: <stem>.png, several as "
        "<stem>_1.png, <stem>_2.png, ..., or a <stem>/ folder of images (any image extension).",
    )
    control_pairing: Literal["stem", "metadata"] = Field(
        "stem", description='VACE: "stem" pairs files by the clip\'s stem in control_path / mask_path / '
        'reference_path; "metadata" reads them from the metadata table (metadata_file, default metadata.jsonl or '
        '.csv): columns "control", "mask", "reference" with paths relative to path (several references: a JSON list, '
        'or separated by "|" in a CSV).',
    )
    # ---- problems and caches
    delete_problematic: bool = Field(
        False, description="Move unusable files (with their captions) to <path>/.quarantine/ instead of only listing them."
    )
    cache_dir: Path | None = Field(None, description="Latent cache folder (default: <path>/.wanforge_cache). SimpleTuner: cache_dir_vae.")
    text_cache_dir: Path | None = Field(None, description="Text-embedding cache folder (default: <cache_dir>/text).")

    @property
    def name(self) -> str:
        return self.id or self.path.name

    @field_validator("path", mode="before")
    @classmethod
    def _path_given(cls, v: Any) -> Any:
        return not_empty(v, "the folder of clips and captions")

    @field_validator("instance_prompt", mode="before")
    @classmethod
    def _trigger_given(cls, v: Any, info: ValidationInfo) -> Any:
        if isinstance(v, str) and not v.strip() and info.data.get("caption_strategy") == "instanceprompt":
            raise ValueError('is empty, and caption_strategy "instanceprompt" captions every sample with it: give '
                             'the trigger words, e.g. instance_prompt = "sks toy"')
        return v

    @field_validator("num_frames")
    @classmethod
    def _four_k_plus_one(cls, v: int | None) -> int | None:
        if v is None:
            return v
        if v < 1:
            raise ValueError("must be 1 or more, 4k+1 (1, 5, ..., 81)")
        rounded = four_k_plus_one(v)
        if rounded != v:
            _log.warning("num_frames=%d is not 4k+1 (the Wan VAE packs 4 frames into one): using %d", v, rounded)
        return rounded

    @field_validator("frame_interval")
    @classmethod
    def _multiple_of_4(cls, v: int) -> int:
        if v % 4:
            raise ValueError(f"must be a multiple of 4 (frame counts are 4k+1): try {v // 4 * 4 or 4} or {v // 4 * 4 + 4}")
        return v

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_16(cls, v: int | None) -> int | None:
        if v is not None and (v <= 0 or v % 16 != 0):
            lower = max(16, v // 16 * 16)
            raise ValueError(f"must be a positive multiple of 16 (VAE 8x and patch 2x): try {lower} or {lower + 16}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> DatasetConfig:
        if (self.width is None) != (self.height is None):
            raise ValueError("set both width and height (one fixed size), or neither (buckets from resolution)")
        if self.caption_strategy == "instanceprompt" and not self.instance_prompt:
            raise ValueError('caption_strategy "instanceprompt" needs instance_prompt = "your trigger words"')
        if (self.maximum_image_size is None) != (self.target_downsample_size is None):
            raise ValueError("maximum_image_size and target_downsample_size go together: set both or neither")
        if self.hf_repo is not None and self.hf_repo.count("/") != 1:
            raise ValueError('hf_repo must look like "user/name"')
        if self.control_pairing == "metadata" and any((self.control_path, self.mask_path, self.reference_path)):
            raise ValueError('control_pairing = "metadata" reads the control, mask and reference files from the metadata '
                             'table: remove control_path / mask_path / reference_path, or use control_pairing = "stem"')
        return self

    @property
    def has_control(self) -> bool:
        """The dataset names control clips (VACE): a control folder, or pairing through the metadata table."""
        return self.control_path is not None or self.control_pairing == "metadata"


class CacheConfig(Section):
    """How the latent and text caches are built (where they go is per dataset: cache_dir, text_cache_dir)."""

    vae_batch_size: int = Field(
        1, ge=1, description="Clips of one bucket VAE-encoded together (1 suits 81-frame clips; more helps images)."
    )
    decode_workers: int = Field(2, ge=0, description="Threads decoding clips ahead of the VAE (0: decode inline).")
    vae_dtype: Literal["bfloat16", "float32"] = Field(
        "bfloat16", description="VAE precision for caching latents on a GPU: bfloat16 is faster, float32 a little more "
        "exact (the choice does not invalidate a cache); float32 on a CPU either way."
    )
    compress_latents: bool = Field(
        False, description="Store latents as bfloat16: half the disk and RAM (its rounding is far below the VAE's own error)."
    )
