"""Every triton_fa_rope kernel the launcher would run on an H100 compiles for sm_90, without a GPU.

CI has no GPU and the interpreter compiles nothing, so without this a kernel that the GPU compiler rejects (a type
mismatch between branches, a shape tl.dot refuses, a config that needs more shared memory than a Hopper block
has) or a launcher that passes the wrong arguments would first fail on a user's GPU. `sm90.py --matrix` (next to
this file) records the launches of real inference forwards, training forwards and backwards (CPU tensors, the
Hopper config table, launches recorded rather than run) over head dims, dtypes, layouts, per-head tables, cross
attention, the variable-resolution switches (key padding mask, grouped k/v heads, per-sample tables) and the
forward variants, and compiles each with `triton.compile` for sm_90: the exact arguments,
constexprs and launch options a GPU call would use. It runs in a subprocess without TRITON_INTERPRET (which this
test session sets on CPU and which turns every kernel into an interpreted function). Speed is not checked here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.helpers import resident_kernel

triton = pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[3]
RESIDENT = resident_kernel()  # the resident Gluon forward Hopper's table runs
_MATRIX: dict = {}  # the running compile processes (`start_matrix`): folder, [(process, stdout file, stderr file)]


def _why_not() -> str | None:
    """Why this triton cannot compile for sm_90 here (None: it can)."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as exc:  # older triton: no offline compile API
        return f"triton {triton.__version__} has no offline compile API: {exc}"
    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        return "this triton ships no ptxas"
    return None


def start_matrix(alone: bool = True) -> None:
    """Start the matrix's compile processes (`sm90.py --matrix`, a shard per core, each with its own Triton cache and
    output files), once. tests/conftest.py starts them when collection selects the test below, so that their
    minutes of compiling overlap the other tests' (not `alone`: a core left to those)."""
    if _MATRIX or _why_not():
        return
    folder = tempfile.mkdtemp(prefix="attnhub-sm90-")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["ATTNHUB_CACHE_DIR"] = os.path.join(folder, "attnhub-cache")  # started before any test's own (conftest)
    shards = max(1, min(4, (os.cpu_count() or 1) - (0 if alone else 1)))  # the compiles take minutes
    procs = []
    for i in range(shards):
        out, err = (open(os.path.join(folder, f"shard{i}.{ext}"), "w+") for ext in ("json", "log"))
        procs.append((subprocess.Popen([sys.executable, "-m", "tests.backends.triton_fa_rope.sm90", "--matrix",
                                        "--shard", f"{i}/{shards}"], stdout=out, stderr=err, text=True, cwd=ROOT,
                                       env={**env, "TRITON_CACHE_DIR": os.path.join(folder, f"cache{i}")}), out, err))
    _MATRIX.update(folder=folder, procs=procs)


def stop_matrix() -> None:
    """Stop processes still running (a session that ended before the test) and remove their folder."""
    for proc, out, err in _MATRIX.pop("procs", ()):
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        out.close()
        err.close()
    shutil.rmtree(_MATRIX.pop("folder", ""), ignore_errors=True)


