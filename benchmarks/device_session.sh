#!/usr/bin/env bash
# The GPU runs the open issues need, in two device calls (each stage under its own time limit, so each call stays
# inside the 10-minute command limit). Logs and results go to $OUT (the device tool's folder; ./out elsewhere), at
# most 8 files a call, so they all come back.
#
#   bash benchmarks/device_session.sh [STAGE ...]           default stages: env tests (about 7 minutes)
#   bash benchmarks/device_session.sh env first bench e2e hyp   first calls, kernel table, ViT-S e2e, hypothesis
#
#   env    versions of the stack, GPU name and driver                  -> stdout
#   tests  pytest -m gpu but the Gluon forwards' (early, gluonlong and gluontrain run those), then the backend
#          tests that run on CUDA when there is one (launch paths, NaN/inf, determinism)
#                                                                   -> pytest_gpu.log/.xml, pytest_cuda.log
#   tests2 the suites that run on CUDA when there is one and are not marked gpu: variable-resolution parity, the
#          backward paths, the Triton runtime                            -> pytest_cuda2.log
#   first  python -m attnhub bench --sections first_call: each backend's first call per shape in fresh processes,
#          cold (empty Triton cache) and warm, Gluon forwards compiling in the background; then triton_fa_rope's
#          with them compiled in the call (ATTNHUB_TRITON_BACKGROUND_COMPILE=0)  -> first_call{,_foreground}.json
#   background the GPU tests of the Gluon forwards compiling in the background (the Triton forward serving meanwhile,
#          a CUDA graph capturing the first launch after), then the runtime's tests on CUDA
#                                                                           -> pytest_gluon.log, pytest_runtime.log
#   host   python -m attnhub bench --sections host (host µs per cached call, dispatch overhead)  -> h200_host.json
#   bench  python -m attnhub bench --sections table,host (kernel table, host overhead), its winners merged into a copy
#          of measured.yaml                                   -> h200.json, .png, measured.yaml, bench.log
#   sweep  benchmarks/sweep.py over the forward configs ($SWEEP_ARGS overrides)   -> sweep.json, sweep.log
#   bwdsweep benchmarks/sweep.py over gluon_dkdv and gluon_dq (the Gluon backward's configs) at 577 and 1029 tokens,
#          fwd+bwd, the kernels' GPU time                        -> h200_sweep_gluon_{dkdv,dq}.json, sweep_*.log
#   e2e    benchmarks/bench_e2e.py, ViT-S/16 train and inference, eager and compiled -> e2e_h100_vit_s.json, .log
#   e2e384 ViT-B/16@384 (N = 577) train step, B = 64, eager and compiled  -> e2e_vit_b384.json, .log
#   varlen bench_varlen.py (kernel level, NaFlex and grouped heads; its winners merged into a copy of measured.yaml),
#          then NaFlexViT-B axial on a padded 576-token bucket and ViT-B/16@384 with 4 k/v heads, train steps
#                                   -> h200_varlen.json, measured.yaml, e2e_naflex.json, e2e_gqa.json, .log
#   varlenq bench_varlen.py, NaFlex case, triton_fa_rope forced: as shipped, with q rotated first from 384 tokens
#          (prerotate_q_from_n = 384: key-padded inference, which the Triton forward serves), as shipped again
#                                                -> h200_varlen_q{_shipped,_first,_shipped2}.json, bench_varlen_q.log
#   hostwait NaFlexViT-B compiled train step three ways: as is, with --gc-freeze, with the allocator's expandable
#          segments; each record counts garbage collections and allocator retries per step (bench_e2e host_events)
#                                   -> e2e_naflex_hostwait{,_gc_freeze,_expandable}.json, e2e_hostwait.log
#   naflex the NaFlexViT tests (the GPU's sync count among them), benchmarks/sync_check.py, then the NaFlexViT-B
#          axial train step (B = 64, 576-token buckets) eager and compiled, and compiled once more
#                     -> pytest_naflex.log, h200_naflex_syncs.txt, e2e_h200_naflex{,_repeat}.json, e2e_naflex.log
#   rotate benchmarks/rotate_ab.py (the rotation pass: one launch for q and k against one per tensor) -> h200_rotate_ab.json
#   steps  benchmarks/step_kernels.py (compiled ViT-B/16@384 train step, B = 64: GPU ms per kernel, timm against
#          patched)                                                  -> h200_step_kernels_vit_b384.json, .log
#   graphs ViT-S/16 train step at B = 32 under torch.compile(mode="reduce-overhead") (CUDA graphs)
#                                                                       -> e2e_reduce_overhead.json, .log
#   multigpu pytest -m multigpu (needs the nvidia-h200-x2 kind)         -> pytest_multigpu.log
#   mixed  RoPE-Mixed (learnable frequencies) train step, eager          -> e2e_h100_rope_mixed.json, .log
#   hyp    randomized parity (hypothesis) on CUDA, 60 examples           -> hypothesis_cuda.log
#   gluonlong the Gluon forwards' GPU tests, then benchmarks/gluon_long.py (the long kernel's variants against the
#          forwards serving 256 < N <= 640 today)            -> pytest_gluon.log, h200_gluon_long.json, gluon_long.log
#   early  the Gluon forwards' GPU tests, then benchmarks/gluon_long.py --groups 0,3 at N = 577, 401 and 197 (the
#          long kernel forced there, against the resident one): one attending partition with its K/V boxes handed
#          back as a whole and box by box (long_early_release), three attending warpgroups as partitions of their
#          own (long_attend_groups: the table's) and with the swapped last slice (long_swap_tail); inference with
#          and without RoPE, training forward   -> pytest_gluon.log, h200_gluon_long_early.json, gluon_long_early.log
#   groupse2e benchmarks/e2e_ab.py, ViT-B/16@384 compiled train step, B = 64: the table before three attending
#          groups (one partition, no early release, the Triton training forward from 384 tokens) against the
#          table                                          -> h200_e2e_ab_vit_b384_groups.json, e2e_ab_groups.log
#   stream the streaming kernel's GPU tests, then benchmarks/gluon_long.py past 640 tokens (ViT-B/16@512 with 4 register
#          tokens, ViT-L/16@448): the streaming kernel (K resident, V through a ring of 3, 4 or 5 boxes; its key loop
#          overlapped and not) against the Triton forward that served there before it, inference and training
#                                                        -> pytest_gluon.log, h200_gluon_stream.json, gluon_stream.log
#   hostprof benchmarks/host_profile.py --sections paths,breakdown: host µs per cached call by path, a cProfile of
#          cached training steps at the tiny shape, the call's pieces                   -> h200_host_profile.txt
#   hostthread benchmarks/host_profile.py --sections thread,breakdown: a fwd+bwd's host time in parts (forward, the
#          engine's hand-over, the backward's Python, the hand-back) on the engine's thread and the calling thread
#                                                                                 -> h200_host_thread.txt
#   atomics benchmarks/atomic_bw.py: fp32 atomic adds of dQ partials at ViT-B/16@512 + 4 registers, against plain stores
#          (does a dK/dV kernel that also accumulates dQ pay at D = 64?)                  -> h200_atomic_bw.txt
#   hostfloor benchmarks/host_profile.py --sections breakdown,floor: the cached call's host µs piece by piece, then the
#          autograd floor of a C++ node against the Python Function's, and of a C++ node running the planned
#          kernels through the driver (DriverNode; builds host_floor_ext.cpp, about a minute)  -> h200_host_floor.txt
#   replay the C++ replay's GPU tests (tests/backends/triton_fa_rope/test_replay.py, packed calls among them; the
#          extension's and the driver launches'), then the host section twice in separate processes, interleaved,
#          with ATTNHUB_TRITON_REPLAY=0
#          and 1, and a summary (fwd+bwd host µs against F.sdpa's)
#                                                     -> pytest_replay.log, h200_host_replay{0,1}_r{1,2}.json
#   swaptail the Gluon backward's GPU tests with a head's last resident block swapped (bwd_swap_tail), then
#          benchmarks/gluon_bwd.py at N = 577 and 1029, the kernels without it against the table's (with it)
#                                      -> pytest_swapped.log, h200_gluon_bwd_swapped.json, gluon_bwd_swapped.log
#   swape2e ViT-B/16@384 (N = 577) compiled train step, B = 64, against timm compiled: the table without
#          bwd_swap_tail (bench_e2e --triton-configs), then the table           -> e2e_vit_b384_{unswapped,table}.json, .log
#   e2e384r ViT-B/16@384 (N = 577) compiled train step, B = 64: timm and attnhub alive together, timed in 6 alternating
#          rounds (bench_e2e --rounds)                                      -> e2e_vit_b384_rounds.json, .log
#   rotatee2e the same step through benchmarks/e2e_ab.py: the table against the rotation pass first at every length
#          (gluon_prerotate_train_from_n = 0; the table starts at 641), interleaved -> e2e_ab_vit_b384_rotate.json, .log
#   storeab benchmarks/gluon_long.py at 577 and 1029 tokens with three attending groups, the training forms beside
#          themselves with the rotated q and k stores clipped by TMA (--clipped-stores: the price of those writes)
#                                               -> h200_gluon_store_ablation.json, gluon_store_ablation.log
#   ws     the warp-specialized resident kernel's GPU tests, then benchmarks/gluon_long.py at the three 197-token
#          shapes: the resident kernel as shipped and warp-specialized (`resident_warp_specialized`), inference with
#          and without RoPE, training             -> pytest_ws.log, h200_gluon_resident_ws.json, gluon_resident_ws.log
#   rotatefirst the GPU tests of the training forward after the rotation pass (gluon_prerotate_train_from_n), then
#          benchmarks/gluon_bwd.py at N = 577, 785 and 1029, fwd+bwd with it everywhere against the Gluon forwards'
#          own training form, in two processes
#                             -> pytest_rotate_first.log, h200_gluon_bwd_rotate_first_r{1,2}.json, its logs
#   rotatetests the suites the rotation pass first touches, on CUDA: the Gluon forwards', the replay's, the launch
#          paths', the packed calls'                                               -> pytest_rotate_tests.log
#   gluontrain the Gluon forwards' GPU tests, then benchmarks/gluon_train.py (training through the Gluon forwards
#          against the Triton training forward)              -> pytest_gluon.log, h200_gluon_train.json, gluon_train.log
#   gluonbwd the Gluon dK/dV kernel's GPU tests, then benchmarks/gluon_bwd.py (against Triton's dK/dV kernel)
#                                                      -> pytest_gluon_bwd.log, h200_gluon_bwd.json, gluon_bwd.log
#   gluon  the Gluon forwards' GPU tests, then the kernel table's cells, fwd and fwd+bwd (automatic, each attnhub
#          backend forced, cuDNN, timm compiled), with their winners merged into a copy of measured.yaml
#                                                                 -> pytest_gluon.log, h200_table.json, measured.yaml
set -uo pipefail
OUT=${OUT:-out}
GLUON_BWD_ARGS=${GLUON_BWD_ARGS:-}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# the kernels the table picks from a shape's first call on (benchkit's timers also wait for background compiles;
# the scripts timing with do_bench directly do not): `first` measures both
export ATTNHUB_TRITON_BACKGROUND_COMPILE=${ATTNHUB_TRITON_BACKGROUND_COMPILE:-0}
cd "$(dirname "$0")/.."
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(env tests)

