"""FID/KID evaluation (fid50k_full protocol): agreement with torchmetrics, real-statistics cache,
determinism and rank sharding of the fakes, fixed-seed sample grids."""

from __future__ import annotations

import json
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from clipportrait.data.datamodule import ConditioningSampler, PortraitDataset
from clipportrait.data.format import read_index, write_dataset
from clipportrait.geometry.cameras import sample_ffhq_like
from clipportrait.metrics.evaluation import (
    BoundGenerator,
    FeatureExtractor,
    RealStatistics,
    dataset_content_hash,
    evaluate_fid_kid,
    gather_in_item_order,
    item_latents,
    shard_items,
)
from clipportrait.metrics.fid import InceptionFeatures
from clipportrait.metrics.grids import grid_cameras, sample_grid, save_png

RES = 32


def write_tiny_dataset(path, num: int = 12, seed: int = 0, as_zip: bool = False):
    """``num`` smooth random RGB images of RES^2 with FFHQ-like cameras and random morphable rows."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.uniform(0, 255, (num, 3, 4, 4)).astype(np.float32))
    pixels = F.interpolate(coarse, size=(RES, RES), mode="bilinear", align_corners=False)
    pixels = pixels + torch.from_numpy(rng.normal(0, 12, pixels.shape).astype(np.float32))
    images = {f"images/{i:05d}.png": pixels[i].clamp(0, 255).round().byte().permute(1, 2, 0).numpy() for i in range(num)}
    labels = sample_ffhq_like(num, generator=torch.Generator().manual_seed(seed)).numpy()
    arrays = {k: rng.standard_normal((num, d)).astype(np.float32) for k, d in (("shape", 100), ("expression", 50), ("pose", 6))}
    return write_dataset(path, images, labels, arrays["shape"], arrays["expression"], arrays["pose"], as_zip=as_zip)


class CountingTrunk(nn.Module):
    """Cheap stand-in for the Inception trunk (fixed random projection of a 4x4 pooled image to 8
    features) that counts the images it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(48, 8)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(8, 48, generator=torch.Generator().manual_seed(3)))
            self.proj.bias.zero_()
        self.images_seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.images_seen += x.shape[0]
        return torch.tanh(self.proj(F.adaptive_avg_pool2d(x, 4).flatten(1)) / 4)


def counting_extractor() -> tuple[FeatureExtractor, CountingTrunk]:
    trunk = CountingTrunk()
    return FeatureExtractor(InceptionFeatures(trunk), "test-trunk-sha", "test trunk", "tf1 bilinear to 299"), trunk


def camera_lookup_generator(dataset: PortraitDataset, z_dim: int = 4, record: list | None = None) -> BoundGenerator:
    """`generate` returning the real image whose camera label equals the sampled one (records z and
    the images it returns)."""
    table = torch.from_numpy(dataset.index.labels[dataset.rows])

    def fn(z, cond):
        rows = torch.cdist(cond["camera"], table).argmin(1)
        images = torch.stack([dataset[int(r)]["image"] for r in rows])
        if record is not None:
            record.append((z.clone(), images))
        return images

    return BoundGenerator(fn, z_dim)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = write_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny", num=6)
    return PortraitDataset(path)


def test_fid_and_kid_equal_direct_torchmetrics_on_the_same_images(offline_cache, tiny, tmp_path):
    """With the real Inception: evaluate_fid_kid (cached real features + sharded fakes) gives the FID
    and KID that torchmetrics computes directly from the same real and generated images."""
    from torchmetrics.image import FrechetInceptionDistance, KernelInceptionDistance

    from clipportrait.metrics.evaluation import fid_feature_extractor

    extractor = fid_feature_extractor()
    stats = RealStatistics.load_or_compute(tiny, extractor, tmp_path, batch_size=6, show_progress=False)
    record: list = []
    result = evaluate_fid_kid(camera_lookup_generator(tiny, record=record), ConditioningSampler(tiny), stats,
                              num_fakes=5, batch_size=4, seed=5, device="cpu", kid_subset_size=4, kid_subsets=5,
                              show_progress=False)
    reals = torch.stack([tiny[i]["image"] for i in range(len(tiny))])
    fakes = torch.cat([images for _, images in record])
    fid = FrechetInceptionDistance(feature=extractor.network)
    with pytest.warns(UserWarning, match="save all extracted features"):  # torchmetrics' memory notice
        kid = KernelInceptionDistance(feature=extractor.network, subset_size=4, subsets=5)
    for metric in (fid, kid):
        metric.update(reals, real=True)
        metric.update(fakes, real=False)
    torch.manual_seed(5)  # evaluate_fid_kid draws KID subsets from the CPU generator seeded by `seed`
    kid_mean, kid_std = kid.compute()
    assert result["fid"] > 1.0  # fakes are a resample of the reals, not the same set
    assert result["fid"] == pytest.approx(float(fid.compute()), abs=1e-3)
    assert result["kid"] == pytest.approx(float(kid_mean), abs=1e-6)
    assert result["kid_std"] == pytest.approx(float(kid_std), abs=1e-6)
    protocol = result["protocol"]
    assert protocol["num_real"] == 6 and protocol["num_fakes"] == 5
    assert protocol["feature_sha256"] == extractor.sha256 and protocol["dataset_hash"] == stats.key.dataset_hash
    assert protocol["kid_subset_size"] == 4 and protocol["warnings"] == []