def test_every_launch_compiles_for_sm90():
    why = _why_not()
    if why:
        pytest.skip(why)
    start_matrix()  # started at collection, unless this session did not (an xdist worker)
    results = []
    try:
        for proc, out, err in _MATRIX["procs"]:
            proc.wait(timeout=900)
            out.seek(0)
            err.seek(0)
            assert proc.returncode in (0, 1), err.read()[-3000:]
            results.append(json.load(out))
    finally:
        stop_matrix()
    failures = [f for r in results for f in r["failures"]]
    assert not failures, "\n".join(failures)
    result = dict(rows=[row for r in results for row in r["rows"]])
    compiled = {(r["case"], r["variant"], r["kernel"]) for r in result["rows"]}
    # the matrix really ran: every path's kernels were compiled
    assert ("d64_bf16_interleaved", "default", "bwd_dq_kernel") in compiled
    assert ("d64_bf16_interleaved", "fused_backward", "bwd_fused_kernel") in compiled
    assert ("d64_bf16_interleaved", "prerotate_narrow_tail", "rotate_kernel") in compiled
    assert ("d256_bf16_interleaved", "default", "fwd_kernel") in compiled
    # inference at N = 197, D = 64: the Gluon forward, shared and per-head tables, bf16 and fp16
    for case in ("d64_bf16_interleaved", "d64_bf16_perhead", "d64_fp16_interleaved"):
        assert (case, "default", RESIDENT) in compiled
    # and its form without the rotating warpgroup (shared and per-head tables)
    for case in ("d64_bf16_interleaved_n197", "d64_bf16_perhead_n100"):
        assert (case, "gluon_resident_plain", "resident_fwd_kernel") in compiled
    # longer inference with the Gluon forward enabled up to 640 tokens: its long kernel (N = 577, 401, 641 -> 640
    # is the Triton forward's)
    for case in ("d64_bf16_interleaved_n577", "d64_bf16_perhead_n401"):
        assert (case, "long_gluon", "long_fwd_kernel") in compiled
    assert ("d64_fp16_interleaved_n641", "long_gluon", "fwd_kernel") in compiled
    # training forwards through them (writing the rotated q and k), both kernels, then the backward
    for case, kernel, dq in (("d64_bf16_perhead_n197", RESIDENT, "bwd_dq_kernel"),
                             ("d64_bf16_interleaved_n577", "long_fwd_kernel", "gluon_dq_kernel")):
        assert {(case, "gluon_train", name) for name in (kernel, dq)} <= compiled
        assert (case, "gluon_train", "fwd_kernel") not in compiled
    # the long kernel with one attending partition of two warpgroups, its K/V boxes released box by box or as a
    # whole (the table's three groups with early release: long_gluon, gluon_train), inference and training
    for case in ("d64_bf16_interleaved_n577", "d64_bf16_perhead_n401"):
        assert {(case, variant, "long_fwd_kernel") for variant in ("gluon_early_release", "gluon_0_groups")} <= compiled
    # three attending groups with the swapped last slice (long_swap_tail)
    for case, variant in (("d64_bf16_interleaved_n577", "gluon_3_groups_early_tail"),
                          ("d64_bf16_interleaved_n197", "gluon_3_groups_early_tail")):
        assert (case, variant, "long_fwd_kernel") in compiled
    # the long kernel below 257 tokens (gluon_long_from_n): two query slices with early release, and one
    for case in ("d64_bf16_interleaved_n197", "d64_fp16_interleaved_n128"):
        assert (case, "gluon_long_from_128", "long_fwd_kernel") in compiled
        assert (case, "gluon_long_from_128", RESIDENT) not in compiled
    # the Gluon backward from gluon_bwd_from_n on (shared and per-head tables, bf16 and fp16; last blocks narrow
    # and whole), Triton's below it
    for case in ("d64_bf16_interleaved_n577", "d64_bf16_perhead_n401", "d64_fp16_interleaved_n641"):
        for variant in ("long_gluon", "gluon_bwd_whole_tail"):
            assert {(case, variant, name) for name in ("gluon_dkdv_kernel", "gluon_dq_kernel")} <= compiled
            assert (case, variant, "bwd_dkdv_kernel") not in compiled
        # delta in the dQ kernel (the table's) and from the delta pass
        assert (case, "long_gluon", "bwd_preprocess") not in compiled
        assert (case, "gluon_bwd_whole_tail", "bwd_preprocess") in compiled
    # a head's last resident block as written (the table swaps it at N = 577 and 641: bwd_swap_tail), with delta in
    # dQ and the delta pass
    for case in ("d64_bf16_interleaved_n577", "d64_fp16_interleaved_n641"):
        for variant in ("gluon_bwd_unswapped", "gluon_bwd_unswapped_delta_pass"):
            assert {(case, variant, name) for name in ("gluon_dkdv_kernel", "gluon_dq_kernel")} <= compiled
    # past 640 tokens the streaming kernel (K resident, V through a ring), inference and training (each case two
    # launches of it), then the Gluon backward; ViT-B/16@512 with 4 register tokens, ViT-L/16@448, 1152 tokens
    stream_cases = ("d64_bf16_interleaved_n1029", "d64_bf16_perhead_n785", "d64_fp16_interleaved_n1152")
    for case in stream_cases:
        assert {(case, "stream_gluon", name) for name in ("stream_fwd_kernel", "gluon_dq_kernel")} <= compiled
        assert (case, "stream_gluon", "fwd_kernel") not in compiled
    streams = [r for r in result["rows"] if r["kernel"] == "stream_fwd_kernel" and r["variant"] == "stream_gluon"]
    assert len(streams) == 2 * len(stream_cases)
    # the overlapped key loop (stream_overlap) at each case: an MMA left in flight where the plain loop has none
    overlapped = [r for r in result["rows"] if r["kernel"] == "stream_fwd_kernel"
                  and r["variant"] == "stream_gluon_overlap"]
    assert {r["case"] for r in overlapped} == set(stream_cases) and len(overlapped) == 2 * len(stream_cases)
    assert all(r["wait_group_1"] > 0 for r in overlapped) and not any(r["wait_group_1"] for r in streams)
    # every ring depth the table takes (2 without RoPE at 1029, 3 with a per-head table at 785, 5 at 1029)
    for case, slots in (("d64_bf16_norope_n1029", 2), ("d64_bf16_perhead_n785", 3), ("d64_bf16_interleaved_n1029", 5)):
        assert (case, f"stream_gluon_{slots}_slots", "stream_fwd_kernel") in compiled
    # the table's training past 640 tokens: the rotation pass, then the kernel's form without stores of its own
    rotated_first = [r for r in result["rows"] if r["variant"] == "stream_gluon_rotate_first"]
    assert [r["kernel"] for r in rotated_first][:3] == ["stream_fwd_kernel", "rotate_kernel", "stream_fwd_kernel"]
    own = [r for r in result["rows"] if r["case"] == "d64_bf16_interleaved_n1029"  # the same kernel in its own
           and r["variant"] == "stream_gluon_overlap" and r["kernel"] == "stream_fwd_kernel"][1]  # training form
    assert rotated_first[2]["store_wait"] < own["store_wait"]
    for case in ("d64_bf16_mask", "d64_bf16_gqa", "d64_bf16_per_sample", "d80_fp16_mask_gqa",  # KEY_MASK, GROUP,
                 "d128_fp32_mask_norope"):                                                   # BATCHED_TABLE
        assert {(case, "default", kernel) for kernel in ("fwd_kernel", "bwd_dkdv_kernel", "bwd_dq_kernel")} <= compiled
    # all three together through every forward variant; a fused request runs the split kernels
    assert ("d64_bf16_mask_gqa_per_sample", "prerotate_narrow_tail", "rotate_kernel") in compiled
    assert ("d64_bf16_mask_gqa_per_sample", "fused_backward", "bwd_dkdv_kernel") in compiled
    assert ("d64_bf16_mask_gqa_per_sample", "fused_backward", "bwd_fused_kernel") not in compiled
    for case in ("d64_bf16_interleaved", "d64_bf16_per_sample_gqa", "d80_fp16_interleaved",  # triton_rope_sdpa
                 "d64_bf16_coords_gqa"):
        assert (f"rope_sdpa_{case}", "rotate", "_rotate_kernel") in compiled
    assert len(compiled) >= 30


