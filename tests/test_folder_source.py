"""The folder source: odd and broken files, CSV and JSONL label files, clear errors, added splits, the CLI."""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
from dataset_layouts import member_bytes
from PIL import Image

from shards.format import LabelKind, Sample, decode_sample, safe_key
from shards.manifest import SplitManifest, load_splits, manifest_path, validate_split
from shards.sources.folder import LabelFileError, folder_items, folder_spec
from shards.writer import WriterSettings, write_split

# path -> (what should happen, a phrase the recorded reason must contain)
EXPECTED = {
    "odd/cmyk.jpg": ("repaired", "CMYK JPEG"),
    "odd/gray.jpg": ("repaired", "L JPEG, not RGB"),
    "odd/png_named.jpg": ("repaired", "PNG bytes"),
    "odd/progressive.jpg": ("repaired", "progressive"),
    "bad/truncated.jpg": ("skipped", "truncated"),
    "bad/empty.jpg": ("skipped", "zero-byte"),
    "bad/notes.jpg": ("skipped", "undecodable"),
}
GOOD = ["good/cat_0.jpg", "good/cat_1.jpg", "good/dog_0.jpg"]


@pytest.fixture
def image_folder(tmp_path, make_jpeg) -> Path:
    """Normal RGB baseline JPEGs beside every kind of odd and broken file."""
    files = {name: make_jpeg(seed=i) for i, name in enumerate(GOOD)}
    files["odd/cmyk.jpg"] = make_jpeg(seed=10, mode="CMYK")
    files["odd/gray.jpg"] = make_jpeg(seed=11, mode="L")
    files["odd/png_named.jpg"] = make_jpeg(seed=12, fmt="PNG")
    files["odd/progressive.jpg"] = make_jpeg(seed=13, progressive=True)
    files["bad/truncated.jpg"] = make_jpeg(seed=14)[:900]
    files["bad/empty.jpg"] = b""
    files["bad/notes.jpg"] = b"label,notes\nthis is a text file\n"
    root = tmp_path / "images"
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def write_labels(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def all_rows_csv(tmp_path: Path) -> Path:
    rows = [f"{name},{'dog' if 'dog' in name or i % 2 else 'cat'}" for i, name in enumerate(GOOD + list(EXPECTED))]
    return write_labels(tmp_path / "labels.csv", "path,label\n" + "\n".join(rows) + "\n")


def convert(images: Path, labels: Path, out: Path, split: str = "train") -> SplitManifest:
    items, class_names, kind = folder_items(images, labels, out, split)
    return write_split(out, folder_spec(split, class_names, kind, labels), items, WriterSettings(progress=False))


def read_samples(out: Path, manifest: SplitManifest) -> dict[str, Sample]:
    """Every sample of a split, decoded straight from the tars."""
    samples = {}
    for shard in manifest.shards:
        with tarfile.open(out / shard.path) as tar:
            grouped: dict[str, dict[str, bytes]] = {}
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                grouped.setdefault(key, {})[ext] = member_bytes(tar, member)
        samples.update({key: decode_sample(key, members) for key, members in grouped.items()})
    return samples


def frame_marker(jpeg: bytes) -> int:
    """The SOFn marker of a JPEG: 0xC0 baseline, 0xC2 progressive (walks the segments)."""
    pos = 2
    while pos + 4 <= len(jpeg):
        marker = jpeg[pos + 1]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return marker
        pos += 2 + int.from_bytes(jpeg[pos + 2 : pos + 4], "big")
    raise AssertionError("no JPEG frame header")


def test_odd_and_broken_files_are_repaired_or_skipped_and_named(image_folder, tmp_path):
    manifest = convert(image_folder, all_rows_csv(tmp_path), tmp_path / "out")
    outcomes = {r.source: ("repaired", r.reason) for r in manifest.repaired}
    outcomes.update({r.source: ("skipped", r.reason) for r in manifest.skipped})
    assert sorted(outcomes) == sorted(EXPECTED)
    for source, (what, phrase) in EXPECTED.items():
        assert outcomes[source][0] == what and phrase in outcomes[source][1], (source, outcomes[source])
    assert manifest.num_samples == len(GOOD) + 4
    assert load_splits(tmp_path / "out")["train"].skipped == manifest.skipped


def test_repaired_images_are_rgb_baseline_jpegs_that_look_like_their_source(image_folder, tmp_path):
    samples = read_samples(tmp_path / "out", convert(image_folder, all_rows_csv(tmp_path), tmp_path / "out"))
    for source, (what, _) in EXPECTED.items():
        if what != "repaired":
            continue
        jpeg = samples[safe_key(source)].jpeg
        assert frame_marker(jpeg) == 0xC0, source
        stored = Image.open(io.BytesIO(jpeg))
        assert (stored.format, stored.mode) == ("JPEG", "RGB")
        original = np.asarray(Image.open(image_folder / source).convert("RGB"), dtype=np.float32)
        assert np.abs(np.asarray(stored, dtype=np.float32) - original).mean() < 8, source


def test_valid_rgb_baseline_jpegs_pass_through_byte_for_byte(image_folder, tmp_path):
    samples = read_samples(tmp_path / "out", convert(image_folder, all_rows_csv(tmp_path), tmp_path / "out"))
    for name in GOOD:
        assert samples[safe_key(name)].jpeg == (image_folder / name).read_bytes()
        assert samples[safe_key(name)].meta["source"] == name


def test_csv_labels_column_gives_multi_label_sets(image_folder, tmp_path):
    labels = write_labels(
        tmp_path / "labels.csv",
        "path,label,labels\ngood/cat_0.jpg,cat,cat;owl\ngood/cat_1.jpg,cat,\ngood/dog_0.jpg,dog,dog cat\n",
    )
    manifest = convert(image_folder, labels, tmp_path / "out")
    assert manifest.label_kind is LabelKind.MULTI and manifest.class_names == ["cat", "dog", "owl"]
    samples = read_samples(tmp_path / "out", manifest)
    got = {key: (s.label, s.label_set) for key, s in samples.items()}
    assert got == {"good_cat_0_jpg": (0, (0, 2)), "good_cat_1_jpg": (0, ()), "good_dog_0_jpg": (1, (0, 1))}


@pytest.mark.parametrize(
    "name, text",
    [
        ("labels.csv", "path,labels\ngood/cat_0.jpg,owl;cat\ngood/cat_1.jpg,cat\ngood/dog_0.jpg,dog cat\n"),
        (
            "labels.jsonl",
            '{"path": "good/cat_0.jpg", "labels": ["owl", "cat"]}\n{"path": "good/cat_1.jpg", "labels": "cat"}\n'
            '{"path": "good/dog_0.jpg", "labels": ["dog", "cat"]}\n',
        ),
    ],
)
def test_a_file_of_label_sets_alone_gives_each_image_its_first_listed_class_as_label(
    image_folder, tmp_path, name, text
):
    manifest = convert(image_folder, write_labels(tmp_path / name, text), tmp_path / "out")
    assert manifest.label_kind is LabelKind.MULTI and manifest.class_names == ["cat", "dog", "owl"]
    got = {key: (s.label, s.label_set) for key, s in read_samples(tmp_path / "out", manifest).items()}
    assert got == {"good_cat_0_jpg": (2, (0, 2)), "good_cat_1_jpg": (0, (0,)), "good_dog_0_jpg": (1, (0, 1))}


def test_a_label_set_alone_must_not_be_empty(image_folder, tmp_path):
    labels = write_labels(tmp_path / "labels.csv", "path,labels\ngood/cat_0.jpg,cat\ngood/dog_0.jpg,\n")
    with pytest.raises(LabelFileError, match=r"labels\.csv:3: missing 'label': .*non-empty 'labels'"):
        convert(image_folder, labels, tmp_path / "out")


def test_jsonl_labels_and_integer_classes(image_folder, tmp_path):
    labels = write_labels(
        tmp_path / "labels.jsonl",
        '{"path": "good/cat_0.jpg", "label": 2, "labels": [2, 0]}\n\n{"path": "good/dog_0.jpg", "label": "0"}\n',
    )
    manifest = convert(image_folder, labels, tmp_path / "out")
    assert manifest.label_kind is LabelKind.MULTI and manifest.class_names == ["0", "1", "2"]
    samples = read_samples(tmp_path / "out", manifest)
    assert {key: (s.label, s.label_set) for key, s in samples.items()} == {
        "good_cat_0_jpg": (2, (0, 2)),
        "good_dog_0_jpg": (0, ()),
    }


def test_single_label_csv_with_a_byte_order_mark(image_folder, tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "path,label\ngood/cat_0.jpg,cat\ngood/dog_0.jpg,dog\n", encoding="utf-8-sig"
    )  # Excel's "CSV UTF-8"
    manifest = convert(image_folder, labels, tmp_path / "out")
    assert manifest.label_kind is LabelKind.SINGLE and manifest.class_names == ["cat", "dog"]


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("labels.csv", "path,class\ngood/cat_0.jpg,cat\n", r"labels\.csv:1: .*neither a 'label' nor a 'labels' column"),
        ("labels.csv", "path,label\ngood/cat_0.jpg,cat\ngood/dog_0.jpg,\n", r"labels\.csv:3: missing 'label'"),
        (
            "labels.csv",
            "path,label\ngood/cat_0.jpg,cat\nnope/x.jpg,dog\n",
            r"labels\.csv:3: image 'nope/x\.jpg' not found",
        ),
        (
            "labels.jsonl",
            '{"path": "good/cat_0.jpg", "label": "cat"}\n{"path": "good/dog_0.jpg"}\n',
            r"labels\.jsonl:2: missing 'label'",
        ),
        ("labels.jsonl", '{"path": "good/cat_0.jpg", "label": "cat"}\nnot json\n', r"labels\.jsonl:2: not JSON"),
        ("labels.jsonl", '["good/cat_0.jpg", "cat"]\n', r"labels\.jsonl:1: .*object"),
        ("labels.jsonl", '{"path": "good/cat_0.jpg", "label": "cat", "labels": 3}\n', r"labels\.jsonl:1: .*'labels'"),
    ],
)
def test_label_file_errors_name_the_file_and_line_and_write_nothing(image_folder, tmp_path, name, text, message):
    labels = write_labels(tmp_path / name, text)
    with pytest.raises(LabelFileError, match=message):
        convert(image_folder, labels, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_two_paths_that_make_the_same_key_name_both_lines(image_folder, tmp_path):
    (image_folder / "good_cat_0.jpg").write_bytes((image_folder / "good/cat_0.jpg").read_bytes())
    labels = write_labels(
        tmp_path / "labels.csv", "path,label\ngood/cat_0.jpg,cat\ngood/dog_0.jpg,dog\ngood_cat_0.jpg,cat\n"
    )
    with pytest.raises(LabelFileError, match=r"labels\.csv:4: .*same sample key .* as line 2"):
        convert(image_folder, labels, tmp_path / "out")


def test_another_split_joins_the_manifest_with_the_same_classes(image_folder, tmp_path):
    out = tmp_path / "out"
    convert(
        image_folder, write_labels(tmp_path / "train.csv", "path,label\ngood/cat_0.jpg,cat\ngood/dog_0.jpg,dog\n"), out
    )
    val = convert(
        image_folder, write_labels(tmp_path / "val.csv", "path,label\ngood/cat_1.jpg,dog\n"), out, split="val"
    )
    splits = load_splits(out)
    assert sorted(splits) == ["train", "val"] and splits["val"].class_names == splits["train"].class_names
    assert [s.label for s in read_samples(out, val).values()] == [1]  # "dog" keeps train's index
    validate_split(out, "train")
    unknown = write_labels(tmp_path / "test.csv", "path,label\ngood/cat_1.jpg,cat\ngood/cat_0.jpg,owl\n")
    with pytest.raises(LabelFileError, match=r"test\.csv:3: class 'owl' is not among the dataset's 2 classes"):
        convert(image_folder, unknown, out, split="test")
    assert sorted(load_splits(out)) == ["train", "val"]


def test_rewriting_a_split_after_fixing_a_class_name_drops_the_old_class(image_folder, tmp_path):
    out = tmp_path / "out"
    labels = write_labels(tmp_path / "train.csv", "path,label\ngood/cat_0.jpg,cat\ngood/dog_0.jpg,dgo\n")
    assert convert(image_folder, labels, out).class_names == ["cat", "dgo"]
    labels.write_text("path,label\ngood/cat_0.jpg,cat\ngood/dog_0.jpg,dog\n")
    assert convert(image_folder, labels, out).class_names == ["cat", "dog"]
    assert load_splits(out)["train"].class_names == ["cat", "dog"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """``tools/make_shards.py folder ARGS --workers 1``, run in this process."""
    from helpers import run_in_process

    return run_in_process("tools/make_shards.py", "folder", *args, "--workers", "1", timeout=120)


def test_cli_converts_a_folder_end_to_end(image_folder, tmp_path):
    out = tmp_path / "out"
    result = run_cli(
        "--images", str(image_folder), "--labels", str(all_rows_csv(tmp_path)), "--split", "train", "--out", str(out)
    )
    assert result.returncode == 0, result.stderr
    manifest = validate_split(out, "train")
    assert manifest.num_samples == len(GOOD) + 4 and len(manifest.skipped) == 3
    assert "3 skipped" in result.stdout


def test_cli_errors_exit_nonzero_with_the_line_on_stderr(image_folder, tmp_path):
    labels = write_labels(tmp_path / "labels.csv", "path,label\ngood/cat_0.jpg,cat\nmissing.jpg,cat\n")
    result = run_cli(
        "--images", str(image_folder), "--labels", str(labels), "--split", "train", "--out", str(tmp_path / "o")
    )
    assert result.returncode != 0
    assert "labels.csv:3" in result.stderr and "missing.jpg" in result.stderr and "Traceback" not in result.stderr
    assert not manifest_path(tmp_path / "o").exists()
