"""The Gluon forwards of triton_fa_rope (`gluon_fwd`: the resident kernel up to 256 tokens, the long one up to 640,
the streaming one up to 1152;
inference, and training up to `resident_train_max_n`): which calls take them, how they split the keys, and on
a Hopper GPU their results (o, lse, the rotated q and k they save, the gradients after them) against `math` in
float64 (Gluon has no interpreter: on CPU only the planning tests run; test_sm90.py compiles its launches for sm_90
offline).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import attnhub
from attnhub import settings
from attnhub.backends import _triton_runtime as runtime
from attnhub.backends.triton_fa_rope import configs, launch
from attnhub.backends.triton_fa_rope.launch import Table
from attnhub.backends.triton_fa_rope.configs import GluonOptions
from attnhub.rope import apply_rope_qk
from tests.helpers import (Shape, assert_close_rel, make_emb, make_qkv, make_table, plan_as_compiled,
                           resident_kernel)

gluon_fwd = launch._gluon("gluon_fwd")
pytestmark = pytest.mark.skipif(gluon_fwd is None, reason="this Triton has no Gluon Hopper API")
ON_HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


def _inputs(N=197, D=64, dtype=torch.bfloat16, H=3, kind="fused"):
    return make_qkv(kind, 2, H, N, D, dtype, torch.Generator().manual_seed(0))


def _table(N, P=1, layout="interleaved", per_head=False, H=3):
    return make_table(Shape(2, H, (1, N - P), P, 64, layout, per_head=per_head), torch.Generator().manual_seed(1))


def _plan(q, k, v, table, save_rotated=False, early_release=False, long_from_n=257, attend_groups=0,
          swap_tail=False, v_slots=4, overlap=False, resident_ws=False):
    cos = None if table is None else gluon_fwd._tables(table, q.dtype)[0]
    return gluon_fwd._plan(q, k, v, table, cos, save_rotated, GluonOptions(
        early_release, long_from_n, attend_groups, swap_tail, v_slots, overlap, resident_ws))


def test_takes_calls_it_covers():
    q, k, v = _inputs()
    for table in (_table(197), _table(197, per_head=True), None):
        assert gluon_fwd.eligible(q, k, v, table, None)
    assert gluon_fwd.eligible(*_inputs(N=1, dtype=torch.float16), None, None)
    assert gluon_fwd.eligible(*_inputs(N=256, kind="contiguous"), _table(256), None)


@pytest.mark.parametrize("why", ["mask", "fp32", "head_dim", "too_long", "grouped", "cross", "half", "per_sample",
                                 "unaligned", "unaligned_base"])
def test_leaves_other_calls_to_the_triton_forward(why):
    q, k, v = _inputs(N=gluon_fwd.STREAM_MAX_N + 1 if why == "too_long" else 197, D=32 if why == "head_dim" else 64,
                      dtype=torch.float32 if why == "fp32" else torch.bfloat16)
    table, mask = _table(q.shape[2]), None
    if why == "mask":
        mask = torch.ones(2, 197, dtype=torch.bool, device=q.device)
    elif why == "grouped":
        k, v = k[:, :1], v[:, :1]
    elif why == "cross":
        k, v, table = k[:, :, :100], v[:, :, :100], None
    elif why == "half":
        table = _table(197, layout="half")
    elif why == "per_sample":
        emb = make_emb(Shape(2, 3, (1, 196), 1, 64, "interleaved"), torch.Generator().manual_seed(2), heads=False)
        table = attnhub.CosSinTable.from_sin_cos(emb.expand(2, 1, -1, -1), prefix_tokens=1, layout="interleaved")
    elif why == "unaligned":  # TMA needs 16-byte aligned strides: 3 tokens of 66 channels are not
        q = torch.randn(2, 197, 3, 66, device=q.device, dtype=q.dtype)[..., :64].transpose(1, 2)
    elif why == "unaligned_base":  # the strides are, the base 2 bytes past a 16-byte boundary is not (per call)
        assert gluon_fwd.eligible(q, k, v, table, mask)
        q = torch.randn(q.numel() + 1, device=q.device, dtype=q.dtype)[1:].view(q.shape)
    assert not gluon_fwd.eligible(q, k, v, table, mask)


@pytest.mark.parametrize("N", [197, 256, 257, 383, 384, 577, 640, 641, 1029, 1152, 1153])
def test_training_takes_it_up_to_resident_train_max_n(N, monkeypatch):
    """Inference up to resident_fwd_max_n, training up to resident_train_max_n (0: never) and no further (as
    compiled code decides it: the interpreter takes none)."""
    plan_as_compiled(monkeypatch)
    hopper = configs.for_arch(9, 64)
    assert (launch._resident_forward(hopper, N, False) is gluon_fwd) == (N <= hopper.resident_fwd_max_n)
    assert (launch._resident_forward(hopper, N, True) is gluon_fwd) == (N <= hopper.resident_train_max_n)
    assert launch._resident_forward(dataclasses.replace(hopper, resident_train_max_n=0), N, True) is None
    everywhere = dataclasses.replace(hopper, resident_train_max_n=10**6)
    assert (launch._resident_forward(everywhere, N, True) is gluon_fwd) == (N <= hopper.resident_fwd_max_n)


def test_a_training_plan_writes_the_rotated_q_and_k():
    """Saving the rotated q and k is part of the signature: its own plan, SAVE_ROT set, descriptors of contiguous
    [B, H, N, D] tensors; without a table nothing is rotated, so the inference plan serves."""
    q, k, v = _inputs(N=577)
    table = _table(577)
    infer, train = _plan(q, k, v, table), _plan(q, k, v, table, save_rotated=True)
    assert train is not infer and train.constexprs["SAVE_ROT"] and not infer.constexprs["SAVE_ROT"]
    assert infer.make_rot is None and train.make_rot is not None
    rot = torch.empty(q.shape, dtype=q.dtype)
    B, H, N, D = q.shape
    assert tuple(train.make_rot[0](rot).strides) == (H * N * D, D, N * D, 1)
    assert _plan(q, k, v, None, save_rotated=True) is _plan(q, k, v, None)


@pytest.mark.parametrize("N", range(1, gluon_fwd.RESIDENT_MAX_N + 1) if gluon_fwd else [])
def test_key_chunks_cover_the_sequence_within_the_block(N):
    c = gluon_fwd.chunking(N)
    covered = c["N_FULL"] * gluon_fwd.BLOCK_N + c["MID_N"] + c["TAIL_N"]
    assert N <= covered <= gluon_fwd.block_rows(N) and covered - N < max(16, gluon_fwd.BLOCK_N // 2)
    assert c["TAIL_N"] == 0 or c["TAIL_N"] >= 16  # wgmma's smallest N
    rotated = c["ROT_ROWS"] * c["ROT_CHUNKS"]
    assert N <= rotated <= gluon_fwd.block_rows(N) and c["ROT_ROWS"] % 32 == 0  # whole tiles of `_rot_layout`


def test_the_warp_specialized_resident_kernel_is_the_config_tables_switch():
    """`resident_warp_specialized` reaches the plans up to 256 tokens (with RoPE and without): the warp-specialized
    kernel, its register cap, the rotating warpgroup's step as ROT_ROWS, and the scale S takes as an argument (1.0
    where q carries it: inference with RoPE); the long kernel's plans are the ones without it."""
    with configs.override(resident_warp_specialized=True):
        options = configs.for_call(torch.device("cpu"), 64).gluon_options
    assert options.resident_ws is True
    for N in (1, 17, 197, 256):
        q, k, v = _inputs(N=N)
        for table in (_table(N) if N > 1 else None, None):
            for save in (False, True):
                cos = None if table is None else gluon_fwd._tables(table, q.dtype)[0]
                plan = gluon_fwd._plan(q, k, v, table, cos, save, options)
                assert plan is not _plan(q, k, v, table, save_rotated=save)
                assert plan.kernel is gluon_fwd.resident_ws_fwd_kernel and plan.num_warps == gluon_fwd.NUM_WARPS
                assert plan.constexprs["maxnreg"] == gluon_fwd.RESIDENT_WS_MAXNREG
                assert plan.constexprs["ROT_ROWS"] == gluon_fwd.WS_ROT_ROWS
                assert plan.s_scale_one is (table is not None and not save)
    assert _plan(*_inputs(N=197), _table(197)).s_scale_one is None
    q, k, v = _inputs(N=577)
    assert gluon_fwd._plan(q, k, v, _table(577), gluon_fwd._tables(_table(577), q.dtype)[0], False,
                           options) is _plan(q, k, v, _table(577))


