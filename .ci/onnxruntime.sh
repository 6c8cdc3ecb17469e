#!/usr/bin/env bash
# .ci/onnxruntime.sh — put the ONNX Runtime shared library where payguard's
# `ort` crate (2.0.0-rc.15, load-dynamic, API 31) can dlopen it.
#
# Takes libonnxruntime.so.<ver> out of the PyPI wheel onnxruntime==$ORT_VERSION
# (`pip download`, nothing is pip-installed) and copies it, with
# libonnxruntime_providers_shared.so, into
#   ${PAYGUARD_CACHE:-$HOME/.cache/payguard}/onnxruntime/lib/
# plus symlinks libonnxruntime.so and libonnxruntime.so.1 -> the versioned file.
# Idempotent: skips the download when that version is already there.
# Prints the library path last; point ORT_DYLIB_PATH at it.
set -euo pipefail

ORT_VERSION="${ORT_VERSION:-1.31.1}"
CACHE="${PAYGUARD_CACHE:-$HOME/.cache/payguard}"
LIB_DIR="$CACHE/onnxruntime/lib"
SO="$LIB_DIR/libonnxruntime.so.$ORT_VERSION"

say() { echo "[onnxruntime] $*" >&2; }
die() { echo "[onnxruntime] ERROR: $*" >&2; exit 1; }

if [[ -s "$SO" && "$(readlink "$LIB_DIR/libonnxruntime.so" 2>/dev/null)" == "libonnxruntime.so.$ORT_VERSION" ]]; then
  say "onnxruntime $ORT_VERSION already in $LIB_DIR"
else
  command -v unzip >/dev/null || die "unzip not found"
  if command -v pip >/dev/null; then PIP=(pip); else PIP=(python3 -m pip); fi
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  say "downloading onnxruntime==$ORT_VERSION wheel from PyPI"
  "${PIP[@]}" download -q --no-deps --only-binary=:all: "onnxruntime==$ORT_VERSION" -d "$tmp" \
    || die "pip download onnxruntime==$ORT_VERSION failed"
  whl="$(ls "$tmp"/onnxruntime-*.whl | head -n1)"
  unzip -q -o "$whl" 'onnxruntime/capi/libonnxruntime*.so*' -d "$tmp/x" \
    || die "no libonnxruntime in $whl"
  [[ -s "$tmp/x/onnxruntime/capi/libonnxruntime.so.$ORT_VERSION" ]] \
    || die "wheel has no libonnxruntime.so.$ORT_VERSION: $(ls "$tmp/x/onnxruntime/capi")"
  mkdir -p "$LIB_DIR"
  # copy under a temp name, then rename: an interrupted run leaves no half file
  for f in "$tmp"/x/onnxruntime/capi/libonnxruntime*.so*; do
    cp "$f" "$LIB_DIR/.$(basename "$f").tmp"
    mv -f "$LIB_DIR/.$(basename "$f").tmp" "$LIB_DIR/$(basename "$f")"
  done
  ln -sfn "libonnxruntime.so.$ORT_VERSION" "$LIB_DIR/libonnxruntime.so.1"
  ln -sfn "libonnxruntime.so.$ORT_VERSION" "$LIB_DIR/libonnxruntime.so"
  say "installed $(basename "$whl") -> $LIB_DIR"
fi
say "ORT_DYLIB_PATH=$LIB_DIR/libonnxruntime.so"
echo "$LIB_DIR/libonnxruntime.so"