def _run_offline(code: str, paths: list, tmp_path):
    """Run `code` (with json, sys and sm90 imported; sys.argv[1:] = paths) in a Python without TRITON_INTERPRET (the
    kernels must compile) -> the JSON its last line prints."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    proc = subprocess.run([sys.executable, "-c", "import json, sys; from tests.backends.triton_fa_rope import sm90; "
                           + code, *map(str, paths)], capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def _kernel_file_and_change(name: str, old: str, new: str) -> tuple[str, str]:
    """The text of backends/triton_fa_rope/<name>, and the same with `old` replaced by `new` (which must occur)."""
    source = (ROOT / "backends" / "triton_fa_rope" / name).read_text()
    changed = source.replace(old, new)
    assert changed != source, f"{old!r} is not in {name}"
    return source, changed


def test_same_ttir_tells_a_changed_kernel_from_a_copy(tmp_path):
    """`sm90.same_ttir` (a refactor checked without a GPU): a copy of kernels.py compiles to the same TTIR as the
    checkout's, a copy whose table lookup pads with another value does not."""
    pytest.importorskip("triton.compiler", reason="no offline compile API")
    source, changed = _kernel_file_and_change("kernels.py", "mask=mask, other=1.0).to(tl.float32)",
                                              "mask=mask, other=0.5).to(tl.float32)")
    (tmp_path / "copy.py").write_text(source)
    (tmp_path / "changed.py").write_text(changed)
    code = ("m = [('d64_bf16_interleaved', 'in_kernel_full_tail')]; "
            "print(json.dumps([sm90.same_ttir(p, m) for p in sys.argv[1:]]))")
    copy, changed_report = _run_offline(code, [tmp_path / "copy.py", tmp_path / "changed.py"], tmp_path)
    assert copy["compared"] > 0 and copy["differ"] == [], copy
    assert changed_report["differ"], changed_report  # the in-kernel forward and the backward read the table


