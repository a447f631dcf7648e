"""PortraitDataset / ConditioningSampler / PortraitDataModule: batches, flips, zip workers, bad data."""

import itertools
import logging
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from pytorch3d.renderer import MeshRasterizer, RasterizationSettings
from pytorch3d.structures import Meshes
from torch.utils.data import DataLoader

from clipportrait.data.config import DataConfig, SyntheticConfig
from clipportrait.data.datamodule import (
    ConditioningSampler, PortraitDataModule, PortraitDataset, observation_vertices,
)
from clipportrait.data.format import DatasetError, read_index
from clipportrait.data.sampler import ResumableSampler
from clipportrait.data.synthetic import default_model
from clipportrait.geometry.cameras import mirror_labels, to_pytorch3d_cameras

N, RES = 8, 32


def _synthetic(**kw):
    # Bald heads and wide yaws: the foreground is exactly the mesh, and mirroring errors show. One
    # sample per pixel, so masks hold the region at each pixel centre, as pytorch3d's rasteriser does.
    return SyntheticConfig(num_images=N, resolution=RES, seed=1, render_batch=8, hair_lengths=["bald"],
                           yaw_std=0.5, supersample=1, workers=1, **kw)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    dm = PortraitDataModule(DataConfig(kind="synthetic", path=str(tmp_path_factory.mktemp("d") / "ds"),
                                       resolution=RES, synthetic=_synthetic()))
    dm.prepare_data()
    return dm.dataset_path


@pytest.fixture(scope="module")
def zipped(tmp_path_factory):
    dm = PortraitDataModule(DataConfig(kind="synthetic", path=str(tmp_path_factory.mktemp("z") / "ds"),
                                       resolution=RES, synthetic=_synthetic(as_zip=True)))
    dm.prepare_data()
    assert dm.dataset_path.suffix == ".zip" and dm.dataset_path.is_file()
    return dm.dataset_path


def test_batch_shapes_and_dtypes(folder):
    """A collated batch has the documented keys, shapes, dtypes and value ranges."""
    ds = PortraitDataset(folder, RES, flip=True)
    assert len(ds) == 2 * N
    batch = next(iter(DataLoader(ds, batch_size=4, shuffle=False)))
    expected = {"image": ((4, 3, RES, RES), torch.float32), "camera": ((4, 25), torch.float32),
                "shape": ((4, 100), torch.float32), "expression": ((4, 50), torch.float32),
                "pose": ((4, 6), torch.float32), "flip": ((4,), torch.bool), "index": ((4,), torch.int64)}
    assert set(batch) == set(expected)
    for key, (shape, dtype) in expected.items():
        assert tuple(batch[key].shape) == shape and batch[key].dtype == dtype, key
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1 and batch["image"].std() > 0.1


def test_resolution_resampling(folder):
    """Asking for another resolution resamples the images."""
    assert PortraitDataset(folder, 32)[0]["image"].shape == (3, 32, 32)


def test_folder_and_zip_give_identical_samples(folder, zipped):
    """The zip dataset (generated from the same recipe) serves exactly the folder's items."""
    a, b = PortraitDataset(folder, RES, flip=True), PortraitDataset(zipped, RES, flip=True)
    for i in (0, 3, N + 2):
        x, y = a[i], b[i]
        for key in x:
            assert torch.equal(x[key], y[key]), key


def _silhouette(verts, faces, labels, size):
    raster = MeshRasterizer(cameras=to_pytorch3d_cameras(labels, size),
                            raster_settings=RasterizationSettings(image_size=size, faces_per_pixel=1))
    return (raster(Meshes(verts, faces[None].expand(len(verts), -1, -1))).pix_to_face[..., 0] >= 0).numpy()


