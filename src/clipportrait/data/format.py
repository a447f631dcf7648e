"""The dataset format (DESIGN.md section 6): read, write and validate.

A dataset is a directory or an uncompressed zip holding

- images (PNG, RGB, square, all of one size) at relative paths, e.g. ``images/000123.png``;
- ``dataset.json``: EG3D's label file ``{"labels": [["images/000123.png", [25 floats]], ...]}``; the
  25 floats are the camera label (flattened 4x4 cam2world + flattened 3x3 normalised intrinsics,
  `clipportrait.geometry.cameras`). The order of this list is the dataset order;
- ``morphable.npz``: float32 arrays ``shape`` (N,100), ``expression`` (N,50), ``pose`` (N,6) and a
  string array ``names`` (N,) equal to the label paths in the same order;
- optionally ``attributes.json``: ``{"region_ids": {...}, "items": {name: {"attributes": {...},
  "captions": [str, ...]}}}``;
- optionally region masks: for image ``<dir>/<stem>.<ext>`` the file ``masks/<dir>/<stem>.png``, a
  single-channel 8-bit PNG holding one region id per pixel (`REGION_IDS`).

Writers go through a temporary name and ``os.replace`` so a reader never sees half a file, and
`DatasetWriter` builds the whole dataset in ``<out>.partial`` before moving it into place, so a killed
run leaves no folder at ``<out>`` (hence nothing that `check_dataset` could accept).
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image

from .zipfs import DatasetFiles

LABEL_DIM = 25
PARAM_DIMS = {"shape": 100, "expression": 50, "pose": 6}
LABELS_FILE = "dataset.json"
MORPHABLE_FILE = "morphable.npz"
ATTRIBUTES_FILE = "attributes.json"
MASK_DIR = "masks"

# Region ids stored in the masks (one uint8 per pixel).
REGION_IDS: dict[str, int] = {
    "background": 0,
    "skin": 1,
    "neck": 2,
    "hair": 3,
    "eyes": 4,
    "brows": 5,
    "lips": 6,
    "mouth": 7,  # mouth interior between the lips
    "beard": 8,
    "glasses": 9,
}
REGION_NAMES = {v: k for k, v in REGION_IDS.items()}


class DatasetError(ValueError):
    """A dataset that cannot be used; the message lists every problem found."""


@dataclass(frozen=True)
class Problem:
    """One problem of a dataset: the file it concerns, what is wrong, and the affected image name
    (None when the problem concerns the dataset as a whole and no item can be skipped to fix it)."""

    file: str
    message: str
    name: str | None = None

    def __str__(self) -> str:
        return f"{self.file}: {self.message}"


def mask_path(name: str) -> str:
    """Relative path of the region mask of image ``name``: ``masks/<dir>/<stem>.png``."""
    return str(PurePosixPath(MASK_DIR) / PurePosixPath(name).with_suffix(".png"))


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of a uint8 (H,W,3) or (H,W) array (deterministic for equal input)."""
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise ValueError(f"image array: expected uint8 (H,W) or (H,W,3), got {array.dtype} {array.shape}")
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def decode_image(data: bytes, what: str) -> np.ndarray:
    """uint8 (H,W,3) RGB array from encoded image bytes; ValueError naming ``what`` if unreadable."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return np.asarray(img.convert("RGB"))
    except Exception as exc:  # PIL raises many types for corrupt data
        raise ValueError(f"{what}: unreadable image ({type(exc).__name__}: {exc})") from None


def decode_mask(data: bytes, what: str) -> np.ndarray:
    """uint8 (H,W) region-id array from PNG bytes; ValueError naming ``what`` if not single-channel 8-bit."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.mode != "L":
                raise ValueError(f"mode {img.mode}, expected single-channel 8-bit ('L')")
            return np.asarray(img)
    except Exception as exc:
        raise ValueError(f"{what}: unreadable mask ({type(exc).__name__}: {exc})") from None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, indent=1, sort_keys=False).encode("utf-8")


@dataclass
class DatasetIndex:
    """Everything of a dataset except pixels: names in dataset order, camera labels and morphable
    parameters (float32 arrays aligned with ``names``), and per-item attributes when present."""

    files: DatasetFiles
    names: list[str]
    labels: np.ndarray  # (N,25)
    shape: np.ndarray  # (N,100)
    expression: np.ndarray  # (N,50)
    pose: np.ndarray  # (N,6)
    attributes: dict[str, dict] | None
    has_masks: bool

    def __len__(self) -> int:
        return len(self.names)

    def read_image(self, i: int) -> np.ndarray:
        return decode_image(self.files.read_bytes(self.names[i]), f"{self.files.root}/{self.names[i]}")

    def read_mask(self, i: int) -> np.ndarray:
        rel = mask_path(self.names[i])
        return decode_mask(self.files.read_bytes(rel), f"{self.files.root}/{rel}")


