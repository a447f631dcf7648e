"""CLIP through open_clip: one loader for every source of weights, batched tensor preprocessing.

`build_clip(cfg)` resolves the weights of `LVLMConfig` to a local file (a pretrained tag from the
user's download cache, a local state dict, or a project-trained checkpoint) and builds the model with
`open_clip.create_model(arch, pretrained=<file>)` — the same generic loader for real CLIP weights and
for the project's own small model. `ClipEncoder` then embeds

- images: float (B,3,H,W) in [-1,1] -> the model's own preprocessing (resize, centre crop or pad,
  mean/std normalisation, from the model's preprocess config) done on tensors, so it is batched and
  differentiable -> (B,D) L2-normalised;
- texts: list[str] -> the model's tokenizer -> (B,D) L2-normalised.

`model_id` ("<arch>@<sha256 prefix of the weights>") names the exact weights in every artefact that
holds embeddings (text cache keys, canonicalisation manifests, metrics protocols).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F

from ..errors import UserError
from .config import LVLM_KINDS, PRECISIONS, LVLMConfig
from .models import register_project_models

CARD_SUFFIX = ".card.json"  # model card written beside a project-trained checkpoint


def card_path(weights: str | os.PathLike) -> Path:
    """Model card of the checkpoint ``weights``: ``<dir>/<stem>.card.json``."""
    weights = Path(weights)
    return weights.with_name(weights.stem + CARD_SUFFIX)


@lru_cache(maxsize=32)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file (memoised per path, size and modification time: big CLIP files hash once)."""
    stat = os.stat(path)
    return _file_sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


def state_dict_sha256(model: torch.nn.Module) -> str:
    """SHA-256 over the names and bytes of a module's state dict (weights that exist only in memory)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class Preprocess:
    """The model's image preprocessing (open_clip's PreprocessCfg fields that apply to tensors)."""

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"  # bicubic | bilinear
    resize_mode: str = "shortest"  # shortest (resize + centre crop) | longest (resize + pad) | squash
    fill_color: int = 0

    @classmethod
    def from_open_clip(cls, cfg: dict) -> "Preprocess":
        size = cfg["size"]
        size = (size, size) if isinstance(size, int) else tuple(size)
        return cls(size=tuple(int(s) for s in size), mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                   interpolation=cfg.get("interpolation", "bicubic"), resize_mode=cfg.get("resize_mode", "shortest"),
                   fill_color=int(cfg.get("fill_color", 0)))


def preprocess_images(images: torch.Tensor, pp: Preprocess) -> torch.Tensor:
    """Model input from images in [-1,1] (B,3,H,W): the tensor version of open_clip's validation
    transform (PIL resize with antialiasing, centre crop / pad, ToTensor, Normalize)."""
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(f"images: expected a float tensor (B,3,H,W) in [-1,1], got {images.dtype} {tuple(images.shape)}")
    x = (images.float() + 1.0) / 2.0  # ToTensor's [0,1] range
    height, width = x.shape[-2:]
    out_h, out_w = pp.size
    mode = "bicubic" if pp.interpolation != "bilinear" else "bilinear"
    if pp.resize_mode == "squash":
        target = (out_h, out_w)
    elif pp.resize_mode in ("shortest", "longest"):
        pick = max if pp.resize_mode == "shortest" else min
        scale = pick(out_h / height, out_w / width)
        target = (max(1, round(height * scale)), max(1, round(width * scale)))
    else:
        raise ValueError(f"preprocess resize_mode={pp.resize_mode!r}: expected shortest, longest or squash")
    if target != (height, width):
        # antialias=True is PIL's filter (bicubic a=-0.5 with a widened support when downscaling);
        # PIL clips to the pixel range, hence the clamp.
        x = F.interpolate(x, size=target, mode=mode, align_corners=False, antialias=True).clamp(0.0, 1.0)
    height, width = target
    if (height, width) != (out_h, out_w):
        # torchvision's CenterCrop / CenterCropOrPad rounding: offset = round((in - out) / 2)
        top, left = int(round((height - out_h) / 2.0)), int(round((width - out_w) / 2.0))
        if top >= 0 and left >= 0:
            x = x[..., top:top + out_h, left:left + out_w]
        else:
            pad_t, pad_l = max(0, -top), max(0, -left)
            x = F.pad(x, (pad_l, out_w - width - pad_l, pad_t, out_h - height - pad_t), value=pp.fill_color / 255.0)
    mean = x.new_tensor(pp.mean).view(1, 3, 1, 1)
    std = x.new_tensor(pp.std).view(1, 3, 1, 1)
    return (x - mean) / std


class ClipEncoder:
    """An open_clip model with its tokenizer and preprocessing; see the module docstring."""

    def __init__(self, model: torch.nn.Module, tokenizer, arch: str, model_id: str, batch_size: int = 256) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.arch = arch
        self.model_id = model_id
        self.batch_size = int(batch_size)
        self.preprocess = Preprocess.from_open_clip(model.visual.preprocess_cfg)
        self._embed_dim: Optional[int] = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.visual.parameters()).dtype

    @property
    def embed_dim(self) -> int:
        if self._embed_dim is None:  # architectures store it in different places; measure it once
            self._embed_dim = int(self.encode_text(["a"]).shape[1])
        return self._embed_dim

    def preprocess_images(self, images: torch.Tensor) -> torch.Tensor:
        return preprocess_images(images, self.preprocess)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B,D) float32 L2-normalised embeddings of images in [-1,1] (B,3,H,W); differentiable
        (wrap in torch.no_grad() when no gradient is needed)."""
        out = []
        for chunk in images.split(self.batch_size):
            x = self.preprocess_images(chunk.to(self.device)).to(self.dtype)
            out.append(self.model.encode_image(x, normalize=True).float())
        return torch.cat(out) if out else images.new_zeros(0, self.embed_dim)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """(B,D) float32 L2-normalised embeddings of ``texts`` (no gradient: texts are constants)."""
        if isinstance(texts, str):
            raise TypeError("encode_text expects a list of strings, got one string")
        out = []
        for start in range(0, len(texts), self.batch_size):
            out.append(self.encode_tokens(self.tokenize(texts[start:start + self.batch_size]).to(self.device)))
        return torch.cat(out) if out else torch.zeros(0, self.embed_dim)

    def tokenize(self, texts: Sequence[str]):
        """(B, context) token ids of ``texts`` on the CPU (the model's own tokenizer)."""
        return self.tokenizer(list(texts))

    @torch.no_grad()
    def encode_tokens(self, tokens: torch.Tensor, model: torch.nn.Module | None = None) -> torch.Tensor:
        """(B,D) float32 L2-normalised embeddings of token ids on the model's device (no host work, so it
        can be captured in a CUDA graph); ``model``: a copy of the model to run instead (``text_copy``)."""
        return (self.model if model is None else model).encode_text(tokens, normalize=True).float()

    def text_copy(self, dtype: torch.dtype) -> torch.nn.Module:
        """A copy of the model without its image tower, cast to ``dtype``, for ``encode_tokens``: an
        inference engine's text tower in bf16 runs on bf16 weights instead of casting every weight on
        every call as autocast does. A copy: later changes to the model's weights do not reach it."""
        visual = self.model.visual
        self.model.visual = None  # not copied (the text tower never uses it)
        try:
            copied = copy.deepcopy(self.model)
        finally:
            self.model.visual = visual
        return copied.to(dtype).eval().requires_grad_(False)


