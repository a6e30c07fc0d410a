"""ImageNet-1k source: train class folders, val in three layouts, ReaL sets, label fractions, class subsets.

Layouts understood under ``--root`` (or under Kaggle's ``ILSVRC/Data/CLS-LOC/`` inside it):

- ``train/nXXXXXXXX/*.JPEG``.
- ``val/nXXXXXXXX/*.JPEG`` (folder-structured), or loose ``val/*.JPEG`` labelled by Kaggle's
  ``LOC_val_solution.csv`` or by the devkit's ``ILSVRC2012_validation_ground_truth.txt``.

Class index = position of the WNID in the sorted ImageNet-1k list (timm's copy), or in the class
list chosen by ``--classes`` / ``--class-list``. The devkit ground truth holds ILSVRC2012_IDs, which
follow the devkit's own synset order (ID 1 is n02119789, not n01440764); nothing installed ships
that order, so it is read from the devkit's ``meta.mat`` or from a WNID list in ID order.
"""

from __future__ import annotations

import json
import pkgutil
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from shards.format import NO_LABEL, LabelKind, safe_key
from shards.sources.common import (
    NON_UTF8_NAME,
    WNID_PATTERN,
    PathGuard,
    PlannedSplit,
    SourceError,
    file_item,
    find_file,
    imagenet_wnids,
    is_utf8_name,
    list_image_files,
    list_subfolders,
    read_lines,
    read_wnid_list,
    require_dir,
    skipped_item,
)
from shards.writer import SourceItem, SplitSpec

SPLITS = ("train", "val")
_KEY_LIKE = re.compile(r"[A-Za-z0-9_\-]+")  # a split name is a folder name (shards.format.check_key)
VAL_LAYOUTS = ("auto", "folders", "kaggle", "devkit")
KAGGLE_VAL_FILE = "LOC_val_solution.csv"
DEVKIT_VAL_FILE = "ILSVRC2012_validation_ground_truth.txt"
DEVKIT_META_FILE = "meta.mat"
DEVKIT_DIR = Path("ILSVRC2012_devkit_t12") / "data"
KAGGLE_IMAGE_DIR = Path("ILSVRC") / "Data" / "CLS-LOC"
VAL_STEM = "ILSVRC2012_val_{:08d}"  # val image i (1-based); ReaL entry i-1 and devkit line i
NUM_DEVKIT_CLASSES = 1000  # ILSVRC2012_IDs 1..1000 are the leaf classes; higher IDs are inner synsets


@dataclass(frozen=True)
class ImageNetOptions:
    """What to convert and how to label it (one ``imagenet`` command line)."""

    root: Path
    splits: tuple[str, ...] | None = None  # None = every split found
    val_layout: str = "auto"
    val_labels: Path | None = None  # LOC_val_solution.csv or the devkit ground truth; None = search
    devkit_synsets: Path | None = None  # meta.mat or WNIDs in ILSVRC2012_ID order; None = meta.mat beside
    real_labels: Path | None = None  # None = the copy timm bundles
    use_real: bool = True
    subset: Path | None = None
    fraction: float | None = None
    seed: int = 0
    num_classes: int | None = None
    class_list: Path | None = None
    follow_symlinks: bool = False  # read symlinked files or folders whose target is outside root
    unlabelled_complement: str | None = None  # split name for the train images --subset/--fraction leaves out

    def __post_init__(self) -> None:
        if self.val_layout not in VAL_LAYOUTS:
            raise ValueError(f"--val-layout must be one of {', '.join(VAL_LAYOUTS)}, got {self.val_layout!r}")
        if self.subset is not None and self.fraction is not None:
            raise ValueError("--subset and --fraction are alternatives: give one")
        if self.fraction is not None and not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"--fraction must be in (0, 1], got {self.fraction}")
        if self.num_classes is not None and self.class_list is not None:
            raise ValueError("--classes and --class-list are alternatives: give one")
        if self.num_classes is not None and not 1 <= self.num_classes <= 1000:
            raise ValueError(f"--classes must be in [1, 1000], got {self.num_classes}")
        self._check_complement()

    def _check_complement(self) -> None:
        name = self.unlabelled_complement
        if name is None:
            return
        if self.subset is None and self.fraction is None:
            raise ValueError(
                "--unlabelled-complement needs --fraction or --subset (without them no train image is left out)"
            )
        if name in SPLITS or not _KEY_LIKE.fullmatch(name):
            raise ValueError(
                f"--unlabelled-complement {name!r}: give a plain split name other than {' and '.join(SPLITS)} "
                f"(letters, digits, '_' or '-'), e.g. train_unlabelled"
            )
        if self.splits is not None and "train" not in self.splits:
            raise ValueError("--unlabelled-complement is made from the train split: include train in --splits")


