"""One counter of KVM's binary statistics (KVM_GET_STATS_FD, Documentation/virt/kvm/api.rst "KVM_GET_STATS_FD").

The file holds a header, one descriptor per statistic (name, size, offset) and the values; a counter is read with
one pread of its 8 bytes, without taking the vCPU (no vcpu_load, unlike every vCPU ioctl): about 0.4 µs here."""

from __future__ import annotations

import errno
import os
import struct

from ..errors import KvmError
from . import constants as c
from .api import ioctl

_HEADER = struct.Struct("<IIIIII")          # flags, name_size, num_desc, id_offset, desc_offset, data_offset
_DESC = struct.Struct("<IhHII")             # flags, exponent, size, offset, bucket_size; then the name


class StatsCounter:
    """The 64-bit counter `name` (e.g. "insn_emulation") of the vCPU or VM behind `fd`."""

    __slots__ = ("_fd", "_offset", "name")

    def __init__(self, fd: int, name: str) -> None:
        self.name = name
        self._fd = ioctl(fd, c.KVM_GET_STATS_FD)
        try:
            _, name_size, count, _, desc_offset, data_offset = _HEADER.unpack(os.pread(self._fd, _HEADER.size, 0))
            size = _DESC.size + name_size
            table = os.pread(self._fd, size * count, desc_offset)
            for i in range(count):
                _, _, n, offset, _ = _DESC.unpack_from(table, i * size)
                label = table[i * size + _DESC.size:(i + 1) * size].split(b"\0", 1)[0].decode()
                if label == name and n == 1:
                    self._offset = data_offset + offset
                    return
            raise KvmError("KVM_GET_STATS_FD", errno.ENOENT, f"no 64-bit statistic named {name!r}")
        except BaseException:
            os.close(self._fd)
            raise

    def read(self) -> int:
        return int.from_bytes(os.pread(self._fd, 8, self._offset), "little")

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


__all__ = ["StatsCounter"]
