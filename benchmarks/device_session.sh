#!/usr/bin/env bash
# What the open issues still need from the lent GPU, in two device calls (each stage under its own time limit, so
# each call stays inside the 10-minute command limit). Logs and results go to $OUT (the device tool's folder;
# ./out elsewhere), at most 8 files a call, so they all come back.
#
#   bash benchmarks/device_session.sh [STAGE ...]      default stages: env tests paths (about 8 minutes)
#   bash benchmarks/device_session.sh env bench mixed  the kernel table and RoPE-Mixed e2e, in a second call
#
#   env    versions of the stack, GPU name                      -> stdout
#   tests  pytest -m gpu (every GPU test, full log)              -> pytest_gpu.log, pytest_gpu.xml
#   paths  benchmarks/fwd_paths.py: forward variants (prerotate, narrow tail), configs, the cached launcher,
#          host cost; checked against float64 math first        -> fwd_paths.json, fwd_paths.log
#   bench  python -m attnhub bench (the kernel table of README) -> h100.json, h100.png, bench.log
#   mixed  RoPE-Mixed (learnable frequencies) train step, timm vs patched, eager -> e2e_rope_mixed.json, .log
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(env tests paths)

# nothing can be fetched there: build with the machine's own setuptools (>= 77 for the SPDX license field)
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 \
  || { echo "pip install -e . failed (see install.log):"; tail -5 "$OUT/install.log"; exit 3; }
status=0
for stage in "${stages[@]}"; do
  echo "== $stage ($(date -u +%H:%M:%S))"
  case $stage in
    env)
      python3 -m pip show torch triton timm 2>/dev/null | grep -E "^(Name|Version)"
      nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader ;;
    tests)
      timeout 230 python3 -m pytest -m gpu -q -rs -p no:cacheprovider --junitxml="$OUT/pytest_gpu.xml" \
        >"$OUT/pytest_gpu.log" 2>&1 || status=1
      tail -25 "$OUT/pytest_gpu.log" ;;
    paths)
      timeout 250 python3 benchmarks/fwd_paths.py --out "$OUT/fwd_paths.json" >"$OUT/fwd_paths.log" 2>&1 || status=1
      grep -E "^(check|host|vit_[a-z0-9_]+ (cudnn|fwd\+bwd))" "$OUT/fwd_paths.log" | head -40
      sed -n '/== best forward/,$p' "$OUT/fwd_paths.log" ;;
    bench)
      timeout 360 python3 -m attnhub bench --out "$OUT/h100.json" --plot "$OUT/h100.png" >"$OUT/bench.log" 2>&1 \
        || status=1
      tail -30 "$OUT/bench.log" ;;
    mixed)
      timeout 200 python3 benchmarks/bench_e2e.py --models vit_small_patch16_rope_mixed_224 --modes train \
        --no-compile --out "$OUT/e2e_rope_mixed.json" >"$OUT/e2e_rope_mixed.log" 2>&1 || status=1
      tail -15 "$OUT/e2e_rope_mixed.log" ;;
    *) echo "unknown stage $stage (env, tests, paths, bench, mixed)"; status=2 ;;
  esac
done
exit $status