@dataclass(frozen=True)
class ClassSelection:
    """The classes written (class index = position) and how they were chosen."""

    wnids: list[str]
    description: dict[str, Any]

    def index(self) -> dict[str, int]:
        return {w: i for i, w in enumerate(self.wnids)}


@dataclass(frozen=True)
class ValListing:
    """Val images as (path relative to the image root, WNID), and where the labels came from."""

    layout: str
    files: list[tuple[str, str | None]]  # WNID None: a loose file whose name is not UTF-8 (skipped)
    label_file: str | None


def imagenet_plan(options: ImageNetOptions) -> list[PlannedSplit]:
    """List and check every requested split; raises ``SourceError`` before anything is written."""
    image_root = resolve_image_root(options.root)
    splits = requested_splits(image_root, options.splits)
    train = list_train(image_root) if "train" in splits else None
    val = list_val(options, image_root) if "val" in splits else None
    if train is not None:
        present = [w for w, names in train.items() if names]
    else:
        assert val is not None  # requested_splits holds train or val
        present = [w for _, w in val.files if w is not None]  # None: a skipped non-UTF-8 name
    selection = select_classes(options, present)
    base = image_root.relative_to(options.root)
    guard = PathGuard(options.root, options.follow_symlinks)
    planned = []
    if train is not None:
        planned.extend(train_splits(options, guard, base, train, selection))
    if val is not None:
        planned.append(val_split(options, guard, base, val, selection))
    return planned


def resolve_image_root(root: Path) -> Path:
    """``root`` itself, or Kaggle's ``ILSVRC/Data/CLS-LOC`` below it."""
    require_dir(root, "ImageNet root")
    if (root / "train").is_dir() or (root / "val").is_dir():
        return root
    if (root / KAGGLE_IMAGE_DIR).is_dir():
        return root / KAGGLE_IMAGE_DIR
    raise SourceError(f"ImageNet root {root} has neither train/ nor val/ (nor Kaggle's {KAGGLE_IMAGE_DIR.as_posix()}/)")


def requested_splits(image_root: Path, splits: tuple[str, ...] | None) -> tuple[str, ...]:
    present = tuple(s for s in SPLITS if (image_root / s).is_dir())
    if not present:  # Kaggle's ILSVRC/Data/CLS-LOC/ without train/ or val/ inside
        raise SourceError(f"ImageNet image folder {image_root} has neither train/ nor val/")
    if splits is None:
        return present
    missing = [s for s in splits if s not in present]
    if missing:
        raise SourceError(f"split folder(s) {', '.join(str(image_root / s) for s in missing)} do not exist")
    return splits


def list_train(image_root: Path) -> dict[str, list[str]]:
    """WNID -> image file names, from ``train/nXXXXXXXX/`` (directory entries only)."""
    train = image_root / "train"
    folders = list_subfolders(train, WNID_PATTERN)
    if not folders:
        raise SourceError(f"{train} holds no class folders named nXXXXXXXX")
    return {wnid: list_image_files(train / wnid) for wnid in folders}


