"""Header parsing on hostile element values: dates at the ends of the calendar, impossible
offsets, numbers that are not, huge strings, wrong VRs. ``InstanceHeader`` never raises (a
malformed optional attribute becomes ``None``); ``read_header_bytes`` raises only
``UnreadableHeader``."""

from __future__ import annotations

from hypothesis import example, given

from harness.fuzz import check_header, header_elements

from .conftest import fuzz


@fuzz(400)
@given(header_elements())
# What the fuzzing found, tried first on every run.
@example({0x00080005: ("UL", b"ISO_IR 100")})
@example({0x00080023: ("DA", b"20240101"), 0x00080033: ("SQ", b"A" * 64)})
@example({0x00080020: ("DA", b"\xd5\xe8\n/"), 0x00080201: ("SH", b"A" * 64)})
@example({0x00080020: ("DA", b"00010101")})
@example({0x00080020: ("DA", b"00010101"), 0x00080201: ("SH", b"+1400")})
@example({0x00080020: ("DA", b"20240101"), 0x00080201: ("SH", b"+9999")})
def test_header_values_never_raise_but_the_declared_exception(
        elements: dict[int, tuple[str | None, bytes]]) -> None:
    check_header(elements)