# --- resolving weights ---------------------------------------------------------------------------
def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no", "off")


def _cached_pretrained_file(pretrained_cfg: dict, download_dir: Optional[str]) -> Optional[Path]:
    """The file of an open_clip pretrained entry if it is already in the download cache, else None."""
    from open_clip.pretrained import _get_safe_alternatives

    if pretrained_cfg.get("file"):
        return Path(pretrained_cfg["file"]) if Path(pretrained_cfg["file"]).is_file() else None
    if pretrained_cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(pretrained_cfg["hf_hub"])
        filename = filename or "open_clip_pytorch_model.bin"
        for name in (*_get_safe_alternatives(filename), filename):
            found = try_to_load_from_cache(repo, name, cache_dir=download_dir)
            if isinstance(found, str) and os.path.isfile(found):
                return Path(found)
    if pretrained_cfg.get("url"):
        path = Path(download_dir or os.path.expanduser("~/.cache/clip")) / os.path.basename(pretrained_cfg["url"])
        if path.is_file():
            return path
    return None


def resolve_pretrained(arch: str, tag: str, download_dir: Optional[str] = None) -> tuple[Path, dict]:
    """Local file and open_clip pretrained entry of (arch, tag). Offline (HF_HUB_OFFLINE set) only
    the user's download cache is looked at; online, open_clip's usual download fills that cache."""
    from open_clip.pretrained import download_pretrained, get_pretrained_cfg, list_pretrained_tags_by_model

    entry = get_pretrained_cfg(arch, tag)
    if not entry:
        tags = list_pretrained_tags_by_model(arch)
        raise UserError(f"lvlm.pretrained_tag={tag!r} is not an open_clip pretrained tag of lvlm.arch={arch!r}; "
                        f"known tags: {', '.join(tags) or '(none: use lvlm.kind=file with a local weights file)'}")
    if hub_offline():
        path = _cached_pretrained_file(entry, download_dir)
        if path is None:
            where = entry.get("hf_hub") or entry.get("url")
            raise UserError(
                f"lvlm: weights of {arch} '{tag}' ({where}) are not in the download cache "
                f"({download_dir or 'the default Hugging Face / ~/.cache/clip cache'}) and HF_HUB_OFFLINE is set, so "
                f"nothing is downloaded. Unset HF_HUB_OFFLINE on a machine with network to fetch them once, or "
                f"download the file yourself and use lvlm.kind=file lvlm.weights=<path>.")
        return path, entry
    try:
        return Path(download_pretrained(entry, cache_dir=download_dir)), entry
    except Exception as exc:
        raise UserError(f"lvlm: could not fetch the weights of {arch} '{tag}' ({type(exc).__name__}: {exc}); "
                        f"download them yourself and use lvlm.kind=file lvlm.weights=<path>") from exc


