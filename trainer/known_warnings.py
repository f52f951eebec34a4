"""Silence the library warnings that every run printed and that are known to be harmless here, each by its logger and
exact text (anything else those loggers say still shows). Installed by the `wanforge` entry point."""

from __future__ import annotations

import logging

# logger name -> the start of the one message dropped, with why it is harmless for wanforge
KNOWN_HARMLESS = {
    # diffusers says this on every `set_attention_backend`; wanforge always sets the backend explicitly
    # (trainer/model/attention.py) against the diffusers version pinned in constraints.txt.
    "diffusers.models.modeling_utils": "Attention backends are an experimental feature",
    # diffusers' Wan I2V pipeline module imports CLIPImageProcessor; without torchvision (the CPU install has none)
    # transformers hands out the PIL image processor, which gives the same CLIP input for the one frame I2V encodes.
    "transformers.utils.import_utils": "`CLIPImageProcessor` requires torchvision (not installed); falling back",
}


class _DropMessage(logging.Filter):
    def __init__(self, start: str) -> None:
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.start)


def install() -> None:
    """Add the filters (once per logger, however often this is called)."""
    for name, start in KNOWN_HARMLESS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.start == start for f in logger.filters):
            logger.addFilter(_DropMessage(start))