def select_classes(options: ImageNetOptions, present: list[str]) -> ClassSelection:
    """All of ImageNet-1k, the first N present, or a list from a file."""
    canonical = imagenet_wnids()
    if options.class_list is not None:
        wnids = read_wnid_list(options.class_list, "class list")
        unknown = sorted(set(wnids) - set(canonical))
        if unknown:
            raise SourceError(f"class list {options.class_list}: {unknown[:3]} are not ImageNet-1k classes")
        return ClassSelection(
            wnids, {"method": "class_list", "file": options.class_list.name, "num_classes": len(wnids)}
        )
    if options.num_classes is not None:
        found = sorted(set(present) & set(canonical))
        if len(found) < options.num_classes:
            raise SourceError(f"--classes {options.num_classes}: only {len(found)} ImageNet-1k classes have images")
        chosen = found[: options.num_classes]
        return ClassSelection(chosen, {"method": "first_present", "num_classes": len(chosen)})
    return ClassSelection(canonical, {"method": "imagenet-1k", "num_classes": len(canonical)})


def train_splits(
    options: ImageNetOptions, guard: PathGuard, base: Path, files: dict[str, list[str]], selection: ClassSelection
) -> list[PlannedSplit]:
    """The train split and, with ``unlabelled_complement``, the images it left out as an unlabelled split."""
    index = selection.index()
    selected = {w: names for w, names in files.items() if w in index}
    if not any(selected.values()):
        raise SourceError(f"no training images in the {len(selection.wnids)} selected classes under {options.root}")
    chosen, fraction = select_fraction(selected, options)
    planned = [train_split(options, guard, base, files, selection, chosen, fraction)]
    if options.unlabelled_complement is not None:
        planned.append(complement_split(options, guard, base, selected, chosen, selection))
    return planned


def complement_split(
    options: ImageNetOptions,
    guard: PathGuard,
    base: Path,
    selected: dict[str, list[str]],
    chosen: dict[str, list[str]],
    selection: ClassSelection,
) -> PlannedSplit:
    """The selected classes' train images that the label fraction did not keep, with no labels: the
    unlabelled stream of a semi-supervised run (the paper's Table 4 setting). Disjoint from train."""
    name = str(options.unlabelled_complement)
    left = {w: sorted(set(names) - set(chosen.get(w, []))) for w, names in selected.items()}
    items = [
        file_item(guard, (PurePosixPath(base) / "train" / wnid / file).as_posix(), safe_key(Path(file).stem), NO_LABEL)
        for wnid, names in left.items()
        for file in names
    ]
    if not items:
        raise SourceError(
            f"--unlabelled-complement {name}: the label fraction kept every train image; nothing is left unlabelled"
        )
    extra = {
        "source": "imagenet",
        "classes": selection.description,
        "complement_of": "train",
        "unlabelled_images": len(items),
    }
    return PlannedSplit(SplitSpec(name, LabelKind.UNLABELLED, list(selection.wnids), extra), items)


def train_split(
    options: ImageNetOptions,
    guard: PathGuard,
    base: Path,
    files: dict[str, list[str]],
    selection: ClassSelection,
    chosen: dict[str, list[str]],
    fraction: dict[str, Any],
) -> PlannedSplit:
    index = selection.index()
    items = [
        file_item(
            guard, (PurePosixPath(base) / "train" / wnid / name).as_posix(), safe_key(Path(name).stem), index[wnid]
        )
        for wnid, names in chosen.items()
        for name in names
    ]
    extra = {
        "source": "imagenet",
        "classes": selection.description,
        "label_fraction": fraction,
        "ignored_class_folders": len(set(files) - set(index)),
    }
    return PlannedSplit(SplitSpec("train", LabelKind.SINGLE, list(selection.wnids), extra), items)


def select_fraction(
    files: dict[str, list[str]], options: ImageNetOptions
) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """Keep the files of a SimCLR subset list, a seeded per-class fraction, or everything."""
    if options.subset is not None:
        return _subset_files(files, options.subset)
    if options.fraction is not None:
        chosen = {w: _seeded_pick(names, options.fraction, options.seed, w) for w, names in files.items()}
        kept = sum(len(v) for v in chosen.values())
        return chosen, {"method": "fraction", "fraction": options.fraction, "seed": options.seed, "selected": kept}
    return files, {"method": "all", "selected": sum(len(v) for v in files.values())}


