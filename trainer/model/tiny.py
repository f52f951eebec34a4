"""A tiny random-initialised Wan saved in the diffusers layout, so CPU trials and tests run the real loading code.

The classes are the real ones (WanTransformer3DModel, AutoencoderKLWan, UMT5EncoderModel, a byte-level tokenizer
built locally, CLIPVisionModel for Wan 2.1 I2V); only the sizes are small. One folder per architecture: Wan 2.1
T2V, Wan 2.1 I2V (36 input channels + CLIP), Wan 2.2 T2V / I2V A14B (`transformer` = high-noise expert,
`transformer_2` = low-noise expert, boundary_ratio in model_index.json) and TI2V-5B (the Wan 2.2 VAE layout:
48 channels, 16x spatial; expand_timesteps), and VACE (WanVACETransformer3DModel, a VACE block beside each of the two
main blocks; Wan 2.1, and the Wan 2.2 two-expert layout of VACE-Fun). The build is seeded, so every machine gets the
same weights.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

TINY_VERSION = "v3"  # v3: rotary positions for any size (rope_max_seq_len 1024, as the real Wan)
TEXT_DIM = 32
TINY_NUM_LAYERS = 2  # transformer blocks of every tiny model (preflight resolves block indices against it)
TINY_ROPE_MAX_SEQ_LEN = 1024  # rotary positions per axis (diffusers' default, the real Wan's; preflight checks sizes)
CLIP_DIM = 32
# one tiny pipeline folder per architecture; flavours name theirs in Flavour.tiny
TINY_VARIANTS = ("t2v-2.1", "i2v-2.1", "t2v-2.2", "i2v-2.2", "ti2v", "vace-2.1", "vace-2.2")
TINY_VACE_LAYERS = [0, 1]  # both main blocks of a tiny VACE model get a VACE block's hint


def wanforge_home() -> Path:
    return Path(os.environ.get("WANFORGE_HOME", Path.home() / ".cache" / "wanforge"))


def tiny_model_dir(variant: str = "t2v-2.1") -> Path:
    if variant not in TINY_VARIANTS:
        raise ValueError(f"unknown tiny model {variant!r}: one of {TINY_VARIANTS}")
    return wanforge_home() / f"tiny-wan-{variant}-{TINY_VERSION}"


def build_tokenizer():
    """Byte-level BPE with no merges: every text (any script) tokenises, nothing to download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(specials + byte_chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )


def tiny_transformer_config(in_channels: int, out_channels: int, image_dim: int | None = None) -> dict:
    """The tiny transformer's WanTransformer3DModel arguments (torch-free: preflight reads them when the model is not
    built yet)."""
    return dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=in_channels,
        out_channels=out_channels, text_dim=TEXT_DIM, freq_dim=64, ffn_dim=64, num_layers=TINY_NUM_LAYERS, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=TINY_ROPE_MAX_SEQ_LEN, image_dim=image_dim,
        added_kv_proj_dim=32 if image_dim is not None else None,
    )


TINY_CHANNELS = {"t2v-2.1": (16, 16, None), "i2v-2.1": (36, 16, CLIP_DIM), "t2v-2.2": (16, 16, None),
                 "i2v-2.2": (36, 16, None), "ti2v": (48, 48, None), "vace-2.1": (16, 16, None),
                 "vace-2.2": (16, 16, None)}  # (in, out, image_dim) of each variant


def tiny_vace_config() -> dict:
    """The tiny VACE transformer's WanVACETransformer3DModel arguments: 96 control channels as the real ones (16
    inactive + 16 reactive latent channels + 8x8 mask channels of the Wan 2.1 VAE's spatial factor)."""
    return {**tiny_transformer_config(16, 16), "vace_layers": list(TINY_VACE_LAYERS), "vace_in_channels": 96}


def _tiny_transformer(in_channels: int, out_channels: int, image_dim: int | None = None):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(**tiny_transformer_config(in_channels, out_channels, image_dim))


def _tiny_vace_transformer():
    from diffusers import WanVACETransformer3DModel

    return WanVACETransformer3DModel(**tiny_vace_config())