def read_index(path: str | os.PathLike) -> DatasetIndex:
    """Read labels, parameters and attributes of the dataset at ``path`` (folder or zip).

    Raises DatasetError listing the dataset-wide problems (unreadable metadata, wrong array shapes).
    Items with a malformed label or missing/non-finite parameters get NaN rows: callers validate with
    `check_dataset` first and drop or refuse them (per-image pixel problems are found there too).
    """
    files = DatasetFiles(path)
    problems: list[Problem] = []
    entries = _read_labels(files, problems)
    arrays = _read_morphable(files, problems, entries)
    fatal = [p for p in problems if p.name is None]
    if fatal or not arrays:
        raise DatasetError(f"dataset {files.root} cannot be read:\n" + "\n".join(f"  {p}" for p in fatal or problems))
    attributes = None
    if files.exists(ATTRIBUTES_FILE):
        attributes = json.loads(files.read_bytes(ATTRIBUTES_FILE))["items"]
    names = [n for n, _ in entries]
    return DatasetIndex(
        files=files,
        names=names,
        labels=np.asarray(
            [lab if lab is not None else [math.nan] * LABEL_DIM for _, lab in entries], dtype=np.float32
        ).reshape(len(names), LABEL_DIM),
        shape=arrays["shape"],
        expression=arrays["expression"],
        pose=arrays["pose"],
        attributes=attributes,
        has_masks=any(n.startswith(MASK_DIR + "/") for n in files.names()),
    )


def _read_labels(files: DatasetFiles, problems: list[Problem]) -> list[tuple[str, list[float] | None]]:
    """Parse dataset.json; append problems; return (name, label) per uniquely named entry, with
    label None where it is malformed (that problem names the image)."""
    if not files.exists(LABELS_FILE):
        problems.append(Problem(LABELS_FILE, "missing (expected EG3D's {'labels': [[path, [25 floats]], ...]})"))
        return []
    try:
        labels = json.loads(files.read_bytes(LABELS_FILE))["labels"]
        if not isinstance(labels, list):
            raise TypeError(f"'labels' is a {type(labels).__name__}, expected a list")
    except Exception as exc:
        problems.append(Problem(LABELS_FILE, f"unreadable ({type(exc).__name__}: {exc})"))
        return []
    entries: list[tuple[str, list[float] | None]] = []
    seen: set[str] = set()
    for k, entry in enumerate(labels):
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)):
            problems.append(Problem(LABELS_FILE, f"entry {k} is not [relative_path, [25 floats]]"))
            continue
        name, label = entry
        if name in seen:
            problems.append(Problem(LABELS_FILE, f"duplicate image name {name!r} (entry {k})", name))
            continue
        seen.add(name)
        if not isinstance(label, list) or len(label) != LABEL_DIM:
            length = len(label) if isinstance(label, list) else type(label).__name__
            problems.append(Problem(LABELS_FILE, f"label of {name!r} has length {length}, expected {LABEL_DIM}", name))
            entries.append((name, None))
            continue
        try:
            values = [float(v) for v in label]
        except (TypeError, ValueError):
            problems.append(Problem(LABELS_FILE, f"label of {name!r} holds non-numbers", name))
            entries.append((name, None))
            continue
        if not all(math.isfinite(v) for v in values):
            problems.append(Problem(LABELS_FILE, f"label of {name!r} holds NaN or inf", name))
            entries.append((name, None))
            continue
        entries.append((name, values))
    return entries


