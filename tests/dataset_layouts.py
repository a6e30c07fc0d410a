"""Miniature copies of real dataset layouts (ImageNet, WebVision, CelebA) with real JPEG bytes and broken files."""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from shards.format import Sample, decode_sample
from shards.manifest import load_split
from shards.sources.common import imagenet_wnids
from shards.tar_io import split_name

SHARED = Path(__file__).resolve().parents[2] / "shared"
REAL_JSON = SHARED / "data" / "real" / "real.json"
ONE_PERCENT = SHARED / "data" / "imagenet_subsets" / "1percent.txt"

# Classes of the mini ImageNet: their ReaL entries overlap (val image 2 has {n09193705, n04228054},
# image 3 has {n02105855, n02106030}), so class subsets must re-index ReaL sets.
IMAGENET_CLASSES = ["n02105855", "n02106030", "n04228054", "n09193705"]
# val image number -> its (invented) ground-truth class; image 1 has an empty ReaL set.
VAL_TRUTH = {1: "n02105855", 2: "n09193705", 3: "n02105855", 17: "n02106030", 18: "n04228054"}
EXTRA_TRAIN_PER_CLASS = 3

CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair "
    "Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup "
    "High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose "
    "Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat "
    "Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young"
).split()


def jpeg_bytes(seed: int, size: tuple[int, int] = (20, 14), **save: object) -> bytes:
    """A small RGB baseline JPEG (smooth noise, so every file differs)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1] // 2 + 1, size[0] // 2 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).resize(size, Image.Resampling.BILINEAR)
    return encode(image, "JPEG", **save)


def encode(image: Image.Image, fmt: str, **save: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def broken_files(seed: int) -> dict[str, tuple[bytes, str]]:
    """Kind -> (bytes, expected outcome 'repaired' or 'skipped'): what real datasets hold."""
    rgb = Image.open(io.BytesIO(jpeg_bytes(seed))).convert("RGB")
    good = jpeg_bytes(seed + 1)
    return {
        "cmyk": (encode(rgb.convert("CMYK"), "JPEG"), "repaired"),
        "gray": (encode(rgb.convert("L"), "JPEG"), "repaired"),
        "png": (encode(rgb, "PNG"), "repaired"),
        "gif": (encode(rgb.convert("P"), "GIF"), "repaired"),
        "progressive": (encode(rgb, "JPEG", progressive=True), "repaired"),
        "truncated": (good[: len(good) // 2], "skipped"),
        "zero": (b"", "skipped"),
    }


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@dataclass
class Layout:
    """A built dataset folder and what a correct conversion must find in it."""

    root: Path
    expected: dict[str, str] = field(default_factory=dict)  # relpath -> 'pass', 'repaired', 'skipped'
    labels: dict[str, object] = field(default_factory=dict)  # relpath -> expected label facts


def listed_one_percent() -> dict[str, list[str]]:
    """Mini-class file names from SimCLR's real 1% list (synthetic names when ../shared is absent)."""
    names: dict[str, list[str]] = {w: [] for w in IMAGENET_CLASSES}
    if ONE_PERCENT.is_file():
        for line in ONE_PERCENT.read_text().split():
            if line.split("_")[0] in names:
                names[line.split("_")[0]].append(line)
    for wnid, found in names.items():
        found.extend([] if found else [f"{wnid}_{1000 + k}.JPEG" for k in range(12)])
    return names


def make_imagenet_train(root: Path, classes: list[str] = IMAGENET_CLASSES, with_broken: bool = True) -> Layout:
    """train/nXXXXXXXX/: the 1%-list files of each class, extra unlisted files, and broken files."""
    layout = Layout(root)
    listed = listed_one_percent()
    for c, wnid in enumerate(classes):
        names = listed.get(wnid, [f"{wnid}_{1000 + k}.JPEG" for k in range(6)])
        names = names + [f"{wnid}_{900000 + k}.JPEG" for k in range(EXTRA_TRAIN_PER_CLASS)]
        for k, name in enumerate(names):
            write(root / "train" / wnid / name, jpeg_bytes(1000 * c + k))
            layout.expected[f"train/{wnid}/{name}"] = "pass"
    if with_broken:
        # the real PNG-named-JPEG is n02105855_2933.JPEG; here every kind sits in the first class
        for k, (data, outcome) in enumerate(broken_files(7).values()):
            relpath = f"train/{classes[0]}/{classes[0]}_{800000 + k}.JPEG"
            write(root / relpath, data)
            layout.expected[relpath] = outcome
    write(root / "train" / classes[0] / "readme.txt", b"not an image, not listed")
    return layout


