"""Process-wide tuning of the garbage collector and the GIL, for a process that serves load:
`chatops serve` (and its workers) and the standalone `chatops simulator`."""

from __future__ import annotations

import gc
import sys

# Allocations between young-generation collections (CPython's default is 700). See
# freeze_startup_heap.
GC_YOUNG_THRESHOLD = 20_000
# Longest a thread that wants the GIL waits for the one holding it (CPython's default is 5 ms).
# See freeze_startup_heap.
GIL_SWITCH_INTERVAL_S = 0.001


def freeze_startup_heap() -> None:
    """Move everything alive after start-up out of the garbage collector's sight (gc.freeze),
    collect the young generation less often, and let threads take turns with the GIL sooner.

    The start-up objects (modules, SQLAlchemy's metadata and statement caches, the SDK's
    types, the catalog) live as long as the process, yet every full collection walked them all:
    at 100 generations that was a 200-250 ms stop of the event loop every few seconds, the whole
    token-delivery tail's worst. Frozen, a full collection walks only what came later. Collected
    first, so no garbage is frozen with them.

    At CPython's default the young generation is collected every 700 allocations, hundreds of
    times a second under load, so the objects of one coalescing interval (a write's futures,
    batches and records, living ~150 ms) outlived two collections and reached the old
    generation, which then filled with garbage and was collected in full every ~5 s: 100-165
    ms stops of the loop and the stream writer alike at 450 generations, for almost nothing
    collected. Every GC_YOUNG_THRESHOLD allocations, such objects die young instead; with it
    the delivery lag p99 at 450 generations went from 287/309 ms to 213/206 ms, for the same
    CPU.

    The stream writer's thread hands the GIL back and forth with the event loop several times
    per commit (each wait on the database releases it); at CPython's 5 ms switch interval each
    hand-back could wait 5 ms behind a busy loop, so a commit of 10 ms took tens under load and
    every delta waiting on it with it. GIL_SWITCH_INTERVAL_S bounds those waits: at 500
    generations, lag p99 303/303/243 -> 207/217/280 ms and the service's CPU 25-27 -> 23 s per
    step (time-to-first-token overhead at 50 sessions p50 35 -> 25 ms)."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
