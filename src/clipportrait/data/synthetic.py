"""The synthetic portrait world (DESIGN.md section 5): procedural-head portraits with ground truth.

Each image is fully determined by (config seed, image index): a per-image NumPy generator draws

- the camera (FFHQ-like yaw/pitch on the default orbit, `geometry.cameras`),
- morphable parameters: identity beta ~ N(0, shape_std^2), expression psi ~ N(0, expression_std^2),
  jaw opened uniformly in [0, jaw_open_max] (FLAME sizes 100/50/6, no global rotation),
- appearance attributes: skin tone, hair colour and length (bald/short/medium/long), eye colour,
  lip colour, glasses (frame colour), beard,
- nuisance factors: background pattern and colour, colour cast, film grain, a "photo id" patch (a
  random block texture unique to the image), light direction and strength,
- captions built from the attributes in several phrasings, optionally followed by the nuisance
  phrases a CLIP interrogator would add ("..., shot on film, grainy, blue tint").

Rendering (`PortraitRenderer`) rasterises the head mesh plus a hair shell (the scalp region pushed
out along the normals; for medium/long hair the shell continues down the back of the head and neck
and bulks outward as it hangs; parts beyond the sampled length collapse to the head's centre, where the
z-buffer hides them) with the vectorised rasteriser of `data.raster`, at ``supersample`` x the
output size. Per pixel, canonical-space surface coordinates (the vertex positions of the canonical
mesh, interpolated) drive procedural textures: iris and pupil discs, lash line, beard zone, glasses
frames (drawn as texture on the surface), hair strands. Shading is Lambertian (ambient + diffuse).
Region masks (`format.REGION_IDS`) come from the same rasterisation, so they agree with the pixels.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import textwrap
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from ..geometry.cameras import intrinsics, lookat_cam2world, make_labels
from ..geometry.morphable import MorphableModel
from .config import SyntheticConfig
from .format import REGION_IDS, DatasetWriter, atomic_write_bytes, check_dataset, encode_png
from ..geometry.raster import rasterize

# --- attribute vocabularies (name -> linear-ish RGB in [0,1]) ------------------------------------
SKIN_TONES = {
    "pale": (0.95, 0.82, 0.74), "fair": (0.92, 0.74, 0.62), "light": (0.86, 0.66, 0.52),
    "honey": (0.76, 0.55, 0.40), "olive": (0.70, 0.54, 0.36), "tan": (0.62, 0.44, 0.30),
    "brown": (0.46, 0.30, 0.20), "dark": (0.30, 0.19, 0.13),
}
HAIR_COLORS = {
    "black": (0.05, 0.04, 0.04), "dark brown": (0.20, 0.12, 0.07), "brown": (0.38, 0.24, 0.13),
    "auburn": (0.50, 0.20, 0.10), "red": (0.72, 0.22, 0.08), "blonde": (0.86, 0.72, 0.42),
    "gray": (0.58, 0.58, 0.58), "white": (0.90, 0.90, 0.88), "blue": (0.15, 0.30, 0.80),
    "pink": (0.92, 0.45, 0.65),
}
HAIR_COLOR_WEIGHTS = (0.2, 0.18, 0.16, 0.08, 0.07, 0.12, 0.07, 0.04, 0.04, 0.04)
HAIR_LENGTHS = ("bald", "short", "medium", "long")
EYE_COLORS = {
    "brown": (0.35, 0.20, 0.10), "dark brown": (0.16, 0.09, 0.05), "blue": (0.25, 0.50, 0.85),
    "green": (0.25, 0.58, 0.30), "hazel": (0.55, 0.42, 0.20), "gray": (0.55, 0.60, 0.65),
}
LIP_COLORS = {"natural": None, "pink": (0.88, 0.45, 0.55), "red": (0.78, 0.08, 0.12), "plum": (0.45, 0.12, 0.25)}
FRAME_COLORS = {"black": (0.03, 0.03, 0.03), "brown": (0.30, 0.17, 0.08), "gold": (0.80, 0.65, 0.25),
                "silver": (0.75, 0.76, 0.78), "red": (0.75, 0.08, 0.08)}
BACKGROUND_COLORS = {
    "white": (0.92, 0.92, 0.90), "gray": (0.55, 0.55, 0.55), "blue": (0.25, 0.45, 0.80),
    "green": (0.30, 0.60, 0.35), "yellow": (0.90, 0.80, 0.30), "pink": (0.90, 0.60, 0.70),
    "dark": (0.12, 0.12, 0.14), "orange": (0.90, 0.55, 0.20),
}
BACKGROUND_PATTERNS = ("plain", "gradient", "striped", "checkered", "dotted")
COLOR_CASTS = {"none": (1.0, 1.0, 1.0), "blue tint": (0.85, 0.95, 1.15), "warm tint": (1.15, 1.0, 0.82),
               "green tint": (0.9, 1.12, 0.9), "sepia": (1.0, 1.0, 1.0)}
GRAIN_PHRASES = ("grainy", "shot on film", "film grain", "grainy film photo")
ID_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"

# Region ids of the morphable model's vertex labels (by name) in the dataset masks.
MODEL_REGION_TO_MASK = {
    "skin": "skin", "scalp": "skin", "brows": "brows", "eyes": "eyes", "lips": "lips",
    "mouth_interior": "mouth", "nose": "skin", "ears": "skin", "neck": "neck",
}
RECIPE_FILE = "synthetic_config.json"  # the SyntheticConfig (and head fingerprint) a dataset was made with
MAX_RASTER_PIXELS = 2**22  # supersampled pixels rasterised at once (64 images at 128^2 x 2^2)


@dataclass
class ItemSpec:
    """Everything random about one image (drawn by `sample_item`)."""

    index: int
    yaw: float
    pitch: float
    shape: np.ndarray  # (100,)
    expression: np.ndarray  # (50,)
    pose: np.ndarray  # (6,)
    attributes: dict
    nuisance: dict
    light: np.ndarray  # (4,): unit direction (3) + ambient
    texture_seed: int
    captions: list[str]


def _pick(rng: np.random.Generator, options, weights=None):
    options = list(options)
    p = None if weights is None else np.asarray(weights, dtype=float) / np.sum(weights)
    return options[int(rng.choice(len(options), p=p))]


def sample_item(cfg: SyntheticConfig, index: int) -> ItemSpec:
    """Draw image ``index`` of the dataset of ``cfg`` (depends only on cfg.seed and index)."""
    rng = np.random.default_rng([cfg.seed, index])
    yaw = float(np.clip(rng.normal(0.0, cfg.yaw_std), -0.9, 0.9))
    pitch = float(np.clip(rng.normal(0.0, cfg.pitch_std), -0.45, 0.45))
    shape = rng.normal(0.0, cfg.shape_std, 100).astype(np.float32)
    expression = rng.normal(0.0, cfg.expression_std, 50).astype(np.float32)
    pose = np.zeros(6, np.float32)
    pose[3] = rng.uniform(0.0, cfg.jaw_open_max)
    pose[4:6] = rng.normal(0.0, 0.05 * cfg.jaw_open_max, 2)
    hair_length = _pick(rng, cfg.hair_lengths)
    glasses = bool(rng.random() < cfg.glasses_prob)
    attributes = {
        "skin_tone": _pick(rng, SKIN_TONES),
        "hair_color": _pick(rng, HAIR_COLORS, HAIR_COLOR_WEIGHTS),
        "hair_length": hair_length,
        "eye_color": _pick(rng, EYE_COLORS),
        "lip_color": _pick(rng, LIP_COLORS, (0.5, 0.2, 0.2, 0.1)),
        "glasses": glasses,
        "glasses_frame": _pick(rng, FRAME_COLORS) if glasses else None,
        "beard": bool(rng.random() < cfg.beard_prob),
    }
    pattern = _pick(rng, BACKGROUND_PATTERNS) if cfg.background_pattern else "plain"
    background = _pick(rng, BACKGROUND_COLORS) if cfg.background_pattern else "gray"
    nuisance = {
        "background_pattern": pattern,
        "background_color": background,
        "background_color2": _pick(rng, BACKGROUND_COLORS),
        "background_phase": float(rng.uniform(0, 2 * np.pi)),
        "color_cast": _pick(rng, COLOR_CASTS, (0.4, 0.15, 0.15, 0.15, 0.15)) if cfg.color_cast else "none",
        "grain": float(rng.choice([0.0, rng.uniform(0.02, 0.06)])) if cfg.noise_grain else 0.0,
        "photo_id": "".join(rng.choice(list(ID_ALPHABET), 4)) if cfg.photo_id_patch else None,
        "photo_id_corner": int(rng.integers(4)),
    }
    azimuth, elevation = rng.uniform(-0.9, 0.9), rng.uniform(0.1, 0.8)
    light = np.array(
        [np.cos(elevation) * np.sin(azimuth), np.sin(elevation), np.cos(elevation) * np.cos(azimuth),
         rng.uniform(0.3, 0.5)], np.float32,
    )
    texture_seed = int(rng.integers(2**31))
    captions = make_captions(attributes, nuisance, rng, cfg.captions_per_image, cfg.nuisance_captions)
    return ItemSpec(index, yaw, pitch, shape, expression, pose, attributes, nuisance, light, texture_seed, captions)


def nuisance_phrases(nuisance: dict, rng: np.random.Generator) -> list[str]:
    """Interrogator-style phrases describing the image-level nuisances present in ``nuisance``."""
    phrases = []
    pattern, colour = nuisance["background_pattern"], nuisance["background_color"]
    phrases.append(f"{colour} background" if pattern == "plain" else f"{pattern} {colour} background")
    if nuisance["color_cast"] != "none":
        phrases.append(nuisance["color_cast"])
    if nuisance["grain"] > 0:
        phrases.append(_pick(rng, GRAIN_PHRASES))
    if nuisance["photo_id"] is not None:
        phrases.append(f"photo id {nuisance['photo_id']}")
    return phrases


def make_captions(
    attributes: dict, nuisance: dict, rng: np.random.Generator, count: int, with_nuisance: bool
) -> list[str]:
    """``count`` captions of one image in different phrasings of its attributes; with
    ``with_nuisance`` most captions also get a random subset of the nuisance phrases."""
    a = attributes
    hair = "a bald head" if a["hair_length"] == "bald" else f"{a['hair_length']} {a['hair_color']} hair"
    lips = "natural lips" if a["lip_color"] == "natural" else f"{a['lip_color']} lips"
    glasses = f"{a['glasses_frame']} glasses" if a["glasses"] else ""
    who = "a bald person" if a["hair_length"] == "bald" else f"a {a['hair_color']}-haired person"
    extras = [x for x in (glasses and f"wearing {glasses}", "with a beard" if a["beard"] else "") if x]
    extra = "".join(f", {x}" for x in extras)
    templates = [
        f"a photo of a person with {hair} and {a['eye_color']} eyes{extra}",
        f"portrait of someone with {a['skin_tone']} skin and {hair}{extra}",
        f"a face with {a['eye_color']} eyes, {lips} and {a['skin_tone']} skin{extra}",
        f"close-up of {who} with {a['eye_color']} eyes{extra}",
        f"{who}, {a['skin_tone']} skin, {lips}" + "".join(f", {x}" for x in (glasses, "beard" if a["beard"] else "") if x),
        f"headshot: {hair}, {a['eye_color']} eyes, {a['skin_tone']} skin{extra}",
    ]
    if count < 1:
        raise ValueError(f"captions_per_image={count}: expected >= 1")
    order = rng.permutation(len(templates))
    captions = [templates[order[k % len(templates)]] for k in range(count)]
    if with_nuisance:
        for k in range(count):
            if rng.random() < 0.75:
                phrases = [p for p in nuisance_phrases(nuisance, rng) if rng.random() < 0.6]
                captions[k] = ", ".join([captions[k], *phrases])
    return captions


# --- rendering ---------------------------------------------------------------------------------
def _hash_noise(points: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """Deterministic pseudo-random values in [0,1) per 3-d point (P,3) and per-point seed (P,)."""
    h = torch.sin(points @ torch.tensor([127.1, 311.7, 74.7], dtype=points.dtype, device=points.device) * 40.0 + seed)
    return torch.frac(h * 43758.5453).abs()


def _vertex_normals(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Area-weighted unit vertex normals (B,V,3) of meshes (B,V,3) with faces (F,3)."""
    corners = vertices[:, faces]  # (B,F,3,3)
    face_normals = torch.cross(corners[:, :, 1] - corners[:, :, 0], corners[:, :, 2] - corners[:, :, 0], dim=-1)
    normals = torch.zeros_like(vertices)
    for k in range(3):
        normals.index_add_(1, faces[:, k], face_normals)
    return F.normalize(normals, dim=-1)


