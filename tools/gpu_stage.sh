#!/usr/bin/env bash
# Stage what the GPU machine lacks (it has no network): NVIDIA DALI for CUDA 13 with the packages and
# run-time libraries it needs, and tomli-w (engine/config.py writes config.toml with it).
#
# Here, with PyPI:     bash tools/gpu_stage.sh
#   downloads the wheels for Python 3.12 and unpacks them into one site-packages tree, leaving out
#   what the GPU machine has or never runs: the packages its image already holds, extension modules
#   built for other Python versions, headers, byte code, nvCOMP (DALI dlopens it only for its LZ4
#   inflate operator, which the trainer never uses); of NVIDIA's NPP only the three libraries
#   DALI loads (libnppc, libnppicc, libnppig: DALI dlopens them through its RUNPATH
#   $ORIGIN/../cu13/lib, and the torch image has no NPP). The tree is packed as one tar.xz cut into
#   parts of at most 60 MiB, each small enough to travel in one device call:
#   .gpu-stage/ (ignored by git): base/ (tomli-w, a few KiB), parts/dali-site.tar.xz.partNN,
#   MANIFEST (sha256 of every part) and SIZES (what was measured here).
# There, no network:   bash tools/gpu_stage.sh --unpack
#   installs base/ when tomli_w is missing; moves the parts it was handed into a store outside the
#   repository copy (parts from earlier calls stay there while the machine is held); once every part
#   of MANIFEST is in the store with its checksum, joins them and unpacks the tree into Python's
#   site-packages without replacing any file already there. Until then it says which parts are
#   still to come. docs/PERFORMANCE.md ("GPU checks") gives the sequence of device calls.
set -euo pipefail
# GPU_STAGE_XZ: xz's options (default -9 -T0; a lower level only to try the script out: parts grow)
stage=.gpu-stage
part_bytes=$((60 * 1024 * 1024))
py="${PYTHON:-python3}"
store="${GPU_STAGE_STORE:-${TMPDIR:-/tmp}/mile-gpu-stage}"
device_python=312  # the GPU machine's Python (3.12): extension modules for others are left out
# DALI's dependencies that the GPU machine's image already holds (its package list): not carried,
# and not replaced there (installing numpy over the image's would change what torch runs with)
on_device_already="numpy packaging six pyyaml typing_extensions wheel"
never_loaded="nvidia_libnvcomp_cu13"  # a DALI dependency dlopened only by operators the trainer does not use
npp_kept="libnppc.so.13 libnppicc.so.13 libnppig.so.13"  # DALI's dlopen names (libdali_operators.so)

project_of() {  # wheel file name -> normalised project name
    basename "$1" | cut -d- -f1 | tr '[:upper:].-' '[:lower:]__'
}

download() {
    rm -rf "$stage"
    mkdir -p "$stage/download" "$stage/base" "$stage/parts" "$stage/site"
    local start=$SECONDS
    "$py" -m pip download nvidia-dali-cuda130 'nvidia-npp==13.0.*' tomli-w --no-cache-dir --dest "$stage/download" \
        --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
    echo "download took $((SECONDS - start)) s"
    mv "$stage"/download/tomli_w-*.whl "$stage/base/"
    local wheel project
    for wheel in "$stage"/download/*.whl; do
        project=$(project_of "$wheel")
        if [[ " $on_device_already " == *" $project "* ]]; then
            echo "not carried (on the GPU machine already): $(basename "$wheel")"
        elif [[ " $never_loaded " == *" $project "* ]]; then
            echo "not carried (never loaded by the trainer's pipelines): $(basename "$wheel")"
        elif [[ $project == nvidia_npp ]]; then
            (cd "$stage/site" && "$py" -m zipfile -e "../download/$(basename "$wheel")" npp-all)
            mkdir -p "$stage/site/nvidia/cu13/lib"
            for lib in $npp_kept; do mv "$stage/site/npp-all/nvidia/cu13/lib/$lib" "$stage/site/nvidia/cu13/lib/"; done
            rm -rf "$stage/site/npp-all"
        else
            "$py" -m zipfile -e "$wheel" "$stage/site"
        fi
    done
    find "$stage/site" -name '*.cpython-3*' ! -name "*.cpython-${device_python}-*" -delete
    find "$stage/site" \( -name __pycache__ -o -name include -o -name '*.data' \) -type d -prune -exec rm -rf {} +
    local unpacked
    unpacked=$(du -sb "$stage/site" | cut -f1)
    start=$SECONDS
    tar -C "$stage/site" -cf - . | xz ${GPU_STAGE_XZ:--9 -T0} | split --bytes="$part_bytes" --numeric-suffixes --suffix-length=2 - \
        "$stage/parts/dali-site.tar.xz.part"
    local packed_s=$((SECONDS - start))
    (cd "$stage/parts" && sha256sum dali-site.tar.xz.part*) > "$stage/MANIFEST"
    {
        echo "date: $(date -u +%Y-%m-%d)"
        echo "tree: $((unpacked / 1048576)) MiB unpacked; xz ${GPU_STAGE_XZ:--9 -T0} took ${packed_s} s here"
        (cd "$stage/parts" && ls -l dali-site.tar.xz.part*) | awk '{printf "%s %.1f MiB\n", $9, $5 / 1048576}'
    } > "$stage/SIZES"
    rm -rf "$stage/download" "$stage/site"
    echo "parts (carry one per device call, with $stage/MANIFEST and $stage/base):"
    cat "$stage/SIZES"
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
    local start=$SECONDS site
    site=$("$py" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    cut -d' ' -f3 "$store/MANIFEST" | sed "s|^|$store/|" | xargs cat | xz -d -T0 | tar -x --skip-old-files -C "$site"
    rm -f "$store"/dali-site.tar.xz.part*  # the machine's disk: the tree is installed now
    echo "unpacked into $site in $((SECONDS - start)) s: DALI $("$py" -c "import nvidia.dali; print(nvidia.dali.__version__)")"
}

case "${1:-}" in
    "") download ;;
    --unpack) unpack ;;
    *) echo "usage: bash tools/gpu_stage.sh [--unpack]" >&2; exit 2 ;;
esac
