"""The oracle canonicaliser of the synthetic world (``task.embed=oracle``).

Eq. 9-10 recover x_hat = G(w_x, neutral camera, canonical geometry) by inverting the Stage-1
generator. On the synthetic world the answer is known without a GAN: re-render each item with its
own appearance, lighting and nuisance factors (background, colour cast, grain, photo-id patch) but
the neutral frontal camera and the canonical mesh (beta = 0, psi = 0, jaw at the canonical angle).
That is the x_hat a perfect inversion would give, so it is an upper bound for canonicalisation, and
on 2 CPU cores it is what makes the whole demo chain fit its time budget (the LPIPS inversion costs
seconds per image per step there). The nuisance factors stay in x_hat on purpose: they are the
r_noise that Stage 2's Jacobian regulariser (sec. 3.5) has to cope with.

Works only on datasets written by `data.synthetic.generate_synthetic` (they carry their recipe).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError


class SyntheticOracle:
    def __init__(self, dataset_path: str | os.PathLike, model, resolution: int) -> None:
        from ..data.config import SyntheticConfig
        from ..data.synthetic import RECIPE_FILE, PortraitRenderer, same_head
        from ..data.zipfs import DatasetFiles

        files = DatasetFiles(Path(dataset_path))
        if not files.exists(RECIPE_FILE):
            raise UserError(f"task.embed=oracle needs a synthetic dataset (with {RECIPE_FILE}); {dataset_path} has "
                            "none: use task.embed=canonical (GAN inversion) for other data")
        recipe = json.loads(files.read_bytes(RECIPE_FILE).decode())
        if not same_head(recipe, model):
            raise UserError(f"{dataset_path} was rendered with another head model than the `morphable` group's: "
                            "the oracle re-render would not match it")
        self.config = SyntheticConfig(**recipe["config"])
        self.renderer = PortraitRenderer(model, resolution, self.config.supersample)
        self.canonical_pose = model.canonical_pose(1)[0].cpu().numpy().astype(np.float32)

    @staticmethod
    def item_index(name: str) -> int:
        match = re.fullmatch(r"images/(\d+)\.png", name)
        if match is None:
            raise UserError(f"image {name!r} is not named like a synthetic item (images/<index>.png)")
        return int(match.group(1))

    def __call__(self, names: list[str]) -> torch.Tensor:
        """(B,3,R,R) canonical renders in [-1, 1] of the named items."""
        from ..data.synthetic import sample_item

        items = []
        for name in names:
            item = sample_item(self.config, self.item_index(name))
            items.append(dataclasses.replace(item, yaw=0.0, pitch=0.0, shape=np.zeros_like(item.shape),
                                             expression=np.zeros_like(item.expression), pose=self.canonical_pose.copy()))
        images, _, _ = self.renderer.render(items)
        return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
