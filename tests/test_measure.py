"""The timing protocol: adaptive stopping, interleaving, caps, ratios, settings round trip."""

from __future__ import annotations

import itertools
import time

import pytest

from autoprune import bundle_runner as core
from autoprune.errors import InvalidInputError
from autoprune.measure import (
    ProtocolSettings,
    measure,
    measure_interleaved,
    measure_ratio,
    to_sample,
    wall_clock_timer,
)


def test_summarize_quantiles():
    med, iqr, n, mn = core.summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (med, iqr, n, mn) == (3.0, 2.0, 5, 1.0)
    s = to_sample([1.0, 1.0, 1.0, 1.0])
    assert s.median_ms == 1.0 and s.iqr_ms == 0.0 and s.n_runs == 4


def test_stable_call_stops_at_min_runs():
    settings = ProtocolSettings(warmup_runs=3, min_runs=12, max_runs=200, target_rel_iqr=0.05,
                                time_cap_s=5.0, settle_ms=0.0, burst_runs=1)
    s = measure(lambda: 1.0, settings)
    assert s.n_runs == 12 and s.median_ms == 1.0


def test_noisy_call_runs_to_max_runs():
    noisy = itertools.cycle([1.0, 3.0, 0.5, 2.0])
    settings = ProtocolSettings(warmup_runs=0, min_runs=8, max_runs=40, target_rel_iqr=0.01,
                                time_cap_s=5.0, settle_ms=0.0, burst_runs=1)
    s = measure(lambda: next(noisy), settings)
    assert s.n_runs == 40
    assert s.spread > 0.01


def test_lockstep_keeps_a_stable_call_going_while_a_noisy_one_runs():
    settings = ProtocolSettings(warmup_runs=0, min_runs=8, max_runs=40, target_rel_iqr=0.05,
                                target_rel_se=0.0, time_cap_s=5.0, settle_ms=0.0,
                                burst_runs=1)

    def calls():
        noisy = itertools.cycle([1.0, 3.0, 0.5, 2.0])
        return [lambda: 1.0, lambda: next(noisy)]

    apart = measure_interleaved(calls(), settings)
    assert [s.n_runs for s in apart] == [8, 40]  # the stable one stopped first
    together = measure_interleaved(calls(), settings, lockstep=True)
    assert [s.n_runs for s in together] == [40, 40]  # the same stretch of time
    # and all stop together once every one is stable
    both_stable = measure_interleaved([lambda: 1.0, lambda: 2.0], settings, lockstep=True)
    assert [s.n_runs for s in both_stable] == [8, 8]


def test_precise_median_stops_a_noisy_call_before_max_runs():
    # IQR 10% of the median never meets target_rel_iqr=1%, but after ~90 runs the median's
    # estimated standard error is below 1%: the precision rule stops it there
    noisy = itertools.cycle([0.95, 1.0, 1.05, 0.97, 1.03])
    base = dict(warmup_runs=0, min_runs=10, max_runs=1000, target_rel_iqr=0.01,
                time_cap_s=30.0, settle_ms=0.0, burst_runs=1)
    s = measure(lambda: next(noisy), ProtocolSettings(**base, target_rel_se=0.01))
    assert 20 <= s.n_runs <= 60
    assert core.median_rel_se([next(noisy) for _ in range(s.n_runs)]) <= 0.012
    off = measure(lambda: next(noisy), ProtocolSettings(**base, target_rel_se=0.0))
    assert off.n_runs == 1000


def test_median_rel_se():
    assert core.median_rel_se([]) == float("inf")
    assert core.median_rel_se([2.0] * 9) == 0.0
    xs = [1.0, 2.0, 3.0, 4.0, 5.0]  # median 3, IQR 2
    assert core.median_rel_se(xs) == pytest.approx(1.2533 * (2 / 1.349) / 5 ** 0.5 / 3)
    with pytest.raises(InvalidInputError, match="target_rel_se"):
        ProtocolSettings(target_rel_se=-0.1)


def test_warm_up_is_bounded_by_a_fifth_of_the_time_cap():
    calls = []

    def slow() -> float:
        calls.append(1)
        time.sleep(0.01)
        return 10.0

    settings = ProtocolSettings(warmup_runs=1000, min_runs=1, max_runs=1, target_rel_iqr=1.0,
                                time_cap_s=0.1, settle_ms=0.0, burst_runs=1)
    measure(slow, settings)
    # 0.02 s of warm-up at 10 ms a call, then one timed run
    assert 2 <= len(calls) <= 5


