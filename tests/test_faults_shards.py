"""Faults and hostile inputs: concurrent conversions, paths leaving the dataset, killed runs,
non-UTF-8 names and label files, unwritable or full output folders, reproducible skip reasons,
users' own files, and damaged shards met by the loaders."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from dataset_layouts import (
    IMAGENET_CLASSES,
    jpeg_bytes,
    make_imagenet_train,
    make_imagenet_val,
    make_webvision,
    member_bytes,
    write,
)
from helpers import run_in_process
from shards_cli import run_main

from pipelines import ShardDataError, build_loader, dali_import_error
from pipelines.contract import LoaderConfig
from pipelines.torch_backend import TorchLoader
from shards.atomic_files import atomic_write_text
from shards.format import LabelKind
from shards.manifest import ShardError, load_split, load_splits, manifest_path, validate_split
from shards.tar_io import read_index
from shards.writer import SourceItem, SplitSpec, WriterSettings, write_split

REPO = Path(__file__).resolve().parents[1]
needs_dali = pytest.mark.skipif(dali_import_error() is not None, reason="DALI not importable")
BACKENDS = ["torch", pytest.param("dali", marks=[pytest.mark.dali, needs_dali])]
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m shards.cli ARGS`` in a fresh process importing this checkout."""
    return subprocess.run(
        [sys.executable, "-m", "shards.cli", *args],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def cli_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def folder_dataset(root: Path, count: int = 6) -> tuple[Path, Path]:
    """``root/images`` with ``count`` JPEGs and ``root/labels.csv`` listing them."""
    images = root / "images"
    rows = []
    for i in range(count):
        write(images / f"img{i}.jpg", jpeg_bytes(i))
        rows.append(f"img{i}.jpg,{'cat' if i % 2 else 'dog'}")
    labels = root / "labels.csv"
    labels.write_text("path,label\n" + "\n".join(rows) + "\n")
    return images, labels


def folder_args(images: Path, labels: Path, out: Path, *extra: str) -> list[str]:
    paths = ["--images", str(images), "--labels", str(labels), "--out", str(out)]
    return ["folder", *paths, "--split", "train", "--workers", "1", *extra]


# --- 1. one conversion per output folder ---------------------------------------------------------


def feed_fifo(fifo: Path, data: bytes, process: subprocess.Popen, timeout_s: float = 60) -> None:
    """Write ``data`` into ``fifo`` once ``process`` opens it for reading (fails if it exits first)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError as error:
            if error.errno != errno.ENXIO or process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the conversion never read {fifo} (exit status {process.poll()})") from None
            time.sleep(0.05)
    os.set_blocking(fd, True)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def webvision_with_fifo(root: Path, per_source: int = 4) -> Path:
    """A WebVision layout whose Google list also names a FIFO: a conversion reading it blocks there,
    holding its output folder, until the test writes the image into the FIFO."""
    make_webvision(root, [i % 4 for i in range(per_source)], [0, 1])
    fifo = root / "google" / "q0000" / "fifo.jpg"
    os.mkfifo(fifo)
    listing = root / "info" / "train_filelist_google.txt"
    listing.write_text(listing.read_text() + "google/q0000/fifo.jpg 0\n")
    return fifo


def start_webvision(root: Path, out: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "shards.cli", "webvision", "--root", str(root), "--out", str(out), *extra]
    return subprocess.Popen(command, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.slow
def test_a_second_conversion_into_a_busy_out_stops_naming_the_first_ones_pid(tmp_path):
    root, out = tmp_path / "webvision", tmp_path / "out"
    fifo = webvision_with_fifo(root)
    first = start_webvision(root, out, "--splits", "train", "--workers", "1")
    try:
        wait_for(lambda: (out / "train").is_dir(), 60, "the first conversion to start writing")
        second = run_cli("webvision", "--root", str(root), "--out", str(out), "--splits", "val", "--workers", "1")
        feed_fifo(fifo, jpeg_bytes(99), first)
        stdout, stderr = first.communicate(timeout=120)
    finally:
        first.kill()
    assert second.returncode == 2, second.stdout + second.stderr
    assert str(out) in second.stderr and f"pid {first.pid}" in second.stderr and "Traceback" not in second.stderr
    assert first.returncode == 0, stderr
    assert sorted(load_splits(out)) == ["train"]
    verify = run_cli("verify", str(out), "--workers", "1")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert not (out / ".make-shards.lock").exists()


SAVE_SPLITS = """
import sys
from pathlib import Path
from shards.format import LabelKind
from shards.manifest import SplitManifest, save_split
root, prefix = Path(sys.argv[1]), sys.argv[2]
for i in range(int(sys.argv[3])):
    save_split(root, SplitManifest(f"{prefix}{i}", 0, 1, ["c"], LabelKind.SINGLE, []))
"""


def test_simultaneous_manifest_updates_keep_every_split(tmp_path):
    count = 25
    command = [sys.executable, "-c", SAVE_SPLITS, str(tmp_path)]
    writers = [
        subprocess.Popen([*command, prefix, str(count)], cwd=REPO, env=cli_env(), stderr=subprocess.PIPE)
        for prefix in "ab"
    ]
    errors = [w.communicate(timeout=120)[1].decode() for w in writers]
    assert [w.returncode for w in writers] == [0, 0], errors
    expected = sorted(f"{p}{i}" for p in "ab" for i in range(count))
    assert sorted(json.loads(manifest_path(tmp_path).read_text())["splits"]) == expected


def test_atomic_writes_to_one_file_from_several_threads_never_collide(tmp_path):
    target, failures = tmp_path / "file.json", []

    def write_many(number: int) -> None:
        for i in range(40):
            try:
                atomic_write_text(target, json.dumps({"writer": number, "i": i}))
            except OSError as error:
                failures.append(error)

    threads = [threading.Thread(target=write_many, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures[:3]
    assert json.loads(target.read_text())["i"] == 39
    assert [p.name for p in tmp_path.iterdir()] == ["file.json"]  # no temporary file left


# --- 2. paths that leave the dataset ------------------------------------------------------------


@pytest.mark.parametrize("listed", ["../secret.jpg", "ABSOLUTE", "link.jpg", "sub/../../secret.jpg"])
def test_folder_label_paths_leaving_the_image_folder_are_refused(tmp_path, monkeypatch, capsys, listed):
    images, _ = folder_dataset(tmp_path)
    secret = write(tmp_path / "secret.jpg", jpeg_bytes(42))
    (images / "link.jpg").symlink_to(secret)
    (images / "sub").mkdir()
    listed = str(secret) if listed == "ABSOLUTE" else listed
    labels = tmp_path / "hostile.csv"
    labels.write_text(f"path,label\nimg0.jpg,dog\n{listed},cat\n")
    status, err = run_main(monkeypatch, capsys, *folder_args(images, labels, tmp_path / "out"))
    assert status == 2 and f"{labels}:3" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_follow_symlinks_reads_a_symlink_that_leaves_the_folder(tmp_path, monkeypatch, capsys):
    images, _ = folder_dataset(tmp_path)
    secret = write(tmp_path / "elsewhere" / "photo.jpg", jpeg_bytes(42))
    (images / "link.jpg").symlink_to(secret)
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\nimg0.jpg,dog\nlink.jpg,cat\n")
    status, err = run_main(monkeypatch, capsys, *folder_args(images, labels, tmp_path / "out", "--follow-symlinks"))
    assert status == 0, err
    with tarfile.open(tmp_path / "out" / load_split(tmp_path / "out", "train").shards[0].path) as tar:
        stored = [tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")]
    assert secret.read_bytes() in stored


def test_webvision_list_paths_leaving_the_root_are_refused(tmp_path, monkeypatch, capsys):
    root = tmp_path / "webvision"
    make_webvision(root, [0, 1], [0])
    write(tmp_path / "outside.jpg", jpeg_bytes(5))
    listing = root / "info" / "train_filelist_google.txt"
    listing.write_text(listing.read_text() + "../outside.jpg 1\n")
    args = ["webvision", "--root", str(root), "--out", str(tmp_path / "out"), "--workers", "1"]
    status, err = run_main(monkeypatch, capsys, *args)
    assert status == 2 and f"{listing}:3" in err and "../outside.jpg" in err, err


def test_imagenet_symlinked_file_outside_the_root_needs_follow_symlinks(tmp_path, monkeypatch, capsys):
    root = tmp_path / "imagenet"
    make_imagenet_train(root, classes=IMAGENET_CLASSES[:1], with_broken=False)
    outside = write(tmp_path / "private" / "photo.JPEG", jpeg_bytes(7))
    link = root / "train" / IMAGENET_CLASSES[0] / "linked.JPEG"
    link.symlink_to(outside)
    args = ["imagenet", "--root", str(root), "--out", str(tmp_path / "out"), "--workers", "1"]
    status, err = run_main(monkeypatch, capsys, *args)
    assert status == 2 and str(link) in err and "--follow-symlinks" in err, err
    status, err = run_main(monkeypatch, capsys, *args, "--follow-symlinks")
    assert status == 0, err
    assert f"train/{IMAGENET_CLASSES[0]}/linked.JPEG" in {s for s in read_sources(tmp_path / "out", "train")}


def read_sources(out: Path, split: str) -> list[str]:
    sources = []
    for shard in load_split(out, split).shards:
        with tarfile.open(out / shard.path) as tar:
            sources += [json.loads(member_bytes(tar, m))["source"] for m in tar if m.name.endswith(".json")]
    return sources


@pytest.fixture
def small_shards(tmp_path) -> Path:
    """A 24-sample single-label split ``s`` in 3 shards (8 each), 40×40 images."""
    out = tmp_path / "shards"
    rng = np.random.default_rng(0)
    items = [
        SourceItem(
            key=f"k{i:03d}", label=i % 3, source=f"mem/{i}", pixels=rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
        )
        for i in range(24)
    ]
    settings = WriterSettings(max_samples_per_shard=8, progress=False)
    write_split(out, SplitSpec("s", LabelKind.SINGLE, ["a", "b", "c"]), items, settings)
    return out


def edit_manifest(root: Path, edit) -> None:
    data = json.loads(manifest_path(root).read_text())
    edit(data["splits"]["s"])
    manifest_path(root).write_text(json.dumps(data))


@pytest.mark.parametrize("field", ["path", "index_path"])
@pytest.mark.parametrize("bad", ["/etc/passwd", "../outside.tar", "s/../../outside.tar"])
def test_manifest_paths_leaving_the_folder_are_refused_by_loading_and_verify(small_shards, field, bad):
    edit_manifest(small_shards, lambda split: split["shards"][0].update({field: bad}))
    with pytest.raises(ShardError, match="leaves the dataset folder"):
        validate_split(small_shards, "s")
    result = run_in_process("shards.cli", "verify", str(small_shards), "--workers", "1")
    assert result.returncode != 0 and "OK" not in result.stdout
    assert repr(bad) in result.stderr and "Traceback" not in result.stderr


def test_a_manifest_split_name_that_is_a_path_is_refused(small_shards):
    edit_manifest(small_shards, lambda split: split.update({"name": "../s"}))
    with pytest.raises(ShardError, match="not a plain folder name"):
        load_splits(small_shards)


# --- 3. workers die with their parent -----------------------------------------------------------


def process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state letter) of every process, from /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                text = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = text[text.rindex(")") + 2 :].split()  # the command name may hold spaces
            table[int(entry)] = (int(fields[1]), fields[0])
    return table


def descendants(pid: int) -> set[int]:
    table = process_table()
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, (parent, _) in table.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pids: set[int]) -> set[int]:
    table = process_table()
    return {pid for pid in pids if pid in table and table[pid][1] != "Z"}  # a zombie is dead, not yet reaped


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_killing_a_conversion_leaves_no_worker_or_resource_tracker(tmp_path, how):
    root = tmp_path / "webvision"
    webvision_with_fifo(root, per_source=20)  # 41 inputs: 3 chunks, 2 workers; one blocks reading the FIFO
    parent = start_webvision(root, tmp_path / "out", "--splits", "train", "--workers", "2")
    try:
        # two workers and multiprocessing's resource tracker
        wait_for(lambda: len(descendants(parent.pid)) >= 3, 60, "the worker processes to start")
        time.sleep(1.0)  # let them import and take work
        children = descendants(parent.pid)
        parent.send_signal(how)
        parent.wait(timeout=30)
        deadline = time.monotonic() + 10
        while alive(children) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = alive(children)
    finally:
        parent.kill()
        for pid in alive(descendants(parent.pid)):
            os.kill(pid, signal.SIGKILL)
    for pid in left:
        os.kill(pid, signal.SIGKILL)  # do not leak them into the rest of the test run
    assert not left, f"still running after the parent's {how.name}: {sorted(left)}"
    if how == signal.SIGTERM:
        assert parent.returncode == 128 + signal.SIGTERM and "terminated" in parent.stderr.read()


# --- 4. file names and label files that are not UTF-8 ---------------------------------------------


def test_imagenet_non_utf8_file_names_are_skipped_and_listed(tmp_path, monkeypatch, capsys):
    root = tmp_path / "imagenet"
    make_imagenet_train(root, classes=IMAGENET_CLASSES[:2], with_broken=False)
    make_imagenet_val(root, "folders", truth={1: IMAGENET_CLASSES[0], 2: IMAGENET_CLASSES[1]})
    for folder in (root / "train" / IMAGENET_CLASSES[0], root / "val" / IMAGENET_CLASSES[1]):
        Path(os.fsdecode(os.fsencode(folder) + b"/bad\xff\xfe name.JPEG")).write_bytes(jpeg_bytes(3))
    args = ["imagenet", "--root", str(root), "--out", str(tmp_path / "out"), "--workers", "1", "--no-real"]
    status, err = run_main(monkeypatch, capsys, *args)
    assert status == 0, err
    for split, wnid in (("train", IMAGENET_CLASSES[0]), ("val", IMAGENET_CLASSES[1])):
        manifest = load_split(tmp_path / "out", split)
        skipped = {r.source: r.reason for r in manifest.skipped}
        assert list(skipped) == [f"{split}/{wnid}/bad\\xff\\xfe name.JPEG"]
        assert "not valid UTF-8" in skipped[f"{split}/{wnid}/bad\\xff\\xfe name.JPEG"]
        assert manifest.num_samples == len(read_sources(tmp_path / "out", split)) > 0


@pytest.mark.parametrize("kind", ["csv", "jsonl", "webvision"])
def test_a_label_file_that_is_not_utf8_is_an_error_naming_file_and_line(tmp_path, kind):
    if kind == "webvision":
        root = tmp_path / "webvision"
        make_webvision(root, [0, 1, 2], [0])
        listing = root / "info" / "train_filelist_google.txt"
        listing.write_bytes(listing.read_bytes() + b"google/q0000/caf\xe9.jpg 0\n")
        result = run_in_process(
            "shards.cli", "webvision", "--root", str(root), "--out", str(tmp_path / "out"), "--workers", "1"
        )
    else:
        images, _ = folder_dataset(tmp_path)
        good = "img0.jpg,dog\n" if kind == "csv" else '{"path": "img0.jpg", "label": "dog"}\n'
        bad = b"caf\xe9.jpg,cat\n" if kind == "csv" else b'{"path": "caf\xe9.jpg", "label": "cat"}\n'
        listing = tmp_path / f"labels.{kind}"
        listing.write_bytes(("path,label\n" if kind == "csv" else "").encode() + good.encode() + bad)
        result = run_in_process("shards.cli", *folder_args(images, listing, tmp_path / "out"))
    line = 4 if kind == "webvision" else (3 if kind == "csv" else 2)
    assert result.returncode == 2 and f"{listing}:{line}: not UTF-8" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


# --- 5. an output folder that cannot be written ---------------------------------------------------


def test_out_that_is_a_file_is_a_clear_error(tmp_path):
    images, labels = folder_dataset(tmp_path)
    (tmp_path / "taken").write_text("not a folder")
    result = run_in_process("shards.cli", *folder_args(images, labels, tmp_path / "taken"))
    assert result.returncode == 2 and f"{tmp_path / 'taken'} exists and is not a folder" in result.stderr
    assert "Traceback" not in result.stderr and (tmp_path / "taken").read_text() == "not a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; the next test simulates it")
def test_read_only_out_is_a_clear_error(tmp_path):
    images, labels = folder_dataset(tmp_path)
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    try:
        result = run_in_process("shards.cli", *folder_args(images, labels, tmp_path / "ro" / "out"))
    finally:
        (tmp_path / "ro").chmod(0o755)
    assert result.returncode == 2 and str(tmp_path / "ro" / "out") in result.stderr
    assert (
        "Permission denied" in result.stderr and "writable --out" in result.stderr and "Traceback" not in result.stderr
    )


def test_unwritable_out_is_a_clear_error(tmp_path, monkeypatch, capsys):
    images, labels = folder_dataset(tmp_path)
    out = tmp_path / "ro" / "out"
    real_mkdir = Path.mkdir

    def refuse(self, *args, **kwargs):  # what mkdir does under a read-only parent
        if self == out:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse)
    status, err = run_main(monkeypatch, capsys, *folder_args(images, labels, out))
    assert status == 2 and f"cannot access {out}: Permission denied" in err and "writable --out" in err


def test_full_disk_while_writing_a_shard_is_a_clear_error_and_leaves_no_partial_file(tmp_path, monkeypatch, capsys):
    images, labels = folder_dataset(tmp_path, count=12)
    real_addfile, calls = tarfile.TarFile.addfile, []

    def fill_up(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 12:  # a few samples in, the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_addfile(self, *args, **kwargs)

    monkeypatch.setattr(tarfile.TarFile, "addfile", fill_up)
    out = tmp_path / "out"
    status, err = run_main(monkeypatch, capsys, *folder_args(images, labels, out, "--shard-samples", "2"))
    assert status == 2 and "No space left on device" in err and "free space" in err and "Traceback" not in err, err
    assert f"{out / 'train'}{os.sep}.train-000001.tar." in err  # names the file, hence the disk
    assert not [p for p in (out / "train").iterdir() if "partial" in p.name]
    monkeypatch.setattr(tarfile.TarFile, "addfile", real_addfile)
    status, output = run_main(monkeypatch, capsys, *folder_args(images, labels, out, "--shard-samples", "2"))
    assert status == 0 and "resuming split train: 1 shards kept" in output, output


def test_full_disk_while_writing_the_manifest_names_it(tmp_path, monkeypatch, capsys):
    images, labels = folder_dataset(tmp_path)
    real_fsync = os.fsync

    def fsync(fd):
        if "manifest.json" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    out = tmp_path / "out"
    status, err = run_main(monkeypatch, capsys, *folder_args(images, labels, out))
    assert status == 2 and f"cannot access {manifest_path(out)}: No space left on device" in err, err
    assert not list(out.glob(".manifest.json*")) and not manifest_path(out).exists()


# --- 6. reproducible manifests ------------------------------------------------------------------


def test_skip_reasons_hold_no_addresses_and_manifests_are_reproducible(tmp_path):
    images, _ = folder_dataset(tmp_path)
    (images / "text.jpg").write_text("this is not an image")
    (images / "half.jpg").write_bytes(jpeg_bytes(9)[:200])
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\nimg0.jpg,dog\nimg1.jpg,cat\ntext.jpg,cat\nhalf.jpg,dog\n")
    texts = []
    for name in ("a", "b"):
        result = run_in_process("shards.cli", *folder_args(images, labels, tmp_path / name))
        assert result.returncode == 0, result.stderr
        texts.append(manifest_path(tmp_path / name).read_text())
    reasons = [r.reason for r in load_split(tmp_path / "a", "train").skipped]
    assert len(reasons) == 2 and not any("0x" in r for r in reasons), reasons
    assert texts[0] == texts[1]


# --- 7. a user's own files survive a re-conversion -------------------------------------------------


def test_reconverting_with_new_settings_deletes_only_the_converters_files(tmp_path, monkeypatch, capsys):
    images, labels = folder_dataset(tmp_path, count=6)
    out = tmp_path / "out"
    assert run_main(monkeypatch, capsys, *folder_args(images, labels, out, "--shard-samples", "2"))[0] == 0
    mine = {"train-foo.tar": b"mine", "train-foo.idx": b"mine", "train-notes.partial": b"mine", "notes.txt": b"mine"}
    for name, data in mine.items():
        (out / "train" / name).write_bytes(data)
    assert run_main(monkeypatch, capsys, *folder_args(images, labels, out, "--shard-samples", "4"))[0] == 0
    names = sorted(p.name for p in (out / "train").iterdir())
    assert names == sorted([*mine, "train-000000.tar", "train-000000.idx", "train-000001.tar", "train-000001.idx"])
    assert all((out / "train" / name).read_bytes() == data for name, data in mine.items())


# --- 8. damaged shards met by the loaders -------------------------------------------------------


def loader_config(backend: str, **overrides) -> LoaderConfig:
    settings = {"batch_size": 4, "image_size_px": 16, "train": False, "backend": backend, "num_workers": 1}
    return LoaderConfig(**{**settings, **overrides})


def jpeg_member(root: Path, shard: int, sample: int):
    record = load_split(root, "s").shards[shard]
    index = root / record.index_path
    return root / record.path, index, next(m for m in read_index(index)[sample] if m.ext == "jpg")


def overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(data)


def garble_jpeg(root: Path, shard: int = 1, sample: int = 2) -> tuple[Path, str]:
    """Overwrite one sample's JPEG bytes with noise of the same length: size and index stay valid."""
    tar, _, member = jpeg_member(root, shard, sample)
    overwrite(tar, member.offset, np.random.default_rng(1).integers(0, 256, member.size, dtype=np.uint8).tobytes())
    return tar, member.name.split(".")[0]


def run_epoch(root: Path, config: LoaderConfig) -> int:
    loader = build_loader(root, "s", config)
    try:
        return sum(len(batch) for batch in loader.epoch(0))
    finally:
        loader.close()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train", [False, True])
def test_garbled_jpeg_raises_shard_data_error_naming_the_shard(small_shards, backend, train):
    tar, key = garble_jpeg(small_shards)
    with pytest.raises(ShardDataError) as error:
        run_epoch(small_shards, loader_config(backend, train=train))
    message = str(error.value)
    assert str(tar) in message and f"make-shards verify {small_shards}" in message and "Traceback" not in message
    if backend == "torch":
        assert f"sample {key}" in message


def test_garbled_jpeg_on_the_batch_decode_path_is_pinpointed(small_shards):
    """The CUDA path's code (the main process decodes whole batches), run on the CPU."""
    tar, key = garble_jpeg(small_shards)
    config = loader_config("torch", num_workers=0)
    loader = TorchLoader(small_shards, load_split(small_shards, "s"), config, decode_on_device=True)
    with pytest.raises(ShardDataError, match=f"shard {tar}, sample {key}"):
        list(loader.epoch(0))


def test_corrupt_label_bytes_raise_shard_data_error(small_shards):
    record = load_split(small_shards, "s").shards[2]
    label = next(m for m in read_index(small_shards / record.index_path)[5] if m.ext == "lbl")
    overwrite(small_shards / record.path, label.offset, np.array([2**31 - 1], dtype="<i4").tobytes())
    with pytest.raises(
        ShardDataError, match=f"shard {small_shards / record.path}, sample k.* label 2147483647 outside"
    ):
        run_epoch(small_shards, loader_config("torch"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_index_offsets_past_the_end_are_refused_at_start(small_shards, backend):
    _, index, member = jpeg_member(small_shards, 1, 2)
    index.write_text(index.read_text().replace(f"jpg {member.offset} ", f"jpg {member.offset + 10 * 1024 * 1024} "))
    with pytest.raises(ShardError, match=f"index file {index}: sample {member.name}: .* outside the"):
        build_loader(small_shards, "s", loader_config(backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_index_counts_that_disagree_with_the_manifest_are_refused_at_start(small_shards, backend):
    _, index, _ = jpeg_member(small_shards, 0, 0)
    lines = index.read_text().splitlines()
    index.write_text("\n".join([f"v1.2 {len(lines) - 2}", *lines[1:-1]]) + "\n")
    with pytest.raises(ShardError, match=f"index file {index} lists 7 samples, manifest says 8"):
        build_loader(small_shards, "s", loader_config(backend))


def test_verify_checksums_refuses_damaged_bytes_at_start(small_shards):
    tar, _ = garble_jpeg(small_shards)
    build_loader(small_shards, "s", loader_config("torch")).close()  # sizes and index are fine
    with pytest.raises(ShardError, match=f"shard {tar} fails its sha256 checksum"):
        build_loader(small_shards, "s", loader_config("torch", verify_checksums=True))