# nothing can be fetched there: build with the machine's own setuptools (>= 77 for the SPDX license field)
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 \
  || { echo "pip install -e . failed (see install.log):"; tail -5 "$OUT/install.log"; exit 3; }
# wheels carried along (`run --carry .whl`), e.g. timm 1.0.31 for NaFlexVit on a machine with an older timm
# (`pip download timm==1.0.31 --no-deps -d .whl` where there is network)
for whl in .whl/*.whl; do
  [ -e "$whl" ] && { python3 -m pip install -q --no-deps "$whl" >>"$OUT/install.log" 2>&1 || echo "could not install $whl"; }
done
# tests in parallel processes when pytest-xdist is there (carry its wheel and execnet's): compiling is CPU-bound.
# Eight on an H200 (141 GB); four on an 80 GB card, where eight ran out of GPU memory at the fp32 launches (spilled
# registers' local memory) near the suite's end, session 15
XDIST=""
GPU_MB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)
python3 -c "import xdist" 2>/dev/null && XDIST="-n $([ "${GPU_MB:-0}" -gt 100000 ] && echo 8 || echo 4)"
status=0
gluon_tests() {  # the Gluon forwards' GPU tests (inference and training; $1: a -k expression, e.g. only the streaming
  # kernel's) -> pytest_gluon.log; a test still running after 60 s dumps its traceback there (an untested kernel
  # waiting forever names itself)
  timeout 240 python3 -m pytest $XDIST -q -rs -p no:cacheprovider -o faulthandler_timeout=60 \
    tests/backends/triton_fa_rope/test_gluon_fwd.py ${1:+-k "$1"} \
    >"$OUT/pytest_gluon.log" 2>&1 || status=1
  tail -3 "$OUT/pytest_gluon.log"
}
for stage in "${stages[@]}"; do
  echo "== $stage ($(date -u +%H:%M:%S))"
  case $stage in
    env)
      python3 -m pip show torch triton timm 2>/dev/null | grep -E "^(Name|Version)"
      nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader ;;
    tests)
      timeout 330 python3 -m pytest $XDIST -m gpu -q -rs -p no:cacheprovider --junitxml="$OUT/pytest_gpu.xml" \
        --ignore=tests/backends/triton_fa_rope/test_gluon_fwd.py >"$OUT/pytest_gpu.log" 2>&1 || status=1
      tail -5 "$OUT/pytest_gpu.log"
      timeout 200 python3 -m pytest $XDIST -q -rs -p no:cacheprovider tests/backends/triton_fa_rope/test_launch.py \
        tests/backends/test_nonfinite.py tests/backends/test_determinism.py >"$OUT/pytest_cuda.log" 2>&1 || status=1
      tail -5 "$OUT/pytest_cuda.log" ;;
    tests2)
      timeout 400 python3 -m pytest $XDIST -q -rs -p no:cacheprovider tests/backends/test_varlen_parity.py \
        tests/backends/triton_fa_rope/test_backward.py tests/backends/test_triton_runtime.py \
        >"$OUT/pytest_cuda2.log" 2>&1 || status=1
      tail -5 "$OUT/pytest_cuda2.log" ;;
    bench)
      cp measured.yaml "$OUT/measured.yaml"
      timeout 540 python3 -m attnhub bench --sections table,host --no-progress --out "$OUT/h200.json" \
        --plot "$OUT/h200.png" --winners "$OUT/measured.yaml" >"$OUT/bench.log" 2>&1 || status=1
      tail -40 "$OUT/bench.log" ;;
    rotate)
      timeout 150 python3 benchmarks/rotate_ab.py --out "$OUT/h200_rotate_ab.json" >"$OUT/rotate_ab.log" 2>&1 || status=1
      grep -v Warn "$OUT/rotate_ab.log" | tail -12 ;;
    steps)
      timeout 400 python3 benchmarks/step_kernels.py --out "$OUT/h200_step_kernels_vit_b384.json" \
        >"$OUT/step_kernels.log" 2>&1 || status=1
      head -12 "$OUT/step_kernels.log" ;;
    mixed)
      timeout 200 python3 benchmarks/bench_e2e.py --models vit_small_patch16_rope_mixed_224 --modes train \
        --no-compile --out "$OUT/e2e_h100_rope_mixed.json" >"$OUT/e2e_rope_mixed.log" 2>&1 || status=1
      tail -15 "$OUT/e2e_rope_mixed.log" ;;
    background)  # the Gluon forwards compiling in the background while the Triton forward serves (its GPU tests)
      gluon_tests "background"
      timeout 120 python3 -m pytest -q -rs -p no:cacheprovider tests/backends/test_triton_runtime.py \
        >"$OUT/pytest_runtime.log" 2>&1 || status=1
      tail -2 "$OUT/pytest_runtime.log" ;;
    host)
      timeout 200 python3 -m attnhub bench --sections host --no-progress --out "$OUT/h200_host.json" \
        >"$OUT/host.log" 2>&1 || status=1
      tail -25 "$OUT/host.log" ;;
    first)  # as users get it (Gluon forwards compiling in the background), then with them compiled in the call
      ATTNHUB_TRITON_BACKGROUND_COMPILE=1 timeout 250 python3 -m attnhub bench --sections first_call --no-progress \
        --impls attnhub:triton_fa_rope,attnhub:triton_rope_sdpa,attnhub:torch_sdpa --out "$OUT/first_call.json" \
        >"$OUT/first_call.log" 2>&1 || status=1
      ATTNHUB_TRITON_BACKGROUND_COMPILE=0 timeout 150 python3 -m attnhub bench --sections first_call --no-progress \
        --impls attnhub:triton_fa_rope --out "$OUT/first_call_foreground.json" >>"$OUT/first_call.log" 2>&1 \
        || status=1
      cat "$OUT/first_call.log" ;;
    sweep)
      # shellcheck disable=SC2086
      timeout 400 python3 benchmarks/sweep.py ${SWEEP_ARGS:---field fwd} --out "$OUT/sweep.json" >"$OUT/sweep.log" \
        2>&1 || status=1
      tail -30 "$OUT/sweep.log" ;;
    bwdsweep)  # the Gluon backward's configs at 577 and 1029 tokens, fwd+bwd by the kernels' GPU time
      for field in gluon_dkdv gluon_dq; do
        timeout 270 python3 benchmarks/sweep.py --field $field --shapes vit_b16_384,vit_b16_512_reg4 --passes fwdbwd \
          --timer gpu --out "$OUT/h200_sweep_$field.json" >"$OUT/sweep_$field.log" 2>&1 || status=1
        tail -12 "$OUT/sweep_$field.log"
      done ;;
    e2e)
      timeout 300 python3 benchmarks/bench_e2e.py --models vit_small_patch16_rope_224 --out "$OUT/e2e_h100_vit_s.json" \
        >"$OUT/e2e_vit_s.log" 2>&1 || status=1
      tail -12 "$OUT/e2e_vit_s.log" ;;
    e2e384)
      timeout 300 python3 benchmarks/bench_e2e.py --models vit_base_patch16_rope_224 --img 384 --batch 64 --modes train \
        --out "$OUT/e2e_vit_b384.json" >"$OUT/e2e_vit_b384.log" 2>&1 || status=1
      tail -6 "$OUT/e2e_vit_b384.log" ;;
    varlen)
      cp measured.yaml "$OUT/measured.yaml"
      timeout 150 python3 benchmarks/bench_varlen.py --out "$OUT/h200_varlen.json" --winners "$OUT/measured.yaml" \
        >"$OUT/bench_varlen.log" 2>&1 || status=1
      grep -v "^  " "$OUT/bench_varlen.log" | tail -16
      timeout 300 python3 benchmarks/bench_e2e.py --models naflexvit_base_patch16_gap --model-kwargs '{"rope_type": "axial"}' \
        --batch 64 --seq-len 576 --modes train --out "$OUT/e2e_naflex.json" >"$OUT/e2e_varlen.log" 2>&1 || status=1
      timeout 300 python3 benchmarks/bench_e2e.py --models vit_base_patch16_rope_224 --img 384 --batch 64 --modes train \
        --model-kwargs '{"attn_type": "rope", "num_kv_heads": 4, "qkv_fused": false}' --out "$OUT/e2e_gqa.json" \
        >>"$OUT/e2e_varlen.log" 2>&1 || status=1
      grep "attnhub vs timm" "$OUT/e2e_varlen.log" ;;
    varlenq)
      for run in shipped first shipped2; do
        set_args=(); [ "$run" = first ] && set_args=(--set prerotate_q_from_n=384)
        timeout 120 python3 benchmarks/bench_varlen.py --cases naflex --impls attnhub:triton_fa_rope "${set_args[@]}" \
          --out "$OUT/h200_varlen_q_$run.json" >>"$OUT/bench_varlen_q.log" 2>&1 || status=1
        echo "$run: $(grep -E '^naflex +attnhub' "$OUT/bench_varlen_q.log" | tail -1)"
      done ;;
    hostwait)
      naflex=(--models naflexvit_base_patch16_gap --model-kwargs '{"rope_type": "axial"}' --batch 64 --seq-len 576
              --modes train --compile-only)
      : >"$OUT/e2e_hostwait.log"
      for run in "" _gc_freeze _expandable; do
        flags=(); envs=()
        [ "$run" = _gc_freeze ] && flags=(--gc-freeze)
        [ "$run" = _expandable ] && envs=(PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True)
        env "${envs[@]}" timeout 200 python3 benchmarks/bench_e2e.py "${naflex[@]}" "${flags[@]}" \
          --out "$OUT/e2e_naflex_hostwait$run.json" >>"$OUT/e2e_hostwait.log" 2>&1 || status=1
      done
      grep "compiled=True\|attnhub vs timm:" "$OUT/e2e_hostwait.log" ;;
    naflex)
      timeout 150 python3 -m pytest -q -rs -p no:cacheprovider tests/integrations/test_timm_naflex.py \
        >"$OUT/pytest_naflex.log" 2>&1 || status=1
      tail -3 "$OUT/pytest_naflex.log"
      timeout 150 python3 benchmarks/sync_check.py --steps 2 >"$OUT/h200_naflex_syncs.txt" 2>&1 || status=1
      grep "synchronizing calls" "$OUT/h200_naflex_syncs.txt"
      naflex=(--models naflexvit_base_patch16_gap --model-kwargs '{"rope_type": "axial"}' --batch 64 --seq-len 576
              --modes train)
      : >"$OUT/e2e_naflex.log"
      timeout 250 python3 benchmarks/bench_e2e.py "${naflex[@]}" --out "$OUT/e2e_h200_naflex.json" \
        >>"$OUT/e2e_naflex.log" 2>&1 || status=1
      timeout 150 python3 benchmarks/bench_e2e.py "${naflex[@]}" --compile-only --out "$OUT/e2e_h200_naflex_repeat.json" \
        >>"$OUT/e2e_naflex.log" 2>&1 || status=1
      grep "attnhub vs timm" "$OUT/e2e_naflex.log" ;;
    graphs)
      timeout 300 python3 benchmarks/bench_e2e.py --models vit_small_patch16_rope_224 --batch 32 --modes train \
        --compile-mode reduce-overhead --out "$OUT/e2e_reduce_overhead.json" >"$OUT/e2e_graphs.log" 2>&1 || status=1
      tail -6 "$OUT/e2e_graphs.log" ;;
    multigpu)
      timeout 400 python3 -m pytest -m multigpu -q -rs -p no:cacheprovider >"$OUT/pytest_multigpu.log" 2>&1 || status=1
      tail -3 "$OUT/pytest_multigpu.log" ;;
    hyp)
      ATTNHUB_HYPOTHESIS_EXAMPLES=60 timeout 200 python3 -m pytest -q -p no:cacheprovider \
        tests/backends/test_randomized_parity.py >"$OUT/hypothesis_cuda.log" 2>&1 || status=1
      tail -5 "$OUT/hypothesis_cuda.log" ;;
    gluon)
      gluon_tests
      cp measured.yaml "$OUT/measured.yaml"
      timeout 300 python3 -m attnhub bench --sections table --no-progress --warmup 20 --rep 80 \
        --impls attnhub,attnhub:triton_fa_rope,attnhub:triton_rope_sdpa,sdpa_cudnn,timm_compiled \
        --out "$OUT/h200_table.json" --winners "$OUT/measured.yaml" >"$OUT/bench_table.log" 2>&1 || status=1
      grep "│ vit" "$OUT/bench_table.log" ;;
    gluonlong)
      gluon_tests
      timeout 300 python3 benchmarks/gluon_long.py --out "$OUT/h200_gluon_long.json" >"$OUT/gluon_long.log" 2>&1 \
        || status=1
      tail -32 "$OUT/gluon_long.log" ;;
    early)
      gluon_tests
      timeout 330 python3 benchmarks/gluon_long.py --groups 0,3 \
        --shapes "vit_b16_384;custom:64,12,401,64,1,20;vit_b16_224" --out "$OUT/h200_gluon_long_early.json" \
        >"$OUT/gluon_long_early.log" 2>&1 || status=1
      tail -80 "$OUT/gluon_long_early.log" ;;
    groupse2e)
      timeout 400 python3 benchmarks/e2e_ab.py --model vit_base_patch16_rope_224 --img 384 --batch 64 \
        --variants '{"one_partition": {"long_attend_groups": 0, "long_early_release": false,
                                       "resident_train_max_n": 383}, "table": {}}' \
        --out "$OUT/h200_e2e_ab_vit_b384_groups.json" >"$OUT/e2e_ab_groups.log" 2>&1 || status=1
      grep -E "step .* GPU" "$OUT/e2e_ab_groups.log" ;;
    stream)  # the tests whose ids name the streaming kernel, its loop or its lengths (559 on the H100, 48 s), so
      # the benchmark keeps its time in the call; the `gluon` stage runs them all
      gluon_tests "streaming or overlapped or 641 or 705 or 785 or 1029 or 1152"
      timeout 330 python3 benchmarks/gluon_long.py --shapes "vit_b16_512_reg4;custom:32,16,785,64,1,28" \
        --v-slots 3,4,5 --overlap --out "$OUT/h200_gluon_stream.json" >"$OUT/gluon_stream.log" 2>&1 || status=1
      tail -14 "$OUT/gluon_stream.log" ;;
    hostprof)
      timeout 240 python3 benchmarks/host_profile.py --sections paths,breakdown >"$OUT/h200_host_profile.txt" 2>&1 \
        || status=1
      tail -12 "$OUT/h200_host_profile.txt" ;;
    hostthread)
      timeout 200 python3 benchmarks/host_profile.py --sections thread,breakdown >"$OUT/h200_host_thread.txt" 2>&1 \
        || status=1
      cat "$OUT/h200_host_thread.txt" | grep -v "^ " | tail -60 ;;
    atomics)
      timeout 120 python3 benchmarks/atomic_bw.py >"$OUT/h200_atomic_bw.txt" 2>&1 || status=1
      cat "$OUT/h200_atomic_bw.txt" ;;
    hostfloor)
      timeout 300 python3 benchmarks/host_profile.py --sections breakdown,floor >"$OUT/h200_host_floor.txt" 2>&1 \
        || status=1
      tail -12 "$OUT/h200_host_floor.txt" ;;
    replay)
      timeout 240 python3 -m pytest $XDIST -q -rs -p no:cacheprovider tests/backends/triton_fa_rope/test_replay.py \
        tests/backends/test_replay.py tests/backends/test_driver_launch.py >"$OUT/pytest_replay.log" 2>&1 || status=1
      tail -5 "$OUT/pytest_replay.log"
      for round in 1 2; do
        for on in 0 1; do
          ATTNHUB_TRITON_REPLAY=$on timeout 120 python3 -m attnhub bench --sections host --no-progress \
            --out "$OUT/h200_host_replay${on}_r$round.json" >/dev/null 2>&1 || status=1
        done
      done
      python3 - "$OUT" <<'PY' || status=1
import json, pathlib, sys
for path in sorted(pathlib.Path(sys.argv[1]).glob("h200_host_replay*_r*.json")):
    us = json.loads(path.read_text())["host"]["us"]
    mine, sdpa = us["attnhub:triton_fa_rope"]["fwdbwd"], us["sdpa"]["fwdbwd"]
    print(f"{path.stem}: fwd+bwd {mine:.1f} us, F.sdpa {sdpa:.1f} us, {mine / sdpa:.2f}x")
PY
      ;;
    swaptail)
      timeout 150 python3 -m pytest $XDIST -q -rs -p no:cacheprovider tests/backends/triton_fa_rope/test_gluon_bwd.py \
        -k "table or swapped or reach" >"$OUT/pytest_swapped.log" 2>&1 || status=1
      tail -3 "$OUT/pytest_swapped.log"
      timeout 270 python3 benchmarks/gluon_bwd.py --shapes "vit_b16_384;vit_b16_512_reg4" \
        --variants "gluon dkdv+dq unswapped,gluon dkdv+dq" --out "$OUT/h200_gluon_bwd_swapped.json" \
        >"$OUT/gluon_bwd_swapped.log" 2>&1 || status=1
      tail -8 "$OUT/gluon_bwd_swapped.log" ;;
    swape2e)
      declare -A swape2e_configs=([unswapped]='{"bwd_swap_tail": false}' [table]='{}')
      for variant in unswapped table; do
        timeout 200 python3 benchmarks/bench_e2e.py --models vit_base_patch16_rope_224 --img 384 --batch 64 \
          --modes train --compile-only --triton-configs "${swape2e_configs[$variant]}" \
          --out "$OUT/e2e_vit_b384_$variant.json" >"$OUT/e2e_vit_b384_$variant.log" 2>&1 || status=1
        echo "$variant:"; tail -4 "$OUT/e2e_vit_b384_$variant.log"
      done ;;
    e2e384r)
      timeout 360 python3 benchmarks/bench_e2e.py --models vit_base_patch16_rope_224 --img 384 --batch 64 \
        --modes train --compile-only --rounds 6 --rep 1000 --out "$OUT/e2e_vit_b384_rounds.json" \
        >"$OUT/e2e_vit_b384_rounds.log" 2>&1 || status=1
      tail -4 "$OUT/e2e_vit_b384_rounds.log" ;;
    rotatee2e)
      timeout 300 python3 benchmarks/e2e_ab.py --model vit_base_patch16_rope_224 --img 384 --batch 64 \
        --variants '{"table": {}, "rotate_first": {"gluon_prerotate_train_from_n": 0}}' \
        --out "$OUT/e2e_ab_vit_b384_rotate.json" >"$OUT/e2e_ab_vit_b384_rotate.log" 2>&1 || status=1
      grep -E "^(table|rotate_first) " "$OUT/e2e_ab_vit_b384_rotate.log" ;;
    storeab)
      timeout 300 python3 benchmarks/gluon_long.py --shapes "vit_b16_384;vit_b16_512_reg4" --groups 3 \
        --clipped-stores --out "$OUT/h200_gluon_store_ablation.json" >"$OUT/gluon_store_ablation.log" 2>&1 || status=1
      grep -E "training" "$OUT/gluon_store_ablation.log" | tail -8 ;;
    ws)
      gluon_tests "warp_specialized"
      mv "$OUT/pytest_gluon.log" "$OUT/pytest_ws.log"
      timeout 300 python3 benchmarks/gluon_long.py --shapes "vit_s16_224;vit_b16_224;vit_l16_224" --groups "" \
        --out "$OUT/h200_gluon_resident_ws.json" >"$OUT/gluon_resident_ws.log" 2>&1 || status=1
      grep -E "resident|cudnn|timm" "$OUT/gluon_resident_ws.log" | grep -v "^ " | tail -21 ;;
    rotatefirst)
      gluon_tests "rotation_pass"
      mv "$OUT/pytest_gluon.log" "$OUT/pytest_rotate_first.log"
      timeout 100 python3 -m pytest -q -p no:cacheprovider tests/backends/triton_fa_rope/test_launch.py \
        -k "gluon_forward" >>"$OUT/pytest_rotate_first.log" 2>&1 || status=1
      tail -1 "$OUT/pytest_rotate_first.log"
      for run in 1 2; do
        timeout 200 python3 benchmarks/gluon_bwd.py --shapes "vit_b16_384;vit_b16_512_reg4;custom:32,16,785,64,1,28" \
          --variants "gluon dkdv+dq own training form,gluon dkdv+dq rotate first" \
          --out "$OUT/h200_gluon_bwd_rotate_first_r$run.json" \
          >"$OUT/gluon_bwd_rotate_first_r$run.log" 2>&1 || status=1
        tail -12 "$OUT/gluon_bwd_rotate_first_r$run.log"
      done ;;
    rotatetests)
      timeout 420 python3 -m pytest $XDIST -q -rs -p no:cacheprovider -o faulthandler_timeout=60 \
        tests/backends/triton_fa_rope/test_gluon_fwd.py tests/backends/triton_fa_rope/test_replay.py \
        tests/backends/triton_fa_rope/test_launch.py tests/backends/triton_fa_rope/test_packed.py \
        >"$OUT/pytest_rotate_tests.log" 2>&1 || status=1
      tail -4 "$OUT/pytest_rotate_tests.log" ;;
    gluontrain)
      gluon_tests
      timeout 300 python3 benchmarks/gluon_train.py --out "$OUT/h200_gluon_train.json" >"$OUT/gluon_train.log" 2>&1 \
        || status=1
      tail -24 "$OUT/gluon_train.log" ;;
    gluonbwd)
      timeout 240 python3 -m pytest $XDIST -q -rs -p no:cacheprovider tests/backends/triton_fa_rope/test_gluon_bwd.py \
        >"$OUT/pytest_gluon_bwd.log" 2>&1 || status=1
      tail -3 "$OUT/pytest_gluon_bwd.log"
      timeout 300 python3 benchmarks/gluon_bwd.py $GLUON_BWD_ARGS --out "$OUT/h200_gluon_bwd.json" \
        >"$OUT/gluon_bwd.log" 2>&1 || status=1
      tail -32 "$OUT/gluon_bwd.log" ;;
    *) echo "unknown stage $stage: the stages are listed at the top of this script"; status=2 ;;
  esac
done
exit $status