@pytest.mark.parametrize("value", [1, "yes", None])
def test_a_resident_warp_specialized_that_is_not_a_bool_is_refused_with_the_fields_name(value):
    with pytest.raises(ValueError, match="resident_warp_specialized"):
        dataclasses.replace(configs.for_arch(9, 64), resident_warp_specialized=value)


@pytest.mark.parametrize("N", range(gluon_fwd.RESIDENT_MAX_N + 1, gluon_fwd.MAX_N + 1) if gluon_fwd else [])
def test_long_kernel_chunks_fit_its_boxes(N):
    """long_fwd_kernel holds K and V in boxes of BLOCK_N rows: one per full chunk, and the half-width and masked
    chunks together in one more (`_chunk_kv`); its query slices cover N."""
    c = gluon_fwd.chunking(N, gluon_fwd.SLICE)
    assert c["MID_N"] + c["TAIL_N"] <= gluon_fwd.BLOCK_N
    boxes = c["N_FULL"] + (1 if c["MID_N"] + c["TAIL_N"] else 0)
    assert N <= boxes * gluon_fwd.BLOCK_N and boxes * gluon_fwd.BLOCK_N * 2 * 64 * 2 + 3 * gluon_fwd.SLICE * 64 * 2 \
        <= 212_992  # bf16 K, V, two query slices and the o slice: 208 KiB
    assert N <= c["ROT_CHUNKS"] * gluon_fwd.SLICE < N + gluon_fwd.SLICE
    # attending groups: two 64-row slice buffers per group (up to three), o written through them
    assert boxes * gluon_fwd.BLOCK_N * 2 * 64 * 2 + 3 * 2 * gluon_fwd.GROUP_SLICE * 64 * 2 <= 212_992


@pytest.mark.parametrize("N", range(gluon_fwd.MAX_N + 1, gluon_fwd.STREAM_MAX_N + 1) if gluon_fwd else [])
def test_streaming_kernel_fits_shared_memory_and_its_schedule(N):
    """stream_fwd_kernel holds K in boxes of BLOCK_N rows (the half-width and masked chunks in the last), six 64-row
    query buffers and its V ring within Hopper's 227 KiB (1 KiB left for the barriers): the table's four V boxes
    at every length, five up to 1088 tokens (`stream_v_slots`); its producer loads the next round's slices at V
    box V_SLOTS_ and rotates them one per box after, so a head needs V_SLOTS_ + 4 boxes, and every group needs a
    slice per head."""
    c = gluon_fwd.chunking(N, gluon_fwd.GROUP_SLICE)
    boxes = c["N_FULL"] + (1 if c["MID_N"] + c["TAIL_N"] else 0)
    assert c["MID_N"] + c["TAIL_N"] <= gluon_fwd.BLOCK_N and N <= boxes * gluon_fwd.BLOCK_N
    box = gluon_fwd.BLOCK_N * 64 * 2
    assert gluon_fwd.stream_v_slots(N, configs.for_arch(9, 64).stream_v_slots) == 4
    assert [gluon_fwd.stream_v_slots(N, v) for v in configs.STREAM_V_SLOTS] == [2, 3, 4, 5 if N <= 1088 else 4]
    for v in configs.STREAM_V_SLOTS:
        slots = gluon_fwd.stream_v_slots(N, v)
        assert (boxes + 6 + slots) * box <= 227 * 1024 - 1024 and boxes >= slots + 4
    assert c["ROT_CHUNKS"] >= 3
    assert N <= c["ROT_CHUNKS"] * gluon_fwd.GROUP_SLICE < N + gluon_fwd.GROUP_SLICE


def test_plans_pick_the_kernel_by_length():
    short, long = _plan(*_inputs(N=256), _table(256)), _plan(*_inputs(N=577), _table(577))
    assert short.kernel is gluon_fwd.resident_fwd_kernel and long.kernel is gluon_fwd.long_fwd_kernel
    assert long.constexprs["ROT_ROWS"] == gluon_fwd.SLICE and long.constexprs["ROT_CHUNKS"] == 5
    assert long.constexprs["maxnreg"] == gluon_fwd.WS_MAXNREG and "maxnreg" not in short.constexprs
    assert long.constexprs["EARLY_RELEASE"] is False and "EARLY_RELEASE" not in short.constexprs
    for N in (gluon_fwd.MAX_N + 1, 1029, gluon_fwd.STREAM_MAX_N):  # whatever the options say
        stream = _plan(*_inputs(N=N), _table(N), early_release=True, attend_groups=3, swap_tail=True)
        assert stream.kernel is gluon_fwd.stream_fwd_kernel and stream.num_warps == 4
        assert stream.constexprs["ROT_ROWS"] == gluon_fwd.GROUP_SLICE and stream.constexprs["V_SLOTS_"] == 4
        assert "EARLY_RELEASE" not in stream.constexprs and stream.constexprs["maxnreg"] == gluon_fwd.STREAM_MAXNREG
        deeper = _plan(*_inputs(N=N), _table(N), v_slots=5)  # where five V boxes fit beside K's; else the same plan
        assert deeper.constexprs["V_SLOTS_"] == (5 if N <= 1088 else 4) and (deeper is stream) == (N > 1088)