def _tiny_vae(wan_2_2: bool):
    """The Wan 2.1 VAE layout (16 channels, 8x) or the Wan 2.2 one (48 channels, 16x = 8x + pixel patch 2)."""
    from diffusers import AutoencoderKLWan

    if not wan_2_2:
        return AutoencoderKLWan(
            base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
        )
    return AutoencoderKLWan(
        base_dim=8, decoder_base_dim=8, z_dim=48, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
        temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12, patch_size=2,
        scale_factor_spatial=16, latents_mean=[0.0] * 48, latents_std=[1.0] * 48,
    )


def demo_transformer():
    """The shipped demo model's transformer (trainer.demo.pretrain): big enough to draw the demo's world, still
    trains a LoRA on a CPU in about a minute."""
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=24, in_channels=16, out_channels=16,
        text_dim=TEXT_DIM, freq_dim=64, ffn_dim=256, num_layers=4, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=TINY_ROPE_MAX_SEQ_LEN,
    )


def demo_vae():
    """The shipped demo model's VAE: the Wan 2.1 layout (16 channels, 8x spatial, 4x temporal), wider than the
    random test VAE so that it reconstructs flat shapes sharply once trained."""
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(
        base_dim=16, z_dim=16, dim_mult=[1, 1, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True]
    )


def text_encoder():
    """The tiny UMT5 every tiny model uses (seed it first: the weights are random)."""
    from transformers import UMT5Config, UMT5EncoderModel

    return UMT5EncoderModel(
        UMT5Config(
            vocab_size=384, d_model=TEXT_DIM, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
            relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        )
    )


def flow_scheduler():
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)


def _tiny_clip():
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    encoder = CLIPVisionModel(
        CLIPVisionConfig(hidden_size=CLIP_DIM, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         image_size=32, patch_size=8, projection_dim=CLIP_DIM)
    )
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return encoder, processor


def build_tiny_model(target: Path, variant: str = "t2v-2.1") -> Path:
    """Build one tiny Wan and save it as a diffusers pipeline folder at `target` (atomically)."""
    import torch
    from diffusers import WanImageToVideoPipeline, WanPipeline, WanVACEPipeline

    torch.manual_seed(0)
    common = dict(tokenizer=build_tokenizer(), text_encoder=text_encoder(), scheduler=flow_scheduler())
    if variant == "t2v-2.1":
        pipe = WanPipeline(vae=_tiny_vae(False), transformer=_tiny_transformer(16, 16), **common)
    elif variant == "t2v-2.2":
        pipe = WanPipeline(vae=_tiny_vae(False), transformer=_tiny_transformer(16, 16),
                           transformer_2=_tiny_transformer(16, 16), boundary_ratio=0.875, **common)
    elif variant == "i2v-2.1":
        encoder, processor = _tiny_clip()
        pipe = WanImageToVideoPipeline(vae=_tiny_vae(False), transformer=_tiny_transformer(36, 16, CLIP_DIM),
                                       image_encoder=encoder, image_processor=processor, **common)
    elif variant == "i2v-2.2":
        pipe = WanImageToVideoPipeline(vae=_tiny_vae(False), transformer=_tiny_transformer(36, 16),
                                       transformer_2=_tiny_transformer(36, 16), boundary_ratio=0.9, **common)
    elif variant == "ti2v":
        pipe = WanPipeline(vae=_tiny_vae(True), transformer=_tiny_transformer(48, 48), expand_timesteps=True, **common)
    elif variant == "vace-2.1":
        pipe = WanVACEPipeline(vae=_tiny_vae(False), transformer=_tiny_vace_transformer(), **common)
    elif variant == "vace-2.2":
        pipe = WanVACEPipeline(vae=_tiny_vae(False), transformer=_tiny_vace_transformer(),
                               transformer_2=_tiny_vace_transformer(), boundary_ratio=0.875, **common)
    else:
        raise ValueError(f"unknown tiny model {variant!r}: one of {TINY_VARIANTS}")
    return save_pipeline(pipe, target)


def save_pipeline(pipe, target: Path) -> Path:
    """save_pretrained into a temporary sibling folder, then one rename: a half-written model is never loaded."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if target.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def ensure_tiny_model(variant: str = "t2v-2.1") -> Path:
    target = tiny_model_dir(variant)
    if not (target / "model_index.json").is_file():
        import torch

        with torch.random.fork_rng():  # building seeds torch: it must not move the RNG of the run that asked for it
            build_tiny_model(target, variant)
    return target
