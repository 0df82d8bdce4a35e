"""The staging pool's reuse rules, on the CPU. CUDA events do not exist here, so an event
is an object whose query() says whether the copy landed: the only stand-in in the tests
(tests/test_cuda.py runs the pool with real events and pinned memory)."""

from __future__ import annotations

import torch

from gradmon.agent.staging import Staged, StagingPool


class Event:
    def __init__(self) -> None:
        self.done = False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.done = True


def pool(keep: int = 4) -> tuple[StagingPool, list[Event]]:
    events: list[Event] = []

    def record(_: torch.Tensor) -> Event:
        events.append(Event())
        return events[-1]

    return StagingPool(
        keep, alloc=lambda shape, dtype: torch.empty(shape, dtype=dtype), record_event=record
    ), events


def block(rows: int = 3, value: float = 1.0) -> torch.Tensor:
    return torch.full((rows, 9), value, dtype=torch.float64)


def test_copies_the_block_and_readiness_follows_the_event() -> None:
    p, events = pool()
    staged = p.stage(block(value=2.5))
    assert torch.equal(staged.host, block(value=2.5))
    assert not staged.ready()
    events[0].done = True
    assert staged.ready()


def test_double_buffered_a_published_buffer_is_reused() -> None:
    p, events = pool()
    ptrs = []
    previous: Staged | None = None
    for step in range(6):  # stage step N while step N-1 is still in flight, then publish N-1
        staged = p.stage(block(value=step))
        ptrs.append(staged.host.data_ptr())
        if previous is not None:
            events[-2].done = True
            p.release(previous)
        previous = staged
    assert p.allocations == 2  # two buffers, alternating
    assert len(set(ptrs)) == 2 and ptrs[0] == ptrs[2] == ptrs[4]


def test_in_flight_buffers_are_never_handed_out_a_spare_is_allocated() -> None:
    p, events = pool()
    a, b = p.stage(block(value=1)), p.stage(block(value=2))
    c = p.stage(block(value=3))  # a and b still in flight: no wait, a third buffer
    assert p.allocations == 3
    assert len({a.host.data_ptr(), b.host.data_ptr(), c.host.data_ptr()}) == 3
    assert float(a.host[0, 0]) == 1 and float(b.host[0, 0]) == 2  # untouched
    events[0].done = True  # a landed and was published: its buffer is the next one used
    p.release(a)
    assert p.stage(block(value=4)).host.data_ptr() == a.host.data_ptr()
    assert p.allocations == 3


def test_a_copy_not_landed_is_not_pooled() -> None:
    p, events = pool()
    staged = p.stage(block())
    p.release(staged)  # its event has not completed: dropped, never overwritten
    assert p.idle() == 0
    events[0].done = True
    p.release(staged)
    assert p.idle() == 1
    p.release(staged)  # released once only
    assert p.idle() == 1


def test_bounded_spares_beyond_keep_are_dropped() -> None:
    p, events = pool(keep=4)
    staged = [p.stage(block()) for _ in range(7)]
    for event in events:
        event.done = True
    for s in staged:
        p.release(s)
    assert p.allocations == 7 and p.idle() == 4
    for _ in range(4):
        p.stage(block())
    assert p.allocations == 7  # the kept four are reused


def test_buffers_are_pooled_by_shape_and_dtype() -> None:
    p, events = pool()
    small = p.stage(block(rows=2))
    events[0].done = True
    p.release(small)
    p.stage(block(rows=5))  # another shape: a buffer of its own
    p.stage(block(rows=2).float())  # another dtype too
    assert p.allocations == 3
    again = p.stage(block(rows=2))
    assert p.allocations == 3 and again.host.data_ptr() == small.host.data_ptr()


def test_cpu_blocks_need_no_staging() -> None:
    staged = Staged(block())
    assert staged.ready() and staged.event is None
