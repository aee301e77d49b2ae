"""The problem ledger (rollouts/ledger.py): every problem index accounted for exactly once, across
out-of-order groups, checkpoints and resumes. The runs that exercise it end to end (a SIGKILL,
then --resume) are in test_reliability.py; here is its contract on its own."""

from __future__ import annotations

import pytest

from parityrl.rollouts.ledger import Ledger


def test_groups_done_out_of_order_move_the_watermark_only_past_a_contiguous_prefix():
    ledger = Ledger()
    taken = [ledger.take() for _ in range(5)]
    assert taken == [0, 1, 2, 3, 4] and ledger.started == 5
    ledger.mark(2, "trained")
    ledger.mark(4, "dropped")
    assert ledger.state() == {"position": 0, "done_above": [2, 4]}  # 0 and 1 still running
    ledger.mark(0, "rejected")
    assert ledger.state() == {"position": 1, "done_above": [2, 4]}
    ledger.mark(1, "trained")
    assert ledger.state() == {"position": 3, "done_above": [4]}
    ledger.mark(3, "trained")
    assert ledger.state() == {"position": 5, "done_above": []}


def test_a_resumed_ledger_skips_what_was_done_and_takes_what_was_in_flight():
    before = Ledger()
    for _ in range(6):
        before.take()
    for index in (0, 1, 3, 5):  # 2 and 4 were in flight when the checkpoint was written
        before.mark(index, "trained")
    saved = before.state()
    resumed = Ledger(**saved)
    assert [resumed.take() for _ in range(3)] == [2, 4, 6]
    for index in (2, 4, 6):
        resumed.mark(index, "trained")
    assert resumed.state() == {"position": 7, "done_above": []}


def test_an_index_accounted_for_twice_is_an_error_below_and_above_the_watermark():
    ledger = Ledger()
    for _ in range(3):
        ledger.take()
    ledger.mark(0, "trained")
    ledger.mark(2, "trained")
    with pytest.raises(RuntimeError, match="problem 0 is accounted for twice"):
        ledger.mark(0, "dropped")
    with pytest.raises(RuntimeError, match="problem 2 is accounted for twice"):
        ledger.mark(2, "rejected")


def test_flush_returns_each_outcome_once_for_problems_jsonl():
    ledger = Ledger()
    for _ in range(4):
        ledger.take()
    ledger.mark(1, "rejected")
    ledger.mark(0, "trained")
    ledger.mark(3, "dropped")
    assert ledger.flush() == {"trained": [0], "rejected": [1], "dropped": [3], "no_signal": []}
    assert ledger.flush() == {"trained": [], "rejected": [], "dropped": [], "no_signal": []}
    ledger.mark(2, "trained")
    assert ledger.flush()["trained"] == [2] and ledger.state()["position"] == 4
