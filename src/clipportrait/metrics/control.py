"""Control accuracy on the synthetic world (DESIGN.md section 5; issue 8, deliverable 2).

In the synthetic world every generated image has known conditioning (camera label, morphable
shape / expression / pose, flip) and, through its prompt, a known attribute value. Two numbers
measure whether the generator obeys:

- **text control** (paper sec. 3.4: the text embedding steers appearance): the prompt's hair
  colour, eye colour or skin tone, measured inside the region where the known mesh says that part
  is, and classified by a `ColorProbe` calibrated on the dataset's real images;
- **geometry control** (paper sec. 3.2, eq. 4-5: the morphable mesh drives the shape):
  `silhouette_iou` between the generator's alpha and the mesh's own silhouette.

Probe regions (`RegionMasker`) are rasterised from the observation mesh with the synthetic
renderer's own geometry (`data.synthetic.PortraitRenderer`: its hair shell, region labels and
feature anchors), so they mark the pixels the renderer would have painted with that attribute:

- ``hair``: the hair shell of a chosen hair length (default ``short``: the scalp shell, which every
  non-bald length covers; medium and long only add hair hanging behind the ears);
- ``iris``: the iris annulus of both eyes (between the pupil and the sclera discs of the renderer,
  below the lash line): the only eye pixels that carry the eye colour;
- ``face_skin``: skin above the renderer's beard zone, so a beard never enters the skin measure;
- ``sclera``: the eye discs outside the iris, below the lash line (a white reference).

A pixel belongs to a region only if all of its ``supersample``^2 sub-pixels do, and regions are
then eroded by ``erode`` pixels (the iris is too small at 64^2 to be eroded), so edges and
anti-aliased borders do not leak other colours. The colour of a region is the per-channel median of
log-RGB over its pixels: Lambertian shading multiplies albedo by a scalar (a shift along (1,1,1) in
log space) and the median ignores the few pixels of glasses frames or lashes that fall inside.
Hair colour and skin tone are white-balanced: the colour of the ``sclera`` region (the renderer's
fixed off-white eye discs) is subtracted in log space, which removes the image-wide colour casts of
the synthetic world (on the 256-image 64^2 set, skin tone held-out accuracy 0.56 -> 0.79, hair
0.89 -> 0.91); eye colour is not (the iris and the sclera share a few pixels: 0.93 -> 0.91).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data.format import REGION_IDS, read_index
from ..geometry.head import observation_vertices
from ..geometry.mesh_render import render_vertex_coords
from ..geometry.morphable import MorphableModel
from ..geometry.raster import rasterize

# Attribute -> its palette in the synthetic world and the region that shows it.
ATTRIBUTE_REGIONS = {"hair_color": "hair", "eye_color": "iris", "skin_tone": "face_skin"}
WHITE_BALANCED = {"hair_color": True, "eye_color": False, "skin_tone": True}  # see the module docstring
REGIONS = ("hair", "iris", "face_skin", "sclera")
COND_KEYS = ("camera", "shape", "expression", "pose", "flip")
_LOG_EPS = 2.0 / 255.0  # keeps log-RGB finite for black hair (albedo 0.05 x shading ~ 3/255)


def attribute_palette(attribute: str) -> dict[str, tuple[float, float, float]]:
    """The synthetic world's colour table of ``attribute`` (value -> albedo RGB in [0,1])."""
    from ..data.synthetic import EYE_COLORS, HAIR_COLORS, SKIN_TONES

    palettes = {"hair_color": HAIR_COLORS, "eye_color": EYE_COLORS, "skin_tone": SKIN_TONES}
    if attribute not in palettes:
        raise ValueError(f"attribute={attribute!r}: expected one of {sorted(palettes)}")
    return palettes[attribute]