def test_same_ir_tells_a_changed_gluon_kernel_from_a_copy(tmp_path):
    """`sm90.same_ir` compares Gluon kernels too (TTGIR): a copy of gluon_long_kernels.py compiles to the same IR as the
    checkout's long forward (three attending groups, as the table has it), a copy whose producer gets other
    registers does not, and a launch with a switch the other file's kernel lacks, turned on, is new rather than
    compared."""
    pytest.importorskip("triton.experimental.gluon._runtime", reason="no offline Gluon compile")
    source, changed = _kernel_file_and_change("gluon_long_kernels.py", "_WS_3_PRODUCER_REGS = gl.constexpr(144)",
                                              "_WS_3_PRODUCER_REGS = gl.constexpr(136)")
    for name, text in (("copy", source), ("changed", changed)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "gluon_long_kernels.py").write_text(text)
    code = ("q, k, v, rope, _ = sm90.case_inputs(*sm90.CASES['d64_bf16_interleaved'], grid=(24, 24)); "
            "ls = sm90.training_step_launches(q, k, v, rope, resident_fwd_max_n=640)[:1]; "
            "on = [ls[0]._replace(constexprs={**ls[0].constexprs, 'LATER_SWITCH': True})]; "
            "print(json.dumps([sm90.same_ir(p, [('n577', 'long', ls), ('n577', 'later', on)]) "
            "for p in sys.argv[1:]]))")
    copy, changed_report = _run_offline(code, [tmp_path / "copy", tmp_path / "changed"], tmp_path)
    assert copy == dict(copy, compared=1, differ=[], new=["n577/later long_fwd_kernel"]), copy
    assert changed_report["differ"] == ["n577/long long_fwd_kernel"], changed_report


@pytest.mark.parametrize("config,switch,tokens,slices", [
    ({"long_attend_groups": 0}, ("EARLY_RELEASE", True), 127, 1),
    ({"long_attend_groups": 3, "long_early_release": True}, ("EARLY_RELEASE", False), 128, 3)])
def test_the_long_kernel_refuses_what_its_query_slices_cannot_serve(config, switch, tokens, slices, tmp_path):
    """The long kernel forced from 128 tokens: at N = 128 its one 128-row query slice is the first, which never
    hands the K/V boxes back with early release (the producer would wait for them forever); at N = 129 three
    attending groups (three 64-row slices) release the boxes only box by box, so they need early release. The
    plans and `gluon_fwd.forward` never launch these (test_gluon_fwd.py); the kernel itself refuses to compile
    them, and compiles the launch without the switch."""
    pytest.importorskip("triton.experimental.gluon._runtime", reason="no offline Gluon compile")
    code = ("q, k, v, rope, _ = sm90.case_inputs(*sm90.CASES['d64_bf16_interleaved'], grid=(1, int(sys.argv[3])))\n"
            "config, (name, value) = json.loads(sys.argv[1]), json.loads(sys.argv[2])\n"
            "off = sm90.training_step_launches(q, k, v, rope, resident_fwd_max_n=640, gluon_long_from_n=0, "
            "**config)[0]\n"
            "on = off._replace(constexprs={**off.constexprs, name: value})\n"
            "out = [off.name, off.constexprs['ROT_CHUNKS'], sm90.compile_launch(off, ptxas=False)['shared_bytes']]\n"
            "try:\n    sm90.compile_launch(on, ptxas=False)\n    out.append('compiled')\n"
            "except Exception as exc:\n    out.append(type(exc).__name__)\n"
            "print(json.dumps(out))")
    args = [json.dumps(config), json.dumps(switch), str(tokens)]
    name, n_slices, shared, refused = _run_offline(code, args, tmp_path)
    assert (name, n_slices) == ("long_fwd_kernel", slices) and shared > 0
    assert refused == "CompileTimeAssertionFailure"  # the kernel's static_assert, no other error
