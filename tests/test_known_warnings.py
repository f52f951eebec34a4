"""The library warnings every run printed are gone, by exact text only: other messages of the same loggers still show."""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
from pathlib import Path

from trainer import known_warnings

ROOT = Path(__file__).resolve().parent.parent
I2V_IMPORT = "import diffusers; diffusers.WanImageToVideoPipeline"


def _stderr(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_attention_backend_warning_is_dropped_and_others_kept(capfd):
    from diffusers import WanTransformer3DModel

    known_warnings.install()
    known_warnings.install()  # idempotent
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                  out_channels=4, text_dim=16, freq_dim=16, ffn_dim=16, num_layers=1, rope_max_seq_len=32)
    model.set_attention_backend("native")
    logging.getLogger("diffusers.models.modeling_utils").warning("something else")  # diffusers' handler: stderr
    err = capfd.readouterr().err
    assert "experimental feature" not in err and "something else" in err


def test_clip_processor_fallback_warning_is_dropped():
    silenced = _stderr(f"from trainer import known_warnings; known_warnings.install(); {I2V_IMPORT}")
    assert "requires torchvision" not in silenced
    if importlib.util.find_spec("torchvision") is None:  # the warning exists only without torchvision
        assert "requires torchvision" in _stderr(I2V_IMPORT)
