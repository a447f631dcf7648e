"""Dataset format: writing, reading folder and zip alike, and check_dataset's problem reports."""

import json
import zipfile

import numpy as np
import pytest

from clipportrait.data.format import (
    DatasetError, DatasetWriter, check_dataset, encode_png, mask_path, read_index, write_dataset,
)

N = 4


def _make(tmp_path, name="ds", as_zip=False, size=16):
    rng = np.random.default_rng(0)
    images = {f"images/{i:06d}.png": rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for i in range(N)}
    masks = {k: rng.integers(0, 10, (size, size), dtype=np.uint8) for k in images}
    attrs = {k: {"attributes": {"hair_color": "red"}, "captions": ["a person with red hair"]} for k in images}
    out = write_dataset(
        tmp_path / name, images, rng.normal(size=(N, 25)), rng.normal(size=(N, 100)),
        rng.normal(size=(N, 50)), rng.normal(size=(N, 6)), attrs, masks, as_zip=as_zip,
    )
    return out, images


def _edit_json(path, fn):
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def _edit_npz(path, fn):
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    fn(arrays)
    np.savez(path, **arrays)


def test_good_dataset_has_no_problems_and_round_trips(tmp_path):
    """A written dataset passes check_dataset and reads back the same pixels, labels and masks."""
    out, images = _make(tmp_path)
    assert check_dataset(out) == []
    index = read_index(out)
    assert index.names == list(images)
    assert index.labels.shape == (N, 25) and index.shape.shape == (N, 100)
    assert (index.read_image(2) == images["images/000002.png"]).all()
    assert index.read_mask(1).shape == (16, 16)
    assert index.attributes["images/000000.png"]["captions"] == ["a person with red hair"]


def test_folder_and_zip_identical(tmp_path):
    """The zip and the folder version of one dataset give identical metadata and pixels, and the
    zip is uncompressed and byte-identical when written twice."""
    folder, _ = _make(tmp_path, "a")
    zip1, _ = _make(tmp_path, "b.zip", as_zip=True)
    zip2, _ = _make(tmp_path, "c.zip", as_zip=True)
    assert zip1.read_bytes() == zip2.read_bytes()
    with zipfile.ZipFile(zip1) as zf:
        assert all(info.compress_type == zipfile.ZIP_STORED for info in zf.infolist())
    assert check_dataset(zip1) == []
    a, b = read_index(folder), read_index(zip1)
    assert a.names == b.names
    for key in ("labels", "shape", "expression", "pose"):
        assert np.array_equal(getattr(a, key), getattr(b, key))
    for i in range(N):
        assert np.array_equal(a.read_image(i), b.read_image(i))
        assert np.array_equal(a.read_mask(i), b.read_mask(i))


def test_unfinished_writer_leaves_no_dataset(tmp_path):
    """A writer that never reaches finish() (a killed run) leaves nothing at the output path, and
    check_dataset says so naming the path."""
    writer = DatasetWriter(tmp_path / "ds")
    writer.add_image("images/000000.png", np.zeros((8, 8, 3), np.uint8))
    assert not (tmp_path / "ds").exists()
    problems = check_dataset(tmp_path / "ds")
    assert len(problems) == 1 and "does not exist" in problems[0].message


def _single_problem(out, needle, file):
    problems = check_dataset(out)
    assert len(problems) >= 1, "problem not detected"
    assert any(needle in p.message and p.file == file for p in problems), [str(p) for p in problems]
    return problems


def test_missing_image(tmp_path):
    """An image listed in dataset.json but absent is reported with its name."""
    out, _ = _make(tmp_path)
    (out / "images/000001.png").unlink()
    problems = _single_problem(out, "missing", "images/000001.png")
    assert problems[0].name == "images/000001.png"


def test_corrupt_image(tmp_path):
    """Garbage bytes in an image are reported as unreadable with the file name."""
    out, _ = _make(tmp_path)
    (out / "images/000002.png").write_bytes(b"\x89PNG not really")
    _single_problem(out, "unreadable", "images/000002.png")


def test_wrong_label_length(tmp_path):
    """A camera label with 24 floats is reported against dataset.json, naming the image."""
    out, _ = _make(tmp_path)
    _edit_json(out / "dataset.json", lambda d: d["labels"][0][1].pop())
    problems = _single_problem(out, "length 24", "dataset.json")
    assert any(p.name == "images/000000.png" for p in problems)


def test_nan_in_label(tmp_path):
    """NaN in a camera label is reported."""
    out, _ = _make(tmp_path)
    text = (out / "dataset.json").read_text()
    data = json.loads(text)
    data["labels"][3][1][5] = float("nan")
    (out / "dataset.json").write_text(json.dumps(data))  # json writes NaN, which Python parses back
    _single_problem(out, "NaN or inf", "dataset.json")


def test_inf_in_parameters(tmp_path):
    """Non-finite morphable parameters are reported against morphable.npz with the image name."""
    out, _ = _make(tmp_path)
    _edit_npz(out / "morphable.npz", lambda a: a["expression"].__setitem__((2, 7), np.inf))
    problems = _single_problem(out, "expression of 'images/000002.png'", "morphable.npz")
    assert any(p.name == "images/000002.png" for p in problems)


