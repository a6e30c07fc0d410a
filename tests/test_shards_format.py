"""The sample format read back every way a user reads it: decoder, webdataset library, DALI, index files."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import wds2idx
import webdataset
from PIL import Image

from shards.format import NO_LABEL, FormatError, LabelKind, Sample, decode_sample, encode_sample, fields_for
from shards.manifest import ShardError, load_split, validate_split
from shards.tar_io import Member, TarShardFile, format_index, read_index, split_name
from shards.writer import SplitSpec, WriterSettings, write_split

CLASSES = ["cat", "dog", "owl", "yak"]


@pytest.fixture(scope="module")
def written(tmp_path_factory, make_items):
    """A multi-label split of 30 samples in shards of at most 8: (root, items by key, manifest)."""
    root = tmp_path_factory.mktemp("shards")
    items = make_items(30, len(CLASSES))
    spec = SplitSpec("val", LabelKind.MULTI, CLASSES)
    manifest = write_split(root, spec, items, WriterSettings(max_samples_per_shard=8, progress=False))
    return root, {item.key: item for item in items}, manifest


def members_by_ext(members: list[tuple[str, bytes]]) -> dict[str, bytes]:
    return {name.split(".", 1)[1]: data for name, data in members}


@pytest.mark.parametrize(
    "kind, label, labels",
    [(LabelKind.SINGLE, 2, None), (LabelKind.MULTI, 1, (1, 3)), (LabelKind.ATTRIBUTES, NO_LABEL, (0, 4))],
)
def test_encode_then_decode_gives_the_sample_back(make_jpeg, kind, label, labels):
    jpeg = make_jpeg()
    sample = Sample("img_01", jpeg, label, labels, meta={"source": "a/b.jpg"})
    members = encode_sample(sample, kind, num_classes=5)
    assert [name for name, _ in members] == [f"img_01.{ext}" for ext in fields_for(kind)]
    by_ext = members_by_ext(members)
    assert by_ext["cls"] == str(label).encode("ascii")  # what the plain webdataset library reads
    back = decode_sample("img_01", by_ext)
    assert (back.key, back.jpeg, back.label, back.label_set) == ("img_01", jpeg, label, labels)
    assert back.meta["source"] == "a/b.jpg"
    if kind.has_targets:
        assert len(by_ext["tgt"]) == 5 and back.meta["label_set"] == list(labels)


@pytest.mark.parametrize("key", ["a.b", "a/b", "", "a b", "a\n", "ä"])
def test_encode_rejects_invalid_keys(make_jpeg, key):
    with pytest.raises(FormatError, match="invalid sample key"):
        encode_sample(Sample(key, make_jpeg(), 0), LabelKind.SINGLE, 2)


def test_encode_rejects_labels_outside_the_classes(make_jpeg):
    with pytest.raises(FormatError, match="label 2 outside"):
        encode_sample(Sample("k", make_jpeg(), 2), LabelKind.SINGLE, 2)
    with pytest.raises(FormatError, match="multi-label set"):
        encode_sample(Sample("k", make_jpeg(), 0, (0, 7)), LabelKind.MULTI, 2)


def test_decode_rejects_damaged_samples(make_jpeg):
    by_ext = members_by_ext(encode_sample(Sample("k", make_jpeg(), 1), LabelKind.SINGLE, 3))
    with pytest.raises(FormatError, match=r"\.cls says 2 but \.lbl says 1"):
        decode_sample("k", {**by_ext, "cls": b"2"})
    with pytest.raises(FormatError, match="missing members"):
        decode_sample("k", {ext: data for ext, data in by_ext.items() if ext != "lbl"})


def test_webdataset_library_reads_what_the_manifest_promises(written):
    root, items, manifest = written
    for shard in manifest.shards:
        assert len(list(webdataset.WebDataset([str(root / shard.path)], shardshuffle=False))) == shard.num_samples
    samples = list(webdataset.WebDataset([str(root / s.path) for s in manifest.shards], shardshuffle=False))
    assert sorted(s["__key__"] for s in samples) == sorted(items)
    for sample in samples:
        item, meta = items[sample["__key__"]], json.loads(sample["json"])
        assert int(sample["cls"]) == item.label
        assert meta["label_set"] == list(item.label_set)
        assert (meta["source"], meta["split"]) == (item.source, "val")
        assert Image.open(io.BytesIO(sample["jpg"])).size == (16, 16)


def read_with_dali(paths: list[str], index_paths: list[str], ext: list[str], count: int) -> dict[str, list[np.ndarray]]:
    """Every sample of the tars through DALI's CPU webdataset reader: key -> one array per ext."""
    from nvidia.dali import fn, pipeline_def, types

    dtypes = {"jpg": types.UINT8, "lbl": types.INT32, "tgt": types.UINT8, "cls": types.UINT8}

    # device_id None = CPU only, as DALI documents it; its stub wants an int
    @pipeline_def(batch_size=count, num_threads=1, device_id=None)  # type: ignore[call-overload]
    def pipe():
        return tuple(
            fn.readers.webdataset(
                paths=paths,
                index_paths=index_paths,
                ext=ext,
                dtypes=[dtypes[e] for e in ext],
                random_shuffle=False,
                missing_component_behavior="error",
            )
        )

    pipeline = pipe()
    pipeline.build()
    outputs = pipeline.run()
    keys = [outputs[0][i].source_info().rsplit(":", 1)[1].split(".", 1)[0] for i in range(count)]
    return {key: [np.array(out[i]) for out in outputs] for i, key in enumerate(keys)}


