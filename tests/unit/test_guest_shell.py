"""VM.shell()'s escape rule (pure): ssh's `~.` after a newline leaves, `~~` sends one `~`."""
from __future__ import annotations

import pytest

from harness.guest import _Escape


def feed_all(*chunks: bytes):
    e, sent = _Escape(), b""
    for c in chunks:
        out, leave = e.feed(c)
        sent += out
        if leave:
            return sent, True
    return sent, False


@pytest.mark.parametrize("chunks,sent,leave", [
    ((b"~.",), b"", True),                                   # first thing typed
    ((b"ls\r~.",), b"ls\r", True),                           # after Enter (raw mode sends \r)
    ((b"ls\n", b"~", b"."), b"ls\n", True),                  # split across reads
    ((b"a~.",), b"a~.", False),                              # not at the start of a line
    ((b"~~.",), b"~.", False),                               # ~~ is one literal ~, then text
    ((b"~x",), b"~x", False),                                # an unknown escape sends both
    ((b"\r~", b"~", b"\r~."), b"\r~\r", True),
    ((b"echo hi\r", b"exit\r"), b"echo hi\rexit\r", False),
    # the terminal answering busybox's cursor query (ESC[6n) after the prompt, then ~.
    ((b"ls\r", b"\x1b[50;14R", b"~."), b"ls\r\x1b[50;14R", True),
    ((b"\x1b[50;14R~.",), b"\x1b[50;14R", True),
    ((b"\x1bOA~.",), b"\x1bOA", True),                        # an SS3 arrow key
    ((b"~\x1b[A",), b"~\x1b[A", False),                       # ~ then an escape sequence: both sent
])
def test_escape(chunks, sent, leave):
    assert feed_all(*chunks) == (sent, leave)


def test_text_after_escape_is_not_sent():
    out, leave = _Escape().feed(b"~.rm -rf /\r")
    assert (out, leave) == (b"", True)
