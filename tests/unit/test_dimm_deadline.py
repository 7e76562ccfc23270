"""harness.memory.dimm.remove_dimm keeps ONE deadline: events for other devices do not restart it.

The QMP object here is a stand-in that only hands out events (the wait logic is what is tested);
the real event order is tested on real guests in tests/integration/test_boot.py.
"""
from __future__ import annotations

import time

import pytest

from harness.errors import Hang
from harness.memory.dimm import Dimm, remove_dimm


class ChattyQMP:
    """Answers device_del, then keeps emitting OST events for ANOTHER DIMM every 50 ms."""

    def __init__(self, limit: int = 200):
        self.n, self.limit = 0, limit

    def mark(self) -> int:
        return 0

    def execute(self, cmd, args=None):
        assert cmd == "device_del", cmd
        return {}

    def wait_event_indexed(self, names, timeout, after):
        self.n += 1
        if self.n > self.limit:
            raise AssertionError("remove_dimm kept waiting long past its deadline")
        time.sleep(min(0.05, max(0.0, timeout)))
        return after, {"event": "ACPI_DEVICE_OST",
                       "data": {"info": {"device": "other-dimm", "slot-type": "DIMM", "slot": "3",
                                         "status": 132, "source": 3}}}


def test_unrelated_events_do_not_extend_the_deadline():
    qmp = ChattyQMP()
    d = Dimm(id="dimm1", memdev="mem-dimm1", addr=1 << 32, size=128 << 20, slot=0, node=0)
    with pytest.raises(Hang) as e:
        remove_dimm(qmp, d, timeout=0.5)
    assert "dimm1" in str(e.value) and "other-dimm" in str(e.value)   # names what it awaited and last saw
    assert qmp.n < 40, f"{qmp.n} waits for a 0.5 s deadline of 50 ms events"
