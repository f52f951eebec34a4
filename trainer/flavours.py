"""The Wan models wanforge trains, by name. Pure data: importable without torch (the notebook form, estimates and
importers read it).

Every flavour carries what the rest of the kit needs to know about its model: frame rate, default clip shape,
validation flow shift / guidance, the task (t2v / i2v / ti2v / vace), which VAE, the transformer's input channels and
real shape, and for the Wan 2.2 A14B experts the stage it trains and the boundary between the two experts. VACE
flavours (a control clip, an optional mask and reference images steer the video) also say which main blocks get a
VACE block's hint (`vace_layers`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# The negative prompt of the official Wan repository; validation uses it unless the config says otherwise.
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

# Wan 2.2 A14B: the expert boundary as a fraction of the 1000-step schedule (official configs).
T2V_BOUNDARY = 0.875
I2V_BOUNDARY = 0.900

Task = Literal["t2v", "i2v", "ti2v", "vace"]
Stage = Literal["high", "low"]


@dataclass(frozen=True)
class Flavour:
    name: str
    hub_id: str | None  # None: built locally (the tiny test models, see `tiny`)
    fps: int  # the frame rate the model was trained at
    width: int
    height: int
    num_frames: int
    flow_shift: float  # validation scheduler shift at the default resolution
    guidance_scale: float  # for the high-noise expert on Wan 2.2 A14B
    description: str
    task: Task = "t2v"
    wan_version: Literal["2.1", "2.2"] = "2.1"
    vae: Literal["2.1", "2.2"] = "2.1"  # 2.1: 16 latent channels, 8x spatial; 2.2: 48 channels, 16x spatial
    latent_channels: int = 16
    vae_spatial: int = 8
    in_channels: int = 16  # transformer input: latents (+ 4 mask + 16 condition channels for 14B I2V)
    image_encoder: bool = False  # CLIP ViT-H image tokens (Wan 2.1 I2V only)
    expand_timesteps: bool = False  # per-token timesteps, first latent frame clean (TI2V-5B)
    stage: Stage | None = None  # Wan 2.2 A14B: the expert this flavour trains
    boundary: float | None = None  # Wan 2.2 A14B: high expert for t >= boundary*1000, low expert below
    guidance_scale_low: float | None = None  # Wan 2.2 A14B: guidance of the low-noise expert
    # the transformer's real shape (for estimates and benchmarks; the config on disk is what loads)
    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    tiny: str | None = None  # which locally built tiny model (trainer.model.tiny) stands in for the Hub repo
    vace_layers: tuple[int, ...] = ()  # VACE: the main blocks after which a VACE block's hint is added (one VACE block each)

    @property
    def is_expert(self) -> bool:
        return self.stage is not None

    @property
    def expert_subfolder(self) -> str:
        """diffusers layout: `transformer` is the HIGH-noise expert, `transformer_2` the LOW-noise expert."""
        return "transformer_2" if self.stage == "low" else "transformer"

    @property
    def other_expert_subfolder(self) -> str:
        return "transformer" if self.stage == "low" else "transformer_2"

    @property
    def is_vace(self) -> bool:
        """Trains with a control clip (+ mask, reference images) through diffusers' WanVACETransformer3DModel."""
        return self.task == "vace"

    @property
    def conditioned(self) -> bool:
        """Trains with image conditioning (I2V channels or the TI2V clean first frame)."""
        return self.task in ("i2v", "ti2v")


_14B = dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
_5B = dict(dim=3072, ffn_dim=14336, num_heads=24, num_layers=30)
_VACE_1_3B = tuple(range(0, 30, 2))  # Wan2.1-VACE-1.3B: a VACE block beside every second main block
_VACE_14B = tuple(range(0, 40, 5))  # Wan2.1-VACE-14B and Wan2.2-VACE-Fun-A14B: every fifth
_TI2V = dict(task="ti2v", wan_version="2.2", vae="2.2", latent_channels=48, vae_spatial=16, in_channels=48,
             expand_timesteps=True)


