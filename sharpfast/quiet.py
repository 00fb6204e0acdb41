"""Warnings that say nothing about the user's work, filtered where they arise (one place).

transformers warns, once per process on importing diffusers' Stable Diffusion pipelines, that
its CLIP / SigLIP image processors "require torchvision (not installed); falling back to ...Pil".
Those processors serve the safety checker and IP-adapters, which the bundled pipelines do not
have, so the line is noise before every script's own output. Only that message is dropped.
"""
from __future__ import annotations

import logging

_DROPPED = "requires torchvision (not installed); falling back to"


class _DropFallbackNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _DROPPED not in record.getMessage()


def quiet_image_processor_notice() -> None:
    """Attach the filter to transformers' own handlers (idempotent; nothing if it is absent)."""
    try:
        import transformers.utils.logging as tlog
    except ImportError:
        return
    tlog.get_logger()  # makes sure transformers' root handler exists
    for handler in logging.getLogger("transformers").handlers:
        if not any(isinstance(f, _DropFallbackNotice) for f in handler.filters):
            handler.addFilter(_DropFallbackNotice())