def test_image_size_mismatch(tmp_path):
    """An image of another size than the others is reported with both sizes."""
    out, _ = _make(tmp_path)
    (out / "images/000003.png").write_bytes(encode_png(np.zeros((8, 8, 3), np.uint8)))
    _single_problem(out, "expected 16x16", "images/000003.png")


def test_non_square_image(tmp_path):
    """A non-square image is reported."""
    out, _ = _make(tmp_path)
    (out / "images/000001.png").write_bytes(encode_png(np.zeros((16, 12, 3), np.uint8)))
    _single_problem(out, "square", "images/000001.png")


def test_duplicate_names(tmp_path):
    """The same image listed twice in dataset.json is reported."""
    out, _ = _make(tmp_path)
    _edit_json(out / "dataset.json", lambda d: d["labels"].append(d["labels"][0]))
    _single_problem(out, "duplicate", "dataset.json")


def test_parameter_array_wrong_shape(tmp_path):
    """A shape array of (N, 99) is reported with the expected shape."""
    out, _ = _make(tmp_path)
    _edit_npz(out / "morphable.npz", lambda a: a.__setitem__("shape", a["shape"][:, :99]))
    _single_problem(out, "expected (4, 100)", "morphable.npz")
    with pytest.raises(DatasetError, match="morphable.npz"):
        read_index(out)


def test_names_mismatch(tmp_path):
    """Parameters keyed by names that differ from dataset.json (renamed, reordered) are reported."""
    out, _ = _make(tmp_path)
    _edit_npz(out / "morphable.npz", lambda a: a.__setitem__("names", np.array([*a["names"][:3], "images/other.png"])))
    problems = check_dataset(out)
    assert any("other.png" in p.message for p in problems)
    assert any("no parameters for image 'images/000003.png'" in p.message for p in problems)
    out2, _ = _make(tmp_path, "b")
    _edit_npz(out2 / "morphable.npz", lambda a: a.__setitem__("names", a["names"][::-1]))
    _single_problem(out2, "not in the order", "morphable.npz")


def test_missing_metadata_files(tmp_path):
    """Missing dataset.json and morphable.npz are both reported at once."""
    out, _ = _make(tmp_path)
    (out / "dataset.json").unlink()
    (out / "morphable.npz").unlink()
    files = {p.file for p in check_dataset(out)}
    assert {"dataset.json", "morphable.npz"} <= files


def test_mask_problems(tmp_path):
    """A missing mask and a mask with an unknown region id are reported with the mask paths."""
    out, _ = _make(tmp_path)
    (out / mask_path("images/000000.png")).unlink()
    (out / mask_path("images/000001.png")).write_bytes(encode_png(np.full((16, 16), 200, np.uint8)))
    problems = check_dataset(out)
    assert any(p.file == "masks/images/000000.png" and "missing" in p.message for p in problems)
    assert any(p.file == "masks/images/000001.png" and "region id 200" in p.message for p in problems)


def test_attributes_mismatch(tmp_path):
    """attributes.json without an entry for a listed image is reported."""
    out, _ = _make(tmp_path)
    _edit_json(out / "attributes.json", lambda d: d["items"].pop("images/000002.png"))
    _single_problem(out, "no entry for image 'images/000002.png'", "attributes.json")


def test_reports_every_problem_at_once(tmp_path):
    """Several independent problems in one dataset are all reported in a single call."""
    out, _ = _make(tmp_path)
    (out / "images/000001.png").unlink()
    (out / "images/000002.png").write_bytes(b"junk")
    _edit_json(out / "dataset.json", lambda d: d["labels"][3][1].append(0.0))
    problems = check_dataset(out)
    named = {p.name for p in problems}
    assert {"images/000001.png", "images/000002.png", "images/000003.png"} <= named


def test_zip_problems_named(tmp_path):
    """check_dataset on a zip names the corrupt member."""
    out, images = _make(tmp_path)
    (out / "images/000000.png").write_bytes(b"junk")
    zpath = tmp_path / "bad.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for p in sorted(out.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(out).as_posix())
    _single_problem(zpath, "unreadable", "images/000000.png")


def test_header_only_check(tmp_path):
    """check_dataset(decode=False) still finds missing files and wrong sizes from the headers, but
    not corruption inside the pixel data (which the full check finds)."""
    out, _ = _make(tmp_path)
    (out / "images/000001.png").unlink()
    (out / "images/000003.png").write_bytes(encode_png(np.zeros((8, 8, 3), np.uint8)))
    good = (out / "images/000002.png").read_bytes()
    (out / "images/000002.png").write_bytes(good[:-40])  # truncated pixel stream, header intact
    quick = {p.name for p in check_dataset(out, decode=False)}
    full = {p.name for p in check_dataset(out)}
    assert quick == {"images/000001.png", "images/000003.png"}
    assert full == quick | {"images/000002.png"}


def test_check_command_line(tmp_path, capsys):
    """`python -m clipportrait.data.check` prints OK and exits 0 on a good dataset; on a bad one it
    prints one line per problem naming the file and exits 1."""
    from clipportrait.data.check import main

    out, _ = _make(tmp_path)
    assert main([str(out)]) == 0 and "OK" in capsys.readouterr().out
    (out / "images/000001.png").unlink()
    assert main([str(out), "--resolution", "16"]) == 1
    assert "images/000001.png: image listed in dataset.json is missing" in capsys.readouterr().out
