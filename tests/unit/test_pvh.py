"""harness.kernels.pvh: the payload of a bzImage and its unpacking, on synthetic bzImages."""
import gzip
import lzma
import struct

import pytest

from harness.errors import KernelError
from harness.kernels import pvh

ELF = b"\x7fELF" + bytes(range(256)) * 64


def bzimage(payload: bytes, setup_sects: int = 4) -> bytes:
    """A setup header with HdrS, setup_sects and payload_offset/length, then the payload."""
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    setup[0x202:0x206] = b"HdrS"
    offset = 0x40
    struct.pack_into("<II", setup, 0x248, offset, len(payload))
    return bytes(setup) + bytes(offset) + payload + b"\0" * 16


def test_gzip_payload_is_the_stream_as_gzip_wrote_it():
    # The build appends no length after gzip: its ISIZE trailer is the last 4 bytes.
    blob = gzip.compress(ELF, 9)
    assert pvh.decompress(pvh.payload(bzimage(blob))) == ELF


def test_xz_payload_has_the_length_appended():
    blob = lzma.compress(ELF, format=lzma.FORMAT_XZ) + struct.pack("<I", len(ELF))
    assert pvh.decompress(pvh.payload(bzimage(blob))) == ELF


def test_a_wrong_length_is_refused():
    blob = lzma.compress(ELF, format=lzma.FORMAT_XZ) + struct.pack("<I", len(ELF) + 1)
    with pytest.raises(KernelError, match="unpacked to"):
        pvh.decompress(blob)


def test_not_a_bzimage():
    with pytest.raises(KernelError, match="HdrS"):
        pvh.payload(b"\0" * 4096)