def test_real_statistics_cache_hit_and_invalidation(tmp_path, caplog):
    """Second call loads the cache without running the extractor; a changed dataset (new content
    hash), another max_items, or a cache file holding a foreign key are recomputed."""
    dataset = PortraitDataset(write_tiny_dataset(tmp_path / "a", num=6, seed=1))
    extractor, trunk = counting_extractor()
    first = RealStatistics.load_or_compute(dataset, extractor, tmp_path / "cache", batch_size=4, show_progress=False)
    assert first.source == "computed" and trunk.images_seen == 6 and first.path.is_file()
    second = RealStatistics.load_or_compute(dataset, extractor, tmp_path / "cache", batch_size=4, show_progress=False)
    assert second.source == "cache" and trunk.images_seen == 6
    assert torch.equal(first.features, second.features) and first.features.shape == (6, 8)

    partial = RealStatistics.load_or_compute(dataset, extractor, tmp_path / "cache", max_items=4, show_progress=False)
    assert partial.source == "computed" and trunk.images_seen == 10
    assert torch.allclose(partial.features, first.features[:4], atol=1e-6)  # first items, dataset order

    changed = PortraitDataset(write_tiny_dataset(tmp_path / "b", num=6, seed=2))
    third = RealStatistics.load_or_compute(changed, extractor, tmp_path / "cache", show_progress=False)
    assert third.source == "computed" and trunk.images_seen == 16
    assert third.key.dataset_hash != first.key.dataset_hash and third.path != first.path

    blob = torch.load(first.path, weights_only=True)
    blob["key"]["resolution"] = 64  # a file at the right place whose key does not match
    torch.save(blob, first.path)
    fourth = RealStatistics.load_or_compute(dataset, extractor, tmp_path / "cache", show_progress=False)
    assert fourth.source == "computed" and trunk.images_seen == 22 and "key" in caplog.text
    assert torch.allclose(fourth.features, first.features, atol=1e-6)


def test_dataset_hash_sees_content_not_container(tmp_path):
    """Same content as folder and as zip hash equal; one changed label changes the hash."""
    folder = write_tiny_dataset(tmp_path / "f", num=4, seed=3)
    zipped = write_tiny_dataset(tmp_path / "z", num=4, seed=3, as_zip=True)
    assert dataset_content_hash(folder) == dataset_content_hash(zipped)
    index = read_index(folder)
    images = {n: index.read_image(i) for i, n in enumerate(index.names)}
    labels = index.labels.copy()
    labels[2, 3] += 1e-3
    edited = write_dataset(tmp_path / "e", images, labels, index.shape, index.expression, index.pose)
    assert dataset_content_hash(edited) != dataset_content_hash(folder)


