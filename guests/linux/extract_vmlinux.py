#!/usr/bin/env python3
"""Extract the uncompressed ELF vmlinux from an x86 bzImage.

Usage: extract_vmlinux.py BZIMAGE OUTPUT

How: the bzImage's real-mode setup is (setup_sects + 1) sectors of 512 bytes (setup_sects at 0x1f1; 0 means 4).
The protected-mode part follows; the setup header (boot protocol >= 2.08) gives payload_offset (0x248) and
payload_length (0x24c) of the compressed kernel relative to the start of that protected-mode part. The kernel build
appends the uncompressed size as a little-endian u32 to the compressed stream, and payload_length includes it.

gzip, xz, lzma and bzip2 are decompressed with the standard library; zstd and lz4 (Debian's kernels use lz4) with
the `zstd` / `lz4` command-line tools. The result must be an ELF64 whose size matches the appended size.
Errors go to stderr with exit status 1.
"""

from __future__ import annotations

import bz2
import lzma
import os
import shutil
import struct
import subprocess
import sys
import zlib

SECTOR = 512
HDR_MAGIC = b"HdrS"


class ExtractError(Exception):
    pass


def payload_of(image: bytes) -> bytes:
    """Return the compressed payload (including the appended size) of a bzImage."""
    if len(image) < 0x250 or image[0x202:0x206] != HDR_MAGIC:
        raise ExtractError("not a bzImage: no 'HdrS' setup header at 0x202")
    version = struct.unpack_from("<H", image, 0x206)[0]
    if version < 0x208:
        raise ExtractError(f"boot protocol {version >> 8}.{version & 0xff:02d} has no payload fields (needs >= 2.08)")
    setup_sects = image[0x1F1] or 4
    pm_start = (setup_sects + 1) * SECTOR
    payload_offset, payload_length = struct.unpack_from("<II", image, 0x248)
    start = pm_start + payload_offset
    end = start + payload_length
    if payload_length < 8 or end > len(image):
        raise ExtractError(
            f"payload [{start:#x}, {end:#x}) does not fit in the {len(image)}-byte image "
            f"(setup_sects={setup_sects}, payload_offset={payload_offset:#x}, payload_length={payload_length:#x})"
        )
    return image[start:end]


def _stdlib(decompressor, data: bytes) -> bytes:
    out = decompressor.decompress(data)
    if not decompressor.eof:
        raise ExtractError("compressed stream is truncated")
    return out


def _tool(argv: list[str], data: bytes) -> bytes:
    if shutil.which(argv[0]) is None:
        raise ExtractError(f"the payload needs the `{argv[0]}` tool: apt-get install {argv[0]}")
    proc = subprocess.run(argv, input=data, capture_output=True, check=False)
    if proc.returncode != 0:
        raise ExtractError(f"`{' '.join(argv)}` failed: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout


# (name, magic, decompress(stream without the appended size) -> bytes)
FORMATS = (
    ("gzip", b"\x1f\x8b", lambda d: _stdlib(zlib.decompressobj(16 + zlib.MAX_WBITS), d)),
    ("xz", b"\xfd7zXZ\x00", lambda d: _stdlib(lzma.LZMADecompressor(lzma.FORMAT_XZ), d)),
    ("zstd", b"\x28\xb5\x2f\xfd", lambda d: _tool(["zstd", "-dcq"], d)),
    ("lzma", b"\x5d\x00\x00", lambda d: _stdlib(lzma.LZMADecompressor(lzma.FORMAT_ALONE), d)),
    ("lz4", b"\x02\x21\x4c\x18", lambda d: _tool(["lz4", "-dcq"], d)),  # lz4 legacy frame, as the kernel uses
    ("bzip2", b"BZh", lambda d: _stdlib(bz2.BZ2Decompressor(), d)),
)


def decompress(payload: bytes) -> tuple[str, bytes]:
    stream, size = payload[:-4], struct.unpack("<I", payload[-4:])[0]
    for name, magic, fn in FORMATS:
        if stream.startswith(magic):
            try:
                out = fn(stream)
            except (OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
                raise ExtractError(f"{name} decompression failed: {exc}") from exc
            if len(out) != size:
                raise ExtractError(f"{name}: decompressed {len(out)} bytes, but the image says {size}")
            return name, out
    raise ExtractError(f"unknown compression, payload starts with {stream[:8].hex(' ')}")


def check_elf64(data: bytes) -> None:
    if data[:4] != b"\x7fELF":
        raise ExtractError("decompressed payload is not an ELF file")
    if data[4] != 2 or data[5] != 1:
        raise ExtractError("decompressed payload is not a little-endian ELF64")
    e_machine = struct.unpack_from("<H", data, 18)[0]
    if e_machine != 62:
        raise ExtractError(f"decompressed ELF is for machine {e_machine}, not x86-64 (62)")


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(f"usage: {argv[0]} BZIMAGE OUTPUT", file=sys.stderr)
        return 2
    src, dst = argv[1], argv[2]
    try:
        with open(src, "rb") as f:
            image = f.read()
        name, vmlinux = decompress(payload_of(image))
        check_elf64(vmlinux)
    except (OSError, ExtractError) as exc:
        print(f"extract_vmlinux: {src}: {exc}", file=sys.stderr)
        return 1
    tmp = f"{dst}.tmp"
    with open(tmp, "wb") as f:
        f.write(vmlinux)
    os.replace(tmp, dst)
    if os.environ.get("VERBOSE"):
        print(f"{src}: {name} payload, {len(vmlinux)} bytes of ELF64 -> {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