def _subset_files(files: dict[str, list[str]], subset: Path) -> tuple[dict[str, list[str]], dict[str, Any]]:
    # SimCLR lists hold train file names (nXXXXXXXX_NNNN.JPEG); compare stems so a copy stored
    # with another extension or with class-folder prefixes still matches.
    listed = {PurePosixPath(line.strip()).stem for line in read_lines(subset, "subset list") if line.strip()}
    if not listed:
        raise SourceError(f"subset list {subset} lists no files")
    chosen = {w: [n for n in names if Path(n).stem in listed] for w, names in files.items()}
    kept = sum(len(v) for v in chosen.values())
    expected = sum(1 for stem in listed if stem.split("_")[0] in files)
    if kept == 0:
        raise SourceError(f"none of the {len(listed)} files listed in {subset} is among the selected training images")
    if kept < expected:
        print(f"note: {expected - kept} files of {subset.name} in the selected classes are missing from train/")
    info = {
        "method": "subset",
        "file": subset.name,
        "listed": len(listed),
        "listed_in_classes": expected,
        "selected": kept,
    }
    return chosen, info


def _seeded_pick(names: list[str], fraction: float, seed: int, wnid: str) -> list[str]:
    """round(fraction × n) files (at least one) of one class; seeded by the class's own WNID so a
    class's choice does not depend on which other classes are converted."""
    if not names:
        return []
    count = max(1, round(fraction * len(names)))
    rng = np.random.default_rng([seed, int(wnid[1:])])
    picked = rng.choice(len(names), size=count, replace=False)
    return [names[i] for i in sorted(picked)]


def list_val(options: ImageNetOptions, image_root: Path) -> ValListing:
    """Val images and their WNIDs in whichever layout is present (or forced by --val-layout)."""
    val = image_root / "val"
    search = label_search_folders(options.root, image_root)
    layout = options.val_layout if options.val_layout != "auto" else detect_val_layout(val, options, search)
    if layout == "folders":
        return ValListing("folders", _val_from_folders(val), None)
    name = KAGGLE_VAL_FILE if layout == "kaggle" else DEVKIT_VAL_FILE
    label_file = options.val_labels or find_file(name, search)
    if label_file is None:
        raise SourceError(
            f"--val-layout {layout}: {name} not found in {', '.join(map(str, search))}; pass --val-labels FILE"
        )
    if layout == "kaggle":
        labels = read_kaggle_val(label_file)
    else:
        labels = read_devkit_val(label_file, devkit_id_to_wnid(options.devkit_synsets, label_file))
    return ValListing(layout, _label_loose(val, labels, label_file), label_file.name)


def label_search_folders(root: Path, image_root: Path) -> list[Path]:
    """Where val label files are looked for, in order (duplicates removed)."""
    folders = [root, image_root, image_root / "val", root / DEVKIT_DIR, image_root / DEVKIT_DIR]
    return list(dict.fromkeys(folders))


def detect_val_layout(val: Path, options: ImageNetOptions, search: list[Path]) -> str:
    if list_subfolders(val, WNID_PATTERN):
        return "folders"
    if not list_image_files(val):
        raise SourceError(f"{val} holds neither class folders nor images")
    if options.val_labels is not None:
        return "kaggle" if options.val_labels.suffix.lower() == ".csv" else "devkit"
    for layout, name in (("kaggle", KAGGLE_VAL_FILE), ("devkit", DEVKIT_VAL_FILE)):
        if find_file(name, search) is not None:
            return layout
    raise SourceError(
        f"{val} holds loose images but no label file: looked for {KAGGLE_VAL_FILE} and {DEVKIT_VAL_FILE} "
        f"in {', '.join(map(str, search))}; pass --val-labels FILE"
    )


def _val_from_folders(val: Path) -> list[tuple[str, str | None]]:
    folders, loose = list_subfolders(val, WNID_PATTERN), list_image_files(val)
    if not folders:
        raise SourceError(f"{val} holds no class folders named nXXXXXXXX (--val-layout folders)")
    if loose:
        raise SourceError(f"{val} holds class folders and {len(loose)} loose images (e.g. {loose[0]}); use one layout")
    return [(f"val/{wnid}/{name}", wnid) for wnid in folders for name in list_image_files(val / wnid)]