def _check_cond(cond: dict[str, torch.Tensor], batch: int | None = None) -> int:
    missing = [k for k in COND_KEYS if k not in cond]
    if missing:
        raise KeyError(f"conditioning: missing {missing} (have {sorted(cond)}; expected {list(COND_KEYS)})")
    size = int(cond["camera"].shape[0])
    if batch is not None and size != batch:
        raise ValueError(f"conditioning batch {size} != image batch {batch}")
    return size


def _check_images(images: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[-1] != images.shape[-2] or not images.is_floating_point():
        raise ValueError(f"images: expected float (B,3,R,R) in [-1,1], got {images.dtype} {tuple(images.shape)}")


def _erode(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """Binary erosion of (B,R,R) bool masks by a (2*pixels+1)^2 square."""
    if pixels <= 0:
        return mask
    kernel = 2 * pixels + 1
    return -F.max_pool2d(-mask.float()[:, None], kernel, stride=1, padding=pixels)[:, 0] > 0.5


class RegionMasker:
    """Probe-region masks of conditioning batches from the known mesh (see the module docstring).

    Works on CPU (the synthetic renderer's geometry lives there); masks come back on the device of
    the conditioning.
    """

    def __init__(self, morphable: MorphableModel, hair_length: str = "short", supersample: int = 2,
                 erode: dict[str, int] | None = None) -> None:
        from ..data.synthetic import HAIR_LENGTHS, PortraitRenderer

        if hair_length not in HAIR_LENGTHS or hair_length == "bald":
            raise ValueError(f"hair_length={hair_length!r}: expected one of {[h for h in HAIR_LENGTHS if h != 'bald']}")
        if supersample < 1:
            raise ValueError(f"supersample={supersample}: expected >= 1")
        self.erode = {"hair": 1, "iris": 0, "face_skin": 1, "sclera": 0, **(erode or {})}
        unknown = sorted(set(self.erode) - set(REGIONS))
        if unknown or any(v < 0 for v in self.erode.values()):
            raise ValueError(f"erode={erode}: expected non-negative pixel counts for regions among {REGIONS}")
        self.morphable = morphable.cpu()
        self.hair_length = hair_length
        self.supersample = int(supersample)
        # Only the renderer's geometry (hair shell, labels, anchors) is used; its resolution is not.
        self.renderer = PortraitRenderer(self.morphable, resolution=8, supersample=1)
        r = self.renderer
        # Canonical vertex behind each rendered vertex (head vertices, then hair-shell copies).
        self.base_vertex = torch.cat((torch.arange(len(r.canonical)), r.hair_vertex_ids))

    @torch.no_grad()
    def __call__(self, cond: dict[str, torch.Tensor], resolution: int) -> dict[str, torch.Tensor]:
        """{region: (B,R,R) bool} for ``cond`` (keys camera, shape, expression, pose, flip) at R=resolution."""
        from ..data.synthetic import _vertex_normals

        batch = _check_cond(cond)
        if resolution < 8:
            raise ValueError(f"resolution={resolution}: expected >= 8")
        device = cond["camera"].device
        cpu = {k: cond[k].detach().cpu() for k in COND_KEYS}
        r = self.renderer
        verts = observation_vertices({k: v.float() if v.is_floating_point() else v for k, v in cpu.items()}, self.morphable)
        normals = _vertex_normals(verts, self.morphable.faces)
        # The renderer shapes its hair shell from each item's sampled length; all items get ours.
        hair_items = [SimpleNamespace(attributes={"hair_length": self.hair_length})] * batch
        hair = r._hair_vertices(verts, normals, hair_items)
        size = resolution * self.supersample
        face_index, bary, _ = rasterize(torch.cat((verts, hair), 1), r.faces_all, cpu["camera"].float(), size, r.cullable)
        covered = face_index >= 0
        corners = r.faces_all[face_index.clamp_min(0)]  # (B,S,S,3)
        # Region per sub-pixel: the corner label with the largest summed barycentric weight, as the
        # renderer decides it (PortraitRenderer.render).
        corner_region = r.vertex_mask_id[corners]
        same = corner_region[..., :, None] == corner_region[..., None, :]
        support = (same * bary[..., None, :]).sum(-1)
        region = corner_region.gather(-1, support.argmax(-1, keepdim=True))[..., 0]
        region = torch.where(covered, region, torch.zeros_like(region))
        x, y, z = (r.canonical[self.base_vertex[corners]] * bary[..., None]).sum(-2).unbind(-1)
        # Iris annulus: the renderer's iris disc (0.27 eye widths) minus its pupil (0.11), below the lashes.
        ew = float(r.eye_width)
        eye_xy = r.eye_centres[:, :2]
        dist = torch.cdist(torch.stack((x, y), -1).reshape(-1, 2), eye_xy).reshape(*x.shape, 2)
        nearest, which = dist.min(-1)
        below_lashes = y <= eye_xy[which, 1] + 0.22 * ew
        eyes = region == REGION_IDS["eyes"]
        iris = eyes & (nearest > 0.11 * ew) & (nearest < 0.27 * ew) & below_lashes
        # Skin above the renderer's beard zone (PortraitRenderer._albedo's upper boundary).
        mw, my = float(r.mouth_width), float(r.mouth_centre[1])
        beard_top = my + 0.22 * mw + 0.8 * (x.abs() - 0.35 * mw).clamp_min(0)
        face_skin = (region == REGION_IDS["skin"]) & (y > beard_top)
        fine = {"hair": region == REGION_IDS["hair"], "iris": iris, "face_skin": face_skin,
                "sclera": eyes & (nearest > 0.27 * ew) & below_lashes}
        out = {}
        for name, mask in fine.items():
            pure = F.avg_pool2d(mask.float()[:, None], self.supersample)[:, 0] > 1.0 - 1e-6
            out[name] = _erode(pure, self.erode[name]).to(device)
        return out


def region_log_rgb(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per-image colour (B,3) of a region: channel-wise median of log(rgb + eps) over the pixels of
    ``masks`` (B,R,R); NaN rows where a mask is empty. ``images`` in [-1,1] (B,3,R,R)."""
    _check_images(images)
    if masks.shape != (images.shape[0], *images.shape[-2:]):
        raise ValueError(f"masks: expected shape {(images.shape[0], *images.shape[-2:])}, got {tuple(masks.shape)}")
    rgb = ((images.detach().float() + 1.0) / 2.0).clamp(0.0, 1.0)
    logs = torch.log(rgb + _LOG_EPS)
    out = torch.full((images.shape[0], 3), math.nan)
    for k in range(images.shape[0]):
        pixels = logs[k][:, masks[k].to(images.device)]  # (3,P)
        if pixels.shape[1]:
            out[k] = pixels.median(dim=1).values.cpu()
    return out


def attribute_features(attribute: str, images: torch.Tensor, masks: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B,3) colour features of ``attribute``: the log-RGB median of its region, white-balanced by
    the sclera's where `WHITE_BALANCED` says so; NaN rows where a needed region is not visible."""
    x = region_log_rgb(images, masks[ATTRIBUTE_REGIONS[attribute]])
    if WHITE_BALANCED[attribute]:
        x = x - region_log_rgb(images, masks["sclera"])
    return x


@dataclass
class ColorProbe:
    """Nearest-centroid colour classifier for one attribute, calibrated on real dataset images.

    Distance is Mahalanobis under the pooled within-class covariance of the region colours
    (`attribute_features`, log-RGB): linear discriminant analysis with equal priors. The calibration
    data teach it that brightness (shading) varies within a class, so it leans on the directions
    that separate the palette. ``heldout_accuracy`` is its k-fold cross-validated accuracy on the real images:
    the ceiling a generator can reach on this measure.
    """

    attribute: str
    region: str
    classes: list[str]
    centroids: torch.Tensor  # (K,3) log-RGB
    precision: torch.Tensor  # (3,3) inverse pooled covariance
    heldout_accuracy: float
    num_calibration: int
    mask_agreement: float  # fraction of probe-region pixels whose stored dataset mask has the region's id
    masker: RegionMasker = field(repr=False)
    per_class_heldout: dict[str, float] = field(default_factory=dict)

    @classmethod
    def fit(cls, dataset_path: str | os.PathLike, attribute: str, morphable: MorphableModel | None = None,
            hair_length: str = "short", folds: int = 5, max_items: int | None = None,
            masker: RegionMasker | None = None, batch: int = 64) -> "ColorProbe":
        """Calibrate on the images of the dataset at ``dataset_path`` that show ``attribute``
        (bald items are skipped for hair colour) with their labels from attributes.json, masks from
        their own conditioning, and the dataset's region masks as a check that the head matches.

        ``morphable``: the head the dataset's parameters belong to (default: the embedded head).
        """
        if attribute not in ATTRIBUTE_REGIONS:
            raise ValueError(f"attribute={attribute!r}: expected one of {sorted(ATTRIBUTE_REGIONS)}")
        if folds < 2:
            raise ValueError(f"folds={folds}: expected >= 2 for a held-out accuracy")
        index = read_index(dataset_path)
        if index.attributes is None:
            raise ValueError(f"dataset {dataset_path}: no attributes.json, so no labels to calibrate {attribute} on")
        if morphable is None:
            from ..data.synthetic import default_model

            morphable = default_model()
        _check_head(dataset_path, index, morphable)
        masker = masker or RegionMasker(morphable, hair_length=hair_length)
        region = ATTRIBUTE_REGIONS[attribute]
        rows, labels = [], []
        for i, name in enumerate(index.names):
            attrs = index.attributes.get(name, {}).get("attributes")
            if attrs is None or attribute not in attrs:
                raise ValueError(f"dataset {dataset_path}: attributes.json has no {attribute!r} for {name}")
            if attribute == "hair_color" and attrs.get("hair_length") == "bald":
                continue  # a bald head shows no hair colour
            rows.append(i)
            labels.append(str(attrs[attribute]))
        rows, labels = rows[:max_items], labels[:max_items]
        if len(set(labels)) < 2:
            raise ValueError(f"dataset {dataset_path}: {len(rows)} usable items with {attribute} values "
                             f"{sorted(set(labels))}; need at least two classes to calibrate")
        features, agree, total = [], 0, 0
        for start in range(0, len(rows), batch):
            part = rows[start:start + batch]
            images = torch.stack([torch.from_numpy(index.read_image(i).copy()) for i in part]).permute(0, 3, 1, 2)
            images = images.float() / 127.5 - 1.0
            cond = {
                "camera": torch.from_numpy(index.labels[part]), "shape": torch.from_numpy(index.shape[part]),
                "expression": torch.from_numpy(index.expression[part]), "pose": torch.from_numpy(index.pose[part]),
                "flip": torch.zeros(len(part), dtype=torch.bool),
            }
            all_masks = masker(cond, images.shape[-1])
            masks = all_masks[region]
            features.append(attribute_features(attribute, images, all_masks))
            if index.has_masks:
                stored = torch.from_numpy(np.stack([index.read_mask(i) for i in part]))
                expected = REGION_IDS["eyes" if region == "iris" else "skin" if region == "face_skin" else "hair"]
                agree += int((stored[masks] == expected).sum())
                total += int(masks.sum())
        x = torch.cat(features)
        measured = ~torch.isnan(x).any(1)
        x = x[measured]
        y = [lab for lab, ok in zip(labels, measured.tolist()) if ok]
        if len(y) < folds:
            raise ValueError(f"dataset {dataset_path}: only {len(y)} items with a visible {region} region; "
                             f"need at least folds={folds}")
        # k-fold held-out accuracy; items are i.i.d. draws, so fold = position mod k.
        fold_of = torch.arange(len(y)) % folds
        correct = torch.zeros(len(y), dtype=torch.bool)
        for f in range(folds):
            train, test = fold_of != f, fold_of == f
            classes, centroids, precision = _lda([v for v, t in zip(y, train.tolist()) if t], x[train])
            predicted = _nearest(x[test], centroids, precision)
            truth = [v for v, t in zip(y, test.tolist()) if t]
            correct[test] = torch.tensor([classes[p] == t for p, t in zip(predicted.tolist(), truth)])
        per_class = {c: float(correct[[v == c for v in y]].float().mean()) for c in sorted(set(y))}
        classes, centroids, precision = _lda(y, x)
        agreement = agree / total if total else math.nan
        if total and agreement < 0.8:
            raise ValueError(
                f"dataset {dataset_path}: only {agreement:.0%} of the {region} pixels rendered from its own "
                f"conditioning carry that region in its masks/; was it made with another head model than "
                f"the one given (morphable)?")
        return cls(attribute, region, classes, centroids, precision, float(correct.float().mean()), len(y),
                   agreement, masker, per_class)

    @property
    def chance(self) -> float:
        return 1.0 / len(self.classes)

    def region_masks(self, cond: dict[str, torch.Tensor], resolution: int) -> torch.Tensor:
        """(B,R,R) bool: this probe's region for the conditioning batch ``cond``."""
        return self.masker(cond, resolution)[self.region]

    def features(self, images: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B,3) colour features (`attribute_features`) of ``images`` (B,3,R,R) in [-1,1] under
        ``cond``; NaN rows where the region is not visible."""
        _check_images(images)
        _check_cond(cond, images.shape[0])
        return attribute_features(self.attribute, images, self.masker(cond, images.shape[-1]))

    def predict(self, images: torch.Tensor, cond: dict[str, torch.Tensor]) -> list[str | None]:
        """The attribute value seen in each image (None where the region is not visible)."""
        x = self.features(images, cond)
        measured = ~torch.isnan(x).any(1)
        out: list[str | None] = [None] * len(x)
        if measured.any():
            for k, p in zip(measured.nonzero()[:, 0].tolist(), _nearest(x[measured], self.centroids, self.precision).tolist()):
                out[k] = self.classes[p]
        return out

    def summary(self) -> dict:
        """JSON-ready facts of the calibration (for metric protocols)."""
        return {"attribute": self.attribute, "region": self.region, "hair_length": self.masker.hair_length,
                "white_balanced": WHITE_BALANCED[self.attribute], "classes": self.classes, "heldout_accuracy": self.heldout_accuracy, "chance": self.chance,
                "per_class_heldout": self.per_class_heldout, "num_calibration": self.num_calibration,
                "mask_agreement": self.mask_agreement}


def _lda(labels: Sequence[str], x: torch.Tensor) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Classes, centroids (K,3) and inverse pooled within-class covariance (3,3) in float64."""
    classes = sorted(set(labels))
    x = x.double()
    ids = torch.tensor([classes.index(v) for v in labels])
    centroids = torch.stack([x[ids == k].mean(0) for k in range(len(classes))])
    residual = x - centroids[ids]
    dof = max(1, len(x) - len(classes))
    covariance = residual.T @ residual / dof
    # A small ridge keeps the inverse finite when a direction has no spread (tiny calibration sets).
    covariance = covariance + 1e-4 * torch.eye(x.shape[1], dtype=x.dtype) * max(float(covariance.trace()) / x.shape[1], 1e-6)
    return classes, centroids, torch.linalg.inv(covariance)


def _nearest(x: torch.Tensor, centroids: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid in the probe's Mahalanobis metric, for features on any device
    (the probe's (K,3) statistics live on the CPU)."""
    diff = x.double()[:, None, :] - centroids.to(x.device)[None]
    return torch.einsum("nki,ij,nkj->nk", diff, precision.to(x.device), diff).argmin(1)


def _check_head(dataset_path, index, morphable: MorphableModel) -> None:
    """Refuse a synthetic dataset whose recipe names another head model than ``morphable``."""
    import json

    from ..data.synthetic import RECIPE_FILE, head_identity, same_head

    if not index.files.exists(RECIPE_FILE):
        return
    recipe = json.loads(index.files.read_bytes(RECIPE_FILE))
    stored = recipe.get("model")
    identity = head_identity(morphable)
    if stored is not None and not same_head(recipe, morphable, identity):
        raise ValueError(f"dataset {dataset_path} was rendered with head model {stored[:12]}… ({RECIPE_FILE}), "
                         f"not the morphable model given ({identity['model'][:12]}…)")


def text_control_accuracy(probe: ColorProbe, images: torch.Tensor, cond: dict[str, torch.Tensor],
                          target_values: Sequence[str]) -> dict:
    """Fraction of generated ``images`` whose ``probe.attribute`` reads as the prompt's value.

    ``target_values``: the value each image's prompt asked for (one of ``probe.classes``).
    Images whose region is not visible are left out of ``accuracy`` and counted in
    ``num_unmeasured``. Also reports per-target accuracy, the probe's real-image ceiling and chance.
    """
    targets = [str(v) for v in target_values]
    if len(targets) != images.shape[0]:
        raise ValueError(f"target_values: {len(targets)} values for {images.shape[0]} images")
    unknown = sorted(set(targets) - set(probe.classes))
    if unknown:
        raise ValueError(f"target_values {unknown} are not {probe.attribute} values the probe was calibrated on "
                         f"({probe.classes})")
    predicted = probe.predict(images, cond)
    hits = [p == t for p, t in zip(predicted, targets) if p is not None]
    per_target = {}
    for value in sorted(set(targets)):
        pairs = [(p, t) for p, t in zip(predicted, targets) if t == value and p is not None]
        per_target[value] = sum(p == t for p, t in pairs) / len(pairs) if pairs else math.nan
    return {
        "accuracy": sum(hits) / len(hits) if hits else math.nan,
        "num_images": len(targets),
        "num_unmeasured": sum(p is None for p in predicted),
        "per_target": per_target,
        "predicted": predicted,
        "ceiling": probe.heldout_accuracy,
        "chance": probe.chance,
        "probe": probe.summary(),
    }


@torch.no_grad()
def silhouette_iou(alpha: torch.Tensor, cond: dict[str, torch.Tensor], morphable: MorphableModel,
                   threshold: float = 0.5) -> dict:
    """IoU between the generator's alpha (B,1,r,r) thresholded at ``threshold`` and the silhouette
    of the observation mesh of ``cond`` (eq. 4-5's mesh: shape, expression, pose, flip) rendered
    under ``cond['camera']`` at r (`render_vertex_coords`' mask channel).

    The mesh has no hair, so a generator that renders hair cannot reach 1; compare with real images.
    """
    if alpha.ndim != 4 or alpha.shape[1] != 1 or alpha.shape[-1] != alpha.shape[-2]:
        raise ValueError(f"alpha: expected (B,1,r,r), got {tuple(alpha.shape)}")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold={threshold}: expected a value in (0, 1)")
    batch = _check_cond(cond, alpha.shape[0])
    verts = observation_vertices(cond, morphable).float()
    rdr = render_vertex_coords(verts, morphable.faces, cond["camera"].float().to(verts.device), alpha.shape[-1])
    mesh = (rdr[:, 3] > 0.5).to(alpha.device)
    generated = alpha[:, 0] > threshold
    inter = (mesh & generated).flatten(1).sum(1).double()
    union = (mesh | generated).flatten(1).sum(1).double()
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
    return {"silhouette_iou": float(iou.mean()), "per_image": iou.tolist(), "threshold": threshold,
            "resolution": int(alpha.shape[-1]), "num_images": batch}