def _expert_pair(prefix: str, hub_id: str | None, task: Task, label: str, **common) -> list[Flavour]:
    """The -high and -low flavours of a Wan 2.2 A14B model (same repo, one expert each)."""
    boundary = I2V_BOUNDARY if task == "i2v" else T2V_BOUNDARY  # VACE-Fun A14B is built on the T2V experts
    side = {"high": f"high-noise (t >= {boundary})", "low": f"low-noise (t < {boundary})"}
    return [
        Flavour(
            name=f"{prefix}-{stage}", hub_id=hub_id, task=task, wan_version="2.2", stage=stage, boundary=boundary,
            in_channels=36 if task == "i2v" else 16, description=f"{label} {side[stage]} expert", **common,
        )
        for stage in ("high", "low")
    ]


FLAVOURS: dict[str, Flavour] = {
    f.name: f
    for f in (
        Flavour(
            name="t2v-480p-1.3b-2.1", hub_id="Wan-AI/Wan2.1-T2V-1.3B-Diffusers", fps=16, width=832, height=480,
            num_frames=81, flow_shift=5.0, guidance_scale=5.0,
            description="Wan 2.1 text-to-video 1.3B (fits a 24 GB card)",
        ),
        Flavour(
            name="t2v-480p-14b-2.1", hub_id="Wan-AI/Wan2.1-T2V-14B-Diffusers", fps=16, width=832, height=480,
            num_frames=81, flow_shift=5.0, guidance_scale=5.0, description="Wan 2.1 text-to-video 14B", **_14B,
        ),
        Flavour(
            name="i2v-480p-14b-2.1", hub_id="Wan-AI/Wan2.1-I2V-14B-480P-Diffusers", fps=16, width=832, height=480,
            num_frames=81, flow_shift=3.0, guidance_scale=5.0, task="i2v", in_channels=36, image_encoder=True,
            description="Wan 2.1 image-to-video 14B, 480p (CLIP image tokens)", **_14B,
        ),
        Flavour(
            name="i2v-720p-14b-2.1", hub_id="Wan-AI/Wan2.1-I2V-14B-720P-Diffusers", fps=16, width=1280, height=720,
            num_frames=81, flow_shift=5.0, guidance_scale=5.0, task="i2v", in_channels=36, image_encoder=True,
            description="Wan 2.1 image-to-video 14B, 720p (CLIP image tokens)", **_14B,
        ),
        *_expert_pair(
            "t2v-14b-2.2", "Wan-AI/Wan2.2-T2V-A14B-Diffusers", "t2v", label="Wan 2.2 text-to-video A14B", fps=16,
            width=1280, height=720, num_frames=81, flow_shift=12.0, guidance_scale=4.0, guidance_scale_low=3.0, **_14B,
        ),
        *_expert_pair(
            "i2v-14b-2.2", "Wan-AI/Wan2.2-I2V-A14B-Diffusers", "i2v", label="Wan 2.2 image-to-video A14B", fps=16,
            width=1280, height=720, num_frames=81, flow_shift=5.0, guidance_scale=3.5, guidance_scale_low=3.5, **_14B,
        ),
        Flavour(
            name="vace-1.3b-2.1", hub_id="Wan-AI/Wan2.1-VACE-1.3B-diffusers", fps=16, width=832, height=480,
            num_frames=81, flow_shift=3.0, guidance_scale=5.0, task="vace", vace_layers=_VACE_1_3B,
            description="Wan 2.1 VACE 1.3B: control clip (depth, pose, edges, masked region) + reference images",
        ),
        Flavour(
            name="vace-14b-2.1", hub_id="Wan-AI/Wan2.1-VACE-14B-diffusers", fps=16, width=832, height=480,
            num_frames=81, flow_shift=3.0, guidance_scale=5.0, task="vace", vace_layers=_VACE_14B,
            description="Wan 2.1 VACE 14B: control clip (depth, pose, edges, masked region) + reference images", **_14B,
        ),
        *_expert_pair(
            "vace-14b-2.2", "linoyts/Wan2.2-VACE-Fun-14B-diffusers", "vace",
            label="Wan 2.2 VACE-Fun A14B (alibaba-pai's, diffusers conversion by the diffusers team)", fps=16,
            width=1280, height=720, num_frames=81, flow_shift=12.0, guidance_scale=4.0, guidance_scale_low=3.0,
            vace_layers=_VACE_14B, **_14B,
        ),
        Flavour(
            name="ti2v-5b-2.2", hub_id="Wan-AI/Wan2.2-TI2V-5B-Diffusers", fps=24, width=1280, height=704,
            num_frames=121, flow_shift=5.0, guidance_scale=5.0,
            description="Wan 2.2 text-image-to-video 5B (Wan 2.2 VAE, 24 fps, first-frame conditioning)", **_TI2V, **_5B,
        ),
        # ---- tiny random models with the real classes, for CPU trials and tests (trainer.model.tiny builds them)
        Flavour(
            name="tiny", hub_id=None, fps=16, width=64, height=64, num_frames=9, flow_shift=3.0, guidance_scale=5.0,
            description="random-initialised tiny Wan with the real classes, for CPU trials and tests", tiny="t2v-2.1",
        ),
        Flavour(
            name="tiny-i2v-2.1", hub_id=None, fps=16, width=64, height=64, num_frames=9, flow_shift=3.0,
            guidance_scale=5.0, task="i2v", in_channels=36, image_encoder=True, tiny="i2v-2.1",
            description="tiny Wan 2.1 image-to-video (CLIP image tokens), for tests",
        ),
        *_expert_pair("tiny-t2v-2.2", None, "t2v", label="tiny Wan 2.2 text-to-video", fps=16, width=64, height=64,
                      num_frames=9, flow_shift=3.0, guidance_scale=4.0, guidance_scale_low=3.0, tiny="t2v-2.2"),
        *_expert_pair("tiny-i2v-2.2", None, "i2v", label="tiny Wan 2.2 image-to-video", fps=16, width=64, height=64,
                      num_frames=9, flow_shift=3.0, guidance_scale=3.5, guidance_scale_low=3.5, tiny="i2v-2.2"),
        Flavour(
            name="tiny-vace-2.1", hub_id=None, fps=16, width=64, height=64, num_frames=9, flow_shift=3.0,
            guidance_scale=5.0, task="vace", vace_layers=(0, 1), tiny="vace-2.1",
            description="tiny Wan 2.1 VACE (control clip, mask, reference images), for CPU trials and tests",
        ),
        *_expert_pair("tiny-vace-2.2", None, "vace", label="tiny Wan 2.2 VACE", fps=16, width=64, height=64,
                      num_frames=9, flow_shift=3.0, guidance_scale=4.0, guidance_scale_low=3.0, vace_layers=(0, 1),
                      tiny="vace-2.2"),
        Flavour(
            name="tiny-ti2v", hub_id=None, fps=24, width=64, height=64, num_frames=9, flow_shift=3.0,
            guidance_scale=5.0, description="tiny Wan 2.2 TI2V (Wan 2.2 VAE layout), for tests", tiny="ti2v", **_TI2V,
        ),
    )
}