def test_early_release_is_the_long_kernels_switch_from_the_config_table(monkeypatch):
    """`long_early_release` reaches the long kernel as EARLY_RELEASE, a plan of its own; the resident kernel has no
    such switch; the shipped tables leave it off (as compiled code decides it: the interpreter takes no Gluon
    kernel)."""
    plan_as_compiled(monkeypatch)
    q, k, v = _inputs(N=577)
    table = _table(577)
    early = _plan(q, k, v, table, early_release=True)
    assert early.constexprs["EARLY_RELEASE"] is True and early is not _plan(q, k, v, table)
    short = _inputs(N=197), _table(197)
    assert "EARLY_RELEASE" not in _plan(*short[0], short[1], early_release=True).constexprs
    hopper = configs.for_arch(9, 64)
    assert hopper.long_early_release is True
    for early_release in (False, True):
        with runtime.recording(run=False) as launches:
            launch.forward(q, k, v, table, 0.125, False,
                           dataclasses.replace(hopper, long_early_release=early_release, long_attend_groups=0))
        assert [(x.name, x.constexprs["EARLY_RELEASE"]) for x in launches] == [("long_fwd_kernel", early_release)]
    # the long kernel from 128 tokens: with one query slice there is no last slice to release the boxes in, so the
    # plan leaves it off (the kernel refuses to compile it: test_sm90)
    one, two = (_plan(*_inputs(N=n), _table(n), early_release=True, long_from_n=0) for n in (128, 129))
    assert one.kernel is two.kernel is gluon_fwd.long_fwd_kernel
    assert (one.constexprs["EARLY_RELEASE"], two.constexprs["EARLY_RELEASE"]) == (False, True)


def test_attend_groups_give_the_long_kernel_64_row_slices_in_warpgroups_of_their_own(monkeypatch):
    """`long_attend_groups` = 3 (Hopper's table) reaches the long kernel as ATTEND_GROUPS with 64-row query
    slices, one warpgroup as the default partition (num_warps 4) and the groups' register cap, always with early
    release; 0 launches it with one partition of NUM_WARPS; the resident kernel never takes it; a plan per
    setting."""
    plan_as_compiled(monkeypatch)
    q, k, v = _inputs(N=577)
    table = _table(577)
    one = _plan(q, k, v, table, early_release=True)
    assert one.constexprs["ATTEND_GROUPS"] == 0 and one.num_warps == gluon_fwd.NUM_WARPS
    plan = _plan(q, k, v, table, early_release=True, attend_groups=3)
    assert plan is not one and plan.num_warps == 4 and plan.constexprs["EARLY_RELEASE"] is True
    assert plan.constexprs["ATTEND_GROUPS"] == 3 and plan.constexprs["ROT_ROWS"] == gluon_fwd.GROUP_SLICE
    assert plan.constexprs["ROT_CHUNKS"] == 10 and plan.constexprs["maxnreg"] == gluon_fwd.WS_3_GROUPS_MAXNREG
    hopper = configs.for_arch(9, 64)
    assert (hopper.long_attend_groups, hopper.long_early_release) == (3, True)
    with runtime.recording(run=False) as launches:
        launch.forward(q, k, v, table, 0.125, False, hopper)
    assert [(x.name, x.num_warps, x.constexprs["ATTEND_GROUPS"]) for x in launches] == [("long_fwd_kernel", 4, 3)]
    short = _inputs(N=197), _table(197)
    assert "ATTEND_GROUPS" not in _plan(*short[0], short[1], early_release=True, attend_groups=3).constexprs
    # every group needs a slice of each head: three from 129 tokens (the long kernel from 128: gluon_long_from_n),
    # and each group has a last slice of its own, so early release from two slices on
    at128, at129 = (_plan(*_inputs(N=n), _table(n), early_release=True, long_from_n=0, attend_groups=3)
                    for n in (128, 129))
    assert at128.constexprs["ATTEND_GROUPS"] == 0 and at128.constexprs["EARLY_RELEASE"] is False
    assert at129.constexprs["ATTEND_GROUPS"] == 3 and at129.constexprs["EARLY_RELEASE"] is True
    # the swapped last slice: with groups, where the last 64-row slice holds at most 16 rows
    for n, groups, tail_q in ((577, 3, 16), (592, 3, 16), (593, 3, 0), (576, 3, 0), (577, 0, 0), (401, 3, 0),
                              (257, 3, 16)):
        plan = _plan(*_inputs(N=n), _table(n), early_release=True, attend_groups=groups, swap_tail=True)
        assert plan.constexprs["TAIL_Q"] == tail_q
    assert _plan(q, k, v, table, early_release=True, attend_groups=3).constexprs["TAIL_Q"] == 0


@pytest.mark.parametrize("groups", [1, 2, 4, -1, "3"])
def test_other_attend_groups_are_refused_with_the_fields_name(groups):
    """Two attending groups are not offered: on the H200 they computed wrong results without early release
    (benchmarks/README.md). The table is checked where it is built (under an override: by `for_call`)."""
    with pytest.raises(ValueError, match="long_attend_groups"):
        dataclasses.replace(configs.for_arch(9, 64), long_attend_groups=groups)
    with configs.override(long_attend_groups=groups), pytest.raises(ValueError, match="long_attend_groups"):
        configs.for_call(torch.device("cpu"), 64)


@pytest.mark.parametrize("v_slots", [0, 1, 6, "4"])
def test_other_stream_ring_depths_are_refused_with_the_fields_name(v_slots):
    with pytest.raises(ValueError, match="stream_v_slots"):
        dataclasses.replace(configs.for_arch(9, 64), stream_v_slots=v_slots)


def test_the_ring_depth_reaches_the_plan_from_the_config_table(monkeypatch):
    """`stream_v_slots` travels in `gluon_options` to `gluon_fwd.forward`'s plan."""
    plan_as_compiled(monkeypatch)
    q, k, v = _inputs(N=1029)
    table = _table(1029)
    for v_slots in (3, 5):
        config = dataclasses.replace(configs.for_arch(9, 64), resident_fwd_max_n=1152, stream_v_slots=v_slots)
        assert config.gluon_options.v_slots == v_slots
        with runtime.recording(run=False) as launches:
            launch.forward(q, k, v, table, 0.125, False, config)
        assert [(x.name, x.constexprs["V_SLOTS_"]) for x in launches] == [("stream_fwd_kernel", v_slots)]


def test_the_overlapped_key_loop_reaches_the_streaming_plan_only(monkeypatch):
    """`stream_overlap` travels in `gluon_options` to the streaming kernel's plan (OVERLAP_); shorter calls' plans,
    the resident and long kernels', do not take it."""
    plan_as_compiled(monkeypatch)
    for N, kernel, overlap in ((1029, "stream_fwd_kernel", True), (577, "long_fwd_kernel", None),
                               (197, RESIDENT, None)):
        q, k, v = _inputs(N=N)
        config = dataclasses.replace(configs.for_arch(9, 64), stream_overlap=True)
        with runtime.recording(run=False) as launches:
            launch.forward(q, k, v, _table(N), 0.125, False, config)
        assert [(x.name, x.constexprs.get("OVERLAP_")) for x in launches] == [(kernel, overlap)]


def test_the_overlapped_key_loop_has_a_plan_of_its_own():
    """Two calls alike but for `stream_overlap` get two plans (the switch is part of the plan's key)."""
    q, k, v = _inputs(N=1029)
    table = _table(1029)
    plain, overlapped = (_plan(q, k, v, table, overlap=overlap) for overlap in (False, True))
    assert plain is not overlapped
    assert (plain.constexprs["OVERLAP_"], overlapped.constexprs["OVERLAP_"]) == (False, True)
    assert _plan(q, k, v, table, overlap=True) is overlapped