def make_imagenet_val(root: Path, style: str, truth: dict[int, str] = VAL_TRUTH) -> None:
    """val/ as class folders ('folders') or loose files with a Kaggle CSV or devkit ground truth."""
    for number, wnid in truth.items():
        name = f"ILSVRC2012_val_{number:08d}.JPEG"
        folder = root / "val" / wnid if style == "folders" else root / "val"
        write(folder / name, jpeg_bytes(50000 + number))
    if style == "kaggle":
        rows = [f"ILSVRC2012_val_{n:08d},{w} 10 20 30 40 {w} 1 2 3 4" for n, w in truth.items()]
        (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    elif style == "devkit":
        write_devkit(root / "ILSVRC2012_devkit_t12" / "data", truth)


def devkit_order() -> list[str]:
    """A stand-in for the devkit's (unsorted) synset order: ILSVRC2012_ID i+1 = entry i."""
    wnids = imagenet_wnids()
    return [wnids[i] for i in np.random.default_rng(12).permutation(len(wnids))]


def write_devkit(folder: Path, truth: dict[int, str], meta: bool = True) -> None:
    """Ground truth (one ILSVRC2012_ID per val image, in image order) and meta.mat."""
    from scipy.io import savemat

    order = devkit_order()
    ids = {wnid: i + 1 for i, wnid in enumerate(order)}
    lines = [str(ids[truth[n]]) if n in truth else "1" for n in range(1, max(truth) + 1)]
    write(folder / "ILSVRC2012_validation_ground_truth.txt", ("\n".join(lines) + "\n").encode())
    if meta:
        # as in the real meta.mat: leaf synsets 1..1000 plus inner synsets with higher IDs
        fields = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
        synsets = np.zeros((len(order) + 2, 1), dtype=fields)
        for i, wnid in enumerate(order):
            synsets[i, 0] = (i + 1, wnid, "words", 0)
        synsets[-2, 0] = (1001, "n00001740", "entity", 3)
        synsets[-1, 0] = (1002, "n00002137", "abstraction", 5)
        savemat(str(folder / "meta.mat"), {"synsets": synsets})


def make_webvision(root: Path, labels: list[int], val_labels: list[int]) -> Layout:
    """info/ lists for Google and Flickr, images under google/ and flickr/, val_images_256/."""
    layout = Layout(root)
    wnids = imagenet_wnids()
    write(root / "info" / "synsets.txt", "".join(f"{w} class {i}\n" for i, w in enumerate(wnids)).encode())
    for s, source in enumerate(("google", "flickr")):
        lines = []
        for k, label in enumerate(labels):
            relpath = f"{source}/q{label:04d}/{k:06d}.jpg"
            write(root / relpath, jpeg_bytes(7000 * s + k))
            lines.append(f"{relpath} {label}")
            layout.expected[relpath], layout.labels[relpath] = "pass", label
        (root / "info" / f"train_filelist_{source}.txt").write_text("\n".join(lines) + "\n")
    val_lines = []
    for k, label in enumerate(val_labels):
        name = f"val{k + 1:06d}.jpg"
        write(root / "val_images_256" / name, jpeg_bytes(9000 + k))
        val_lines.append(f"{name} {label}")
        layout.labels[f"val_images_256/{name}"] = label
    (root / "info" / "val_filelist.txt").write_text("\n".join(val_lines) + "\n")
    return layout


def add_webvision_broken(layout: Layout, label: int) -> None:
    """Broken files and one missing file appended to the Google list."""
    list_file = layout.root / "info" / "train_filelist_google.txt"
    lines = []
    for kind, (data, outcome) in broken_files(3).items():
        relpath = f"google/q{label:04d}/broken_{kind}.jpg"
        write(layout.root / relpath, data)
        lines.append(f"{relpath} {label}")
        layout.expected[relpath], layout.labels[relpath] = outcome, label
    lines.append(f"google/q{label:04d}/missing.jpg {label}")
    layout.expected[f"google/q{label:04d}/missing.jpg"] = "skipped"
    list_file.write_text(list_file.read_text() + "\n".join(lines) + "\n")


def celeba_value_line(name: str, values: list[int]) -> str:
    """One attribute line in the real file's spacing: values right-aligned to width 2, space-separated."""
    return name + " " + " ".join(f"{v:>2d}" for v in values)


def make_celeba(root: Path, partitions: list[int], with_broken: bool = True) -> Layout:
    """list_attr_celeba.txt, list_eval_partition.txt and img_align_celeba/ as in the real release."""
    layout = Layout(root)
    rng = np.random.default_rng(5)
    broken = list(broken_files(11).values()) if with_broken else []
    attr_lines, part_lines = [], []
    for k, part in enumerate(partitions):
        name = f"{k + 1:06d}.jpg"
        values = [int(v) for v in rng.choice([-1, 1], size=len(CELEBA_ATTRIBUTES))]
        data, outcome = broken[k] if k < len(broken) else (jpeg_bytes(300 + k), "pass")
        write(root / "img_align_celeba" / name, data)
        attr_lines.append(celeba_value_line(name, values))
        part_lines.append(f"{name} {part}")
        layout.expected[f"img_align_celeba/{name}"] = outcome
        layout.labels[f"img_align_celeba/{name}"] = (part, tuple(i for i, v in enumerate(values) if v == 1))
    header = f"{len(partitions)}\n" + " ".join(CELEBA_ATTRIBUTES) + " \n"  # the real names line ends with a space
    (root / "list_attr_celeba.txt").write_text(header + "\n".join(attr_lines) + "\n")
    (root / "list_eval_partition.txt").write_text("\n".join(part_lines) + "\n")
    return layout


def member_bytes(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    """The bytes of a regular file in an open tar (``extractfile`` gives None for other kinds)."""
    handle = tar.extractfile(member)
    assert handle is not None, f"{member.name} is not a regular file"
    return handle.read()


def read_split(out: Path, split: str) -> dict[str, Sample]:
    """Every sample of a written split, keyed by its source path."""
    manifest = load_split(out, split)
    samples = {}
    for shard in manifest.shards:
        with tarfile.open(out / shard.path) as tar:
            grouped: dict[str, dict[str, bytes]] = {}
            for info in tar:
                key, ext = split_name(info.name)
                grouped.setdefault(key, {})[ext] = member_bytes(tar, info)
        for key, members in grouped.items():
            sample = decode_sample(key, members)
            samples[sample.meta["source"]] = sample
    return samples


def outcomes(out: Path, split: str) -> dict[str, str]:
    """relpath -> 'pass', 'repaired' or 'skipped' as the manifest reports it."""
    manifest = load_split(out, split)
    result = {source: "pass" for source in read_split(out, split)}
    result.update({r.source: "repaired" for r in manifest.repaired})
    result.update({r.source: "skipped" for r in manifest.skipped})
    return result


def real_sets() -> list[list[int]]:
    return json.loads(REAL_JSON.read_text())
