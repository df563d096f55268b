"""Where a rank runs: its host's name and its MLX device, as ``sharding`` reports them."""

from __future__ import annotations

import os
import socket


def hostname() -> str:
    return socket.gethostname()


def device_name() -> str:
    """``cpu``, or ``gpu:N`` with N as ``CUDA_VISIBLE_DEVICES`` names this rank's GPU."""
    import mlx.core as mx

    if mx.default_device().type == mx.DeviceType.gpu:
        return f"gpu:{os.environ.get('CUDA_VISIBLE_DEVICES') or 0}"
    return "cpu"
