"""vmem.resize()'s wait, on a scripted QMP (pure logic): it re-reads the size at least every POLL_S,
woken early by the device's MEMORY_DEVICE_SIZE_CHANGE, never sleeps blindly, and reports a stall."""
from __future__ import annotations

import pytest

from harness.errors import Hang
from harness.memory import virtio_mem as vmem

MiB = 1 << 20


class ScriptedQMP:
    """query-memory-devices answers the next size of `sizes` (the last one repeats)."""

    def __init__(self, sizes, event_after=None):
        self.sizes, self.reads, self.waits, self.sent = list(sizes), 0, [], []
        self.requested = 0
        self.event_after = event_after      # index of the read after which a size event is pending

    def execute(self, cmd, args=None, timeout=30.0):
        self.sent.append(cmd)
        if cmd == "qom-set":
            self.requested = args["value"]
            return {}
        assert cmd == "query-memory-devices"
        size = self.sizes[min(self.reads, len(self.sizes) - 1)]
        self.reads += 1
        return [{"type": "virtio-mem", "data": {"id": "vmem0", "memaddr": 1 << 32, "size": size,
                                                "requested-size": self.requested, "max-size": 1024 * MiB,
                                                "block-size": 2 * MiB, "node": 0}}]

    def mark(self):
        return 0

    def events(self, after=0):
        return []

    def wait_event_indexed(self, names, match=None, timeout=30.0, after=0):
        self.waits.append((names, match, timeout, after))
        if self.event_after is not None and self.reads - 1 >= self.event_after:
            return after, {"event": names, "data": match["data"]}
        raise Hang(f"QMP event {names}", timeout=timeout)


@pytest.fixture
def no_sleep(monkeypatch):
    monkeypatch.setattr(vmem.time, "sleep", lambda s: pytest.fail(f"resize slept {s} s"))


def test_polls_until_the_target_without_sleeping(no_sleep):
    q = ScriptedQMP([0, 0, 64 * MiB, 128 * MiB, 256 * MiB])
    res = vmem.resize(q, 256 * MiB)
    assert res.reached and res.plugged == 256 * MiB and res.before == 0
    assert q.reads == 5                           # the state before the request, then 4 polls
    assert len(q.waits) == 3 and all(w[2] <= vmem.POLL_S for w in q.waits)
    assert all(w[0] == "MEMORY_DEVICE_SIZE_CHANGE" and w[1] == {"data": {"id": "vmem0"}} for w in q.waits)


def test_an_event_moves_the_wait_past_it(no_sleep):
    q = ScriptedQMP([0, 0, 0, 256 * MiB], event_after=1)
    assert vmem.resize(q, 256 * MiB).reached
    assert [w[3] for w in q.waits] == [0, 1]      # after the first event, the next wait starts behind it


def test_a_stalled_size_ends_the_wait_with_the_guests_reason(no_sleep):
    q = ScriptedQMP([128 * MiB])
    res = vmem.resize(q, 0, stall=0.0, dmesg=lambda: "boot\n[ 9.1] virtio_mem virtio1: unplug failed\n")
    assert not res.reached and res.plugged == 128 * MiB
    assert "guest plugged 128 MiB" in res.describe()
