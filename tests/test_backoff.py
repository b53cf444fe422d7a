"""The one backoff policy (meshllm.runtime.backoff.Backoff)."""

from __future__ import annotations

import pytest

from meshllm.runtime.backoff import Backoff


def test_delay_doubles_with_each_death_in_the_window() -> None:
    policy = Backoff(base_s=0.1, max_s=100.0, window_s=30.0)
    delays = [policy.failed(now) for now in (0.0, 1.0, 2.0, 3.0, 4.0)]
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6])
    assert policy.total == 5


def test_delay_is_capped() -> None:
    policy = Backoff(base_s=1.0, max_s=5.0, window_s=1000.0)
    delays = [policy.failed(float(now)) for now in range(10)]
    assert delays[:3] == [1.0, 2.0, 4.0]
    assert delays[3:] == [5.0] * 7


def test_cap_holds_for_very_many_deaths() -> None:
    policy = Backoff(base_s=0.1, max_s=10.0, window_s=1e9)
    for now in range(2000):
        delay = policy.failed(now * 1e-3)
    assert delay == 10.0


def test_process_that_stayed_up_a_window_starts_from_base() -> None:
    policy = Backoff(base_s=0.5, max_s=60.0, window_s=10.0)
    assert [policy.failed(t) for t in (0.0, 1.0, 2.0)] == [0.5, 1.0, 2.0]
    # quiet for longer than the window: the old deaths no longer count
    assert policy.failed(12.5) == 0.5
    assert policy.failed(13.0) == 1.0
    assert policy.total == 5


def test_only_deaths_inside_the_window_count() -> None:
    policy = Backoff(base_s=1.0, max_s=60.0, window_s=10.0)
    policy.failed(0.0)
    policy.failed(6.0)
    # at t=11 the death at 0 has left the window, the one at 6 has not
    assert policy.failed(11.0) == 2.0
    # exactly window_s after a death, that death no longer counts
    assert policy.failed(16.0) == 2.0


def test_reset_forgets_deaths_but_keeps_the_restart_count() -> None:
    policy = Backoff(base_s=0.1, max_s=10.0, window_s=30.0)
    for t in range(4):
        policy.failed(float(t))
    policy.reset()
    assert policy.failed(5.0) == 0.1
    assert policy.total == 5


def test_policies_do_not_share_state() -> None:
    a, b = Backoff(), Backoff()
    a.failed(0.0)
    a.failed(0.1)
    assert b.recent == [] and b.failed(0.2) == b.base_s