def _read_morphable(
    files: DatasetFiles, problems: list[Problem], entries: list[tuple[str, list[float] | None]]
) -> dict[str, np.ndarray]:
    """Load morphable.npz, check shapes/finiteness/names against the labels, reorder to ``entries``."""
    if not files.exists(MORPHABLE_FILE):
        problems.append(Problem(MORPHABLE_FILE, "missing (expected arrays shape, expression, pose, names)"))
        return {}
    try:
        with np.load(io.BytesIO(files.read_bytes(MORPHABLE_FILE)), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as exc:
        problems.append(Problem(MORPHABLE_FILE, f"unreadable ({type(exc).__name__}: {exc})"))
        return {}
    missing = [k for k in (*PARAM_DIMS, "names") if k not in arrays]
    if missing:
        problems.append(Problem(MORPHABLE_FILE, f"missing arrays {missing}"))
        return {}
    names = [str(n) for n in arrays["names"]]
    count = len(names)
    bad_shape = False
    for key, dim in PARAM_DIMS.items():
        if arrays[key].shape != (count, dim):
            problems.append(
                Problem(MORPHABLE_FILE, f"array {key!r} has shape {arrays[key].shape}, expected ({count}, {dim})")
            )
            bad_shape = True
    if bad_shape:
        return {}
    row_of = {n: i for i, n in enumerate(names)}
    listed = [n for n, _ in entries]
    for name in sorted(set(names) - set(listed)):
        problems.append(Problem(MORPHABLE_FILE, f"names an image {name!r} that dataset.json does not list", name))
    if len(row_of) != len(names):
        problems.append(Problem(MORPHABLE_FILE, "array 'names' holds duplicates"))
    present = [n for n in names if n in set(listed)]
    if present != [n for n in listed if n in row_of]:
        problems.append(Problem(MORPHABLE_FILE, "array 'names' is not in the order of dataset.json"))
    # Rows aligned with ``entries``; images without parameters get NaN rows (and a problem).
    out = {key: np.full((len(entries), dim), np.nan, dtype=np.float32) for key, dim in PARAM_DIMS.items()}
    for row, name in enumerate(listed):
        if name not in row_of:
            problems.append(Problem(MORPHABLE_FILE, f"no parameters for image {name!r}", name))
            continue
        for key in PARAM_DIMS:
            values = arrays[key][row_of[name]].astype(np.float32)
            if not np.isfinite(values).all():
                problems.append(Problem(MORPHABLE_FILE, f"{key} of {name!r} holds NaN or inf", name))
            out[key][row] = values
    return out


def check_dataset(path: str | os.PathLike, resolution: int | None = None, decode: bool = True) -> list[Problem]:
    """Every problem of the dataset at ``path`` (folder or zip), each naming its file; [] if usable.

    With ``decode=False`` images and masks are only opened (header: size, mode), not decoded, which
    is ~10x faster on large datasets but misses corruption inside the pixel data (reading such an
    image later raises an error naming it).

    Checks: dataset.json readable with [path, 25 finite floats] entries and unique names; every listed
    image present, decodable, square and of one common size (``resolution`` when given, else the size
    of the first readable image); morphable.npz present with arrays of the right shapes, finite
    values and names equal to the label order; attributes.json (if present) readable and naming the
    same images; masks (if a masks/ folder exists) present for every image, of the image's size and
    holding only known region ids.
    """
    try:
        files = DatasetFiles(path)
    except (FileNotFoundError, ValueError) as exc:
        return [Problem(str(path), str(exc))]
    problems: list[Problem] = []
    entries = _read_labels(files, problems)
    _read_morphable(files, problems, entries)
    names = [n for n, _ in entries]
    expected_size = resolution
    for name in names:
        if not files.exists(name):
            problems.append(Problem(name, "image listed in dataset.json is missing", name))
            continue
        try:
            height, width = _image_size(files.read_bytes(name), name, decode)
        except ValueError as exc:
            problems.append(Problem(name, str(exc).split(": ", 1)[1], name))
            continue
        if height != width:
            problems.append(Problem(name, f"image is {width}x{height}, expected a square image", name))
            continue
        if expected_size is None:
            expected_size = height
        elif height != expected_size:
            problems.append(
                Problem(name, f"image is {width}x{height}, expected {expected_size}x{expected_size}", name)
            )
    if files.exists(ATTRIBUTES_FILE):
        _check_attributes(files, names, problems)
    has_masks = any(n.startswith(MASK_DIR + "/") for n in files.names())
    if has_masks:
        _check_masks(files, names, expected_size, problems, decode)
    return problems


def _image_size(data: bytes, what: str, decode: bool) -> tuple[int, int]:
    """(height, width) of encoded image bytes, decoding the pixels only when ``decode``."""
    if decode:
        return decode_image(data, what).shape[:2]
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.height, img.width
    except Exception as exc:
        raise ValueError(f"{what}: unreadable image ({type(exc).__name__}: {exc})") from None


def _check_attributes(files: DatasetFiles, names: list[str], problems: list[Problem]) -> None:
    try:
        items = json.loads(files.read_bytes(ATTRIBUTES_FILE))["items"]
        if not isinstance(items, dict):
            raise TypeError(f"'items' is a {type(items).__name__}, expected a dict")
    except Exception as exc:
        problems.append(Problem(ATTRIBUTES_FILE, f"unreadable ({type(exc).__name__}: {exc})"))
        return
    for name in names:
        item = items.get(name)
        if item is None:
            problems.append(Problem(ATTRIBUTES_FILE, f"no entry for image {name!r}", name))
        elif not isinstance(item.get("captions"), list) or not all(isinstance(c, str) for c in item["captions"]):
            problems.append(Problem(ATTRIBUTES_FILE, f"entry of {name!r} lacks a list of caption strings", name))
    for extra in sorted(set(items) - set(names)):
        problems.append(Problem(ATTRIBUTES_FILE, f"names an image {extra!r} that dataset.json does not list"))


def _check_masks(
    files: DatasetFiles, names: list[str], size: int | None, problems: list[Problem], decode: bool
) -> None:
    max_id = max(REGION_IDS.values())
    for name in names:
        rel = mask_path(name)
        if not files.exists(rel):
            problems.append(Problem(rel, f"region mask of {name!r} is missing", name))
            continue
        if not decode:
            continue
        try:
            mask = decode_mask(files.read_bytes(rel), rel)
        except ValueError as exc:
            problems.append(Problem(rel, str(exc).split(": ", 1)[1], name))
            continue
        if size is not None and mask.shape != (size, size):
            problems.append(Problem(rel, f"mask is {mask.shape[1]}x{mask.shape[0]}, expected {size}x{size}", name))
        elif int(mask.max()) > max_id:
            problems.append(Problem(rel, f"mask holds region id {int(mask.max())} > {max_id} (see REGION_IDS)", name))


class DatasetWriter:
    """Builds a dataset in ``<out>.partial`` and moves it to ``out`` (a folder, or a zip when
    ``as_zip``) only in `finish`, so a killed writer never leaves a dataset at ``out``.

    Images may be added in any order and across several runs: files already in the partial folder
    are kept, which is what lets `generate_synthetic` resume.
    """

    def __init__(self, out: str | os.PathLike, as_zip: bool = False) -> None:
        self.out = Path(out)
        self.as_zip = as_zip
        self.partial = self.out.with_name(self.out.name + ".partial")
        self.partial.mkdir(parents=True, exist_ok=True)

    def write_file(self, relpath: str, data: bytes) -> None:
        atomic_write_bytes(self.partial / relpath, data)

    def add_image(self, name: str, rgb: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Store image ``name`` (uint8 HxWx3) and, if given, its region mask (uint8 HxW)."""
        if mask is not None:
            self.write_file(mask_path(name), encode_png(mask))
        self.write_file(name, encode_png(rgb))

    def finish(
        self,
        names: list[str],
        labels: np.ndarray,
        shape: np.ndarray,
        expression: np.ndarray,
        pose: np.ndarray,
        attributes: dict[str, dict] | None = None,
    ) -> Path:
        """Write the metadata files, then move the dataset into place; returns ``out``."""
        if self.out.exists():
            raise FileExistsError(f"{self.out} already exists; refusing to overwrite a dataset")
        labels = np.asarray(labels, dtype=np.float64)
        if labels.shape != (len(names), LABEL_DIM):
            raise ValueError(f"labels: expected shape ({len(names)}, {LABEL_DIM}), got {labels.shape}")
        label_list = [[name, [float(v) for v in row]] for name, row in zip(names, labels)]
        self.write_file(LABELS_FILE, _json_bytes({"labels": label_list}))
        arrays = {"shape": shape, "expression": expression, "pose": pose}
        for key, dim in PARAM_DIMS.items():
            if np.shape(arrays[key]) != (len(names), dim):
                raise ValueError(f"{key}: expected shape ({len(names)}, {dim}), got {np.shape(arrays[key])}")
        arrays = {k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()}
        self.write_file(MORPHABLE_FILE, _npz_bytes({**arrays, "names": np.asarray(names)}))
        if attributes is not None:
            self.write_file(ATTRIBUTES_FILE, _json_bytes({"region_ids": REGION_IDS, "items": attributes}))
        if self.as_zip:
            _zip_folder(self.partial, self.out)
            shutil.rmtree(self.partial)
        else:
            os.replace(self.partial, self.out)
        return self.out


def _zip_folder(folder: Path, out: Path) -> None:
    """Uncompressed zip of ``folder`` at ``out`` (sorted entries, fixed timestamps: same bytes for
    the same files), written to a temporary name first."""
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
        for path in files:
            info = zipfile.ZipInfo(path.relative_to(folder).as_posix(), date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, path.read_bytes())
    os.replace(tmp, out)


def write_dataset(
    out: str | os.PathLike,
    images: dict[str, np.ndarray],
    labels: np.ndarray,
    shape: np.ndarray,
    expression: np.ndarray,
    pose: np.ndarray,
    attributes: dict[str, dict] | None = None,
    masks: dict[str, np.ndarray] | None = None,
    as_zip: bool = False,
) -> Path:
    """Write a whole in-memory dataset (``images`` maps name -> uint8 HxWx3, in dataset order)."""
    writer = DatasetWriter(out, as_zip=as_zip)
    for name, rgb in images.items():
        writer.add_image(name, rgb, None if masks is None else masks[name])
    return writer.finish(list(images), labels, shape, expression, pose, attributes)
