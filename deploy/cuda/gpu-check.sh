#!/usr/bin/env bash
# The GPU check, run on the GPU machine from the repository root (no Rust, no network there):
#   correctness of the CUDA path against the CPU, then our benchmarks, then PyTorch's on the
#   same shapes; results in $OUT (default gpu-check-out/): ours.json, torch.json, results.json,
#   report.md, plus ldd/nvidia-smi/log files. Budget: under 5 minutes on an H100/H200.
#
# Needs target/cuda/sparsegrad (deploy/cuda/build.sh, on a CPU machine) and, for the real-model
# check, a MiniLM-L6 folder in $MINILM (deploy/cuda/pack.sh puts both in target/gpu-carry/).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
out=${OUT:-gpu-check-out}
mkdir -p "$out"
carry=target/gpu-carry
bin=${SPARSEGRAD_BIN:-}
if [ -z "$bin" ]; then
  if [ -f "$carry/sparsegrad.gz" ]; then
    gzip -dc "$carry/sparsegrad.gz" > /tmp/sparsegrad-cuda && chmod +x /tmp/sparsegrad-cuda
    bin=/tmp/sparsegrad-cuda
  else
    bin=target/cuda/sparsegrad
  fi
fi
minilm=${MINILM:-}
if [ -z "$minilm" ] && [ -f "$carry/all-minilm-l6-v2/model.safetensors.gz" ]; then
  minilm=/tmp/all-minilm-l6-v2
  mkdir -p "$minilm"
  cp "$carry"/all-minilm-l6-v2/*.json "$carry"/all-minilm-l6-v2/*.txt "$minilm"/ 2>/dev/null
  gzip -dc "$carry/all-minilm-l6-v2/model.safetensors.gz" > "$minilm/model.safetensors"
fi

# The CUDA libraries live in the image's Python environment; libcuda comes with the driver.
libdirs=$(find / -xdev \( -name 'libcublas.so.13*' -o -name 'libcurand.so.10*' -o -name 'libnvrtc.so.13*' \
  -o -name 'libcudart.so.13*' -o -name 'libcublasLt.so.13*' \) 2>/dev/null | xargs -r -n1 dirname | sort -u | paste -sd:)
export LD_LIBRARY_PATH="${libdirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH" | tee "$out/env.txt"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
ldd "$bin" | tee "$out/ldd.txt"
if grep -q "not found" "$out/ldd.txt"; then echo "missing libraries (see $out/ldd.txt)"; exit 1; fi

minilm_arg=()
[ -d "$minilm" ] && minilm_arg=(--minilm "$minilm")
start=$(date +%s)
timeout "${OURS_TIMEOUT:-170}" "$bin" gpu-check --device cuda --out "$out" "${minilm_arg[@]}" 2>&1 | tee "$out/ours.log"
ours_rc=${PIPESTATUS[0]}
echo "ours: exit $ours_rc after $(( $(date +%s) - start )) s"
timeout "${TORCH_TIMEOUT:-110}" python3 deploy/cuda/bench_torch.py --out "$out" 2>&1 | tee "$out/torch.log"
torch_rc=${PIPESTATUS[0]}
echo "torch: exit $torch_rc; total $(( $(date +%s) - start )) s"
exit $(( ours_rc != 0 || torch_rc != 0 ))
