"""The load generator's collector guard (benchmarks/loadgen.py quiet_collector)."""

from __future__ import annotations

import gc

import pytest

from benchmarks.loadgen import quiet_collector


def test_quiet_collector_freezes_and_pauses_collection_then_restores_it() -> None:
    assert gc.isenabled()
    before = gc.get_freeze_count()
    with quiet_collector():
        assert not gc.isenabled()
        # Everything alive when the block began is out of the collector's sight.
        assert gc.get_freeze_count() > before
        assert gc.get_count()[0] < 100  # just collected: the young generation starts empty
    assert gc.isenabled()
    assert gc.get_freeze_count() == 0


def test_quiet_collector_restores_collection_when_the_block_fails() -> None:
    with pytest.raises(RuntimeError), quiet_collector():
        raise RuntimeError("measured phase failed")
    assert gc.isenabled()
    assert gc.get_freeze_count() == 0
