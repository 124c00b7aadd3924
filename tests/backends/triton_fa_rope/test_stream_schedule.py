"""The streaming Gluon forward's schedule (`gluon_stream_kernels.stream_fwd_kernel`), checked on a model of it:
Gluon has no interpreter, so on CPU its code is only compiled (test_sm90.py); this checks the protocol its
partitions follow. The producer and the three attending groups are generators that follow the kernel's functions
step by step (same buffer indices, barrier phases and ring positions); mbarriers complete a phase when their
arrivals and TMA bytes are in; every TMA load lands at a random later time; a random scheduler interleaves it all.
With `stores` (the training form, SAVE_ROT) the producer's TMA stores of the rotated slices and K boxes read their
buffers until they complete, also at random later times, and `tma.store_wait(0)` waits for them all. Checked: no
deadlock; each read finds what it expects (the rotated K box of its head, the V box of its ring position, its
rotated query slice); no TMA load lands in a buffer that is being read, and no o is written into a slice buffer a
store still reads; every (head, slice) output written once. Keep the model in step with the kernel: it mirrors `_stream_producer`, `_stream_group` and
`_attend_stream`; the last two tests show that it fails when the protocol is broken.
"""

from __future__ import annotations

import random

import pytest

from attnhub.backends.triton_fa_rope import configs, launch

gluon_fwd = launch._gluon("gluon_fwd")
pytestmark = pytest.mark.skipif(gluon_fwd is None, reason="this Triton has no Gluon Hopper API")
if gluon_fwd is not None:
    from attnhub.backends.triton_fa_rope.gluon_stream_kernels import GROUPS
else:  # every test skips
    GROUPS = 0
BLOCK = 64  # rows of a query slice and of a K or V box


class _Barrier:
    """An mbarrier: a phase completes when `count` arrivals and every expected TMA load are in."""

    def __init__(self, count: int):
        self.count, self.arrived, self.tx, self.phases = count, 0, 0, 0

    def _maybe_complete(self):
        if self.arrived >= self.count and self.tx == 0:
            assert self.arrived == self.count, "more arrivals than the barrier counts"
            self.arrived, self.phases = 0, self.phases + 1

    def arrive(self, count: int = 1):
        self.arrived += count
        self._maybe_complete()

    def expect(self):  # mbarrier.expect: one arrival and the bytes of one TMA load
        self.tx += 1
        self.arrive()

    def passed(self, parity: int) -> bool:  # mbarrier.wait(parity) returns once that phase has completed
        return (self.phases & 1) != parity


