"""``make_shards verify``: intact folders pass; flipped bytes, truncation, bad index files and bad images are caught."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dataset_layouts import make_imagenet_train
from typer.testing import CliRunner

from shards.cli import app
from shards.manifest import load_split, manifest_path, sha256_file
from shards.sources.common import write_planned
from shards.sources.imagenet import ImageNetOptions, imagenet_plan
from shards.tar_io import read_index
from shards.verify import verify_root
from shards.writer import WriterSettings


@pytest.fixture
def shard_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagenet")
    make_imagenet_train(root, with_broken=False)
    out = root / "shards"
    plan = imagenet_plan(ImageNetOptions(root=root, splits=("train",)))
    write_planned(out, plan, WriterSettings(max_samples_per_shard=16, workers=1, progress=False))
    return out


def run_verify(folder: Path, *options: str):
    return CliRunner().invoke(app, ["verify", str(folder), "--workers", "1", *options])


def shard(folder: Path, number: int) -> Path:
    return folder / load_split(folder, "train").shards[number].path


def test_intact_folder_passes(shard_folder):
    result = run_verify(shard_folder)
    assert result.exit_code == 0, result.output
    total = load_split(shard_folder, "train").num_samples
    assert f"OK: {total} samples" in result.output and f"{total} images decoded" in result.output


def test_flipped_bytes_are_caught_and_named(shard_folder):
    tar = shard(shard_folder, 1)
    data = bytearray(tar.read_bytes())
    for offset in range(3000, 3016):
        data[offset] ^= 0xFF
    tar.write_bytes(bytes(data))
    result = run_verify(shard_folder)
    assert result.exit_code == 1
    assert f"{tar}: " in result.output and "sha256" in result.output and "PROBLEMS" in result.output


def test_truncated_shard_is_caught(shard_folder):
    tar = shard(shard_folder, 0)
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    result = run_verify(shard_folder)
    assert result.exit_code == 1
    assert "truncated or replaced" in result.output and "manifest says 16" in result.output


def test_index_file_that_disagrees_is_caught(shard_folder):
    record = load_split(shard_folder, "train").shards[0]
    index = shard_folder / record.index_path
    lines = index.read_text().splitlines()
    index.write_text("\n".join([f"v1.2 {len(lines) - 2}"] + lines[1:-1]) + "\n")
    report = verify_root(shard_folder, progress=False)
    assert not report.ok and any(p.path == str(index) and "lists 15 samples" in p.message for p in report.problems)


def test_undecodable_image_is_caught_even_with_a_matching_checksum(shard_folder):
    record = load_split(shard_folder, "train").shards[0]
    tar = shard_folder / record.path
    jpg = read_index(shard_folder / record.index_path)[3][0]
    data = bytearray(tar.read_bytes())
    data[jpg.offset : jpg.offset + 3] = b"XXX"  # destroy the JPEG start marker
    tar.write_bytes(bytes(data))
    manifest = json.loads(manifest_path(shard_folder).read_text())  # pretend the damage predates hashing
    manifest["splits"]["train"]["shards"][0]["sha256"] = sha256_file(tar)
    manifest_path(shard_folder).write_text(json.dumps(manifest))
    report = verify_root(shard_folder, progress=False)
    assert len(report.problems) == 1 and "undecodable" in report.problems[0].message
    assert "(source train/" in report.problems[0].path


def test_sample_fraction_and_workers(shard_folder):
    total = load_split(shard_folder, "train").num_samples
    half = verify_root(shard_folder, sample_fraction=0.5, progress=False)
    none = verify_root(shard_folder, sample_fraction=0.0, workers=2, progress=False)
    assert half.ok and 0 < half.num_decoded < total and half.num_samples == total
    assert none.ok and none.num_decoded == 0 and none.num_shards == len(load_split(shard_folder, "train").shards)


def test_stray_tar_and_missing_manifest(shard_folder, tmp_path):
    own = shard_folder / "train" / "train-foo.tar"  # a user's own file: the converter leaves it alone, so does verify
    own.write_bytes(b"")
    assert "not listed in the manifest" not in run_verify(shard_folder).output
    own.unlink()
    stray = shard_folder / "train" / "train-999999.tar"
    stray.write_bytes(b"")
    assert "train-999999.tar: shard file not listed in the manifest" in run_verify(shard_folder).output
    stray.unlink()
    result = run_verify(tmp_path)
    assert result.exit_code != 0 and "no manifest" in str(result.exception)