# SimpleTuner's `model_flavour` names that differ from ours (the identical ones need no alias).
ALIASES: dict[str, str] = {
    "i2v-14b-2.1": "i2v-480p-14b-2.1",
    "i2v-14b-2.1-480p": "i2v-480p-14b-2.1",
    "i2v-14b-2.1-720p": "i2v-720p-14b-2.1",
}

DEFAULT_FLAVOUR = "t2v-480p-1.3b-2.1"


def resolve_flavour_name(name: str) -> str | None:
    """Our name for a flavour name or a SimpleTuner alias; None if unknown."""
    if name in FLAVOURS:
        return name
    return ALIASES.get(name)


def get_flavour(name: str) -> Flavour:
    resolved = resolve_flavour_name(name)
    if resolved is None:
        raise KeyError(name)
    return FLAVOURS[resolved]


def trained_sizes(flavour: Flavour) -> list[tuple[int, int]]:
    """(width, height) the flavour's model was trained at, landscape (either orientation works): its default, and
    480p and 720p for the Wan 2.1 / 2.2 14B models."""
    sizes = {(flavour.width, flavour.height)}
    if "14b" in flavour.name:
        sizes |= {(832, 480), (1280, 720)}
    return sorted(sizes, key=lambda s: s[0] * s[1])
