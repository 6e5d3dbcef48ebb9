"""Whether the Hugging Face hub can be reached: probed once per process, no heavy imports."""

import functools
import logging
import os
import socket

logger = logging.getLogger("lens_compare")

HUB_HOST = ("huggingface.co", 443)


@functools.cache
def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether huggingface.co answers (False under ``HF_HUB_OFFLINE``, without a probe). When it
    does not, hub ids are read from the local Hugging Face cache only, at once, instead of
    transformers' retries (about 30 s per file)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    try:
        socket.create_connection(HUB_HOST, timeout=timeout_s).close()
    except OSError:
        logger.info("huggingface.co cannot be reached: hub ids are read from the local cache only")
        return False
    return True