def _require_file(path: Optional[str], cfg: LVLMConfig) -> Path:
    if not path:
        raise UserError(f"lvlm.weights is not set; lvlm.kind={cfg.kind} needs the path of a weights file")
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if cfg.kind == "project":
        how = (f"train it with `python run.py task=train_lvlm` (writes {path} and its model card), "
               f"or point lvlm.weights at an existing train_lvlm checkpoint")
    else:
        how = "download the open_clip-compatible state dict (.pt, .bin or .safetensors) there, or fix lvlm.weights"
    raise UserError(f"lvlm.weights: no file at {path} (lvlm.kind={cfg.kind}, lvlm.arch={cfg.arch}); {how}")


def _check_card(weights: Path, arch: str) -> None:
    import json

    card = card_path(weights)
    if not card.is_file():
        raise UserError(f"lvlm.kind=project: {weights} has no model card {card} (train_lvlm writes both); "
                        f"use lvlm.kind=file for a checkpoint made elsewhere")
    trained_arch = json.loads(card.read_text()).get("arch")
    if trained_arch != arch:
        raise UserError(f"lvlm.weights={weights} was trained as architecture {trained_arch!r} (its card {card}), "
                        f"but lvlm.arch={arch!r}; set lvlm.arch={trained_arch}")


@contextmanager
def quiet_open_clip(level: int = logging.WARNING) -> Iterator[None]:
    """open_clip logs every step of model creation on the root logger at INFO; keep ``level`` and up."""
    root = logging.getLogger()
    previous = root.level
    root.setLevel(max(previous, level))
    try:
        yield
    finally:
        root.setLevel(previous)


def build_clip(cfg: LVLMConfig) -> ClipEncoder:
    """The `ClipEncoder` of ``cfg`` (eval mode, on ``cfg.device``); never downloads when HF_HUB_OFFLINE is set."""
    import open_clip

    if cfg.kind not in LVLM_KINDS:
        raise UserError(f"lvlm.kind={cfg.kind!r}: expected one of {', '.join(LVLM_KINDS)}")
    if cfg.precision not in PRECISIONS:
        raise UserError(f"lvlm.precision={cfg.precision!r}: expected one of {', '.join(PRECISIONS)}")
    register_project_models()
    if cfg.arch not in open_clip.list_models():
        raise UserError(f"lvlm.arch={cfg.arch!r} is not an open_clip architecture; e.g. "
                        f"{', '.join(m for m in open_clip.list_models() if 'clipportrait' in m or m.startswith('ViT-B'))}")
    overrides: dict = {}
    if cfg.kind == "pretrained":
        if not cfg.pretrained_tag:
            raise UserError("lvlm.kind=pretrained needs lvlm.pretrained_tag (e.g. openai)")
        weights, entry = resolve_pretrained(cfg.arch, cfg.pretrained_tag, cfg.download_dir)
        overrides = {k: entry[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in entry}
        quick_gelu = bool(entry.get("quick_gelu", False))
    elif cfg.kind in ("file", "project"):
        weights = _require_file(cfg.weights, cfg)
        if cfg.kind == "project":
            _check_card(weights, cfg.arch)
        quick_gelu = False
    else:
        weights, quick_gelu = None, False
    with torch.random.fork_rng(devices=[]), quiet_open_clip():
        torch.manual_seed(cfg.random_seed)  # only matters for kind=random; loaded weights overwrite it
        try:
            model = open_clip.create_model(
                cfg.arch, pretrained=None if weights is None else str(weights), precision=cfg.precision,
                device=cfg.device, force_quick_gelu=quick_gelu,
                force_preprocess_cfg=overrides,
            )
        except RuntimeError as exc:  # strict load of a state dict of another architecture
            raise UserError(f"lvlm: cannot load {weights} into open_clip architecture {cfg.arch} ({exc})") from exc
    model.eval()
    if weights is None:
        model_id = f"{cfg.arch}@random{cfg.random_seed}-{state_dict_sha256(model)[:12]}"
    else:
        model_id = f"{cfg.arch}@{file_sha256(weights)[:16]}"
    with quiet_open_clip():
        tokenizer = open_clip.get_tokenizer(cfg.arch)
    return ClipEncoder(model, tokenizer, cfg.arch, model_id, cfg.batch_size)
