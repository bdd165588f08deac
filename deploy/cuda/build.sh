#!/usr/bin/env bash
# Builds the CUDA binary on a machine without a GPU or a CUDA install (see the README's
# "Deploy on a GPU" section): nvcc 13.0 from PyPI compiles candle's and our kernels, and the
# driver/math libraries are linked against stubs that carry only their SONAMEs and the symbols
# the binary calls; the real libraries are found on the GPU machine at run time.
#
#   deploy/cuda/build.sh    -> target/cuda/sparsegrad (stripped) and sparsegrad.gz (to copy)
#
# The first build compiles every candle kernel for sm_90 (~20 min on 2 cores); later builds
# reuse target/cuda. Not part of CI.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"

venv=.cache/cuda-venv
cuda_home() { ls -d "$venv"/lib/python3*/site-packages/nvidia/cu13 2>/dev/null | head -1; }
if [ -z "$(cuda_home)" ] || [ ! -x "$(cuda_home)/bin/nvcc" ]; then
  echo "== installing the pinned CUDA 13.0 toolchain into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --require-hashes --no-deps -r deploy/cuda/requirements.txt
fi
CUDA_HOME=$(cd "$(cuda_home)" && pwd)
export CUDA_HOME PATH="$CUDA_HOME/bin:$PATH" CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CARGO_TARGET_DIR="$root/target/cuda"
"$CUDA_HOME/bin/nvcc" --version | tail -2

# Stubs: lib<name>.so with the real SONAME and one empty function per symbol the binary
# imports from it (a stub without the symbols would be dropped by --as-needed).
stubs="$CARGO_TARGET_DIR/stubs"
mkdir -p "$stubs"
declare -A soname=([cuda]=libcuda.so.1 [nvrtc]=libnvrtc.so.13 [curand]=libcurand.so.10
                   [cublas]=libcublas.so.13 [cublasLt]=libcublasLt.so.13)
make_stubs() {
  for lib in "${!soname[@]}"; do
    local list="deploy/cuda/stubs/$lib.txt"
    touch "$list"
    sed 's/.*/void &(void){}/' "$list" > "$stubs/$lib.c"
    gcc -shared -fPIC -Wl,-soname,"${soname[$lib]}" -o "$stubs/lib$lib.so" "$stubs/$lib.c"
  done
  ln -sf "$CUDA_HOME/lib/libcudart.so.13" "$stubs/libcudart.so"
}
# Which stub a driver/library symbol belongs to.
lib_of() {
  case "$1" in
    nvrtc*) echo nvrtc ;;
    curand*) echo curand ;;
    cublasLt*) echo cublasLt ;;
    cublas*) echo cublas ;;
    cuda*) echo "" ;;            # runtime API: the real libcudart from PyPI
    cu[A-Z]*) echo cuda ;;
    *) echo "" ;;
  esac
}

export RUSTFLAGS="-L native=$stubs -C link-arg=-Wl,--unresolved-symbols=ignore-in-object-files"
bin="$CARGO_TARGET_DIR/release/sparsegrad"
for pass in 1 2; do
  make_stubs
  echo "== cargo build --release --features cuda (pass $pass)"
  cargo build --release --features cuda --bin sparsegrad
  added=0
  while read -r sym; do
    lib=$(lib_of "$sym")
    [ -n "$lib" ] || continue
    if ! grep -qx "$sym" "deploy/cuda/stubs/$lib.txt"; then
      echo "$sym" >> "deploy/cuda/stubs/$lib.txt"
      added=$((added + 1))
    fi
  done < <(nm -u --format=just-symbols "$bin" | sed 's/@.*//' | sort -u)
  [ "$added" -eq 0 ] && break
  echo "== $added symbols had no stub; relinking against the completed stubs"
  for lib in "${!soname[@]}"; do sort -u -o "deploy/cuda/stubs/$lib.txt" "deploy/cuda/stubs/$lib.txt"; done
  touch src/main.rs   # forces the final link only
done

# Every library the binary calls into must be NEEDED (a stub without symbols is dropped by
# --as-needed, which is right: the binary then does not use that library at all).
needed=$(readelf -d "$bin" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p')
for lib in "${!soname[@]}"; do
  if [ -s "deploy/cuda/stubs/$lib.txt" ] && ! grep -qx "${soname[$lib]}" <<<"$needed"; then
    echo "error: $bin calls lib$lib but does not list ${soname[$lib]} as NEEDED" >&2
    exit 1
  fi
done
grep -qx libcudart.so.13 <<<"$needed" || { echo "error: libcudart.so.13 not NEEDED" >&2; exit 1; }
left=$(nm -u --format=just-symbols "$bin" | sed 's/@.*//' | sort -u | while read -r sym; do
  lib=$(lib_of "$sym")
  if [ -n "$lib" ] && ! grep -qx "$sym" "deploy/cuda/stubs/$lib.txt"; then echo "$sym"; fi
done)
if [ -n "$left" ]; then
  echo "error: no stub carries: $left" >&2
  exit 1
fi
out="$CARGO_TARGET_DIR/sparsegrad"
strip -o "$out" "$bin"
# What travels to the GPU machine is the gzipped binary: candle embeds the PTX of all its
# kernels (~40 MiB of text, GGUF ones included), which compresses ~4x.
gzip -9c "$out" > "$out.gz"
size=$(stat -c %s "$out") gz=$(stat -c %s "$out.gz")
echo "== $out: $((size / 1048576)) MiB stripped, $((gz / 1048576)) MiB gzipped; NEEDED: $(tr '\n' ' ' <<<"$needed")"
if [ "$gz" -gt $((64 * 1048576)) ]; then
  echo "error: the gzipped binary is over 64 MiB" >&2
  exit 1
fi
