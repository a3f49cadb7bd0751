"""GuestMemory over synthetic backend files: split layouts, holes, read-only views."""

from __future__ import annotations

from pathlib import Path

import pytest

from translate import BackendError, GuestMemory, PhysicalAddressError, RamRange

MB = 1 << 20


def backend(tmp_path: Path, size: int) -> str:
    path = tmp_path / "ram"
    data = bytearray(size)
    for off in range(0, size, 4096):  # every page starts with its own file offset
        data[off:off + 8] = off.to_bytes(8, "little")
    path.write_bytes(data)
    return str(path)


def test_split_layout_like_q35_above_4g(tmp_path: Path) -> None:
    f = backend(tmp_path, 8 * MB)
    # 4 MiB low, the other 4 MiB mapped at 4 GiB, as q35 does for big guests.
    with GuestMemory([RamRange(0x1_0000_0000, 4 * MB, f, 4 * MB),
                      RamRange(0, 4 * MB, f, 0)]) as mem:
        assert [r.gpa for r in mem.ranges] == [0, 0x1_0000_0000]
        assert mem.read_u64(0x3000) == 0x3000
        assert mem.read_u64(0x1_0000_0000 + 0x5000) == 4 * MB + 0x5000
        v = mem.view(0x1_0000_0000 + 0x2000, 4096)
        assert int.from_bytes(v[:8], "little") == 4 * MB + 0x2000
        assert mem.host_range(0x1_0000_1000, 16) == (f, 4 * MB + 0x1000)
        assert mem.size == 8 * MB and mem.top == 0x1_0000_0000 + 4 * MB


def test_views_are_read_only_and_zero_copy(tmp_path: Path) -> None:
    f = backend(tmp_path, MB)
    with GuestMemory([RamRange(0, MB, f, 0)]) as mem:
        v = mem.view(0x1000, 4096)
        assert v.readonly
        with pytest.raises(TypeError):
            v[0] = 1
        # Zero-copy: a write to the file shows through the existing view.
        with open(f, "r+b") as fh:
            fh.seek(0x1000)
            fh.write(b"\xAA" * 8)
        assert bytes(v[:8]) == b"\xAA" * 8
        del v


@pytest.mark.parametrize(("gpa", "size", "why"), [
    (0x40_0000, 8, "hole"),
    (0x10_0000 - 4, 8, "crosses the end"),
    (0x2_0000_0000, 4096, "past the top"),
    (-8, 8, "below"),
])
def test_holes_and_out_of_range_name_the_gpa(tmp_path: Path, gpa: int, size: int,
                                             why: str) -> None:
    f = backend(tmp_path, 2 * MB)
    with GuestMemory([RamRange(0, MB, f, 0), RamRange(0x80_0000, MB, f, MB)]) as mem:
        with pytest.raises(PhysicalAddressError) as ei:
            mem.view(gpa, size)
        assert f"{gpa:#x}" in str(ei.value)
        assert ei.value.gpa == gpa
        assert not mem.contains(gpa, size)


def test_range_past_end_of_file_is_refused(tmp_path: Path) -> None:
    f = backend(tmp_path, MB)
    with pytest.raises(BackendError, match="past the file's size"):
        GuestMemory([RamRange(0, 2 * MB, f, 0)])


def test_missing_file_and_overlap(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="cannot open"):
        GuestMemory([RamRange(0, MB, str(tmp_path / "nope"), 0)])
    f = backend(tmp_path, 2 * MB)
    with pytest.raises(BackendError, match="overlap"):
        GuestMemory([RamRange(0, MB, f, 0), RamRange(MB // 2, MB, f, MB)])
