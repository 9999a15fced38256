"""RemoteLun over a fake initiator: the byte ranges its SBC commands touch, and the
ways down when a destination refuses WRITE SAME (UNMAP), then WRITE SAME itself."""

from __future__ import annotations

import pytest

from iscsi_vmtarget.client.initiator import ILLEGAL_REQUEST, ScsiCommandError
from iscsi_vmtarget.client.remote import MAX_IO, RemoteLun, UrlError, parse_url

BS = 512


class FakeLun:
    """The Initiator methods RemoteLun calls, over a bytearray medium."""

    def __init__(self, size: int, *, write_same: bool = True, unmap: bool = True) -> None:
        self.medium = bytearray(b"\xaa" * size)
        self.write_same, self.unmap = write_same, unmap
        self.writes: list[int] = []  # bytes per WRITE(16)
        self.sock = None

    def read_capacity16(self, lun: int = 0) -> tuple[int, int]:
        return len(self.medium) // BS, BS

    def read16(self, lba: int, blocks: int, block_size: int, lun: int = 0) -> bytes:
        return bytes(self.medium[lba * BS : (lba + blocks) * BS])

    def write16(self, lba: int, data: bytes, block_size: int, lun: int = 0) -> None:
        self.medium[lba * BS : lba * BS + len(data)] = data
        self.writes.append(len(data))

    def write_same16(
        self, lba: int, blocks: int, block_size: int, lun: int = 0, unmap: bool = False
    ) -> None:
        if not self.write_same or (unmap and not self.unmap):
            raise ScsiCommandError("WRITE SAME(16)", 0x02, (ILLEGAL_REQUEST, 0x24, 0x00))
        self.medium[lba * BS : (lba + blocks) * BS] = bytes(blocks * BS)

    def close(self) -> None:
        pass


@pytest.mark.parametrize("write_same,unmap", [(True, True), (True, False), (False, False)])
def test_unmap_reads_as_zeros_whichever_way_the_destination_allows(
    write_same: bool, unmap: bool
) -> None:
    fake = FakeLun(4 * MAX_IO, write_same=write_same, unmap=unmap)
    lun = RemoteLun(fake, 0, "LUN 0")  # type: ignore[arg-type]
    start, length = BS, 2 * MAX_IO + 3 * BS
    lun.unmap(start, length)
    assert lun.read(start, length) == bytes(length)
    assert lun.read(0, BS) == b"\xaa" * BS  # neighbours untouched
    after = start + length
    assert lun.read(after, 4 * MAX_IO - after) == b"\xaa" * (4 * MAX_IO - after)
    if write_same:
        assert fake.writes == []
    else:  # plain zeros, in commands of at most MAX_IO bytes
        assert sum(fake.writes) == length and max(fake.writes) <= MAX_IO


def test_write_goes_out_in_max_io_pieces_and_reads_back() -> None:
    fake = FakeLun(4 * MAX_IO)
    lun = RemoteLun(fake, 0, "LUN 0")  # type: ignore[arg-type]
    data = bytes(range(256)) * ((MAX_IO + 2 * BS) // 256)
    lun.write(BS, memoryview(data))
    assert fake.writes == [MAX_IO, 2 * BS]
    assert lun.read(BS, len(data)) == data
    assert lun.bytes_written == len(data)
    with pytest.raises(ValueError, match="not whole 512-byte blocks"):
        lun.write(1, b"x" * BS)


def test_url_target_name_is_checked_like_login_does() -> None:
    url = parse_url("iscsi://u%secret123456@[::1]:3261/IQN.2026-11.org.example:t/2")
    assert (url.host, url.port, url.iqn, url.lun) == ("::1", 3261, "IQN.2026-11.org.example:t", 2)
    assert (url.user, url.secret) == ("u", "secret123456")
    with pytest.raises(UrlError, match="is not a target name: it is not iqn"):
        parse_url("iscsi://h/eui.123")  # eui. wants 16 hex digits
    with pytest.raises(UrlError, match="is not a target name: it contains"):
        parse_url("iscsi://h/iqn.2026-11.org.example:a_b")