@pytest.mark.parametrize("overlap", [1, "yes", None])
def test_a_stream_overlap_that_is_not_a_bool_is_refused_with_the_fields_name(overlap):
    with pytest.raises(ValueError, match="stream_overlap"):
        dataclasses.replace(configs.for_arch(9, 64), stream_overlap=overlap)


def test_training_past_the_long_kernel_rotates_first_by_the_table(monkeypatch):
    """Hopper's table (`gluon_prerotate_train_from_n`): a training call past 640 tokens launches the rotation pass
    (q and k, one launch), then the streaming kernel without RoPE and saving nothing; up to 640 the long kernel's
    training form rotates and saves; inference never rotates first."""
    plan_as_compiled(monkeypatch)
    hopper = configs.for_arch(9, 64)
    assert hopper.gluon_prerotate_train_from_n == gluon_fwd.MAX_N + 1
    for N, save, expected in ((1029, True, [("rotate_kernel", None, True), ("stream_fwd_kernel", False, False)]),
                              (641, True, [("rotate_kernel", None, True), ("stream_fwd_kernel", False, False)]),
                              (640, True, [("long_fwd_kernel", True, True)]),
                              (1029, False, [("stream_fwd_kernel", True, False)])):
        q, k, v = _inputs(N=N)
        with runtime.recording(run=False) as launches:
            launch.forward(q, k, v, _table(N), 0.125, save, hopper)
        got = [(x.name, x.constexprs.get("ROPE"), x.constexprs.get("SAVE_ROT", x.constexprs.get("TWO")))
               for x in launches]
        assert got == expected, (N, save)


def test_attend_groups_without_early_release_are_refused_with_both_fields():
    with pytest.raises(ValueError, match="long_attend_groups=3 needs long_early_release=True"):
        dataclasses.replace(configs.for_arch(9, 64), long_early_release=False)


@pytest.mark.parametrize("long_from_n", [0, 128, 197, 257, 10**6])
def test_gluon_long_from_n_moves_the_boundary_between_the_two_kernels(long_from_n, monkeypatch):
    """The resident kernel below `gluon_long_from_n`, the long one from it on, but never below 128 tokens (its slice
    loop needs two key chunks) nor the resident one past 256 (K, V and Q of a head in shared memory twice); a plan
    per kernel."""
    plan_as_compiled(monkeypatch)
    config = dataclasses.replace(configs.for_arch(9, 64), gluon_long_from_n=long_from_n)
    for n in (100, 127, 128, 196, 197, 256, 257, 577):
        q, k, v = _inputs(N=n)
        with runtime.recording(run=False) as launches:
            launch.forward(q, k, v, _table(n), 0.125, False, config)
        long = n > 256 or n >= max(long_from_n, 128)
        assert [x.name for x in launches] == ["long_fwd_kernel" if long else RESIDENT], n
    q, k, v = _inputs(N=197)
    assert _plan(q, k, v, None, long_from_n=0) is not _plan(q, k, v, None)


def _descriptor(x, block=256, example=None):
    """x: [B, H, N, D] -> its descriptor as `gluon_fwd` builds it: a copy of the checked one of `example` (default
    x itself) with x as base."""
    B, H, N, D = x.shape
    s = x.stride()
    make = runtime.descriptor_maker(gluon_fwd.TensorDescriptor, x if example is None else example, [B, N, H, D],
                                    [s[0], s[2], s[1], s[3]], [1, block, 1, D], gluon_fwd._smem_layout(block, x.dtype))
    return make(x)


def test_descriptor_copies_equal_what_the_checked_constructor_builds():
    first, second, _ = _inputs(N=100, H=5)
    fast = _descriptor(second, example=first)
    B, H, N, D = second.shape
    t = second.transpose(1, 2)
    checked = gluon_fwd.TensorDescriptor(t, [B, N, H, D], list(t.stride()), [1, 256, 1, D],
                                         gluon_fwd._smem_layout(256, second.dtype))
    assert fast.base is second and fast.base.data_ptr() == checked.base.data_ptr()
    assert {k: v for k, v in vars(fast).items() if k != "base"} == {k: v for k, v in vars(checked).items()
                                                                       if k != "base"}


def test_kept_runners_key_descriptors_by_what_triton_specializes():
    """dtype, block shape and layout; not the base, shape or strides (they go to the launcher every call)."""
    key = runtime._other_key
    a, b = _inputs(N=197)[0], _inputs(N=100, H=5, kind="contiguous")[0]
    assert key(_descriptor(a)) == key(_descriptor(b))
    assert key(_descriptor(a)) != key(_descriptor(a, block=128))
    assert key(_descriptor(a)) != key(_descriptor(_inputs(dtype=torch.float16)[0]))
    assert key(1.0) != key(True) and key(0.5) == key(0.5)


def test_one_plan_per_call_signature():
    """A plan (descriptor makers, grid, int arguments; the kept runner's key) is shared by calls of one signature
    only: new tensors of the same shapes and strides reuse it; strides, shapes, dtype or table set their own."""
    q, k, v = _inputs()
    table = _table(197)
    plan = _plan(q, k, v, table)
    assert plan is not None and _plan(*_inputs(), _table(197)) is plan
    others = [_plan(*_inputs(kind="contiguous"), table), _plan(*_inputs(H=4), _table(197, H=4)),
              _plan(*_inputs(dtype=torch.float16), table), _plan(q, k, v, None),
              _plan(q, k, v, _table(197, per_head=True))]
    assert all(p is not None and p is not plan for p in others) and len({id(p) for p in others}) == len(others)
    assert plan.ints == (0, table.cos.stride(-2), 3, 197, 1, 2 * 3)  # table strides, H, N, P, heads
    assert _plan(*_inputs(dtype=torch.float32), table) is None  # a signature it cannot take: None, kept


def test_bf16_calls_read_an_fp16_table_kept_on_the_cos_sin_table():
    """bf16 calls read fp16 copies kept on the `CosSinTable` (within 2^-12 of its values; the entry hands it over
    as `Table.source`); fp16 calls and tables without their `CosSinTable` (compiled calls) read fp32."""
    table = _table(197)
    cos, sin = gluon_fwd._tables(table, torch.bfloat16)
    assert cos.dtype == sin.dtype == torch.float16 and gluon_fwd._tables(table, torch.bfloat16)[0] is cos
    assert (cos.float() - table.cos).abs().max() <= 2 ** -12 and (sin.float() - table.sin).abs().max() <= 2 ** -12
    assert gluon_fwd._tables(table, torch.float16)[0].dtype == torch.float32
    bare = Table(*table.cos_sin(), table.prefix_tokens, table.layout)
    assert gluon_fwd._tables(bare, torch.bfloat16)[0].dtype == torch.float32
    assert gluon_fwd._tables(bare._replace(source=table), torch.bfloat16)[0] is cos
    assert _plan(*_inputs(), table) is not _plan(*_inputs(dtype=torch.float16), table)


