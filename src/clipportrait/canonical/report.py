"""Quality report of a canonicalisation cache: per-image inversion LPIPS, its histogram, and the
worst and best cases side by side (target | inverted render | canonical render x_hat)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

from ..utils.files import atomic_open, write_json_atomic
from .cache import iter_shards, read_manifest


def summarize(lpips: np.ndarray) -> dict[str, float]:
    """Summary numbers of per-image inversion LPIPS."""
    if lpips.ndim != 1 or lpips.size == 0:
        raise ValueError(f"lpips: expected a non-empty 1-D array, got shape {lpips.shape}")
    return {"images": int(lpips.size), "lpips_mean": float(lpips.mean()), "lpips_median": float(np.median(lpips)),
            "lpips_p90": float(np.quantile(lpips, 0.9)), "lpips_min": float(lpips.min()),
            "lpips_max": float(lpips.max())}


def collect(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    """names, lpips and (when stored) inverted/canonical renders of every shard, concatenated."""
    manifest = read_manifest(directory)
    if manifest.get("embed") != "canonical":
        raise ValueError(f"canonicalisation cache {directory}: embed={manifest.get('embed')!r} has no inversion to report")
    keys = ("names", "lpips", "inverted", "canonical")
    parts: dict[str, list[np.ndarray]] = {}
    for arrays in iter_shards(directory, manifest):
        for key in keys:
            if key in arrays:
                parts.setdefault(key, []).append(arrays[key])
    return {k: np.concatenate(v) for k, v in parts.items()}


def _figure(width: float, height: float):
    # An explicit Agg canvas: no pyplot, no global backend switch in the caller's process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> None:
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png")


def histogram(lpips: np.ndarray, path: Path) -> None:
    fig = _figure(6, 4)
    ax = fig.add_subplot(1, 1, 1)
    ax.hist(lpips, bins=min(50, max(5, lpips.size // 4)), color="#4477aa")
    ax.axvline(float(np.median(lpips)), color="k", linestyle="--", label=f"median {np.median(lpips):.3f}")
    ax.set_xlabel("inversion LPIPS (VGG) at the generator's output size")
    ax.set_ylabel("images")
    ax.set_title(f"eq. 9 inversion quality, {lpips.size} images")
    ax.legend()
    fig.tight_layout()
    _save(fig, path)


def case_grid(rows: list[int], data: dict[str, np.ndarray], load_target: Callable[[str, int], np.ndarray],
              title: str, path: Path) -> None:
    """One row per case: target | inverted render | canonical render, labelled with name and LPIPS."""
    size = data["inverted"].shape[1]
    fig = _figure(3 * 1.6 + 1.6, 1.6 * len(rows) + 0.6)
    for r, i in enumerate(rows):
        name = str(data["names"][i])
        cells = (load_target(name, size), data["inverted"][i], data["canonical"][i])
        for c, (image, label) in enumerate(zip(cells, ("target", "inverted", "canonical x_hat"))):
            ax = fig.add_subplot(len(rows), 3, r * 3 + c + 1)
            ax.imshow(image)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(label, fontsize=8)
            if c == 0:
                ax.set_ylabel(f"{name}\n{data['lpips'][i]:.3f}", fontsize=6, rotation=0, ha="right", va="center")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def write_report(directory: str | os.PathLike, load_target: Callable[[str, int], np.ndarray], cases: int = 8,
                 out: str | os.PathLike | None = None) -> dict:
    """Write ``report/`` into the cache (or ``out``): lpips_histogram.png, worst.png and best.png
    (when renders are stored), per_image.json (name -> LPIPS, worst first); returns the summary with
    the written paths. ``load_target(name, size)`` gives the dataset image as uint8 (size,size,3)."""
    data = collect(directory)
    out = Path(directory) / "report" if out is None else Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lpips = data["lpips"]
    summary = summarize(lpips)
    order = np.argsort(-lpips, kind="stable")  # worst first
    histogram(lpips, out / "lpips_histogram.png")
    files = {"histogram": str(out / "lpips_histogram.png")}
    if "inverted" in data and cases > 0:
        k = min(cases, lpips.size)
        case_grid(order[:k].tolist(), data, load_target, f"worst {k} inversions", out / "worst.png")
        case_grid(order[::-1][:k].tolist(), data, load_target, f"best {k} inversions", out / "best.png")
        files.update(worst=str(out / "worst.png"), best=str(out / "best.png"))
    per_image = {str(data["names"][i]): float(lpips[i]) for i in order}
    write_json_atomic(out / "per_image.json", {"summary": summary, "lpips": per_image})
    files["per_image"] = str(out / "per_image.json")
    return {**summary, "report": files}
