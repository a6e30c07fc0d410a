"""tools/gpu_stage.sh --unpack as the GPU machine runs it: parts arrive one device call at a time, are
kept outside the repository copy, and once all are there with their checksums the tree goes into
Python's site-packages without replacing a file already there."""

from __future__ import annotations

import hashlib
import io
import lzma
import subprocess
import sys
import tarfile
import venv
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "gpu_stage.sh"


def packed_tree(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return lzma.compress(buffer.getvalue())


def hand_over(checkout: Path, part: str, data: bytes, manifest: str) -> None:
    """What one device call carries: MANIFEST and one part, in a fresh copy of the repository."""
    stage = checkout / ".gpu-stage"
    (stage / "parts").mkdir(parents=True, exist_ok=True)
    (stage / "MANIFEST").write_text(manifest)
    (stage / "parts" / part).write_bytes(data)


@pytest.mark.skipif(sys.platform != "linux", reason="the GPU machine's shell tools")
def test_parts_over_several_calls_then_one_unpack_that_replaces_nothing(tmp_path: Path) -> None:
    env_dir = tmp_path / "device-python"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    (site / "nvidia").mkdir()
    (site / "nvidia" / "__init__.py").write_text("# the image's own\n")
    packed = packed_tree(
        {"nvidia/__init__.py": "# staged\n", "nvidia/dali/__init__.py": "__version__ = '0.0-staged'\n"}
    )
    parts = {
        "dali-site.tar.xz.part00": packed[: len(packed) // 2],
        "dali-site.tar.xz.part01": packed[len(packed) // 2 :],
    }
    manifest = "".join(f"{hashlib.sha256(data).hexdigest()}  {name}\n" for name, data in parts.items())
    env = {"PATH": "/usr/bin:/bin", "PYTHON": str(python), "GPU_STAGE_STORE": str(tmp_path / "store")}
    outputs = []
    for number, (name, data) in enumerate(parts.items()):
        checkout = tmp_path / f"call{number}"  # each device call gets a fresh copy of the checkout
        hand_over(checkout, name, data, manifest)
        result = subprocess.run(
            ["bash", str(SCRIPT), "--unpack"], cwd=checkout, env=env, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr
        outputs.append(result.stdout)
    assert "parts still to come" in outputs[0] and "dali-site.tar.xz.part01" in outputs[0]
    assert "DALI 0.0-staged" in outputs[1]
    assert (site / "nvidia" / "__init__.py").read_text() == "# the image's own\n", "a file already there was replaced"
    assert not list((tmp_path / "store").glob("*.part*")), "the parts stay on the machine's disk after unpacking"