def test_dataset_hash_is_remembered_until_a_file_changes(tmp_path, monkeypatch):
    """The content hash is kept per dataset path with the files' sizes and times: a second call reads
    no image; rewriting an image (other bytes) or a label file rehashes and gives the new content's
    hash; touching a file with unchanged bytes rehashes to the same hash; an unreadable memo is ignored."""
    import os

    from clipportrait.metrics import evaluation

    monkeypatch.setenv("CLIPPORTRAIT_CACHE", str(tmp_path / "cache"))
    calls = []
    full = evaluation._index_content_hash
    monkeypatch.setattr(evaluation, "_index_content_hash", lambda index, show=False: calls.append(1) or full(index, show))
    folder = write_tiny_dataset(tmp_path / "f", num=4, seed=3)
    first = dataset_content_hash(folder)
    assert dataset_content_hash(folder) == first and len(calls) == 1
    image = folder / read_index(folder).names[1]
    other = write_tiny_dataset(tmp_path / "g", num=4, seed=9)
    image.write_bytes((other / read_index(other).names[1]).read_bytes())
    stat = image.stat()  # file times can be coarser than this test is fast: make the rewrite's visible
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    changed = dataset_content_hash(folder)
    assert len(calls) == 2 and changed != first
    assert changed == full(read_index(folder))
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert dataset_content_hash(folder) == changed and len(calls) == 3
    labels_file = folder / "dataset.json"
    labels = json.loads(labels_file.read_text())
    labels["labels"][0][1][3] += 0.5
    labels_file.write_text(json.dumps(labels))
    stat = labels_file.stat()
    os.utime(labels_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    relabelled = dataset_content_hash(folder)
    assert len(calls) == 4 and relabelled != changed
    for memo in (tmp_path / "cache" / "dataset_hashes").iterdir():
        memo.write_text("{not json")
    assert dataset_content_hash(folder) == relabelled and len(calls) == 5


def test_same_seed_same_fakes_other_seed_other_fakes(tmp_path):
    """Fakes depend only on (seed, item): equal across calls and batch sizes; a new seed changes them."""
    dataset = PortraitDataset(write_tiny_dataset(tmp_path / "d", num=10, seed=4))
    extractor, _ = counting_extractor()
    stats = RealStatistics.load_or_compute(dataset, extractor, None, show_progress=False)

    def run(seed, batch_size):
        record: list = []
        out = evaluate_fid_kid(camera_lookup_generator(dataset, record=record), ConditioningSampler(dataset), stats,
                               num_fakes=9, batch_size=batch_size, seed=seed, device="cpu", show_progress=False)
        return out, torch.cat([z for z, _ in record]), torch.cat([im for _, im in record])

    a, z_a, im_a = run(7, 4)
    b, z_b, im_b = run(7, 3)
    c, z_c, _ = run(8, 4)
    assert torch.equal(z_a, z_b) and torch.equal(im_a, im_b)
    assert (a["fid"], a["kid"]) == (b["fid"], b["kid"])
    assert not torch.allclose(z_a, z_c) and a["fid"] != c["fid"]
    assert any("clamped to 9" in w for w in a["protocol"]["warnings"]) and a["protocol"]["kid_subset_size"] == 9


def test_two_ranks_make_the_single_rank_items_and_latents():
    """Rank r of 2 takes items r, r+2, ...; together exactly the single-rank items, each with the
    z and conditioning row it has on one rank."""
    num = 11
    single = list(shard_items(num, 0, 1))
    ranks = [list(shard_items(num, r, 2)) for r in range(2)]
    assert sorted(ranks[0] + ranks[1]) == single and not set(ranks[0]) & set(ranks[1])
    z_all, rows_all = item_latents(single, 6, 20, seed=3)
    for items in ranks:
        z, rows = item_latents(items, 6, 20, seed=3)
        assert torch.equal(z, z_all[items]) and torch.equal(rows, rows_all[items])
    assert len(set(rows_all.tolist())) > 1 and not torch.allclose(z_all[0], z_all[1])
    local = torch.arange(num * 2.0).view(num, 2)
    assert gather_in_item_order(local, num) is local  # no process group: identity
    with pytest.raises(ValueError, match="rank=2"):
        shard_items(num, 2, 2)


def test_generate_output_is_checked(tiny):
    """A generate returning the wrong shape, or lacking z_dim, is refused with a message naming it."""
    extractor, _ = counting_extractor()
    stats = RealStatistics.load_or_compute(tiny, extractor, None, show_progress=False)
    bad = BoundGenerator(lambda z, cond: torch.zeros(z.shape[0], 1, RES, RES), z_dim=4)
    with pytest.raises(ValueError, match=r"expected floating \(4, 3, R, R\)"):
        evaluate_fid_kid(bad, ConditioningSampler(tiny), stats, 4, 4, 0, "cpu", show_progress=False)
    with pytest.raises(ValueError, match="z_dim"):
        evaluate_fid_kid(lambda z, c: z, ConditioningSampler(tiny), stats, 4, 4, 0, "cpu", show_progress=False)


def _ddp_worker(rank: int, folder: str, out: dict) -> None:
    """One rank of `test_two_gloo_ranks_equal_one_rank`: real stats (cached in folder) + FID/KID."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    try:
        dataset = PortraitDataset(f"{folder}/data")
        extractor, trunk = counting_extractor()
        stats = RealStatistics.load_or_compute(dataset, extractor, f"{folder}/cache", batch_size=2, show_progress=False)
        record: list = []
        result = evaluate_fid_kid(camera_lookup_generator(dataset, record=record), ConditioningSampler(dataset), stats,
                                  num_fakes=9, batch_size=2, seed=11, device="cpu", kid_subset_size=5, kid_subsets=4,
                                  show_progress=False)
        torch.save({"result": result, "z": torch.cat([z for z, _ in record]), "seen": trunk.images_seen,
                    "source": stats.source}, f"{folder}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_ranks_equal_one_rank(tmp_path):
    """Two real processes (gloo): each extracts about half of the real and fake features, and both
    report exactly the single-process FID/KID, with rank r's z equal to items r, r+2, ... of one rank."""
    import torch.multiprocessing as mp

    write_tiny_dataset(tmp_path / "data", num=7, seed=6)
    # fork: the children reuse the imported modules (spawn would re-import torch + lightning, ~10 s).
    mp.start_processes(_ddp_worker, args=(str(tmp_path), {}), nprocs=2, join=True, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]

    dataset = PortraitDataset(tmp_path / "data")
    extractor, trunk = counting_extractor()
    stats = RealStatistics.load_or_compute(dataset, extractor, tmp_path / "cache", show_progress=False)
    assert stats.source == "cache" and trunk.images_seen == 0  # rank 0 wrote it, in item order
    assert [r["source"] for r in ranks] == ["computed", "computed"]
    assert [r["seen"] for r in ranks] == [4 + 5, 3 + 4]  # reals 0,2,4,6 | 1,3,5 and fakes 0,2,..8 | 1,..7
    fresh = RealStatistics.load_or_compute(dataset, extractor, None, show_progress=False)
    assert torch.allclose(fresh.features, stats.features, atol=1e-6)
    record: list = []
    single = evaluate_fid_kid(camera_lookup_generator(dataset, record=record), ConditioningSampler(dataset), stats,
                              num_fakes=9, batch_size=4, seed=11, device="cpu", kid_subset_size=5, kid_subsets=4,
                              show_progress=False)
    z_single = torch.cat([z for z, _ in record])
    for rank, out in enumerate(ranks):
        assert torch.equal(out["z"], z_single[rank::2])
        assert out["result"]["fid"] == pytest.approx(single["fid"], abs=1e-5)
        assert out["result"]["kid"] == pytest.approx(single["kid"], abs=1e-7)
        assert out["result"]["protocol"]["world_size"] == 2


def _camera_painter(z, cond):
    """Image whose colour encodes camera x position, expression and z: cells differ iff those do."""
    cam_x = cond["camera"][:, 3]  # cam2world translation x: moves with yaw
    expression = (cond["expression"][:, 0].tanh() + cond["pose"][:, 3].tanh()) / 2
    channels = torch.stack((cam_x / 2, expression, z[:, 0].tanh()), 1)
    return channels.clamp(-1, 1)[:, :, None, None].expand(-1, -1, RES, RES).contiguous()


def test_sample_grid_layout_and_determinism(tiny, tmp_path):
    """Grid of N identities x (C cameras x E expressions): right shape, camera blocks differ,
    expressions within a camera block differ, rows differ, same seed same grid; PNG round-trips."""
    generate = BoundGenerator(_camera_painter, z_dim=4)
    sampler = ConditioningSampler(tiny)
    grid = sample_grid(generate, sampler, num_identities=2, cameras=3, expressions=2, seed=0)
    assert grid.shape == (2 * RES, 3 * 2 * RES, 3) and grid.dtype == np.uint8
    cells = grid.reshape(2, RES, 6, RES, 3)[:, 0, :, 0, :].astype(int)  # (rows, columns, rgb)
    assert len({tuple(cells[0, 2 * c, :]) for c in range(3)}) == 3  # one colour per camera
    assert cells[0, 0, 0] != cells[0, 2, 0] and cells[0, 0, 1] != cells[0, 1, 1]
    assert cells[0, 0, 2] != cells[1, 0, 2]  # identities have their own z
    assert np.array_equal(grid, sample_grid(generate, sampler, 2, 3, 2, seed=0))
    assert not np.array_equal(grid, sample_grid(generate, sampler, 2, 3, 2, seed=1))

    neutral = sample_grid(generate, {"shape": torch.zeros(1, 100)}, 1, [0.0, 0.4], 3, seed=0)
    jaw = neutral.reshape(RES, 6, RES, 3)[0, :3, 0, 1].astype(int)  # camera 0, expressions 0..2
    assert jaw[0] < jaw[1] < jaw[2]  # zeros + jaw opened step by step
    assert grid_cameras(3).shape == (3, 25)

    save_png(tmp_path / "grid.png", grid)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "grid.png")), grid)
    with pytest.raises(ValueError, match="uint8"):
        save_png(tmp_path / "bad.png", grid.astype(np.float32))
