"""Save a 4x4 grid of random generator renders (image | raw | depth | alpha per cell) as PNG.

    python -m clipportrait.nn.preview [--preset tiny] [--out /tmp/clipportrait_nn] [--checkpoint G.safetensors]
    python -m clipportrait.nn.preview --preset eg3d_512 --device cuda      # the CUDA path (fused lookup)

A visual sanity check of the volume path: finite values, non-empty alpha, depth that varies
smoothly with the camera. Prints per-output statistics and fails loudly on NaNs or empty frames.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clipportrait.geometry.cameras import sample_ffhq_like
from clipportrait.nn import build_generator, preset


def _to_uint8(x: torch.Tensor, lo: float, hi: float) -> np.ndarray:
    """(C, H, W) in [lo, hi] -> (H, W, 3) uint8; single channels are repeated to grey."""
    x = ((x.float() - lo) / (hi - lo)).clamp(0, 1)
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    return (x.permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)


def render_grid(preset_name: str, out_dir: Path, seed: int = 0, checkpoint: str | None = None,
                device: str = "cpu") -> Path:
    g_cfg, _ = preset(preset_name)
    torch.manual_seed(seed)
    G = build_generator(g_cfg).eval()
    if checkpoint is not None:
        from safetensors.torch import load_file

        G.load_state_dict(load_file(checkpoint))
    n = 16
    z = torch.randn(n, g_cfg.z_dim)
    c = sample_ffhq_like(n, generator=torch.Generator().manual_seed(seed))
    G = G.to(device)
    with torch.no_grad():
        out = {k: v.cpu() for k, v in G(z.to(device), c.to(device), noise_mode="const").items()}
    for key in ("image", "image_raw", "image_depth", "image_alpha"):
        value = out[key]
        if not torch.isfinite(value).all():
            raise RuntimeError(f"{key}: non-finite values in the render")
        print(f"{key:12s} min {value.min():+.3f} max {value.max():+.3f} mean {value.mean():+.3f}")
    alpha_max = out["image_alpha"].flatten(1).max(dim=1).values
    if (alpha_max < 1e-3).any():
        raise RuntimeError(f"empty frames (alpha < 1e-3 everywhere): {torch.nonzero(alpha_max < 1e-3).flatten().tolist()}")
    res = g_cfg.img_resolution
    up = lambda t: torch.nn.functional.interpolate(t, size=(res, res), mode="nearest")  # noqa: E731
    depth = out["image_depth"]
    d_lo, d_hi = float(depth.min()), float(depth.max())
    cells = []
    for i in range(n):
        parts = [
            _to_uint8(out["image"][i], -1, 1),
            _to_uint8(up(out["image_raw"])[i], -1, 1),
            _to_uint8(up(depth)[i], d_hi, d_lo),  # near = bright
            _to_uint8(up(out["image_alpha"])[i], 0, 1),
        ]
        cells.append(np.concatenate(parts, axis=1))
    rows = [np.concatenate(cells[r * 4 : r * 4 + 4], axis=0) for r in range(4)]
    grid = np.concatenate([np.pad(r, ((0, 0), (0, 4), (0, 0)), constant_values=255) for r in rows], axis=1)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"grid_{preset_name}_seed{seed}.png"
    scale = 2 if res < 256 else 1  # small presets are enlarged to be seen
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)
    print(f"wrote {path} (depth range {d_lo:.3f}..{d_hi:.3f})")
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--out", default="/tmp/clipportrait_nn")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", default=None, help="optional safetensors state dict of the generator")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    render_grid(args.preset, Path(args.out), args.seed, args.checkpoint, args.device)


if __name__ == "__main__":
    main()