def test_flip_consistency(folder):
    """The flipped item's image is the mirrored image, its camera the mirrored camera, and the mirrored
    mesh (observation_vertices) rendered by pytorch3d under that camera covers the flipped image's
    foreground mask (IoU > 0.98); the same mesh under the unmirrored camera does not (IoU lower)."""
    model = default_model()
    ds = PortraitDataset(folder, RES, flip=True)
    index = read_index(folder)
    flipped_items = [ds[N + i] for i in range(N)]
    batch = {k: torch.stack([it[k] for it in flipped_items]) for k in flipped_items[0]}
    assert batch["flip"].all()
    for i in range(N):
        assert torch.equal(flipped_items[i]["image"], ds[i]["image"].flip(-1))
    assert torch.allclose(batch["camera"], mirror_labels(torch.from_numpy(index.labels)))
    verts = observation_vertices(batch, model)
    sil = _silhouette(verts, model.faces, batch["camera"], RES)
    yaws = np.abs(index.labels[:, 3])  # cam2world x translation, ~ 2.7 sin(yaw)
    turned = np.flatnonzero(yaws > 0.5)
    wrong = _silhouette(verts[turned], model.faces, torch.from_numpy(index.labels[turned]), RES)
    for i in range(N):
        fg = index.read_mask(i)[:, ::-1] != 0
        iou = (sil[i] & fg).sum() / (sil[i] | fg).sum()
        assert iou > 0.98, (i, iou)
        if i in turned:
            w = wrong[list(turned).index(i)]
            assert (w & fg).sum() / (w | fg).sum() < iou - 0.02
    assert len(turned) > 0, "test data should contain clearly turned heads"


def test_unflipped_mesh_overlays_image(folder):
    """Control for the flip test: unflipped items' meshes under their own cameras match their masks."""
    model = default_model()
    ds = PortraitDataset(folder, RES, flip=False)
    items = [ds[i] for i in range(4)]
    batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
    assert torch.equal(observation_vertices(batch, model), model(batch["shape"], batch["expression"], batch["pose"]))
    sil = _silhouette(observation_vertices(batch, model), model.faces, batch["camera"], RES)
    index = read_index(folder)
    for i in range(4):
        fg = index.read_mask(i) != 0
        assert (sil[i] & fg).sum() / (sil[i] | fg).sum() > 0.98