def test_only_the_hopper_table_enables_it():
    assert configs.for_arch(9, 64).resident_fwd_max_n == gluon_fwd.STREAM_MAX_N
    assert configs.for_arch(9, 128).resident_fwd_max_n == 0 and configs.for_arch(8, 64).resident_fwd_max_n == 0
    assert configs.for_arch(None, 64).resident_fwd_max_n == 0  # the interpreter


# ------------------------------------------------------------------------------------------------- on the GPU
gpu = pytest.mark.skipif(not ON_HOPPER, reason="needs a Hopper GPU")


def _reference(q, k, v, table):
    return attnhub.attention(q.double(), k.double(), v.double(), table, backend="math")


def _case_inputs(dtype, N, P, table_kind, kind, B, H, gen):
    """q, k, v [B, H, N, 64] of a float64 case (`FLOAT64_CASES`' kind) and its table (None: no RoPE, or only prefix
    tokens)."""
    q, k, v = make_qkv(kind, B, H, N, 64, dtype, gen)
    table = None if table_kind is None or N == P else make_table(
        Shape(B, H, (1, N - P), P, 64, "interleaved", per_head=table_kind == "per_head"), gen)
    return q, k, v, table


FLOAT64_CASES = [
    (197, 1, "shared", "fused"),  # ViT/16 at 224 px, views of a fused qkv projection
    (197, 1, "per_head", "fused"),
    (197, 1, None, "contiguous"),
    (256, 0, "shared", "transposed"),  # the largest, no masked key chunk
    (100, 5, "shared", "fused"),  # a 128-row block: one full, one half-width and one masked chunk
    (17, 1, "shared", "contiguous"),  # one masked chunk only
    (1, 1, "shared", "fused"),  # the prefix token alone
    (65, 0, None, "fused"),  # one key past a full chunk
    # long_fwd_kernel: K and V in 64-row boxes, queries in 128-row slices
    (577, 1, "shared", "fused"),  # ViT/16 at 384 px: nine full boxes and a 16-key tail in the tenth
    (577, 1, "per_head", "contiguous"),
    (640, 0, "shared", "transposed"),  # ten whole boxes, no masked chunk
    (401, 5, None, "fused"),  # a half-width and a masked chunk in the last box
    (257, 0, "shared", "fused"),  # one token past the resident kernel
    # stream_fwd_kernel: K in 64-row boxes, V through a ring, rounds of three 64-row query slices; the last round
    # with one, two or no groups idle
    (1029, 5, "shared", "fused"),  # ViT-B/16 at 512 px with 4 register tokens: 16 boxes and a 16-key tail, 1 idle
    (785, 1, "per_head", "contiguous"),  # ViT-L/16 at 448 px: two idle
    (1152, 0, "shared", "transposed"),  # the largest, 18 whole boxes, none idle
    (641, 0, None, "fused"),  # one token past the long kernel
    (705, 1, "shared", "fused"),  # 11 boxes and one row, none idle
]


# the long kernel's cases again with its K/V boxes released box by box (`long_early_release`), with its attending
# warpgroups as partitions of their own (`long_attend_groups`), and with its last slice swapped where it holds at
# most 16 rows (`long_swap_tail`: 577 and 257 tokens): (early release, groups, swapped tail)
# and the streaming kernel's with its overlapped key loop (`stream_overlap`)
EARLY_CASES = [case for case in FLOAT64_CASES if 256 < case[0] <= gluon_fwd.MAX_N]
STREAM_CASES = [case for case in FLOAT64_CASES if case[0] > gluon_fwd.MAX_N]
HOPPER = configs.for_arch(9, 64)
RESIDENT = resident_kernel(HOPPER)  # the table's
TABLE_VARIANT = (HOPPER.long_early_release, HOPPER.long_attend_groups, HOPPER.long_swap_tail, HOPPER.stream_overlap)
LONG_VARIANTS = [(False, 0, False), (True, 0, False), (True, 3, True)]  # beside the table's


def _with_variants(cases):
    """(dtype, case, early, groups, tail, overlap): every case in bf16 and fp16 as Hopper's table has it; the long
    kernel's other variants in bf16, and in fp16 at N = 577 (the variants share every line that depends on the
    dtype); the streaming kernel's overlapped key loop the same way (fp16 at 1029)."""
    bf16, fp16 = torch.bfloat16, torch.float16
    vit384, vit512 = (577, 1, "shared", "fused"), (1029, 5, "shared", "fused")
    overlap = not HOPPER.stream_overlap
    return [(dtype, *case, *TABLE_VARIANT) for case in cases for dtype in (bf16, fp16)] + [
        (bf16, *case, *variant, HOPPER.stream_overlap) for case in EARLY_CASES for variant in LONG_VARIANTS] + [
        (fp16, *vit384, *variant, HOPPER.stream_overlap) for variant in LONG_VARIANTS] + [
        (bf16, *case, *TABLE_VARIANT[:3], overlap) for case in STREAM_CASES] + [
        (fp16, *vit512, *TABLE_VARIANT[:3], overlap)]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype,N,P,table_kind,kind,early,groups,tail,overlap", _with_variants(FLOAT64_CASES))
def test_matches_math_in_float64(dtype, N, P, table_kind, kind, early, groups, tail, overlap, nan_empty):
    """Through `gluon_fwd.forward` with NaN-filled outputs (every row must be written), B * H = 160 heads > the
    132 SMs, so programs take several heads (the persistent loop, its buffers and barrier phases; with early
    release, the next head's boxes loaded during the last slice of the one before; with groups, each group's
    slices of every head, o through their buffers; with the swapped tail, the last slice's one row)."""
    gen = torch.Generator().manual_seed(N)
    B, H = 20, 8
    q, k, v = make_qkv(kind, B, H, N, 64, dtype, gen)
    table = None if table_kind is None or N == P else make_table(
        Shape(B, H, (1, N - P), P, 64, "interleaved", per_head=table_kind == "per_head"), gen)
    assert gluon_fwd.eligible(q, k, v, table, None)
    scale = 64 ** -0.5
    o, lse, _ = gluon_fwd.forward(q, k, v, table, scale * launch.LOG2E, runtime.launch,  # NaN-filled (nan_empty)
                                  options=GluonOptions(early, attend_groups=groups, swap_tail=tail, overlap=overlap))
    assert_close_rel(o, _reference(q, k, v, table), dtype, "o")
    qd, kd = (q.double(), k.double()) if table is None else apply_rope_qk(q.double(), k.double(), table)
    lse_ref = torch.logsumexp(qd @ kd.transpose(-1, -2) * scale, -1) * launch.LOG2E  # base 2, as the kernels keep it
    assert_close_rel(lse, lse_ref.reshape(B * H, N), dtype, "lse")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("N", [197, 577, 1029])
