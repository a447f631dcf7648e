"""Writing generation results: image grids and strips (PNG), depth maps (PNG), turntables (MP4)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..metrics.grids import _to_uint8, save_png


def tile(images: torch.Tensor) -> np.ndarray:
    """uint8 (R*H, C*W, 3) of images (R, C, 3, H, W) in [-1, 1]: row r, column c = images[r, c]."""
    if images.ndim != 5 or images.shape[2] != 3:
        raise ValueError(f"images: expected (rows, columns, 3, H, W), got {tuple(images.shape)}")
    rows, cols, _, h, w = images.shape
    pixels = _to_uint8(images.reshape(rows * cols, 3, h, w)).reshape(rows, cols, h, w, 3)
    return pixels.permute(0, 2, 1, 3, 4).reshape(rows * h, cols * w, 3).numpy()


def depth_to_gray(depth: torch.Tensor, alpha: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """(B,r,r) uint8 depth maps: near = bright, far = dark, each image stretched over the depth range of
    its own foreground (alpha > threshold), background 0. An image with no foreground pixel (an early,
    mostly transparent generator) is stretched over all its pixels. ``depth``/``alpha``: (B,1,r,r)."""
    if depth.shape != alpha.shape or depth.ndim != 4 or depth.shape[1] != 1:
        raise ValueError(f"depth {tuple(depth.shape)} and alpha {tuple(alpha.shape)}: expected both (B,1,r,r)")
    d, fg = depth[:, 0].detach().float().cpu(), alpha[:, 0].detach().float().cpu() > threshold
    out = torch.zeros(d.shape, dtype=torch.uint8)
    for k in range(d.shape[0]):
        keep = fg[k] if fg[k].any() else torch.ones_like(fg[k])
        values = d[k][keep]
        near, far = values.min(), values.max()
        scaled = (far - d[k]) / (far - near).clamp_min(1e-6)  # 1 at the nearest kept point
        out[k] = torch.where(keep, (scaled.clamp(0, 1) * 215 + 40).round(), torch.zeros(())).to(torch.uint8)
    return out


def tile_gray(maps: torch.Tensor) -> np.ndarray:
    """uint8 (R*H, C*W) of grayscale maps (R, C, H, W)."""
    rows, cols, h, w = maps.shape
    return maps.permute(0, 2, 1, 3).reshape(rows * h, cols * w).numpy()


def write_png(path: str | Path, array: np.ndarray) -> Path:
    save_png(path, array)
    return Path(path)


def video_encoder_missing() -> str | None:
    """Why ``write_video`` cannot write here (imageio's FFMPEG plugin, the imageio-ffmpeg package, is not
    installed), or None when it can."""
    import importlib.util

    if importlib.util.find_spec("imageio_ffmpeg") is None:
        return "imageio's FFMPEG plugin (the imageio-ffmpeg package) is not installed: pip install imageio[ffmpeg]"
    return None


def write_video(path: str | Path, frames: Sequence[np.ndarray], fps: int) -> Path:
    """An H.264 MP4 of uint8 (H,W,3) frames with the ffmpeg binary of imageio-ffmpeg (no network).
    Frames are padded with black to multiples of 16 (the encoder's macro-block size) rather than resized."""
    import imageio.v2 as imageio

    if not frames:
        raise ValueError("write_video: no frames")
    if fps < 1:
        raise ValueError(f"fps={fps}: expected >= 1")
    h, w = frames[0].shape[:2]
    pad = ((0, -h % 16), (0, -w % 16), (0, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Encode under a temporary name beside the target, renamed when complete (never half written).
    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
    with imageio.get_writer(tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264", pixelformat="yuv420p",
                            quality=8, macro_block_size=16, ffmpeg_log_level="error") as writer:
        for frame in frames:
            if frame.shape[:2] != (h, w):
                raise ValueError(f"write_video({path}): frame of shape {frame.shape}, the first was {frames[0].shape}")
            writer.append_data(np.ascontiguousarray(np.pad(frame, pad)))
    tmp.replace(path)
    return path