def test_zip_with_two_workers_matches_single_process(zipped):
    """A DataModule on the zip with num_workers=2 (each worker opens the zip itself) yields the same
    batches as num_workers=0, and one epoch covers every item exactly once."""
    def epoch(workers):
        dm = PortraitDataModule(DataConfig(kind="folder", path=str(zipped), resolution=RES, batch_size=4,
                                           num_workers=workers, seed=5))
        dm.prepare_data()
        dm.setup("fit")
        return list(itertools.islice(dm.train_dataloader(), 2 * N // 4))  # the stream is endless: one epoch

    single, multi = epoch(0), epoch(2)
    assert len(single) == len(multi) == 2 * N // 4
    for a, b in zip(single, multi):
        for key in a:
            assert torch.equal(a[key], b[key]), key
    seen = sorted((int(i), bool(f)) for b in multi for i, f in zip(b["index"], b["flip"]))
    assert seen == sorted((i, f) for i in range(N) for f in (False, True))


def test_distributed_sampler_shards(folder):
    """With a 2-process trainer each rank streams a seeded shard: per epoch the shards are disjoint
    and together cover the dataset; the next epoch is another order."""
    shards, seconds = [], []
    for rank in range(2):
        dm = PortraitDataModule(DataConfig(kind="folder", path=str(folder), resolution=RES, batch_size=2,
                                           num_workers=0, seed=7))
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        dm.setup("fit")
        sampler = dm.train_dataloader().sampler
        assert isinstance(sampler, ResumableSampler) and sampler.seed == 7
        stream = list(itertools.islice(iter(sampler), 2 * N))  # two epochs of N items per rank
        first, second = stream[:N], stream[N:]
        assert second != first
        shards.append(set(first))
        seconds.append(set(second))
    for epoch in (shards, seconds):
        assert not epoch[0] & epoch[1] and len(epoch[0] | epoch[1]) == 2 * N


def test_resumed_stream_continues_exactly():
    """Starting the sampler after k items gives the tail of the uninterrupted stream, across epochs."""
    full = list(itertools.islice(iter(ResumableSampler(10, 2, 1, seed=3)), 23))
    for k in (0, 4, 5, 13):
        tail = list(itertools.islice(iter(ResumableSampler(10, 2, 1, seed=3, start=k)), 23 - k))
        assert tail == full[k:]
    with pytest.raises(ValueError, match="cannot be shared"):
        ResumableSampler(1, 2, 0)


def test_bad_dataset_refused_or_skipped(folder, tmp_path, caplog):
    """A corrupt image makes the dataset refuse to load (naming the file) unless skip_bad, which
    drops that item and logs it."""
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    (bad / "images/000002.png").write_bytes(b"junk")
    with pytest.raises(DatasetError, match="images/000002.png"):
        PortraitDataset(bad, RES)
    with caplog.at_level(logging.WARNING):
        ds = PortraitDataset(bad, RES, skip_bad=True)
    assert len(ds) == N - 1 and "images/000002.png" in caplog.text
    assert 2 not in {int(ds[i]["index"]) for i in range(len(ds))}


def test_clip_cache_and_conditioning_sampler(folder, tmp_path):
    """CLIP embeddings are served per image from the cache (flipped table for flipped items); the
    conditioning sampler draws rows of the dataset (cameras incl. mirrored ones), reproducibly."""
    index = read_index(folder)
    emb = np.random.default_rng(0).normal(size=(N, 6)).astype(np.float32)
    cache = tmp_path / "clip.npz"
    np.savez(cache, names=np.array(index.names[::-1]), embeddings=emb[::-1], embeddings_flipped=-emb[::-1])
    ds = PortraitDataset(folder, RES, flip=True, clip_cache=cache)
    assert torch.equal(ds[3]["clip_embedding"], torch.from_numpy(emb[3]))
    assert torch.equal(ds[N + 3]["clip_embedding"], torch.from_numpy(-emb[3]))
    a, b = ConditioningSampler(ds, seed=3).sample(16), ConditioningSampler(ds, seed=3).sample(16)
    assert set(a) == {"camera", "shape", "expression", "pose", "flip", "clip_embedding"}
    for key in a:
        assert torch.equal(a[key], b[key])
    # Every draw is one dataset item (flipped copies included) with all its fields consistent.
    items = [ds.metadata(i) for i in range(len(ds))]
    for k in range(16):
        matches = [it for it in items if torch.equal(it["camera"], a["camera"][k])]
        assert len(matches) == 1
        for key in a:
            assert torch.equal(matches[0][key], a[key][k]), key
    assert a["flip"].any() and not a["flip"].all()
    np.savez(cache, names=np.array(index.names[:3]), embeddings=emb[:3])
    with pytest.raises(ValueError, match="no embedding"):
        PortraitDataset(folder, RES, clip_cache=cache)


def test_clip_cache_without_the_skipped_images_serves_the_usable_ones(folder, tmp_path):
    """skip_bad=True with a corrupt image: a CLIP cache holding only the usable images loads (only
    those are asked for) and every item, flipped copies included, gets its own image's embedding;
    conditioning draws never see the skipped image's (empty) row."""
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    (bad / "images/000002.png").write_bytes(b"junk")
    index = read_index(bad)
    keep = [i for i in range(N) if i != 2]
    emb = np.random.default_rng(1).normal(size=(N, 6)).astype(np.float32)
    cache = tmp_path / "clip.npz"
    np.savez(cache, names=np.array([index.names[i] for i in keep]), embeddings=emb[keep], embeddings_flipped=-emb[keep])
    ds = PortraitDataset(bad, RES, flip=True, skip_bad=True, clip_cache=cache)
    served = [ds.metadata(i) for i in range(len(ds))]
    assert sorted(int(m["index"]) for m in served) == sorted(keep * 2)
    for m in served:
        expected = (-emb if m["flip"] else emb)[int(m["index"])]
        assert torch.equal(m["clip_embedding"], torch.from_numpy(expected))
    assert torch.isfinite(ConditioningSampler(ds, seed=0).sample(64)["clip_embedding"]).all()


def test_config_errors():
    """Unknown data kinds and non-positive sizes are rejected naming the key."""
    with pytest.raises(ValueError, match="data.kind"):
        PortraitDataModule(DataConfig(kind="imagenet"))
    with pytest.raises(ValueError, match="data.batch_size"):
        PortraitDataModule(DataConfig(batch_size=0))


def test_observation_vertices_stay_full_precision_under_autocast():
    """Inside a bf16 autocast region (training with autocast on), the observation meshes are built in
    float32: equal to the meshes built outside it (bf16 blend shapes are ~3e-3 off in world units)."""
    model = default_model()
    params = model.sample_params(4, generator=torch.Generator().manual_seed(0))
    cond = {"shape": params.shape, "expression": params.expression, "pose": params.pose,
            "flip": torch.tensor([False, True, False, True])}
    want = observation_vertices(cond, model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = observation_vertices(cond, model)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
