"""The Wan models wanforge trains, by name. Pure data: importable without torch (the notebook form uses it)."""

from __future__ import annotations

from dataclasses import dataclass

# The negative prompt of the official Wan repository; validation uses it unless the config says otherwise.
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


@dataclass(frozen=True)
class Flavour:
    name: str
    hub_id: str | None  # None: built locally (the tiny test model)
    fps: int  # the frame rate the model was trained at
    width: int
    height: int
    num_frames: int
    flow_shift: float  # validation scheduler shift at the default resolution
    guidance_scale: float
    description: str


FLAVOURS: dict[str, Flavour] = {
    f.name: f
    for f in (
        Flavour(
            name="t2v-480p-1.3b-2.1",
            hub_id="Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
            fps=16,
            width=832,
            height=480,
            num_frames=81,
            flow_shift=5.0,
            guidance_scale=5.0,
            description="Wan 2.1 text-to-video 1.3B (fits a 24 GB card)",
        ),
        Flavour(
            name="t2v-480p-14b-2.1",
            hub_id="Wan-AI/Wan2.1-T2V-14B-Diffusers",
            fps=16,
            width=832,
            height=480,
            num_frames=81,
            flow_shift=5.0,
            guidance_scale=5.0,
            description="Wan 2.1 text-to-video 14B",
        ),
        Flavour(
            name="tiny",
            hub_id=None,
            fps=16,
            width=64,
            height=64,
            num_frames=9,
            flow_shift=3.0,
            guidance_scale=5.0,
            description="random-initialised tiny Wan with the real classes, for CPU trials and tests",
        ),
    )
}

DEFAULT_FLAVOUR = "t2v-480p-1.3b-2.1"


def get_flavour(name: str) -> Flavour:
    return FLAVOURS[name]