def test_a_negative_scale_takes_the_row_min_of_the_raw_scores(N, nan_empty):
    """scale = -0.7, scores spread over hundreds (q, k scaled by 3), where exponents taken against anything but the
    row max of the scaled scores overflow: the resident, long and streaming kernels' training form (RoPE, the scale
    on S) against float64 attention over the rotated q and k it saved (so that only the softmax is compared: the
    rotation's rounding, which such scores amplify, is not), and their form without RoPE against float64."""
    gen = torch.Generator().manual_seed(N + 11)
    B, H, P = 8, 6, 5 if N == 1029 else 1
    q, k, v = make_qkv("fused", B, H, N, 64, torch.bfloat16, gen)
    q, k = q * 3, k * 3
    table = make_table(Shape(B, H, (1, N - P), P, 64, "interleaved"), gen)
    scale = -0.7

    def reference(q, k):
        s = q.double() @ k.double().transpose(-1, -2) * scale
        return torch.softmax(s, -1) @ v.double(), torch.logsumexp(s, -1).reshape(B * H, N) * launch.LOG2E

    with settings.override(background_compile=False):
        o, lse, (qr, kr) = gluon_fwd.forward(q, k, v, table, scale * launch.LOG2E, runtime.launch, True,
                                             HOPPER.gluon_options)
        o_plain, lse_plain, _ = gluon_fwd.forward(q, k, v, None, scale * launch.LOG2E, runtime.launch, False,
                                                  HOPPER.gluon_options)
    for (got_o, got_lse), (ref_o, ref_lse), form in (((o, lse), reference(qr, kr), "training form"),
                                                     ((o_plain, lse_plain), reference(q, k), "without RoPE")):
        assert_close_rel(got_o, ref_o, q.dtype, f"o, {form}")
        assert_close_rel(got_lse, ref_lse, q.dtype, f"lse, {form}")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("N", [197, 577, 1029])
def test_a_negative_scale_through_the_table(N, nan_empty):
    """scale = -1/8 (the default's magnitude, so the same accuracy as its float64 cases), triton_fa_rope forced with
    Hopper's table and background compiles off: the Gluon forwards' inference and training (at 1029 after the rotation
    pass) and the backward, o and the gradients against float64."""
    gen = torch.Generator().manual_seed(N + 13)
    B, H, P = 8, 6, 5 if N == 1029 else 1
    q, k, v = make_qkv("fused", B, H, N, 64, torch.bfloat16, gen)
    q, k, v = q.detach(), k.detach(), v.detach()
    table = make_table(Shape(B, H, (1, N - P), P, 64, "interleaved"), gen)
    do = torch.randn(q.shape, generator=gen).to(q.device, q.dtype)
    refs = [t.double().requires_grad_() for t in (q, k, v)]
    ref = attnhub.attention(*refs, table, scale=-0.125, backend="math")
    ref.backward(do.double())
    got = [t.clone().requires_grad_() for t in (q, k, v)]
    with settings.override(background_compile=False), runtime.recording() as launches:
        with torch.no_grad():
            o_inf = attnhub.attention(q, k, v, table, scale=-0.125, backend="triton_fa_rope")
        o = attnhub.attention(*got, table, scale=-0.125, backend="triton_fa_rope")
        o.backward(do)
    gluon = [x.name for x in launches if x.name in (RESIDENT, "long_fwd_kernel", "stream_fwd_kernel")]
    assert len(gluon) == 2, [x.name for x in launches]
    assert_close_rel(o_inf, ref.detach(), q.dtype, "o (inference)")
    assert_close_rel(o, ref.detach(), q.dtype, "o (training)")
    for name, t, r in zip("qkv", got, refs):
        assert_close_rel(t.grad, r.grad, q.dtype, f"d{name}", grad=True)


def _check_first_and_last_samples(q, k, v, table, o, lse, qr, kr, save_rotated):
    """o (and with save_rotated the rotated q and k) of the first two and last two samples (the persistent programs'
    first and last heads) against float64; every output finite (NaN-filled before: every head's rows written)."""
    B = q.shape[0]
    for b in (0, 1, B - 2, B - 1):
        sl = slice(b, b + 1)
        assert_close_rel(o[sl], _reference(q[sl], k[sl], v[sl], table), q.dtype, f"o of sample {b}")
        if save_rotated:
            qd, kd = apply_rope_qk(q[sl].double(), k[sl].double(), table)
            assert_close_rel(qr[sl], qd, q.dtype, f"rotated q of sample {b}")
            assert_close_rel(kr[sl], kd, q.dtype, f"rotated k of sample {b}")
    written = (o, lse, qr, kr) if save_rotated else (o, lse)
    assert all(torch.isfinite(t).all() for t in written)


RESIDENT_CASES = [case for case in FLOAT64_CASES if case[0] <= gluon_fwd.RESIDENT_MAX_N]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("save_rotated", [False, True])
@pytest.mark.parametrize("dtype,N,P,table_kind,kind", [(torch.bfloat16, *case) for case in RESIDENT_CASES]
                         + [(torch.float16, *RESIDENT_CASES[0])])
def test_the_warp_specialized_resident_kernel_matches_math_in_float64(dtype, N, P, table_kind, kind, save_rotated,
                                                                      nan_empty):
    """`resident_warp_specialized`: 288 heads (two or three per program, so both slots and their four barriers'
    phases turn over, the rotating warpgroup a head ahead), NaN-filled outputs: o, lse and (training) the rotated q
    and k of every sample against float64."""
    B, H = 24, 12
    q, k, v, table = _case_inputs(dtype, N, P, table_kind, kind, B, H, torch.Generator().manual_seed(N + 7))
    scale = 64 ** -0.5
    with runtime.recording() as launches:
        o, lse, (qr, kr) = gluon_fwd.forward(q, k, v, table, scale * launch.LOG2E, runtime.launch, save_rotated,
                                             GluonOptions(resident_ws=True))
    assert [x.name for x in launches] == ["resident_ws_fwd_kernel"]
    assert_close_rel(o, _reference(q, k, v, table), dtype, "o")
    qd, kd = (q.double(), k.double()) if table is None else apply_rope_qk(q.double(), k.double(), table)
    lse_ref = torch.logsumexp(qd @ kd.transpose(-1, -2) * scale, -1) * launch.LOG2E
    assert_close_rel(lse, lse_ref.reshape(B * H, N), dtype, "lse")
    written = [o, lse]
    if save_rotated and table is not None:
        assert_close_rel(qr, qd, dtype, "rotated q")
        assert_close_rel(kr, kd, dtype, "rotated k")
        written += [qr, kr]
    assert all(torch.isfinite(t).all() for t in written)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("N", [197, 100])
def test_training_through_the_warp_specialized_resident_kernel(N):
    """The table's training call with `resident_warp_specialized`: the forward through it, the backward reading the
    rotated q and k it saved, o and the gradients against float64."""
    _check_training(torch.bfloat16, N, 1, "shared", "fused", dict(resident_warp_specialized=True),
                    rotated_first=False)


