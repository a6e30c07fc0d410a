"""Dataset converters on miniature real layouts: labels, ReaL sets, fractions, subsets, bad files, resume, verify."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from dataset_layouts import (
    CELEBA_ATTRIBUTES,
    EXTRA_TRAIN_PER_CLASS,
    IMAGENET_CLASSES,
    ONE_PERCENT,
    REAL_JSON,
    VAL_TRUTH,
    add_webvision_broken,
    celeba_value_line,
    devkit_order,
    listed_one_percent,
    make_celeba,
    make_imagenet_train,
    make_imagenet_val,
    make_webvision,
    outcomes,
    read_split,
    real_sets,
)
from PIL import Image
from typer.testing import CliRunner

import shards.writer
from shards.cli import app
from shards.format import NO_LABEL, LabelKind
from shards.manifest import load_split, manifest_path
from shards.sources.celeba import CelebAOptions, celeba_plan
from shards.sources.common import SourceError, imagenet_wnids, write_planned
from shards.sources.imagenet import ImageNetOptions, imagenet_plan
from shards.sources.webvision import WebVisionOptions, webvision_plan
from shards.writer import WriterSettings

WNIDS = imagenet_wnids()
needs_shared = pytest.mark.skipif(not REAL_JSON.is_file() or not ONE_PERCENT.is_file(), reason="../shared data absent")


def settings(**overrides) -> WriterSettings:
    return WriterSettings(**{"max_samples_per_shard": 16, "workers": 1, "progress": False, **overrides})


def convert_imagenet(out: Path, **options) -> None:
    write_planned(out, imagenet_plan(ImageNetOptions(**options)), settings())


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagenet")
    make_imagenet_train(root)
    make_imagenet_val(root, "folders")
    return root


@pytest.fixture(scope="module")
def imagenet_out(imagenet_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("imagenet_shards")
    convert_imagenet(out, root=imagenet_root)
    return out


def is_rgb_baseline_jpeg(data: bytes) -> bool:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image.format == "JPEG" and image.mode == "RGB" and not image.info.get("progressive")


# --- ImageNet -----------------------------------------------------------------------------------


def test_imagenet_train_labels_are_sorted_wnid_positions(imagenet_out):
    manifest = load_split(imagenet_out, "train")
    assert manifest.class_names == WNIDS and manifest.label_kind is LabelKind.SINGLE
    samples = read_split(imagenet_out, "train")
    for source, sample in samples.items():
        assert sample.label == WNIDS.index(source.split("/")[1]), source
    assert {s.split("/")[1] for s in samples} == set(IMAGENET_CLASSES)


def test_imagenet_bad_files_are_repaired_or_skipped_with_reasons(imagenet_root, imagenet_out):
    found = outcomes(imagenet_out, "train")
    manifest = load_split(imagenet_out, "train")
    reasons = {r.source: r.reason for r in manifest.repaired + manifest.skipped}
    kinds = {source.rsplit("_", 1)[1]: source for source in reasons}
    assert sorted(found.values()).count("repaired") == 5 and sorted(found.values()).count("skipped") == 2
    assert "CMYK" in reasons[kinds["800000.JPEG"]] and "L JPEG" in reasons[kinds["800001.JPEG"]]
    assert "PNG bytes" in reasons[kinds["800002.JPEG"]] and "GIF bytes" in reasons[kinds["800003.JPEG"]]
    assert "progressive" in reasons[kinds["800004.JPEG"]]
    assert "undecodable" in reasons[kinds["800005.JPEG"]] and reasons[kinds["800006.JPEG"]] == "zero-byte file"
    samples = read_split(imagenet_out, "train")
    for source, sample in samples.items():
        assert is_rgb_baseline_jpeg(sample.jpeg), source
        if found[source] == "pass":  # valid RGB baseline JPEGs pass through byte for byte
            assert sample.jpeg == (imagenet_root / source).read_bytes()


@needs_shared
@pytest.mark.parametrize("style", ["folders", "kaggle", "devkit"])
def test_imagenet_val_layouts_give_labels_and_real_sets(tmp_path, style):
    make_imagenet_val(tmp_path / "in", style)
    convert_imagenet(tmp_path / "out", root=tmp_path / "in")
    manifest = load_split(tmp_path / "out", "val")
    assert manifest.label_kind is LabelKind.MULTI and manifest.extra["val_layout"] == style
    assert manifest.extra["real_labels"] == {"file": "timm:imagenet_real_labels.json", "empty_sets": 1}
    real = real_sets()
    samples = read_split(tmp_path / "out", "val")
    assert len(samples) == len(VAL_TRUTH)
    for source, sample in samples.items():
        number = int(Path(source).stem.split("_")[-1])
        assert sample.label == WNIDS.index(VAL_TRUTH[number])
        assert list(sample.label_set) == sorted(real[number - 1])
        assert sample.meta["real_empty"] == (number == 1)


@needs_shared
def test_real_labels_file_option_and_no_real(tmp_path):
    make_imagenet_val(tmp_path / "in", "folders")
    convert_imagenet(tmp_path / "a", root=tmp_path / "in", real_labels=REAL_JSON)
    assert load_split(tmp_path / "a", "val").extra["real_labels"]["file"] == "real.json"
    convert_imagenet(tmp_path / "b", root=tmp_path / "in", use_real=False)
    manifest = load_split(tmp_path / "b", "val")
    assert manifest.label_kind is LabelKind.SINGLE and "real_labels" not in manifest.extra


def test_devkit_ids_follow_devkit_order_not_sorted_order(tmp_path):
    make_imagenet_val(tmp_path / "in", "devkit")
    convert_imagenet(tmp_path / "out", root=tmp_path / "in", use_real=False)
    labels = {Path(s).stem: x.label for s, x in read_split(tmp_path / "out", "val").items()}
    assert labels == {f"ILSVRC2012_val_{n:08d}": WNIDS.index(w) for n, w in VAL_TRUTH.items()}
    # the same order given as a text list works; the sorted list is refused, not silently used
    order_file = tmp_path / "order.txt"
    order_file.write_text("\n".join(devkit_order()) + "\n")
    convert_imagenet(tmp_path / "out2", root=tmp_path / "in", use_real=False, devkit_synsets=order_file)
    assert {Path(s).stem: x.label for s, x in read_split(tmp_path / "out2", "val").items()} == labels
    order_file.write_text("\n".join(WNIDS) + "\n")
    with pytest.raises(SourceError, match="sorted order"):
        imagenet_plan(ImageNetOptions(root=tmp_path / "in", use_real=False, devkit_synsets=order_file))


def test_devkit_without_meta_names_what_is_missing(tmp_path):
    make_imagenet_val(tmp_path / "in", "devkit")
    (tmp_path / "in" / "ILSVRC2012_devkit_t12" / "data" / "meta.mat").unlink()
    with pytest.raises(SourceError, match="meta.mat beside it or --devkit-synsets"):
        imagenet_plan(ImageNetOptions(root=tmp_path / "in"))


@needs_shared
def test_one_percent_subset_keeps_exactly_the_listed_files(imagenet_root, tmp_path):
    convert_imagenet(tmp_path / "out", root=imagenet_root, subset=ONE_PERCENT, splits=("train",))
    kept = {Path(s).name for s in read_split(tmp_path / "out", "train")}
    listed = {name for names in listed_one_percent().values() for name in names}
    assert kept == listed and len(kept) >= 4 * 12
    assert len(list((imagenet_root / "train").glob("*/*.JPEG"))) > len(kept) + 4 * EXTRA_TRAIN_PER_CLASS - 1
    fraction = load_split(tmp_path / "out", "train").extra["label_fraction"]
    assert fraction["method"] == "subset" and fraction["file"] == "1percent.txt" and fraction["selected"] == len(listed)
    assert fraction["listed_in_classes"] == len(listed)


def test_fraction_complement_is_written_as_an_unlabelled_split(imagenet_root, tmp_path):
    out = tmp_path / "out"
    convert_imagenet(
        out, root=imagenet_root, splits=("train",), fraction=0.25, unlabelled_complement="train_unlabelled"
    )
    train, rest = load_split(out, "train"), load_split(out, "train_unlabelled")
    assert rest.label_kind is LabelKind.UNLABELLED and rest.class_names == train.class_names
    labelled, unlabelled = read_split(out, "train"), read_split(out, "train_unlabelled")
    assert not set(labelled) & set(unlabelled) and all(s.label == NO_LABEL for s in unlabelled.values())
    everything = {source for source, outcome in outcomes(out, "train").items() if outcome != "skipped"}
    everything |= {source for source, outcome in outcomes(out, "train_unlabelled").items() if outcome != "skipped"}
    assert everything == {
        p for p, outcome in make_imagenet_train(tmp_path / "again").expected.items() if outcome != "skipped"
    }
    assert rest.extra["complement_of"] == "train"


@pytest.mark.parametrize(
    "options, message",
    [
        ({}, "--unlabelled-complement needs --fraction or --subset"),
        ({"fraction": 0.5, "unlabelled_complement": "val"}, "a plain split name other than train and val"),
        ({"fraction": 0.5, "unlabelled_complement": "a/b"}, "a plain split name"),
        ({"fraction": 0.5, "splits": ("val",)}, "include train in --splits"),
    ],
)
def test_unlabelled_complement_options_are_checked(options, message):
    with pytest.raises(ValueError, match=message):
        ImageNetOptions(root=Path("in"), **{"unlabelled_complement": "rest", **options})


def test_seeded_fraction_is_per_class_and_reproducible(imagenet_root, tmp_path):
    def kept(name: str, **options) -> set[str]:
        convert_imagenet(tmp_path / name, root=imagenet_root, splits=("train",), fraction=0.25, **options)
        return set(read_split(tmp_path / name, "train"))

    first, again, other_seed = kept("a", seed=3), kept("b", seed=3), kept("c", seed=4)
    assert first == again and first != other_seed
    per_class = {w: sum(1 for s in first if f"/{w}/" in s) for w in IMAGENET_CLASSES}
    files = {w: len(list((imagenet_root / "train" / w).glob("*.JPEG"))) for w in IMAGENET_CLASSES}
    skipped_broken = {s for s in outcomes(tmp_path / "a", "train") if outcomes(tmp_path / "a", "train")[s] == "skipped"}
    for wnid in IMAGENET_CLASSES:
        picked = per_class[wnid] + sum(1 for s in skipped_broken if f"/{wnid}/" in s)
        assert picked == round(0.25 * files[wnid])
    # a class's choice does not depend on which other classes are converted
    two = kept("d", seed=3, num_classes=2)
    assert {s for s in first if s.split("/")[1] in IMAGENET_CLASSES[:2]} == two
    assert load_split(tmp_path / "a", "train").extra["label_fraction"]["method"] == "fraction"


@needs_shared
def test_class_subsets_reindex_labels_and_real_sets(imagenet_root, tmp_path):
    convert_imagenet(tmp_path / "first2", root=imagenet_root, num_classes=2)
    manifest = load_split(tmp_path / "first2", "train")
    assert manifest.class_names == sorted(IMAGENET_CLASSES)[:2]
    assert {x.label for x in read_split(tmp_path / "first2", "train").values()} == {0, 1}
    class_list = tmp_path / "classes.txt"
    class_list.write_text("n09193705\nn04228054\n")
    convert_imagenet(tmp_path / "listed", root=imagenet_root, class_list=class_list)
    train = read_split(tmp_path / "listed", "train")
    assert {s.split("/")[1]: x.label for s, x in train.items()} == {"n09193705": 0, "n04228054": 1}
    val = {Path(s).stem: x for s, x in read_split(tmp_path / "listed", "val").items()}
    assert set(val) == {"ILSVRC2012_val_00000002", "ILSVRC2012_val_00000018"}
    assert val["ILSVRC2012_val_00000002"].label == 0 and val["ILSVRC2012_val_00000002"].label_set == (0, 1)
    assert val["ILSVRC2012_val_00000018"].label_set == () and val["ILSVRC2012_val_00000018"].meta["real_empty"]
    assert load_split(tmp_path / "listed", "val").extra["classes"]["method"] == "class_list"


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("no_root", "does not exist"),
        ("no_classes", "no class folders"),
        ("no_val_labels", "no label file"),
        ("unlabelled_val", "have no label in"),
        ("bad_csv_header", "is not 'ImageId,PredictionString'"),
        ("bad_csv_row", "no WNID"),
        ("unknown_class_in_list", "not ImageNet-1k classes"),
        ("bad_real_json", "ReaL label file"),
        ("bad_devkit_line", "is not an ILSVRC2012_ID"),
        ("forced_folders_on_flat_val", "no class folders"),
    ],
)
def test_structural_problems_stop_before_writing(tmp_path, breakage, message):
    root = tmp_path / "in"
    options = {"root": root}
    if breakage == "no_classes":
        (root / "train" / "not_a_wnid").mkdir(parents=True)
    elif breakage == "unknown_class_in_list":
        make_imagenet_train(root, with_broken=False)
        (tmp_path / "list.txt").write_text("n99999999\n")
        options["class_list"] = tmp_path / "list.txt"
    elif breakage == "bad_real_json":
        make_imagenet_val(root, "folders")
        (tmp_path / "real.json").write_text("{not json")
        options["real_labels"] = tmp_path / "real.json"
    elif breakage == "bad_devkit_line":
        make_imagenet_val(root, "devkit")
        truth = root / "ILSVRC2012_devkit_t12" / "data" / "ILSVRC2012_validation_ground_truth.txt"
        truth.write_text(truth.read_text().replace("\n", "\nn02119789\n", 1))
    elif breakage == "forced_folders_on_flat_val":
        make_imagenet_val(root, "kaggle")
        options["val_layout"] = "folders"
    elif breakage != "no_root":
        make_imagenet_val(root, "kaggle")
        csv = root / "LOC_val_solution.csv"
        lines = csv.read_text().splitlines()
        if breakage == "no_val_labels":
            csv.unlink()
        elif breakage == "unlabelled_val":
            csv.write_text("\n".join(lines[:-1]) + "\n")
        elif breakage == "bad_csv_header":
            csv.write_text("id,label\n" + "\n".join(lines[1:]))
        else:
            csv.write_text("\n".join(lines[:2] + ["ILSVRC2012_val_00000003,"] + lines[3:]))
    out = tmp_path / "out"
    with pytest.raises(SourceError, match=message):
        convert_imagenet(out, **options)
    assert not out.exists()


def test_resume_after_crash_gives_the_uninterrupted_manifest(imagenet_root, imagenet_out, tmp_path, monkeypatch):
    out = tmp_path / "out"
    original = shards.writer._record_shard
    calls = {"n": 0}

    def crash_after_two(*args, **kwargs):
        original(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(shards.writer, "_record_shard", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        convert_imagenet(out, root=imagenet_root)
    assert not manifest_path(out).exists() and len(list((out / "train").glob("*.tar"))) == 2
    monkeypatch.setattr(shards.writer, "_record_shard", original)
    convert_imagenet(out, root=imagenet_root)
    assert json.loads(manifest_path(out).read_text()) == json.loads(manifest_path(imagenet_out).read_text())


def test_parallel_workers_write_identical_shards(imagenet_root, imagenet_out, tmp_path):
    plan = imagenet_plan(ImageNetOptions(root=imagenet_root, splits=("train",)))
    write_planned(tmp_path, plan, settings(workers=2))
    parallel = load_split(tmp_path, "train")
    assert [s.sha256 for s in parallel.shards] == [s.sha256 for s in load_split(imagenet_out, "train").shards]


def test_imagenet_cli_with_resize_and_kaggle_root(tmp_path):
    kaggle = tmp_path / "kaggle"
    make_imagenet_train(kaggle / "ILSVRC" / "Data" / "CLS-LOC", classes=IMAGENET_CLASSES[:1], with_broken=False)
    big = kaggle / "ILSVRC" / "Data" / "CLS-LOC" / "train" / IMAGENET_CLASSES[0] / "big.JPEG"
    Image.new("RGB", (120, 80), (200, 10, 10)).save(big, quality=95)
    result = CliRunner().invoke(
        app, ["imagenet", "--root", str(kaggle), "--out", str(tmp_path / "out"), "--max-side", "60", "--workers", "1"]
    )
    assert result.exit_code == 0, result.output
    samples = read_split(tmp_path / "out", "train")
    resized = samples[f"ILSVRC/Data/CLS-LOC/train/{IMAGENET_CLASSES[0]}/big.JPEG"]
    assert Image.open(io.BytesIO(resized.jpeg)).size == (60, 40)
    assert load_split(tmp_path / "out", "train").writer["image"] == {"max_side_px": 60, "quality": 90}


def test_kaggle_root_without_train_or_val_is_a_one_line_error(tmp_path):
    (tmp_path / "ILSVRC" / "Data" / "CLS-LOC").mkdir(parents=True)
    with pytest.raises(SourceError, match=r"CLS-LOC has neither train/ nor val/"):
        imagenet_plan(ImageNetOptions(root=tmp_path))


def test_cli_main_prints_structural_errors(tmp_path, monkeypatch, capsys):
    from shards import cli

    monkeypatch.setattr(
        "sys.argv", ["make_shards.py", "imagenet", "--root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]
    )
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    assert "ImageNet root" in capsys.readouterr().err and not (tmp_path / "o").exists()


# --- WebVision ----------------------------------------------------------------------------------

WEBVISION_LABELS = [0, 3, 49, 50, 120, 999, 3, 0]
WEBVISION_VAL_LABELS = [0, 49, 50, 7]


def convert_webvision(out: Path, **options) -> None:
    write_planned(out, webvision_plan(WebVisionOptions(**options)), settings())


@pytest.fixture(scope="module")
def webvision_layout(tmp_path_factory):
    layout = make_webvision(tmp_path_factory.mktemp("webvision"), WEBVISION_LABELS, WEBVISION_VAL_LABELS)
    add_webvision_broken(layout, label=3)
    return layout


def test_webvision_both_sources_labels_and_bad_files(webvision_layout, tmp_path):
    convert_webvision(tmp_path, root=webvision_layout.root)
    train = read_split(tmp_path, "train")
    manifest = load_split(tmp_path, "train")
    assert manifest.class_names == WNIDS and manifest.extra["sources"] == ["google", "flickr"]
    assert {s: x.label for s, x in train.items()} == {s: webvision_layout.labels[s] for s in train}
    assert outcomes(tmp_path, "train") == webvision_layout.expected
    missing = [r.reason for r in manifest.skipped if r.source.endswith("missing.jpg")]
    assert len(missing) == 1 and "FileNotFoundError" in missing[0]
    val = read_split(tmp_path, "val")
    assert {s: x.label for s, x in val.items()} == {
        s: v for s, v in webvision_layout.labels.items() if s.startswith("val_")
    }


def test_mini_webvision_and_the_matching_imagenet_val(webvision_layout, tmp_path):
    class_list = tmp_path / "mini_classes.txt"
    result = CliRunner().invoke(
        app,
        ["webvision", "--root", str(webvision_layout.root), "--out", str(tmp_path / "web"), "--mini",
         "--write-class-list", str(class_list), "--workers", "1"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    manifest = load_split(tmp_path / "web", "train")
    assert manifest.class_names == WNIDS[:50] and manifest.extra["synsets"] == WNIDS[:50] and manifest.extra["mini"]
    train = read_split(tmp_path / "web", "train")
    assert train and all(s.startswith("google/") and x.label < 50 for s, x in train.items())
    expected = {s for s, label in webvision_layout.labels.items() if s.startswith("google/") and label < 50}
    assert set(train) == expected - {s for s, o in webvision_layout.expected.items() if o == "skipped"}
    assert {x.label for x in read_split(tmp_path / "web", "val").values()} == {0, 49, 7}
    # ImageNet val restricted to the same 50 classes: class index = WebVision's label
    imagenet_root = tmp_path / "imagenet"
    make_imagenet_val(imagenet_root, "folders", truth={6: WNIDS[3], 18: WNIDS[21], 2: "n09193705"})
    convert_imagenet(tmp_path / "inval", root=imagenet_root, class_list=class_list)
    val = {Path(s).stem: x for s, x in read_split(tmp_path / "inval", "val").items()}
    assert {k: x.label for k, x in val.items()} == {"ILSVRC2012_val_00000006": 3, "ILSVRC2012_val_00000018": 21}
    if REAL_JSON.is_file():
        assert val["ILSVRC2012_val_00000018"].label_set == (21, 22)  # ReaL {21, 22}: both among the 50


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("unlabelled_val", "have no label in"),
        ("label_out_of_range", "label 1000 outside"),
        ("wrong_root", "is --root the dataset's top folder"),
        ("no_flickr_list", "train_filelist_flickr.txt does not exist"),
        ("bad_line", "expected 'path label'"),
    ],
)
def test_webvision_structural_problems(tmp_path, breakage, message):
    layout = make_webvision(tmp_path / "in", [0, 1, 2], [0, 1])
    info = layout.root / "info"
    if breakage == "unlabelled_val":
        (layout.root / "val_images_256" / "val999999.jpg").write_bytes(b"x")
    elif breakage == "label_out_of_range":
        (info / "train_filelist_google.txt").write_text("google/q0000/000000.jpg 1000\n")
    elif breakage == "wrong_root":
        shutil.rmtree(layout.root / "google")
    elif breakage == "no_flickr_list":
        (info / "train_filelist_flickr.txt").unlink()
    else:
        (info / "val_filelist.txt").write_text("val000001.jpg zero\n")
    with pytest.raises(SourceError, match=message):
        convert_webvision(tmp_path / "out", root=layout.root)
    assert not (tmp_path / "out").exists()


def test_webvision_options_are_checked():
    with pytest.raises(ValueError, match="Google subset"):
        WebVisionOptions(Path("."), mini=True, sources=("google", "flickr"))
    with pytest.raises(ValueError, match="choose from"):
        WebVisionOptions(Path("."), sources=("bing",))


# --- CelebA -------------------------------------------------------------------------------------

CELEBA_PARTITIONS = [0, 0, 1, 2, 0, 0, 0, 0, 0, 1, 1, 2, 2, 0, 1, 2]


def test_celeba_attributes_partition_and_bad_files(tmp_path):
    layout = make_celeba(tmp_path / "in", CELEBA_PARTITIONS)
    result = CliRunner().invoke(
        app, ["celeba", "--root", str(layout.root), "--out", str(tmp_path / "out"), "--workers", "1"]
    )
    assert result.exit_code == 0, result.output
    for part, split in enumerate(("train", "val", "test")):
        manifest = load_split(tmp_path / "out", split)
        assert manifest.label_kind is LabelKind.ATTRIBUTES and manifest.class_names == CELEBA_ATTRIBUTES
        samples = read_split(tmp_path / "out", split)
        expected = {s for s, (p, _) in layout.labels.items() if p == part and layout.expected[s] != "skipped"}
        assert set(samples) == expected
        for source, sample in samples.items():
            assert sample.label == NO_LABEL and sample.label_set == layout.labels[source][1]
        assert {s: "pass" for s in samples} | outcomes(tmp_path / "out", split) == {
            s: o for s, o in layout.expected.items() if layout.labels[s][0] == part
        }


def test_celeba_value_lines_use_the_real_spacing():
    line = celeba_value_line("000001.jpg", [-1, 1, 1, -1])
    assert line == "000001.jpg -1  1  1 -1"


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("count", "the count line says"),
        ("value", "values of 1 or -1"),
        ("partition_only", "have no attributes entry"),
        ("attributes_only", "have no partition entry"),
        ("bad_partition", r"partition 7 is not 0 \(train\)"),
        ("no_images", "image folder"),
    ],
)
def test_celeba_structural_problems(tmp_path, breakage, message):
    layout = make_celeba(tmp_path / "in", [0, 1, 2], with_broken=False)
    attr, part = layout.root / "list_attr_celeba.txt", layout.root / "list_eval_partition.txt"
    lines = attr.read_text().splitlines()
    if breakage == "count":
        attr.write_text("\n".join(["4"] + lines[1:]) + "\n")
    elif breakage == "value":
        attr.write_text("\n".join(lines[:2] + [lines[2].replace(" 1", " 0", 1)] + lines[3:]) + "\n")
    elif breakage == "partition_only":
        part.write_text(part.read_text() + "000009.jpg 0\n")
    elif breakage == "attributes_only":
        part.write_text("\n".join(part.read_text().splitlines()[:2]) + "\n")
    elif breakage == "bad_partition":
        part.write_text(part.read_text().replace("000002.jpg 1", "000002.jpg 7"))
    else:
        shutil.rmtree(layout.root / "img_align_celeba")
    with pytest.raises(SourceError, match=message):
        write_planned(tmp_path / "out", celeba_plan(CelebAOptions(layout.root)), settings())
    assert not (tmp_path / "out").exists()


def test_convert_bench_runs_every_configuration(tmp_path):
    from benchmarks import convert as bench_convert

    config = bench_convert.ConvertBenchConfig(num_images=12, large_fraction=0.5, workers=(1,), repeats=1)
    results, num_large = bench_convert.run_convert_bench(config)
    assert [(r.task, r.max_side_px) for r in results] == [("convert", None), ("convert", 500), ("verify", None)]
    assert 0 < num_large < 12 and all(r.images_per_s > 0 and r.cpu_ms_per_image > 0 for r in results)
    bench_convert.write_json(tmp_path / "bench.json", config, results, num_large)
    assert json.loads((tmp_path / "bench.json").read_text())["results"][0]["num_images"] == 12