class _Model:
    """One program of stream_fwd_kernel over `heads`; NS query slices and NKC key boxes a head."""

    def __init__(self, N: int, heads: list[int], rng: random.Random, v_slots: int = 4, v_empty_count: int = GROUPS,
                 arrive_for_idle: bool = True, v_before_k: bool = False, tma_weight: float = 1.0,
                 overlap: bool = False, stores: str | None = None, store_weight: float | None = None):
        """tma_weight: how likely the scheduler lands a TMA load against running a partition (below 1: late loads);
        store_weight: the same for completing a TMA store (tma_weight if None; far below it: stores complete after
        the loads issued with them); overlap: the groups' overlapped key loop (`stream_overlap`); stores: the training
        form's stores, each slice's waited for at once ("eager"); v_empty_count, arrive_for_idle, v_before_k (a
        group's first slice of a head waits for its V box before its K box), stores="unwaited": broken protocols, for
        the tests that show the model fails."""
        self.NS, self.NKC, self.N_FULL = -(-N // BLOCK), -(-N // BLOCK), N // BLOCK
        self.overlap = overlap
        self.heads, self.rng, self.arrive_for_idle, self.R = heads, rng, arrive_for_idle, v_slots
        self.v_before_k, self.tma_weight, self.stores = v_before_k, tma_weight, stores
        self.store_weight = tma_weight if store_weight is None else store_weight
        bars = lambda n, count=1: [_Barrier(count) for _ in range(n)]  # noqa: E731
        self.q_loaded, self.q_ready, self.q_empty = bars(2 * GROUPS), bars(2 * GROUPS), bars(2 * GROUPS)
        self.k_loaded, self.k_ready, self.kv_free = bars(self.NKC), bars(self.NKC), bars(self.NKC, GROUPS)
        self.v_ready, self.v_empty = bars(v_slots), bars(v_slots, v_empty_count)
        self.q_buf, self.k_buf, self.v_ring = [None] * (2 * GROUPS), [None] * self.NKC, [None] * v_slots
        self.reading: dict = {}  # (buffer, index) -> readers now
        self.in_flight: list = []  # TMA loads: (barrier, buffer, index, content)
        self.storing: list = []  # TMA stores: (buffer, index, content)
        self.outputs: list = []

    # primitives: a generator yields a predicate it waits on (None: it just lets the others run)
    def _wait(self, bar, parity):
        while not bar.passed(parity):
            yield lambda: bar.passed(parity)

    def _load(self, bar, buf, index, content):
        bar.expect()
        self.in_flight.append((bar, buf, index, content))

    def _read(self, buf, index, expected):
        key = (id(buf), index)
        assert buf[index] == expected, f"read {expected}, the buffer holds {buf[index]}"
        self.reading[key] = self.reading.get(key, 0) + 1
        yield None
        assert buf[index] == expected, f"{expected} changed while it was read: {buf[index]}"
        self.reading[key] -= 1

    def _store(self, buf, index):
        self.reading[(id(buf), index)] = self.reading.get((id(buf), index), 0) + 1
        self.storing.append((buf, index, buf[index]))

    def _store_wait(self):  # tma.store_wait(0): the producer's stores have all read their buffers
        while self.storing:
            yield lambda: not self.storing

    def _complete_store(self, i):
        buf, index, content = self.storing.pop(i)
        assert buf[index] == content, f"{content} changed while it was stored: {buf[index]}"
        self.reading[(id(buf), index)] -= 1

    def _land(self, i):
        bar, buf, index, content = self.in_flight.pop(i)
        assert not self.reading.get((id(buf), index)), f"TMA load of {content} lands in a buffer being read"
        buf[index] = content
        bar.tx -= 1
        bar._maybe_complete()

    # the producer (`_stream_producer` and its helpers)
    def _slice_buffer(self, si, it):
        g = si % GROUPS
        n = it * ((self.NS - g + GROUPS - 1) // GROUPS) + si // GROUPS
        return g * 2 + n % 2, n

    def _load_slice(self, tile, si, it):
        buf, n = self._slice_buffer(si, it)
        yield from self._wait(self.q_empty[buf], ((n // 2) & 1) ^ 1)
        self._load(self.q_loaded[buf], self.q_buf, buf, ("q", tile, si))

    def _rotate_slice(self, tile, si, it):
        buf, n = self._slice_buffer(si, it)
        yield from self._wait(self.q_loaded[buf], (n // 2) & 1)
        assert self.q_buf[buf] == ("q", tile, si)
        self.q_buf[buf] = ("rotated q", tile, si)
        yield None
        if self.stores:
            self._store(self.q_buf, buf)
            if self.stores == "eager":
                yield from self._store_wait()
        self.q_ready[buf].arrive()

    def _next_round_slices(self, tile, r, j, it):
        if r + 1 < -(-self.NS // GROUPS):
            if j == self.R:
                for g in range(GROUPS):
                    if (r + 1) * GROUPS + g < self.NS:
                        yield from self._load_slice(tile, (r + 1) * GROUPS + g, it)
            for g in range(GROUPS):
                if j == self.R + 1 + g and (r + 1) * GROUPS + g < self.NS:
                    yield from self._rotate_slice(tile, (r + 1) * GROUPS + g, it)

    def _issue_v(self, tile, j, vc, idle):
        slot = vc % self.R
        yield from self._wait(self.v_empty[slot], ((vc // self.R) & 1) ^ 1)
        self._load(self.v_ready[slot], self.v_ring, slot, ("v", tile, j, vc))
        if idle and self.arrive_for_idle:
            self.v_empty[slot].arrive(idle)
        return vc + 1

    def _load_k_box(self, tile, j, it):
        yield from self._wait(self.kv_free[j], (it & 1) ^ 1)
        if self.stores and j == 0:  # STORES_DONE
            yield from self._store_wait()
        self._load(self.k_loaded[j], self.k_buf, j, ("k", tile, j))

    def producer(self):
        NR = -(-self.NS // GROUPS)
        idle = GROUPS * NR - self.NS
        vc = 0
        for it, tile in enumerate(self.heads):
            for g in range(GROUPS):
                yield from self._load_slice(tile, g, it)
            for g in range(GROUPS):
                yield from self._rotate_slice(tile, g, it)
            yield from self._load_k_box(tile, 0, it)
            for j in range(self.NKC):
                if j + 1 < self.NKC:
                    yield from self._load_k_box(tile, j + 1, it)
                vc = yield from self._issue_v(tile, j, vc, idle if NR == 1 else 0)
                yield from self._wait(self.k_loaded[j], it & 1)
                assert self.k_buf[j] == ("k", tile, j)
                self.k_buf[j] = ("rotated k", tile, j)
                yield None
                if self.stores:
                    self._store(self.k_buf, j)
                self.k_ready[j].arrive()
                yield from self._next_round_slices(tile, 0, j, it)
            for r in range(1, NR - 1):
                for j in range(self.NKC):
                    vc = yield from self._issue_v(tile, j, vc, 0)
                    yield from self._next_round_slices(tile, r, j, it)
            if NR > 1:
                for j in range(self.NKC):
                    vc = yield from self._issue_v(tile, j, vc, idle)

    # the attending groups (`_stream_group`, `_attend_stream`)
    def _scores(self, tile, buf, si, j, phase, first):  # S = Q K^T of box j
        if first:
            yield from self._wait(self.k_ready[j], phase)
        yield from self._read(self.q_buf, buf, ("rotated q", tile, si))
        yield from self._read(self.k_buf, j, ("rotated k", tile, j))

    def _values(self, tile, j, vc, last, wait=True):  # P V of box j (wait: for its V box first), then the box back
        slot = (vc + j) % self.R
        if wait:
            yield from self._wait(self.v_ready[slot], ((vc + j) // self.R) & 1)
        yield from self._read(self.v_ring, slot, ("v", tile, j, vc + j))
        self.v_empty[slot].arrive()
        if last:
            self.kv_free[j].arrive()

    def _attend(self, tile, buf, si, vc, phase, first, last):
        rest = range(self.NKC)
        if self.overlap:  # `_overlapped_boxes`: box j's S before box j - 1's P V; the partial box as below
            yield from self._scores(tile, buf, si, 0, phase, first)
            for j in range(1, self.N_FULL):
                yield from self._scores(tile, buf, si, j, phase, first)
                yield from self._values(tile, j - 1, vc, last)
            yield from self._values(tile, self.N_FULL - 1, vc, last)
            rest = range(self.N_FULL, self.NKC)
        for j in rest:
            slot = (vc + j) % self.R
            waits = [(self.k_ready[j], phase)] if first else []
            waits.insert(len(waits) if not self.v_before_k else 0, (self.v_ready[slot], ((vc + j) // self.R) & 1))
            for bar, parity in waits:
                yield from self._wait(bar, parity)
            yield from self._read(self.q_buf, buf, ("rotated q", tile, si))
            yield from self._read(self.k_buf, j, ("rotated k", tile, j))
            yield from self._values(tile, j, vc, last, wait=False)

    def group(self, group):
        NR = -(-self.NS // GROUPS)
        A = (self.NS - group + GROUPS - 1) // GROUPS
        for it, tile in enumerate(self.heads):
            for r in range(A):
                n = it * A + r
                buf = group * 2 + n % 2
                yield from self._wait(self.q_ready[buf], (n // 2) & 1)
                if n > 0:  # the other buffer's o has been stored
                    self.q_empty[group * 2 + (n + 1) % 2].arrive()
                si = r * GROUPS + group
                yield from self._attend(tile, buf, si, (it * NR + r) * self.NKC, it & 1, r == 0, r == A - 1)
                assert not self.reading.get((id(self.q_buf), buf)), f"o of {(tile, si)} written while stored"
                self.q_buf[buf] = ("o", tile, si)  # o leaves through the slice's buffer
                self.outputs.append((tile, si))

    def run(self):
        parts = [self.producer()] + [self.group(g) for g in range(GROUPS)]
        waiting = [None] * len(parts)
        while any(p is not None for p in parts) or self.in_flight or self.storing:
            runnable = [("part", i) for i, p in enumerate(parts) if p is not None and (waiting[i] is None
                                                                                       or waiting[i]())]
            choices = (runnable + [("tma", i) for i in range(len(self.in_flight))]
                       + [("store", i) for i in range(len(self.storing))])
            if not choices:
                stuck = [i for i, p in enumerate(parts) if p is not None]
                raise AssertionError(f"deadlock: partitions {stuck} wait (0: the producer, 1-3: the groups)")
            weights = {"part": 1.0, "tma": self.tma_weight, "store": self.store_weight}
            kind, i = self.rng.choices(choices, [weights[c] for c, _ in choices])[0]
            if kind == "tma":
                self._land(i)
                continue
            if kind == "store":
                self._complete_store(i)
                continue
            try:
                waiting[i] = next(parts[i])
            except StopIteration:
                parts[i] = waiting[i] = None
        assert sorted(self.outputs) == [(t, si) for t in sorted(self.heads) for si in range(self.NS)]


# 641: 11 slices (one group idle in the last round), 785: 13 (two idle), 1029: 17 (one), 1152: 18 (none)
@pytest.mark.parametrize("N", [641, 785, 1029, 1152])
@pytest.mark.parametrize("heads", [1, 3])
@pytest.mark.parametrize("v_slots", configs.STREAM_V_SLOTS)
@pytest.mark.parametrize("tma_weight", [1.0, 0.02])
@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("stores", [None, "eager"])
def test_the_schedule_finishes_and_every_read_finds_its_data(N, heads, v_slots, tma_weight, overlap, stores):
    """Every ring depth the config table takes (`stream_v_slots`), both key loops (`stream_overlap`), inference
    and training (its stores waited for at once), with loads and stores
    completing as often as partitions run and late (stores in half the runs later than the loads too)."""
    rng = random.Random(N * 10 + heads + 1000 * v_slots)
    for run in range(4 if stores else 6):
        _Model(N, list(range(heads)), rng, v_slots=v_slots, tma_weight=tma_weight, overlap=overlap, stores=stores,
               store_weight=tma_weight * (1e-3 if run % 2 else 1.0)).run()


@pytest.mark.parametrize("overlap", [False, True])
def test_the_model_finds_a_v_box_refilled_before_every_group_read_it(overlap):
    with pytest.raises(AssertionError, match="lands in a buffer being read|changed while it was read|the buffer holds"):
        for seed in range(20):
            _Model(1029, [0, 1], random.Random(seed), v_empty_count=GROUPS - 1, overlap=overlap).run()


def test_the_model_finds_a_stale_v_box_read_when_the_groups_wait_for_v_before_k():
    """A group idle in a head's last round skips its V boxes, so in the next head's round 0 a slot's load of the
    round before may still be in flight, and the wait for the slot's next phase passes at once: only waiting for
    K box j first (its k_ready is arrived after `_issue_v(j)`, whose wait saw that load read) keeps the read
    right. Late loads (tma_weight) are needed to see it."""
    with pytest.raises(AssertionError, match="the buffer holds"):
        for seed in range(40):
            _Model(1029, [0, 1, 2], random.Random(seed), v_before_k=True, tma_weight=0.02).run()


@pytest.mark.parametrize("overlap", [False, True])
def test_the_model_finds_the_deadlock_without_the_producers_arrivals_for_idle_groups(overlap):
    with pytest.raises(AssertionError, match="deadlock"):
        _Model(1029, [0, 1], random.Random(0), arrive_for_idle=False, overlap=overlap).run()


@pytest.mark.parametrize("overlap", [False, True])
def test_the_model_finds_an_o_written_while_its_slice_is_stored_without_the_waits(overlap):
    """The training form with neither wait for the slices' stores: a late store still reads a slice buffer when
    its group writes o there."""
    with pytest.raises(AssertionError, match="written while stored|changed while it was stored|lands in a buffer"):
        for seed in range(40):
            _Model(1029, [0, 1], random.Random(seed), stores="unwaited", store_weight=1e-3, overlap=overlap).run()