@pytest.mark.gpu
@gpu
def test_a_kept_runner_serves_new_tensors_and_shapes():
    """The third launch runs the first one's kept runner with its own tensors (ints are keyed by value: B = 5 has
    its own)."""
    table = _table(197, H=6)
    with runtime.fresh_caches(keep_runners=True) as state, torch.no_grad():
        for B in (2, 5, 2):
            q, k, v = make_qkv("fused", B, 6, 197, 64, torch.bfloat16, torch.Generator().manual_seed(B))
            o = attnhub.attention(q, k, v, table, backend="triton_fa_rope")
            assert_close_rel(o, _reference(q, k, v, table), q.dtype, "o")
        assert len(state.runners) == 2


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype,N,P,table_kind,kind,early,groups,tail,overlap", _with_variants(FLOAT64_CASES))
def test_training_matches_math_in_float64(dtype, N, P, table_kind, kind, early, groups, tail, overlap, nan_empty):
    """A training forward through the Gluon kernels (at every length they serve, whatever the table says) with
    NaN-filled outputs: the rotated q and k it saves against the float64 rotation (unscaled, rounded to the input
    dtype), o and lse; then the whole call's gradients, the backward kernels reading what it saved."""
    switches = dict(long_early_release=early, long_attend_groups=groups, long_swap_tail=tail, stream_overlap=overlap,
                    gluon_prerotate_train_from_n=None)  # the kernel's own training form, which rotates and saves
    _check_training(dtype, N, P, table_kind, kind, switches, rotated_first=False)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype,N,P,table_kind,kind", [
    (dtype, *case) for case in FLOAT64_CASES if case[2] is not None and case[0] > case[1]
    for dtype in (torch.bfloat16, torch.float16)])
def test_training_after_the_rotation_pass_matches_math_in_float64(dtype, N, P, table_kind, kind, nan_empty):
    """`gluon_prerotate_train_from_n`: the rotation pass writes the rotated q and k the backward reads, then the
    Gluon forward runs on them without RoPE; the same checks as the training forward's own (NaN-filled outputs)."""
    _check_training(dtype, N, P, table_kind, kind, dict(gluon_prerotate_train_from_n=0), rotated_first=True)


def _check_training(dtype, N, P, table_kind, kind, fields: dict, rotated_first: bool):
    """`launch.forward` in training with the config table's `fields` (the Gluon forwards at every length they
    serve): its launches, the rotated q and k, o and lse against float64; then `attnhub.attention`'s gradients."""
    gen = torch.Generator().manual_seed(N + 1)
    B, H = 20, 8
    q, k, v, table = _case_inputs(dtype, N, P, table_kind, kind, B, H, gen)
    scale = 64 ** -0.5
    lengths = dict(resident_fwd_max_n=gluon_fwd.STREAM_MAX_N, resident_train_max_n=gluon_fwd.STREAM_MAX_N)
    config = dataclasses.replace(configs.for_call(q.device, 64), **lengths, **fields)
    with runtime.recording() as launches:
        o, lse, (qr, kr) = launch.forward(q, k, v, table, scale, True, config)
    kernel = (resident_kernel(config) if N <= gluon_fwd.RESIDENT_MAX_N else "long_fwd_kernel"
              if N <= gluon_fwd.MAX_N else "stream_fwd_kernel")
    kernels = ["rotate_kernel", kernel] if rotated_first else [kernel]
    assert [x.name for x in launches] == kernels
    qd, kd = (q.double(), k.double()) if table is None else apply_rope_qk(q.double(), k.double(), table)
    if table is None:
        assert qr is q and kr is k
    else:
        assert qr.dtype == kr.dtype == launch.rot_dtype(dtype) and qr.is_contiguous() and kr.is_contiguous()
        assert_close_rel(qr, qd, dtype, "rotated q")
        assert_close_rel(kr, kd, dtype, "rotated k")
    assert_close_rel(o, _reference(q, k, v, table), dtype, "o")
    lse_ref = torch.logsumexp(qd @ kd.transpose(-1, -2) * scale, -1) * launch.LOG2E
    assert_close_rel(lse, lse_ref.reshape(B * H, N), dtype, "lse")

    do = torch.randn(q.shape, generator=gen).to(q.device, dtype)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    with configs.override(**lengths, **fields), \
            runtime.recording() as launches:
        got = attnhub.attention(*leaves, table, backend="triton_fa_rope")
    assert [x.name for x in launches[:len(kernels)]] == kernels
    got.backward(do)
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    _reference(*ref_leaves, table).backward(do.double())
    assert_close_rel(got.detach(), _reference(q, k, v, table), dtype, "o")
    for name, a, b in zip(("dq", "dk", "dv"), leaves, ref_leaves):
        if N == 1 and name != "dv":  # one key: the softmax is constant, dq and dk are zero (here round-off)
            assert a.grad.abs().max() <= 1e-2, name
            continue
        assert_close_rel(a.grad, b.grad, dtype, name, grad=True)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("N,kernel", [(197, RESIDENT), (577, "long_fwd_kernel")])
def test_attention_takes_it_for_inference_and_for_training_by_the_table(N, kernel):
    """Inference calls take it; training calls up to the config table's resident_train_max_n."""
    q, k, v = _inputs(N=N, H=6)
    table = _table(N, H=6)
    with torch.no_grad(), runtime.recording() as launches:
        o = attnhub.attention(q, k, v, table, backend="triton_fa_rope")
    assert [x.name for x in launches] == [kernel]
    assert_close_rel(o, _reference(q, k, v, table), q.dtype, "o")
    qg = q.detach().clone().requires_grad_()
    with runtime.recording() as launches:
        attnhub.attention(qg, k, v, table, backend="triton_fa_rope")
    assert (kernel in [x.name for x in launches]) == (N <= configs.for_call(q.device, 64).resident_train_max_n)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("save_rotated", [False, True])
@pytest.mark.parametrize("early,groups,tail", [(False, 0, False), (True, 0, False), (True, 3, False), (True, 3, True)])
def test_long_kernel_over_many_heads_per_program(early, groups, tail, save_rotated, nan_empty):
    """ViT-B/16@384's shape, 768 heads: each persistent program takes five or six, so every barrier's phase turns
    over several times (with early release, each head's boxes loaded during the last slice of the one before;
    with groups, each group's buffers too). The first and last samples (the programs' first and last heads)
    against float64, NaN-filled outputs."""
    gen = torch.Generator().manual_seed(577)
    B, H, N = 64, 12, 577
    q, k, v = make_qkv("fused", B, H, N, 64, torch.bfloat16, gen)
    table = make_table(Shape(B, H, (24, 24), 1, 64, "interleaved"), gen)
    scale = 64 ** -0.5
    o, lse, (qr, kr) = gluon_fwd.forward(q, k, v, table, scale * launch.LOG2E, runtime.launch, save_rotated,
                                         GluonOptions(early, attend_groups=groups, swap_tail=tail))
    _check_first_and_last_samples(q, k, v, table, o, lse, qr, kr, save_rotated)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("save_rotated", [False, True])