def _label_loose(val: Path, labels: dict[str, str], label_file: Path) -> list[tuple[str, str | None]]:
    loose = list_image_files(val)
    # a name that is not UTF-8 cannot match a label line: it is skipped (and reported), not an error
    unlabelled = [name for name in loose if is_utf8_name(name) and Path(name).stem not in labels]
    if unlabelled:
        raise SourceError(f"{len(unlabelled)} val images have no label in {label_file}, e.g. {unlabelled[:3]}")
    return [(f"val/{name}", labels.get(Path(name).stem)) for name in loose]


def read_kaggle_val(path: Path) -> dict[str, str]:
    """``ImageId,PredictionString`` rows -> {image stem: WNID}; the class is the first token."""
    lines = read_lines(path, "Kaggle val solution")
    header = [h.strip() for h in lines[0].split(",")] if lines else []
    if header[:2] != ["ImageId", "PredictionString"]:
        raise SourceError(f"{path}:1: header {header} is not 'ImageId,PredictionString'")
    labels: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for number, text in enumerate(lines[1:], start=2):
        if not text.strip():
            continue
        image_id, _, prediction = text.partition(",")
        tokens = prediction.split()
        if not tokens or not WNID_PATTERN.match(tokens[0]):
            raise SourceError(f"{path}:{number}: no WNID at the start of {prediction.strip()[:60]!r}")
        image_id = image_id.strip()
        if image_id in first_line:
            raise SourceError(
                f"{path}:{number}: ImageId {image_id!r} is listed again (first on line {first_line[image_id]})"
            )
        first_line[image_id] = number
        labels[image_id] = tokens[0]
    return labels


def read_devkit_val(path: Path, id_to_wnid: dict[int, str]) -> dict[str, str]:
    """Line i of the devkit ground truth is the ILSVRC2012_ID of ``ILSVRC2012_val_{i:08d}``."""
    labels = {}
    for number, text in enumerate(read_lines(path, "devkit val ground truth"), start=1):
        token = text.strip()
        if not token and number > 1:
            continue  # a trailing blank line
        if not token.isdigit() or int(token) not in id_to_wnid:
            raise SourceError(f"{path}:{number}: {token!r} is not an ILSVRC2012_ID in 1..{NUM_DEVKIT_CLASSES}")
        labels[VAL_STEM.format(number)] = id_to_wnid[int(token)]
    return labels


def devkit_id_to_wnid(devkit_synsets: Path | None, ground_truth: Path) -> dict[int, str]:
    """ILSVRC2012_ID -> WNID from ``meta.mat`` (beside the ground truth, or given) or a WNID list."""
    source = devkit_synsets or find_file(DEVKIT_META_FILE, [ground_truth.parent])
    if source is None:
        raise SourceError(
            f"the devkit ground truth {ground_truth} holds ILSVRC2012_IDs in the devkit's own order; "
            f"need {DEVKIT_META_FILE} beside it or --devkit-synsets FILE (meta.mat, or WNIDs in ID order)"
        )
    mapping = _read_meta_mat(source) if source.suffix.lower() == ".mat" else _read_id_order(source)
    wnids = [mapping[i] for i in sorted(mapping)]
    unknown = sorted(set(wnids) - set(imagenet_wnids()))
    if unknown:
        raise SourceError(f"devkit synsets {source}: {unknown[:3]} are not ImageNet-1k classes")
    if len(wnids) > 1 and wnids == sorted(wnids):
        raise SourceError(
            f"devkit synsets {source} are in sorted order; the devkit's ID order is not sorted (ID 1 = n02119789)"
        )
    return mapping