class PortraitRenderer:
    """Renders `ItemSpec` batches of one morphable model to images and region masks.

    Geometry precomputed once from the canonical mesh: the hair shell (a copy of the scalp faces and
    of the back-of-head/neck faces below them, with a per-vertex "hang" depth below the hairline),
    feature anchors from the iBUG-68 landmarks (eye centres and width, mouth centre and width, chin)
    and the ear plane.
    """

    def __init__(self, model: MorphableModel, resolution: int, supersample: int = 2) -> None:
        if resolution < 8:
            raise ValueError(f"resolution={resolution}: expected >= 8")
        if supersample < 1:
            raise ValueError(f"supersample={supersample}: expected >= 1")
        self.model = model
        self.resolution = resolution
        self.supersample = supersample
        names = list(model.region_names)
        missing = sorted({"scalp", "ears"} - set(names))
        if missing:
            raise ValueError(f"{type(model).__name__}: vertex regions {missing} needed for hair placement are missing")
        canonical = model.canonical_vertices(1)  # (1,V,3)
        self.canonical = canonical[0]
        faces = model.faces
        regions = model.vertex_regions
        lut = torch.tensor([REGION_IDS[MODEL_REGION_TO_MASK.get(n, "skin")] for n in names])
        c = self.canonical
        landmarks = model.landmarks(canonical)[0]
        eye_a, eye_b = landmarks[36:42].mean(0), landmarks[42:48].mean(0)
        self.eye_centres = torch.stack((eye_a, eye_b))
        self.eye_width = 0.5 * ((landmarks[36] - landmarks[39]).norm() + (landmarks[42] - landmarks[45]).norm())
        self.mouth_centre = landmarks[48:68].mean(0)
        self.mouth_width = (landmarks[48] - landmarks[54]).norm()
        self.chin = landmarks[8]
        scalp = regions == names.index("scalp")
        ears = regions == names.index("ears")
        self.ear_z = float(c[ears, 2].mean())
        # Hair zone: the scalp plus everything behind the ears down the neck.
        back_hairline = float(c[scalp & (c[:, 2] < self.ear_z), 1].min())
        neck_floor = float(c[:, 1].min())
        behind = (c[:, 2] < self.ear_z + 0.02) & (c[:, 1] > neck_floor + 0.04)
        zone = scalp | behind
        hair_ids = zone.nonzero()[:, 0]
        remap = torch.full((len(c),), -1, dtype=torch.long)
        remap[hair_ids] = torch.arange(len(hair_ids))
        keep = zone[faces].all(-1)
        self.hair_vertex_ids = hair_ids
        self.hair_faces = remap[faces[keep]]
        hang = (back_hairline - c[hair_ids, 1]).clamp_min(0) * (~scalp[hair_ids])
        self.hair_hang = hang / hang.max()  # 0 on the scalp, 1 at the lowest hanging vertex
        # Outward winding for back-face culling of the closed head (the open hair shell is never culled).
        corners = c[faces]
        signed_volume = (corners[:, 0] * torch.cross(corners[:, 1], corners[:, 2], dim=-1)).sum()
        head_faces = faces if signed_volume > 0 else faces[:, [0, 2, 1]]
        self.faces_all = torch.cat((head_faces, self.hair_faces + len(c)))
        self.cullable = torch.cat((torch.ones(len(faces), dtype=torch.bool), torch.zeros(len(self.hair_faces), dtype=torch.bool)))
        self.vertex_mask_id = torch.cat(
            (lut[regions], torch.full((len(hair_ids),), REGION_IDS["hair"], dtype=torch.long))
        )

    def labels(self, items: list[ItemSpec]) -> torch.Tensor:
        yaw = torch.tensor([it.yaw for it in items])
        pitch = torch.tensor([it.pitch for it in items])
        return make_labels(lookat_cam2world(yaw, pitch), intrinsics(batch=len(items)))

    @torch.no_grad()
    def render(self, items: list[ItemSpec]) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
        """uint8 images (B,R,R,3), uint8 region masks (B,R,R) and camera labels (B,25).

        Batches are rasterised in groups of at most `MAX_RASTER_PIXELS` supersampled pixels, which
        bounds memory (~0.6 GiB per million pixels) at high resolutions."""
        cap = max(1, MAX_RASTER_PIXELS // (self.resolution * self.supersample) ** 2)
        if len(items) > cap:
            parts = [self.render(items[i : i + cap]) for i in range(0, len(items), cap)]
            return (
                np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                torch.cat([p[2] for p in parts]),
            )
        model = self.model
        batch = len(items)
        shape = torch.from_numpy(np.stack([it.shape for it in items]))
        expression = torch.from_numpy(np.stack([it.expression for it in items]))
        pose = torch.from_numpy(np.stack([it.pose for it in items]))
        verts = model(shape, expression, pose)  # (B,V,3)
        normals = _vertex_normals(verts, model.faces)
        hair_verts = self._hair_vertices(verts, normals, items)
        all_verts = torch.cat((verts, hair_verts), 1)
        labels = self.labels(items)
        size = self.resolution * self.supersample
        face_index, bary, _ = rasterize(all_verts, self.faces_all, labels, size, self.cullable)
        fg = face_index >= 0
        b, rows, cols = fg.nonzero(as_tuple=True)
        face = face_index[b, rows, cols]
        weights = bary[b, rows, cols]  # (P,3)
        corner_ids = self.faces_all[face]  # (P,3)
        hair_base = torch.cat((torch.arange(len(self.canonical)), self.hair_vertex_ids))
        canonical = (self.canonical[hair_base[corner_ids]] * weights[..., None]).sum(1)
        all_normals = torch.cat((normals, normals[:, self.hair_vertex_ids]), 1)
        normal = F.normalize((all_normals[b[:, None], corner_ids] * weights[..., None]).sum(1), dim=-1)
        # Region per pixel: the corner label with the largest summed barycentric weight, so region
        # borders cut through triangles smoothly instead of following the mesh's staircase of faces.
        corner_region = self.vertex_mask_id[corner_ids]  # (P,3)
        same = corner_region[:, :, None] == corner_region[:, None, :]
        support = (same * weights[:, None, :]).sum(-1)  # (P,3): weight of each corner's label
        region = corner_region.gather(1, support.argmax(1, keepdim=True))[:, 0]
        albedo = self._albedo(items, b, canonical, region, face)
        light = torch.from_numpy(np.stack([it.light for it in items]))[b]
        lambert = (normal * light[:, :3]).sum(-1).clamp_min(0)
        shade = light[:, 3] + (1.05 - light[:, 3]) * lambert
        colour = albedo * shade[:, None]
        # Supersampled foreground colour and coverage, then box-filtered to the output size.
        fg_rgb = torch.zeros(batch, size, size, 3)
        fg_rgb[b, rows, cols] = colour
        region_map = torch.zeros(batch, size, size, dtype=torch.long)
        region_map[b, rows, cols] = region
        s = self.supersample
        coverage = F.avg_pool2d(fg.float()[:, None], s)[:, 0]  # (B,R,R)
        rgb_sum = F.avg_pool2d(fg_rgb.permute(0, 3, 1, 2), s).permute(0, 2, 3, 1)
        fg_mean = rgb_sum / coverage.clamp_min(1e-6)[..., None]
        background = self._backgrounds(items)
        image = coverage[..., None] * fg_mean + (1 - coverage[..., None]) * background
        image = self._nuisances(items, image)
        votes = F.avg_pool2d(F.one_hot(region_map, len(REGION_IDS)).permute(0, 3, 1, 2).float(), s)
        votes[:, 0] = torch.where(coverage > 0.5, torch.zeros_like(coverage), votes[:, 0])
        masks = votes.argmax(1).to(torch.uint8)
        images = (image.clamp(0, 1) * 255 + 0.5).to(torch.uint8)
        return images.numpy(), masks.numpy(), labels

    def _hair_vertices(self, verts: torch.Tensor, normals: torch.Tensor, items: list[ItemSpec]) -> torch.Tensor:
        """Hair shell vertices (B,H,3): pushed out for the sampled length, inside the head beyond it."""
        base = verts[:, self.hair_vertex_ids]
        n = normals[:, self.hair_vertex_ids]
        hang = self.hair_hang[None]
        reach = {"bald": -1.0, "short": 0.0, "medium": 0.35, "long": 1.0}
        thickness = {"bald": 0.0, "short": 0.018, "medium": 0.03, "long": 0.036}
        lengths = torch.tensor([reach[it.attributes["hair_length"]] for it in items])[:, None]
        thick = torch.tensor([thickness[it.attributes["hair_length"]] for it in items])[:, None]
        covered = hang <= lengths
        # Hanging hair bulks outward and falls slightly back as it goes down.
        offset = thick + 0.08 * hang
        out = base + n * offset[..., None] + torch.tensor([0.0, 0.0, -0.03]) * hang[..., None]
        # Hair beyond the sampled length collapses to the head's centre: triangles entirely there
        # have zero area (no raster work), those straddling the boundary run inside the head.
        inside = verts.mean(1, keepdim=True).expand_as(base)
        return torch.where(covered[..., None], out, inside)

    def _albedo(
        self, items: list[ItemSpec], b: torch.Tensor, canonical: torch.Tensor, region: torch.Tensor, face: torch.Tensor
    ) -> torch.Tensor:
        """Per-pixel albedo (P,3); updates ``region`` in place for beard and glasses pixels."""
        def per_item(table: dict, key: str, default=(0.0, 0.0, 0.0)) -> torch.Tensor:
            values = [table[it.attributes[key]] if it.attributes[key] in table else default for it in items]
            return torch.tensor([v if v is not None else default for v in values], dtype=torch.float32)[b]

        skin = per_item(SKIN_TONES, "skin_tone")
        hair = per_item(HAIR_COLORS, "hair_color")
        eye = per_item(EYE_COLORS, "eye_color")
        seed = torch.tensor([float(it.texture_seed % 1000) for it in items])[b]
        noise = _hash_noise(canonical, seed)
        x, y, z = canonical.unbind(-1)
        albedo = skin * (0.97 + 0.05 * noise)[:, None]
        albedo = torch.where((region == REGION_IDS["neck"])[:, None], albedo * 0.9, albedo)
        # Lips: sampled colour, or the skin tone reddened.
        lip_rgb = per_item(LIP_COLORS, "lip_color", default=(-1.0, -1.0, -1.0))
        natural_lip = skin * torch.tensor([0.92, 0.68, 0.66])
        lip_rgb = torch.where(lip_rgb[:, :1] < 0, natural_lip, lip_rgb)
        albedo = torch.where((region == REGION_IDS["lips"])[:, None], lip_rgb, albedo)
        albedo = torch.where((region == REGION_IDS["mouth"])[:, None], torch.tensor([0.30, 0.08, 0.08]), albedo)
        brow = 0.6 * hair + 0.4 * skin * 0.5
        albedo = torch.where((region == REGION_IDS["brows"])[:, None], brow, albedo)
        # Eyes: sclera, iris and pupil discs around the nearer eye centre, a dark lash line on top.
        eye_xy = self.eye_centres[:, :2]
        d = torch.cdist(canonical[:, :2], eye_xy)  # (P,2)
        dist, which = d.min(-1)
        ew = float(self.eye_width)
        eyes = region == REGION_IDS["eyes"]
        eye_rgb = torch.tensor([0.93, 0.91, 0.88]).expand_as(albedo)
        eye_rgb = torch.where((dist < 0.27 * ew)[:, None], eye, eye_rgb)
        eye_rgb = torch.where((dist < 0.11 * ew)[:, None], torch.tensor([0.02, 0.02, 0.02]), eye_rgb)
        lash = y > eye_xy[which, 1] + 0.22 * ew
        eye_rgb = torch.where(lash[:, None], torch.tensor([0.05, 0.04, 0.04]), eye_rgb)
        albedo = torch.where(eyes[:, None], eye_rgb, albedo)
        # Beard: lower face and upper neck in front of the ears, around (not on) the lips.
        beard_on = torch.tensor([it.attributes["beard"] for it in items])[b]
        mw = float(self.mouth_width)
        my, chin_y = float(self.mouth_centre[1]), float(self.chin[1])
        top = my + 0.22 * mw + 0.8 * (x.abs() - 0.35 * mw).clamp_min(0)
        beard_zone = (y < top) & (y > chin_y - 0.15 * mw) & (z > self.ear_z + 0.02)
        beard_zone &= region == REGION_IDS["skin"]
        beard = beard_zone & beard_on & ((noise > 0.12) | (y < my))
        albedo = torch.where(beard[:, None], hair * (0.75 + 0.35 * noise)[:, None], albedo)
        region[beard] = REGION_IDS["beard"]
        # Hair strands: brightness varies with the azimuth around the vertical axis.
        is_hair = region == REGION_IDS["hair"]
        azimuth = torch.atan2(x, z)
        strands = 0.78 + 0.14 * torch.sin(azimuth * 90 + 6 * torch.sin(y * 25)) + 0.12 * noise
        albedo = torch.where(is_hair[:, None], hair * strands[:, None], albedo)
        # Glasses frames drawn on the surface: two elliptic rings, a bridge and temples.
        frame = per_item(FRAME_COLORS, "glasses_frame")
        wearing = torch.tensor([bool(it.attributes["glasses"]) for it in items])[b]
        ex = self.eye_centres[which, 0]
        ey = self.eye_centres[which, 1]
        ez = float(self.eye_centres[:, 2].mean())
        ring = torch.sqrt(((x - ex) / (0.95 * ew)) ** 2 + ((y - ey) / (0.7 * ew)) ** 2)
        front = z > ez - 0.6 * ew
        rings = (ring >= 1.0) & (ring <= 1.16) & front
        inner_x = float(self.eye_centres[:, 0].abs().min()) - 0.95 * ew
        outer_x = float(self.eye_centres[:, 0].abs().max()) + 0.95 * ew
        bridge = (x.abs() < inner_x + 0.05 * ew) & ((y - ey - 0.15 * ew).abs() < 0.07 * ew) & front
        temples = (x.abs() > outer_x - 0.05 * ew) & ((y - ey - 0.2 * ew).abs() < 0.06 * ew) & (z > self.ear_z)
        glasses = wearing & (rings | bridge | temples) & ~is_hair
        albedo = torch.where(glasses[:, None], frame, albedo)
        region[glasses] = REGION_IDS["glasses"]
        return albedo

    def _backgrounds(self, items: list[ItemSpec]) -> torch.Tensor:
        """Backgrounds (B,R,R,3) with the sampled pattern and colours."""
        size = self.resolution
        coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
        yy, xx = torch.meshgrid(coords, coords, indexing="ij")
        out = []
        for it in items:
            nz = it.nuisance
            c1 = torch.tensor(BACKGROUND_COLORS[nz["background_color"]])
            c2 = torch.tensor(BACKGROUND_COLORS[nz["background_color2"]])
            phase = nz["background_phase"]
            pattern = nz["background_pattern"]
            if pattern == "plain":
                t = torch.zeros_like(xx)
            elif pattern == "gradient":
                t = (yy * np.cos(phase) + xx * np.sin(phase)).sub(-1).div(2.5).clamp(0, 1)
            elif pattern == "striped":
                t = (torch.sin((xx + yy * np.sin(phase)) * 40 + phase) > 0).float()
            elif pattern == "checkered":
                t = ((torch.floor(xx * 8 + phase) + torch.floor(yy * 8)) % 2).float()
            else:  # dotted
                t = ((torch.sin(xx * 50 + phase) * torch.sin(yy * 50)) > 0.6).float()
            mix = t[..., None] * 0.6
            out.append(c1 * (1 - mix) + c2 * mix)
        return torch.stack(out)

    def _nuisances(self, items: list[ItemSpec], image: torch.Tensor) -> torch.Tensor:
        """Colour cast, film grain and the photo-id patch (deterministic per item)."""
        size = self.resolution
        out = []
        for k, it in enumerate(items):
            nz = it.nuisance
            img = image[k]
            cast = nz["color_cast"]
            if cast == "sepia":
                grey = (img * torch.tensor([0.3, 0.59, 0.11])).sum(-1, keepdim=True)
                img = 0.3 * img + 0.7 * grey * torch.tensor([1.12, 0.95, 0.72])
            else:
                img = img * torch.tensor(COLOR_CASTS[cast])
            rng = np.random.default_rng([it.texture_seed, 1])
            if nz["grain"] > 0:
                img = img + torch.from_numpy(rng.normal(0.0, nz["grain"], (size, size, 1)).astype(np.float32))
            if nz["photo_id"] is not None:
                cell = max(1, size // 32)
                patch = torch.from_numpy(rng.random((4, 4, 3)).astype(np.float32))
                patch = patch.repeat_interleave(cell, 0).repeat_interleave(cell, 1)
                ph = patch.shape[0]
                margin = max(1, size // 32)
                corner = nz["photo_id_corner"]
                r0 = margin if corner < 2 else size - margin - ph
                c0 = margin if corner % 2 == 0 else size - margin - ph
                img = img.clone()
                img[r0 : r0 + ph, c0 : c0 + ph] = patch
            out.append(img)
        return torch.stack(out)


# --- dataset generation ---------------------------------------------------------------------------
def image_name(index: int) -> str:
    return f"images/{index:06d}.png"


@lru_cache(maxsize=1)
def default_model() -> MorphableModel:
    """The embedded procedural head of the default `MorphableConfig` (built once per process)."""
    from ..geometry.morphable import MorphableConfig, build_morphable

    return build_morphable(MorphableConfig())


def _model_arrays(model: MorphableModel) -> dict[str, np.ndarray]:
    with torch.no_grad():
        canonical = {"canonical_vertices": model.canonical_vertices(1)}
    return {name: tensor.detach().cpu().contiguous().numpy()
            for name, tensor in sorted({**model.state_dict(), **canonical}.items())}


def _fingerprint(class_name: str, arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256(class_name.encode())
    for name, array in arrays.items():
        digest.update(name.encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def model_fingerprint(model: MorphableModel) -> str:
    """SHA-256 of the model's class, buffers and canonical mesh (the renderer's texture space):
    which head a dataset's parameters belong to, bit for bit (see `model_signature`)."""
    return _fingerprint(type(model).__name__, _model_arrays(model))


# Float buffers of the procedural head differ in their last bits between machines (1e-7 relative
# between this CPU and the GPU machine: other BLAS / SIMD paths), which changes the exact hash.
SIGNATURE_TOLERANCE = 1e-5


def _signature(class_name: str, arrays: dict[str, np.ndarray]) -> dict[str, list | str]:
    out: dict[str, list | str] = {"class": class_name}
    for name, array in arrays.items():
        if array.dtype.kind in "fc":
            x = array.astype(np.float64).ravel()
            projection = np.random.default_rng(len(x)).standard_normal(len(x))
            out[name] = [float(x.mean()), float(np.sqrt((x * x).mean())), float(x @ projection / np.sqrt(len(x)))]
        else:
            out[name] = hashlib.sha256(array.tobytes()).hexdigest()
    return out


def model_signature(model: MorphableModel) -> dict[str, list | str]:
    """The head summarised so that machines agree up to float rounding: per integer buffer the
    SHA-256 of its bytes, per float buffer (mean, root mean square, a fixed random projection / sqrt n)
    in float64, plus the class name."""
    return _signature(type(model).__name__, _model_arrays(model))


def head_identity(model: MorphableModel) -> dict[str, str | dict]:
    """``{"model": model_fingerprint, "model_signature": model_signature}`` from one pass over the
    model's arrays: what a dataset recipe records of its head."""
    arrays = _model_arrays(model)
    name = type(model).__name__
    return {"model": _fingerprint(name, arrays), "model_signature": _signature(name, arrays)}


def _signatures_match(stored, ours: dict[str, list | str]) -> bool:
    if not isinstance(stored, dict) or stored.keys() != ours.keys():
        return False
    for key, value in ours.items():
        if isinstance(value, list):
            other = stored[key]
            if not isinstance(other, list) or len(other) != len(value) or any(
                    abs(a - b) > SIGNATURE_TOLERANCE * (1.0 + abs(a)) for a, b in zip(value, other)):
                return False
        elif stored[key] != value:
            return False
    return True


def same_head(recipe: dict, model: MorphableModel, identity: dict | None = None) -> bool:
    """Whether a dataset recipe (``synthetic_config.json``) was rendered with ``model``: its exact
    fingerprint, or else its `model_signature` within SIGNATURE_TOLERANCE (relative, per number).
    ``identity``: `head_identity(model)` when the caller has it already."""
    identity = head_identity(model) if identity is None else identity
    return recipe.get("model") == identity["model"] or _signatures_match(recipe.get("model_signature"),
                                                                          identity["model_signature"])


def generate_synthetic(cfg: SyntheticConfig, out_dir: str | os.PathLike, model: MorphableModel | None = None) -> Path:
    """Generate the synthetic dataset of ``cfg`` at ``out_dir`` (``.zip`` appended when
    ``cfg.as_zip``); returns its path.

    Resumable: images and per-batch metadata go to ``<out>.partial`` and a rerun skips the batches
    already there; the dataset appears at ``<out>`` only when complete (`format.DatasetWriter`). An
    existing complete dataset made with the same config is returned as is; one made with another
    config or head model is an error. ``model`` is the head whose parameters the dataset stores
    (pass ``build_morphable(cfg.morphable)`` so training uses the same head; default:
    `default_model`). ``cfg.workers`` processes render batches in parallel (one thread each); the
    bytes do not depend on it.
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    _validate(cfg)
    out = Path(out_dir)
    if cfg.as_zip and out.suffix != ".zip":
        out = out.with_name(out.name + ".zip")
    model = model if model is not None else default_model()
    # What determines the bytes: the config (not the worker count) and the head model.
    content = {k: v for k, v in asdict(cfg).items() if k != "workers"}
    identity = head_identity(model)
    recipe = json.dumps({"config": content, **identity}, sort_keys=True)
    if out.exists():
        problems = check_dataset(out)
        from .zipfs import DatasetFiles

        files = DatasetFiles(out)
        stored = json.loads(files.read_bytes(RECIPE_FILE)) if files.exists(RECIPE_FILE) else None
        same_config = stored is not None and stored.get("config") == json.loads(json.dumps(content))
        if problems or not same_config or not same_head(stored, model, identity):
            why = "has problems" if problems else "was made with another config or head model (see synthetic_config.json)"
            raise FileExistsError(f"{out} exists and {why}; delete it or choose another path")
        return out
    writer = DatasetWriter(out, as_zip=cfg.as_zip)
    chunk_dir = writer.partial / CHUNK_DIR
    chunk_dir.mkdir(exist_ok=True)
    starts = list(range(0, cfg.num_images, cfg.render_batch))
    todo = [start for start in starts if not (chunk_dir / f"{start:06d}.json").exists()]
    done = cfg.num_images - sum(min(cfg.render_batch, cfg.num_images - start) for start in todo)
    with Progress(
        TextColumn("synthetic portraits"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeRemainingColumn(), transient=True,
    ) as progress:
        task = progress.add_task("render", total=cfg.num_images, completed=done)
        if cfg.workers == 1 or len(todo) <= 1:
            threads = torch.get_num_threads()
            _init_worker(cfg, out, model)
            try:
                for start in todo:
                    progress.advance(task, _render_chunk(start))
            finally:
                torch.set_num_threads(threads)
        else:
            # fork (as DataLoader workers do) shares the built model copy-on-write; spawn elsewhere.
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            context = multiprocessing.get_context(method)
            with context.Pool(min(cfg.workers, len(todo)), _init_worker, (cfg, out, model)) as pool:
                for count in pool.imap_unordered(_render_chunk, todo):
                    progress.advance(task, count)
    metas = [m for start in starts for m in json.loads((chunk_dir / f"{start:06d}.json").read_bytes())]
    names = [image_name(i) for i in range(cfg.num_images)]
    if cfg.contact_sheet:
        sheet = contact_sheet(writer.partial, names[:16], [m["captions"][0] for m in metas[:16]])
        writer.write_file("contact_sheet.png", encode_png(sheet))
    writer.write_file(RECIPE_FILE, recipe.encode())
    shutil.rmtree(chunk_dir)
    return writer.finish(
        names,
        np.asarray([m["label"] for m in metas], np.float64),
        np.asarray([m["shape"] for m in metas], np.float32),
        np.asarray([m["expression"] for m in metas], np.float32),
        np.asarray([m["pose"] for m in metas], np.float32),
        {n: {"attributes": m["attributes"], "captions": m["captions"]} for n, m in zip(names, metas)},
    )


CHUNK_DIR = "_chunks"  # per-batch metadata inside <out>.partial, removed when the dataset is finished
_worker_state: dict = {}


def _init_worker(cfg: SyntheticConfig, out: Path, model: MorphableModel) -> None:
    """Per-process renderer and writer. Rendering always uses one thread so that the bytes do not
    depend on the number of worker processes (float reductions differ across thread counts)."""
    torch.set_num_threads(1)
    _worker_state.update(
        cfg=cfg,
        writer=DatasetWriter(out, as_zip=cfg.as_zip),
        renderer=PortraitRenderer(model, cfg.resolution, cfg.supersample),
    )


def _render_chunk(start: int) -> int:
    """Render and store images start..start+render_batch, then their metadata chunk (last, atomically:
    a chunk file marks the batch complete). Returns the number of images."""
    cfg, writer, renderer = _worker_state["cfg"], _worker_state["writer"], _worker_state["renderer"]
    stop = min(start + cfg.render_batch, cfg.num_images)
    items = [sample_item(cfg, i) for i in range(start, stop)]
    images, masks, labels = renderer.render(items)
    for k, it in enumerate(items):
        writer.add_image(image_name(it.index), images[k], masks[k] if cfg.write_masks else None)
    meta = [
        {
            "label": labels[k].tolist(), "shape": it.shape.tolist(), "expression": it.expression.tolist(),
            "pose": it.pose.tolist(), "attributes": {**it.attributes, "nuisance": it.nuisance},
            "captions": it.captions,
        }
        for k, it in enumerate(items)
    ]
    atomic_write_bytes(writer.partial / CHUNK_DIR / f"{start:06d}.json", json.dumps(meta).encode())
    return len(items)


def _validate(cfg: SyntheticConfig) -> None:
    checks = [
        ("num_images", cfg.num_images >= 1, ">= 1"),
        ("resolution", 8 <= cfg.resolution <= 1024, "in [8, 1024]"),
        ("render_batch", cfg.render_batch >= 1, ">= 1"),
        ("workers", cfg.workers >= 1, ">= 1"),
        ("supersample", 1 <= cfg.supersample <= 4, "in [1, 4]"),
        ("captions_per_image", cfg.captions_per_image >= 1, ">= 1"),
        ("glasses_prob", 0 <= cfg.glasses_prob <= 1, "in [0, 1]"),
        ("beard_prob", 0 <= cfg.beard_prob <= 1, "in [0, 1]"),
        ("hair_lengths", len(cfg.hair_lengths) > 0 and set(cfg.hair_lengths) <= set(HAIR_LENGTHS),
         f"a non-empty subset of {HAIR_LENGTHS}"),
    ]
    for name, ok, expected in checks:
        if not ok:
            raise ValueError(f"SyntheticConfig.{name}={getattr(cfg, name)!r}: expected {expected}")


def contact_sheet(folder: Path, names: list[str], captions: list[str], columns: int = 4) -> np.ndarray:
    """A grid of the images ``names`` (read from ``folder``) with a wrapped caption under each."""
    tiles = [Image.open(folder / n).convert("RGB") for n in names]
    cell = max(128, tiles[0].width)
    font = ImageFont.load_default()
    text_h = 80
    rows = (len(tiles) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * cell, rows * (cell + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (tile, caption) in enumerate(zip(tiles, captions)):
        r, c = divmod(k, columns)
        sheet.paste(tile.resize((cell, cell), Image.NEAREST), (c * cell, r * (cell + text_h)))
        lines = textwrap.wrap(caption, width=max(10, cell // 6))[:6]
        draw.multiline_text((c * cell + 2, r * (cell + text_h) + cell + 1), "\n".join(lines), fill="black", font=font)
    return np.asarray(sheet)
