#!/usr/bin/env bash
# Stage the Python wheels the GPU machine lacks (it has no network): NVIDIA DALI for CUDA 13 with
# the packages it needs, and tomli-w (engine/config.py writes config.toml with it).
#
# Here, with PyPI:     bash tools/gpu_stage.sh
#   downloads into .gpu-stage/ (ignored by git): base/ (tomli-w, a few KiB), parts/ (DALI and its
#   dependencies as one tar cut into parts of at most 60 MiB, each small enough to travel in one
#   device call) and MANIFEST (sha256 of every part).
# There, no network:   bash tools/gpu_stage.sh --unpack
#   installs base/ when tomli_w is missing; moves the parts it was handed into a store outside the
#   repository copy (parts from earlier calls stay there while the machine is warm); once every part
#   of MANIFEST is in the store with its checksum, joins them and pip-installs with --no-index.
#   Until then it says which parts are still to come. Run it with each part; docs/PERFORMANCE.md
#   ("GPU checks") gives the sequence of device calls.
set -euo pipefail
stage=.gpu-stage
part_bytes=$((60 * 1024 * 1024))
py="${PYTHON:-python3}"
store="${GPU_STAGE_STORE:-${TMPDIR:-/tmp}/mile-gpu-stage}"
# DALI's dependencies that the GPU machine's image already holds (its package list): not carried,
# and not replaced there (installing numpy over the image's would change what torch runs with)
on_device_already="numpy packaging six pyyaml typing_extensions wheel"

project_of() {  # wheel file name -> normalised project name
    basename "$1" | cut -d- -f1 | tr '[:upper:].-' '[:lower:]__'
}

download() {
    rm -rf "$stage"
    mkdir -p "$stage/download" "$stage/base" "$stage/parts"
    local start=$SECONDS
    "$py" -m pip download nvidia-dali-cuda130 tomli-w --no-cache-dir --dest "$stage/download" --only-binary=:all: \
        --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
    echo "download took $((SECONDS - start)) s"
    mv "$stage"/download/tomli_w-*.whl "$stage/base/"
    for wheel in "$stage"/download/*.whl; do
        if [[ " $on_device_already " == *" $(project_of "$wheel") "* ]]; then
            echo "not carried (on the GPU machine already): $(basename "$wheel")"
            rm "$wheel"
        fi
    done
    ls -l "$stage/download" "$stage/base"
    tar -cf - -C "$stage/download" . | split --bytes="$part_bytes" --numeric-suffixes --suffix-length=2 - "$stage/parts/dali-wheels.tar.part"
    (cd "$stage/parts" && sha256sum dali-wheels.tar.part*) > "$stage/MANIFEST"
    rm -rf "$stage/download"
    echo "parts (carry one per device call, with $stage/MANIFEST and $stage/base):"
    ls -l "$stage/parts"
}

install_base() {
    if ! "$py" -c "import tomli_w" 2>/dev/null && compgen -G "$stage/base/*.whl" > /dev/null; then
        "$py" -m pip install --quiet --no-index --no-deps --no-compile "$stage"/base/*.whl
    fi
}

unpack() {
    install_base
    if "$py" -c "import nvidia.dali" 2>/dev/null; then
        echo "DALI already installed: $("$py" -c "import nvidia.dali; print(nvidia.dali.__version__)")"
        return
    fi
    if [[ ! -f "$stage/MANIFEST" ]]; then
        echo "no $stage/MANIFEST here: carry it (and the parts) from a machine that ran tools/gpu_stage.sh" >&2
        return 1
    fi
    mkdir -p "$store"
    cp "$stage/MANIFEST" "$store/"
    if compgen -G "$stage/parts/*" > /dev/null; then
        mv "$stage"/parts/* "$store/"
    fi
    local missing
    missing=$(cd "$store" && sha256sum --check --quiet MANIFEST 2>/dev/null | cut -d: -f1 || true)
    if [[ -n "$missing" ]]; then
        echo "parts still to come (missing or incomplete): $(echo "$missing" | tr '\n' ' ')"
        return 0
    fi
    local start=$SECONDS
    mkdir -p "$store/wheels"
    cut -d' ' -f3 "$store/MANIFEST" | sed "s|^|$store/|" | xargs cat | tar -xf - -C "$store/wheels"
    "$py" -m pip install --quiet --no-index --no-deps --no-compile "$store"/wheels/*.whl
    echo "installed in $((SECONDS - start)) s: DALI $("$py" -c "import nvidia.dali; print(nvidia.dali.__version__)")"
}

case "${1:-}" in
    "") download ;;
    --unpack) unpack ;;
    *) echo "usage: bash tools/gpu_stage.sh [--unpack]" >&2; exit 2 ;;
esac