def _read_meta_mat(path: Path) -> dict[int, str]:
    from scipy.io import loadmat  # scipy comes with scikit-learn; only the devkit layout needs it

    try:
        synsets = loadmat(str(path), squeeze_me=True)["synsets"]
        pairs = zip(np.atleast_1d(synsets["ILSVRC2012_ID"]), np.atleast_1d(synsets["WNID"]))
        mapping = {int(i): str(w) for i, w in pairs if 1 <= int(i) <= NUM_DEVKIT_CLASSES}
    except Exception as error:  # scipy raises many types for a file that is not a MATLAB struct
        raise SourceError(f"devkit meta file {path} is unreadable: {type(error).__name__}: {error}") from None
    if not mapping:
        raise SourceError(f"devkit meta file {path} lists no synsets with ILSVRC2012_ID 1..{NUM_DEVKIT_CLASSES}")
    return mapping


def _read_id_order(path: Path) -> dict[int, str]:
    return {i: wnid for i, wnid in enumerate(read_wnid_list(path, "devkit synset list"), start=1)}


def load_real(path: Path | None) -> tuple[dict[str, list[int]], str]:
    """{val image stem: ReaL set (ImageNet-1k indices)} and a description of where it came from."""
    if path is None:
        data, source = (
            pkgutil.get_data("timm.data", "_info/imagenet_real_labels.json"),
            "timm:imagenet_real_labels.json",
        )
    else:
        try:
            data, source = path.read_bytes(), path.name
        except OSError as error:
            raise SourceError(f"ReaL label file {path} is unreadable: {error}") from None
    try:
        sets = json.loads(data or b"")
        if not isinstance(sets, list) or not all(isinstance(s, list) for s in sets):
            raise ValueError("expected a JSON list of lists of class indices")
    except ValueError as error:
        raise SourceError(f"ReaL label file {path or source}: {error}") from None
    num_classes = len(imagenet_wnids())
    for number, classes in enumerate(sets):
        wrong = [c for c in classes if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < num_classes]
        if wrong:
            raise SourceError(
                f"ReaL label file {path or source}: entry {number} ({VAL_STEM.format(number + 1)}) holds "
                f"{json.dumps(wrong[0])}, not a class index 0..{num_classes - 1}"
            )
    return {VAL_STEM.format(i + 1): list(s) for i, s in enumerate(sets)}, source


def val_split(
    options: ImageNetOptions, guard: PathGuard, base: Path, listing: ValListing, selection: ClassSelection
) -> PlannedSplit:
    real, real_source = load_real(options.real_labels) if options.use_real else (None, None)
    index = selection.index()
    canonical = imagenet_wnids()
    items = []
    for relpath, wnid in listing.files:
        path = (PurePosixPath(base) / relpath).as_posix()
        if wnid is not None and wnid not in index:
            continue  # a class not selected
        if wnid is None or not is_utf8_name(path):
            items.append(skipped_item(path, NON_UTF8_NAME))
        else:
            items.append(_val_item(guard, path, index[wnid], real, canonical, index))
    extra: dict[str, Any] = {"source": "imagenet", "classes": selection.description, "val_layout": listing.layout}
    extra["val_label_file"] = listing.label_file
    if real is not None:
        empty = sum(1 for item in items if item.skip is None and not item.label_set)
        extra["real_labels"] = {"file": real_source, "empty_sets": empty}
        print(f"val: {empty} of {len(items)} images have an empty ReaL set (kept, meta real_empty=true)")
    kind = LabelKind.MULTI if real is not None else LabelKind.SINGLE
    return PlannedSplit(SplitSpec("val", kind, list(selection.wnids), extra), items)


def _val_item(
    guard: PathGuard,
    relpath: str,
    label: int,
    real: dict[str, list[int]] | None,
    canonical: list[str],
    index: dict[str, int],
) -> SourceItem:
    stem = PurePosixPath(relpath).stem
    if real is None:
        return file_item(guard, relpath, safe_key(stem), label)
    if stem not in real:
        raise SourceError(f"val image {relpath} has no ReaL entry (ReaL covers {VAL_STEM.format(1)}..); pass --no-real")
    # ReaL indices are ImageNet-1k positions; keep those in the selected classes, re-indexed.
    labels = tuple(sorted(index[canonical[c]] for c in real[stem] if canonical[c] in index))
    return file_item(guard, relpath, safe_key(stem), label, labels, {"real_empty": not labels})