@pytest.mark.dali
def test_dali_reader_gives_the_same_keys_and_labels(written):
    pytest.importorskip("nvidia.dali")
    root, items, manifest = written
    paths = [str(root / s.path) for s in manifest.shards]
    index_paths = [str(root / s.index_path) for s in manifest.shards]
    read = read_with_dali(paths, index_paths, ["jpg", "lbl", "tgt"], manifest.num_samples)
    assert sorted(read) == sorted(items)
    for key, (jpg, lbl, tgt) in read.items():
        assert lbl.tolist() == [items[key].label]
        assert np.flatnonzero(tgt).tolist() == list(items[key].label_set)
        assert Image.open(io.BytesIO(jpg.tobytes())).size == (16, 16)


def test_index_files_equal_dalis_own_wds2idx(written, tmp_path):
    root, _, manifest = written
    for shard in manifest.shards:
        theirs = tmp_path / "theirs.idx"
        with wds2idx.IndexCreator(str(root / shard.path), str(theirs), verbose=False) as creator:
            creator.create_index()
        assert (root / shard.index_path).read_bytes() == theirs.read_bytes()


def index_tar(path: Path) -> list[list[Member]]:
    """The index by scanning the tar with the standard library (members grouped by key, in file order)."""
    samples: list[list[Member]] = []
    last_key = None
    with tarfile.open(path, "r") as tar:
        for info in tar:
            if not info.isreg():
                continue
            key, ext = split_name(info.name)
            if key != last_key:
                samples.append([])
                last_key = key
            samples[-1].append(Member(ext, info.offset_data, info.size, info.name))
    return samples


def test_index_offsets_point_at_member_data(written):
    root, _, manifest = written
    for shard in manifest.shards:
        index = read_index(root / shard.index_path)
        assert index == index_tar(root / shard.path)
        assert len(index) == shard.num_samples
        raw = (root / shard.path).read_bytes()
        with tarfile.open(root / shard.path) as tar:
            for member in (m for sample in index for m in sample):
                assert raw[member.offset : member.offset + member.size] == tar.extractfile(member.name).read()


def long_key_tar(path: Path) -> str:
    """A tar whose first key is too long for a plain tar header (GNU long-name member)."""
    key = "k" * 120
    tar = TarShardFile(path)
    tar.add_sample([(f"{key}.jpg", b"x" * 700), (f"{key}.cls", b"1")])
    tar.add_sample([("short.jpg", b"y" * 10), ("short.cls", b"2")])
    tar.close()
    path.with_suffix(".idx").write_text(format_index(tar.samples))
    return key


def test_index_of_long_member_names_points_past_the_long_name_block(tmp_path):
    key = long_key_tar(tmp_path / "long.tar")
    index = read_index(tmp_path / "long.idx")
    assert index == index_tar(tmp_path / "long.tar")
    raw = (tmp_path / "long.tar").read_bytes()
    first = index[0][0]
    assert (first.name, raw[first.offset : first.offset + first.size]) == (f"{key}.jpg", b"x" * 700)


@pytest.mark.dali
def test_dali_reads_long_member_names_through_our_index(tmp_path):
    pytest.importorskip("nvidia.dali")
    key = long_key_tar(tmp_path / "long.tar")
    read = read_with_dali([str(tmp_path / "long.tar")], [str(tmp_path / "long.idx")], ["jpg", "cls"], 2)
    assert read[key][0].tobytes() == b"x" * 700 and read[key][1].tobytes() == b"1"
    assert read["short"][1].tobytes() == b"2"


def test_manifest_counts_equal_the_tar_contents(written):
    root, items, manifest = written
    assert manifest.num_samples == len(items) == sum(s.num_samples for s in manifest.shards)
    assert [s.num_samples for s in manifest.shards] == [8, 8, 8, 6]
    keys = []
    for shard in manifest.shards:
        with tarfile.open(root / shard.path) as tar:
            names = tar.getnames()
        shard_keys = sorted({name.split(".", 1)[0] for name in names})
        assert len(shard_keys) == shard.num_samples and len(names) == 5 * shard.num_samples
        assert (root / shard.path).stat().st_size == shard.num_bytes
        keys += shard_keys
    assert sorted(keys) == sorted(items)


@pytest.fixture
def shard_copy(written, tmp_path):
    """A copy of the written folder that a test may damage: (root, path of the second shard)."""
    root = tmp_path / "copy"
    shutil.copytree(written[0], root)
    return root, root / load_split(root, "val").shards[1].path


def test_validate_accepts_an_intact_folder(shard_copy):
    root, _ = shard_copy
    assert validate_split(root, "val").num_samples == 30


def test_validate_names_a_truncated_shard(shard_copy):
    root, shard = shard_copy
    shard.write_bytes(shard.read_bytes()[:-700])
    with pytest.raises(ShardError, match=rf"{shard.name}.*truncated"):
        validate_split(root, "val")


def test_validate_names_a_shard_with_a_flipped_byte(shard_copy):
    root, shard = shard_copy
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=rf"{shard.name}.*sha256"):
        validate_split(root, "val")


def test_validate_names_a_missing_shard_or_index(shard_copy):
    root, shard = shard_copy
    shard.with_suffix(".idx").unlink()
    with pytest.raises(ShardError, match=rf"missing index file .*{shard.stem}\.idx"):
        validate_split(root, "val")
    shard.unlink()
    with pytest.raises(ShardError, match=rf"missing shard .*{shard.name}"):
        validate_split(root, "val")


def test_loading_names_a_missing_split_or_manifest(shard_copy, tmp_path):
    root, _ = shard_copy
    with pytest.raises(ShardError, match=r"no split 'train'; it has \['val'\]"):
        load_split(root, "train")
    with pytest.raises(ShardError, match="no manifest at"):
        load_split(tmp_path / "elsewhere", "val")