def test_time_cap_stops_noisy_call_but_not_before_min_runs():
    noisy = itertools.cycle([1.0, 3.0])

    def slow() -> float:
        time.sleep(0.002)
        return next(noisy)

    settings = ProtocolSettings(warmup_runs=0, min_runs=10, max_runs=100000,
                                target_rel_iqr=0.0, time_cap_s=0.05, settle_ms=0.0,
                                burst_runs=1)
    t0 = time.perf_counter()
    s = measure(slow, settings)
    assert 10 <= s.n_runs < 100
    assert time.perf_counter() - t0 < 2.0


def test_interleaving_rotates_order():
    order: list[int] = []

    def call(i: int):
        def f() -> float:
            order.append(i)
            return 1.0 + i
        return f

    settings = ProtocolSettings(warmup_runs=0, min_runs=3, max_runs=3, target_rel_iqr=1.0,
                                time_cap_s=5.0, settle_ms=0.0, burst_runs=1)
    samples = measure_interleaved([call(0), call(1), call(2)], settings)
    assert [s.median_ms for s in samples] == [1.0, 2.0, 3.0]
    # round-robin, rotated each round: every config runs once per round, first one changes
    assert order == [0, 1, 2, 1, 2, 0, 2, 0, 1]


def test_ratio_protocol_pairs_alternate():
    seq: list[str] = []

    def a() -> float:
        seq.append("a")
        return 2.0

    def b() -> float:
        seq.append("b")
        return 1.0

    settings = ProtocolSettings(warmup_runs=0, min_runs=6, max_runs=6, target_rel_iqr=0.0,
                                time_cap_s=5.0, settle_ms=0.0, burst_runs=1)
    med, iqr = measure_ratio(a, b, settings)
    assert med == 2.0 and iqr == 0.0
    assert seq[:4] == ["a", "b", "b", "a"]


class _ColdStart:
    """A fake small model that runs at 3x its steady time on its first call after a big model
    ran and 2x on its second, steady from the third (the effect measured on our CPU, reduced
    to its shape); the big model is unaffected."""

    def __init__(self) -> None:
        self.streak = 0

    def small(self) -> float:
        self.streak += 1
        return 0.1 * {1: 3.0, 2: 2.0}.get(self.streak, 1.0)

    def big(self) -> float:
        self.streak = 0
        return 1.0


def test_burst_settles_then_times():
    calls: list[float] = []

    def f() -> float:
        calls.append(time.perf_counter())
        time.sleep(0.001)
        return 1.0

    out = core.burst(f, settle_ms=5.0, runs=4)
    assert out == [1.0] * 4
    assert len(calls) >= 4 + 3  # at least ~5 ms of untimed runs before the 4 timed ones
    assert core.burst(f, settle_ms=0.0, runs=2) == [1.0, 1.0]


@pytest.mark.parametrize("settle_ms,burst_runs,expected", [
    (0.0, 1, 0.3),    # one cold run per sample: the small model always looks 3x slower
    (0.0, 5, 0.1),    # a burst of 5: its median is a steady run
    (1e-6, 3, 0.1),   # one untimed settle run, then 3 timed: 2x, 1x, 1x -> median steady
])
def test_bursts_remove_the_cold_start_bias_of_alternation(settle_ms, burst_runs, expected):
    proto = ProtocolSettings(warmup_runs=0, min_runs=6, max_runs=6, target_rel_iqr=0.0,
                             settle_ms=settle_ms, burst_runs=burst_runs)
    m = _ColdStart()
    assert measure_ratio(m.small, m.big, proto)[0] == pytest.approx(expected)
    m = _ColdStart()
    small, big = measure_interleaved([m.small, m.big], proto)
    assert small.median_ms == pytest.approx(expected) and big.median_ms == 1.0


def test_wall_clock_timer_measures_sleep():
    t = wall_clock_timer(lambda: time.sleep(0.005))
    assert 4.0 < t() < 200.0


def test_settings_validation_and_round_trip():
    s = ProtocolSettings(min_runs=7, max_runs=9)
    assert ProtocolSettings.from_dict(s.to_dict()) == s
    with pytest.raises(InvalidInputError, match="min_runs"):
        ProtocolSettings(min_runs=10, max_runs=5)
    with pytest.raises(InvalidInputError, match="burst_runs"):
        ProtocolSettings(burst_runs=0)
    with pytest.raises(InvalidInputError, match="time_cap_s"):
        ProtocolSettings(time_cap_s=0)