@pytest.mark.parametrize("N", [1029, 1152])
def test_the_overlapped_key_loop_computes_what_the_plain_one_does(N, save_rotated, nan_empty):
    """Same operations in another order of issue: o, lse (and the rotated q, k) agree far closer than the float64
    tolerance, to a bf16 rounding step (o) and fp32 rounding (lse), so a slip in the overlapped loop's order (a box
    skipped, rescaled twice, read from the wrong ring slot) shows even where it would hide within that tolerance."""
    gen = torch.Generator().manual_seed(N + 3)
    q, k, v = make_qkv("fused", 20, 8, N, 64, torch.bfloat16, gen)
    table = make_table(Shape(20, 8, (1, N - 1), 1, 64, "interleaved"), gen)
    plain, overlapped = (gluon_fwd.forward(q, k, v, table, 64 ** -0.5 * launch.LOG2E, runtime.launch, save_rotated,
                                           GluonOptions(overlap=overlap)) for overlap in (False, True))
    torch.testing.assert_close(overlapped[0], plain[0], rtol=2 ** -7, atol=1e-6)
    torch.testing.assert_close(overlapped[1], plain[1], rtol=1e-6, atol=1e-6)
    if save_rotated:  # the producer's work, which the key loop does not touch
        assert torch.equal(overlapped[2][0], plain[2][0]) and torch.equal(overlapped[2][1], plain[2][1])


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("save_rotated,v_slots,overlap", [(False, 4, False), (True, 4, False), (False, 2, False),
                                                          (False, 3, False), (False, 5, False), (False, 4, True),
                                                          (True, 4, True), (False, 2, True)])
def test_streaming_kernel_over_many_heads_per_program(save_rotated, v_slots, overlap, nan_empty):
    """ViT-B/16@512's shape with four register tokens (N = 1029), 384 heads: each persistent program takes two or
    three, so the V ring's slots and every barrier's phase turn over across heads (the next head's K boxes load
    during the last round of the one before, its V boxes follow that round's in the ring), with the table's ring
    of four V boxes and the other depths `stream_v_slots` takes, and with the overlapped key loop
    (`stream_overlap`). The programs' first and last heads against float64, NaN-filled outputs."""
    gen = torch.Generator().manual_seed(1029)
    B, H, N = 32, 12, 1029
    q, k, v = make_qkv("fused", B, H, N, 64, torch.bfloat16, gen)
    table = make_table(Shape(B, H, (32, 32), 5, 64, "interleaved"), gen)
    plan = _plan(q, k, v, table, save_rotated, v_slots=v_slots, overlap=overlap)
    assert plan.kernel is gluon_fwd.stream_fwd_kernel
    assert (plan.constexprs["V_SLOTS_"], plan.constexprs["OVERLAP_"]) == (v_slots, overlap)
    o, lse, (qr, kr) = gluon_fwd.forward(q, k, v, table, 64 ** -0.5 * launch.LOG2E, runtime.launch, save_rotated,
                                         GluonOptions(v_slots=v_slots, overlap=overlap))
    _check_first_and_last_samples(q, k, v, table, o, lse, qr, kr, save_rotated)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("save_rotated", [False, True])
@pytest.mark.parametrize("early,groups,tail", [(False, 0, False), (True, 0, False), (True, 3, False), (True, 3, True)])
@pytest.mark.parametrize("N", [128, 197, 256])
def test_the_long_kernel_from_128_tokens_matches_math(N, early, groups, tail, save_rotated, nan_empty):
    """`gluon_long_from_n` below 257: the long kernel where the resident one serves by default (one query slice at
    128 tokens, where early release stays off; two at 197 and 256), 160 heads, against float64. Three groups: four
    64-row slices at 197 and 256, so two groups have one slice per head, their first and their last (at 128 the
    plan takes no groups); at 197 the swapped tail takes the last slice's five rows."""
    gen = torch.Generator().manual_seed(N + 2)
    B, H = 20, 8
    q, k, v = make_qkv("fused", B, H, N, 64, torch.bfloat16, gen)
    table = make_table(Shape(B, H, (1, N - 1), 1, 64, "interleaved"), gen)
    options = GluonOptions(early, 128, groups, tail)
    assert _plan(q, k, v, table, save_rotated, *options).kernel is gluon_fwd.long_fwd_kernel
    o, lse, (qr, kr) = gluon_fwd.forward(q, k, v, table, 64 ** -0.5 * launch.LOG2E, runtime.launch, save_rotated,
                                         options)
    assert_close_rel(o, _reference(q, k, v, table), q.dtype, "o")
    if save_rotated:
        qd, kd = apply_rope_qk(q.double(), k.double(), table)
        assert_close_rel(qr, qd, q.dtype, "rotated q")
        assert_close_rel(kr, kd, q.dtype, "rotated k")
    assert torch.isfinite(lse).all()


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("N,kernel", [(197, RESIDENT), (1029, "stream_fwd_kernel")])
def test_the_triton_forward_serves_while_the_gluon_one_compiles_in_the_background(N, kernel, training):
    """ATTNHUB_TRITON_BACKGROUND_COMPILE: a shape's first call starts its Gluon forward's compile and runs the Triton
    forward; once `attnhub.wait_for_compiles` returns, the Gluon forward serves. Both against math in float64;
    with deterministic algorithms the first call is the Gluon forward's."""
    q, k, v = _inputs(N=N, H=6)
    table = _table(N, H=6)

    def call():
        qg, kg, vg = (t.detach().clone().requires_grad_(training) for t in (q, k, v))
        with runtime.recording() as launches, torch.set_grad_enabled(training):
            o = attnhub.attention(qg, kg, vg, table, backend="triton_fa_rope")
            if training:
                o.backward(torch.ones_like(o))
        assert_close_rel(o.detach(), _reference(q, k, v, table), q.dtype, "o")
        return [x.name for x in launches], (qg.grad if training else None)

    with settings.override(background_compile=True), runtime.fresh_caches():
        first, dq_first = call()
        assert kernel not in first and "fwd_kernel" in first
        attnhub.wait_for_compiles(timeout=300)
        later, dq_later = call()
        assert kernel in later and "fwd_kernel" not in later
        if training:  # the same saved tensors reach the same backward kernels
            assert_close_rel(dq_later, dq_first.double(), q.dtype, "dq", grad=True)
        deterministic = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            with runtime.fresh_caches():
                assert kernel in call()[0]
        finally:
            torch.use_deterministic_algorithms(deterministic)


@pytest.mark.gpu
@gpu
def test_a_gluon_forward_compiled_in_the_background_is_first_launched_inside_a_cuda_graph_capture():
    """`attnhub.wait_for_compiles` loads the kernel's module: its first launch may then be captured (a graph
    captured after it runs the Gluon forward)."""
    q, k, v = _inputs(N=577, H=6)
    table = _table(577, H=6)
    with settings.override(background_compile=True), runtime.fresh_caches(), torch.no_grad():
        attnhub.attention(q, k, v, table, backend="triton_fa_rope")  # the Triton forward; the long one compiling
        attnhub.wait_for_compiles(timeout=300)
        graph = torch.cuda.CUDAGraph()
        with runtime.recording() as launches, torch.cuda.graph(graph):
            o = attnhub.attention(q, k, v, table, backend="triton_fa_rope")
        o.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
    assert [x.name for x in launches] == ["long_fwd_kernel"]
    assert_close_rel(o, _reference(q, k, v, table), q.dtype, "o")
