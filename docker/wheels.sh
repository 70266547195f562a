#!/usr/bin/env bash
# Download every wheel the CPU image installs into docker/wheels/, for an offline image build:
#
#   bash docker/wheels.sh
#   PDSERVE_PIP_OFFLINE=1 docker compose -f docker/compose.yaml build
#
# What: torch==$TORCH_VERSION (CPU build), pyproject.toml's [project].dependencies and its
# [build-system].requires, with everything they depend on, as binary wheels for CPython 3.11 on this
# machine's architecture (the image's Python, whatever the host's is). Uses the host's pip and its
# configuration, so a local wheel (pip's find-links) is taken as `pip install` would take it. The
# PyTorch CPU index ($TORCH_INDEX_URL) is added when it answers (probed once: pip would retry it for
# every package otherwise); either way a torch wheel that is not a +cpu build is refused, since
# PyPI's Linux torch is the CUDA build with several GB of nvidia-* dependencies.
#
# A second run with the same requirements and nothing removed from the folder does nothing: the
# requirement list is kept in docker/wheels/.requirements and compared.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest=$root/docker/wheels
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
python=${PYTHON:-python3}
arch=$(uname -m)

requirements=$("$python" - "$root/pyproject.toml" "$TORCH_VERSION" <<'EOF'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))
print(f"torch=={sys.argv[2]}")
print("\n".join(project["build-system"]["requires"] + project["project"]["dependencies"]))
EOF
)
stamp="cp311 $arch
$requirements"
if [ -f "$dest/.requirements" ] && [ "$(cat "$dest/.requirements")" = "$stamp" ] \
    && [ "$(find "$dest" -name '*.whl' | wc -l)" -gt 0 ]; then
    echo "wheels.sh: $dest is up to date"
    exit 0
fi
mkdir -p "$dest"
rm -f "$dest/.requirements"
extra=()
if "$python" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=10)' \
        "${TORCH_INDEX_URL%/}/torch/" >/dev/null 2>&1; then
    extra=(--extra-index-url "$TORCH_INDEX_URL")
else
    echo "wheels.sh: $TORCH_INDEX_URL does not answer; torch from pip's configured sources"
fi
# Binary wheels only: the image has no compiler. manylinux_2_28 and 2_17 (manylinux2014) cover what
# the packages publish; Debian bookworm's glibc (2.36) runs both.
timeout 900 "$python" -m pip download --quiet --dest "$dest" --only-binary=:all: \
    --python-version 3.11 --implementation cp --abi cp311 \
    --platform "manylinux_2_28_$arch" --platform "manylinux_2_17_$arch" --platform "manylinux2014_$arch" \
    ${extra[@]+"${extra[@]}"} -r /dev/stdin <<<"$requirements"
compgen -G "$dest/torch-$TORCH_VERSION+cpu-*.whl" >/dev/null \
    || { echo "wheels.sh: no CPU build of torch $TORCH_VERSION in $dest (set TORCH_INDEX_URL)" >&2; exit 1; }
printf '%s' "$stamp" > "$dest/.requirements"
echo "wheels.sh: $(find "$dest" -name '*.whl' | wc -l) wheels, $(du -sh "$dest" | cut -f1) in $dest"
