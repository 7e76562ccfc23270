"""harness.vm.qmp.matches: the partial-dict matcher every wait_event() relies on. Pure."""
from __future__ import annotations

import pytest

from harness.vm.qmp import matches

# Real event shapes from QEMU 7.2 (qmp.jsonl of a pc-dimm remove).
OST_132 = {"event": "ACPI_DEVICE_OST", "timestamp": {"seconds": 1, "microseconds": 2},
           "data": {"info": {"device": "dimm1", "source": 3, "status": 132, "slot": "0",
                             "slot-type": "DIMM"}}}
OST_0_SLOT_ONLY = {"event": "ACPI_DEVICE_OST", "timestamp": {"seconds": 1, "microseconds": 9},
                   "data": {"info": {"source": 3, "status": 0, "slot": "0", "slot-type": "DIMM"}}}
DELETED = {"event": "DEVICE_DELETED", "timestamp": {"seconds": 1, "microseconds": 5},
           "data": {"device": "dimm1", "path": "/machine/peripheral/dimm1"}}


@pytest.mark.parametrize("partial", [None, {}])
def test_empty_partial_matches_anything(partial):
    assert matches(OST_132, partial) and matches({}, partial)


def test_nested_partial_match():
    assert matches(OST_132, {"data": {"info": {"status": 132}}})
    assert matches(OST_132, {"event": "ACPI_DEVICE_OST", "data": {"info": {"slot-type": "DIMM", "source": 3}}})
    assert not matches(OST_132, {"data": {"info": {"status": 0}}})
    assert matches(OST_0_SLOT_ONLY, {"data": {"info": {"slot": "0", "status": 0, "source": 3}}})


def test_missing_key_does_not_match():
    # After DEVICE_DELETED, QEMU's final OST no longer names the device.
    assert not matches(OST_0_SLOT_ONLY, {"data": {"info": {"device": "dimm1"}}})
    assert not matches(DELETED, {"data": {"info": {}}})


def test_values_compare_by_type():
    # The slot is a string in QEMU's events; an int must not match it.
    assert not matches(OST_132, {"data": {"info": {"slot": 0}}})
    assert matches(OST_132, {"data": {"info": {"slot": "0"}}})


def test_dict_wanted_but_scalar_found():
    assert not matches(DELETED, {"data": {"device": {"id": "dimm1"}}})


def test_extra_keys_in_event_are_ignored_and_whole_values_compare():
    assert matches(DELETED, {"data": {"device": "dimm1"}})
    assert not matches(DELETED, {"data": {"path": "/machine/peripheral"}})   # not a prefix match
    assert matches({"a": [1, 2]}, {"a": [1, 2]}) and not matches({"a": [1, 2]}, {"a": [1]})


def test_event_is_not_modified():
    ev = {"event": "X", "data": {"k": 1}}
    matches(ev, {"data": {"k": 1, "z": 2}})
    assert ev == {"event": "X", "data": {"k": 1}}
