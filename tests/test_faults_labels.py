"""Label files are parsed strictly (issue 19, item 4): every malformed row, column or value is one
line naming file:line through ``make-shards folder``, never a silently wrong class or a traceback."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from dataset_layouts import jpeg_bytes, make_celeba, make_imagenet_val, make_webvision, read_split, write
from shards_cli import run_main

from shards.manifest import load_split, manifest_path

IMAGES = [f"img{i}.jpg" for i in range(4)]


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    for i, name in enumerate(IMAGES):
        write(folder / name, jpeg_bytes(i))
    return folder


def convert(monkeypatch, capsys, images: Path, labels: Path, out: Path) -> tuple[int, str]:
    args = ["folder", "--images", str(images), "--labels", str(labels), "--out", str(out), "--split", "train"]
    return run_main(monkeypatch, capsys, *args, "--workers", "1")


BIG_FIELD = "x" * 200_000  # over the csv module's 131,072-character field limit


@pytest.mark.parametrize(
    "name, text, message",
    [
        # a quote after a closing quote: the csv module alone would read the label as 'catx'
        ("l.csv", 'path,label\nimg0.jpg,"cat"x\nimg1.jpg,dog\n', r"l\.csv:2: malformed CSV"),
        # an unbalanced quote swallowing the next row into a label
        ("l.csv", 'path,label\nimg0.jpg,"cat\nimg1.jpg,dog"\n', r"l\.csv:3: a field spans several lines"),
        ("l.csv", "path,label\nimg0.jpg,cat,dog\nimg1.jpg,dog\n", r"l\.csv:2: 3 fields, the header has 2"),
        ("l.csv", "path,label,labels\nimg0.jpg,cat,cat;dog\nimg1.jpg,dog\n", r"l\.csv:3: 2 fields, the header has 3"),
        ("l.csv", "path,label,label\nimg0.jpg,cat,dog\n", r"l\.csv:1: column 'label' appears 2 times"),
        ("l.csv", "path,label,lables\nimg0.jpg,cat,cat dog\n", r"l\.csv:1: unknown column 'lables'"),
        ("l.csv", "path,label,labels\nimg0.jpg,cat,dog;owl\n", r"l\.csv:2: label 'cat' is not in its own labels set"),
        ("l.csv", f"path,label\nimg0.jpg,{BIG_FIELD}\n", r"l\.csv:2: malformed CSV \(field larger than field limit"),
        ("l.jsonl", '{"path": "img0.jpg", "label": 1.5}\n', r"l\.jsonl:1: 'label' must be a class name"),
        ("l.jsonl", '{"path": "img0.jpg", "label": true}\n', r"l\.jsonl:1: 'label' must be a class name"),
        ("l.jsonl", '{"path": "img0.jpg", "label": ["cat"]}\n', r"l\.jsonl:1: 'label' must be a class name"),
        ("l.jsonl", '{"path": "img0.jpg", "label": {"c": 1}}\n', r"l\.jsonl:1: 'label' must be a class name"),
        ("l.jsonl", '{"path": "img0.jpg", "label": "a", "labels": ["a", null]}\n', r"l\.jsonl:1: missing 'labels'"),
        ("l.jsonl", '{"path": "img0.jpg", "label": 1, "labels": [1, 2.0]}\n', r"l\.jsonl:1: 'labels' must be a"),
        ("l.jsonl", '{"path": ["img0.jpg"], "label": "cat"}\n', r"l\.jsonl:1: 'path' must be a string"),
        ("l.jsonl", '{"path": "img0.jpg", "label": "cat", "label": "dog"}\n', r"l\.jsonl:1: key 'label' appears"),
        ("l.jsonl", '{"path": "img0.jpg", "label": "cat", "lables": ["dog"]}\n', r"l\.jsonl:1: unknown key 'lables'"),
        ("l.jsonl", '{"path": "img0.jpg", "label": 2, "labels": [0, 1]}\n', r"l\.jsonl:1: label '2' is not in its own"),
    ],
)
def test_malformed_label_files_are_one_line_naming_file_and_line(
    monkeypatch, capsys, images, tmp_path, name, text, message
):
    labels = tmp_path / name
    labels.write_text(text)
    status, output = convert(monkeypatch, capsys, images, labels, tmp_path / "out")
    assert status == 2, output
    assert "Traceback" not in output
    assert len(output.strip().splitlines()) == 1, output
    assert re.search(message, output), output
    assert not manifest_path(tmp_path / "out").exists()


def test_zero_padded_integer_labels_are_their_value(monkeypatch, capsys, images, tmp_path):
    labels = tmp_path / "l.csv"
    labels.write_text("path,label,labels\nimg0.jpg,007,7;02\nimg1.jpg,7,\nimg2.jpg,2,002\nimg3.jpg,0,\n")
    status, output = convert(monkeypatch, capsys, images, labels, tmp_path / "out")
    assert status == 0, output
    assert load_split(tmp_path / "out", "train").class_names == [str(i) for i in range(8)]
    got = {key: (s.label, s.label_set) for key, s in read_split(tmp_path / "out", "train").items()}
    assert got == {"img0.jpg": (7, (2, 7)), "img1.jpg": (7, ()), "img2.jpg": (2, (2,)), "img3.jpg": (0, ())}


def test_a_quoted_comma_and_spaces_around_fields_are_read_as_meant(monkeypatch, capsys, images, tmp_path):
    write(images / "a, b.jpg", jpeg_bytes(9))
    labels = tmp_path / "l.csv"
    labels.write_text('path , label\n"a, b.jpg",cat\nimg1.jpg, dog \n')
    status, output = convert(monkeypatch, capsys, images, labels, tmp_path / "out")
    assert status == 0, output
    assert load_split(tmp_path / "out", "train").class_names == ["cat", "dog"]


# --- the other converters' label files -------------------------------------------------------------


def _kaggle_duplicate(root: Path) -> list[str]:
    make_imagenet_val(root, "kaggle")
    csv = root / "LOC_val_solution.csv"
    csv.write_text(csv.read_text() + "ILSVRC2012_val_00000002,n02105855 1 2 3 4\n")  # image 2 again, other class
    return ["imagenet", "--root", str(root), "--splits", "val", "--no-real"]


def _real_float(root: Path) -> list[str]:
    make_imagenet_val(root, "folders")
    real = root / "real.json"
    real.write_text(json.dumps([[1], [2.5], []]))
    return ["imagenet", "--root", str(root), "--splits", "val", "--real-labels", str(real)]


def _webvision_list(line: str):
    def build(root: Path) -> list[str]:
        make_webvision(root, [0, 1], [0, 1])
        listing = root / "info" / "train_filelist_google.txt"
        listing.write_text(listing.read_text() + line + "\n")
        return ["webvision", "--root", str(root), "--splits", "train"]

    return build


def _celeba_edit(edit):
    def build(root: Path) -> list[str]:
        make_celeba(root, [0, 0, 1, 2], with_broken=False)
        path = root / "list_attr_celeba.txt"
        path.write_text(edit(path.read_text()))
        return ["celeba", "--root", str(root)]

    return build


def _repeat_attribute(text: str) -> str:
    lines = text.splitlines()
    lines[1] = lines[1].replace("Bald", "Bangs", 1)
    return "\n".join(lines) + "\n"


def _repeat_image(text: str) -> str:
    lines = text.splitlines()
    return "\n".join([str(int(lines[0]) + 1), *lines[1:], lines[2]]) + "\n"


@pytest.mark.parametrize(
    "build, message",
    [
        (_kaggle_duplicate, r"LOC_val_solution\.csv:7: ImageId 'ILSVRC2012_val_00000002' is listed again"),
        (_real_float, r"real\.json: entry 1 \(ILSVRC2012_val_00000002\) holds 2\.5, not a class index"),
        (_webvision_list("google/q0000/000000.jpg 1"), r"train_filelist_google\.txt:3: 'google/q0000/000000\.jpg' is"),
        (_webvision_list("google/q0000/x.jpg ²"), r"train_filelist_google\.txt:3: expected 'path label'"),
        (_celeba_edit(_repeat_attribute), r"list_attr_celeba\.txt:2: attribute 'Bangs' is named 2 times"),
        (_celeba_edit(_repeat_image), r"list_attr_celeba\.txt:7: '000001\.jpg' is listed again"),
    ],
)
def test_other_converters_label_files_are_strict_too(monkeypatch, capsys, tmp_path, build, message):
    args = build(tmp_path / "in")
    status, output = run_main(monkeypatch, capsys, *args, "--out", str(tmp_path / "out"), "--workers", "1")
    assert status == 2 and "Traceback" not in output and re.search(message, output), output
    assert not manifest_path(tmp_path / "out").exists()


def test_a_trailing_comma_in_the_header_is_named(monkeypatch, capsys, images, tmp_path):
    labels = tmp_path / "l.csv"
    labels.write_text("path,label,,\nimg0.jpg,cat,,\n")  # a spreadsheet's empty columns
    status, output = convert(monkeypatch, capsys, images, labels, tmp_path / "out")
    assert status == 2 and "l.csv:1: an unnamed column (a trailing comma?)" in output, output
