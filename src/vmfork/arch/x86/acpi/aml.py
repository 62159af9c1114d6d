"""A small AML (ACPI Machine Language) builder: enough of ACPI 6.x chapter 20 to describe fixed devices.

Every builder returns the AML bytes of one term, so a namespace reads like the ASL it stands for:

    scope("\\_SB", [
        device("COM1", [
            name("_HID", eisa_id("PNP0501")),
            name("_UID", 0),
            name("_CRS", resource_template([io_port(0x3F8, 8), irq_no_flags(4)])),
        ]),
    ])

is `Scope (\\_SB) { Device (COM1) { Name (_HID, EisaId ("PNP0501")) ... } }`. Values: int (the shortest
integer encoding), str (a String), bytes (an already encoded term, e.g. from `buffer`, `package`, `eisa_id`).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable, Sequence

# opcodes (ACPI 6.5, 20.3)
ZERO_OP = 0x00
ONE_OP = 0x01
ONES_OP = 0xFF
NAME_OP = 0x08
BYTE_PREFIX = 0x0A
WORD_PREFIX = 0x0B
DWORD_PREFIX = 0x0C
STRING_PREFIX = 0x0D
QWORD_PREFIX = 0x0E
SCOPE_OP = 0x10
BUFFER_OP = 0x11
PACKAGE_OP = 0x12
METHOD_OP = 0x14
RETURN_OP = 0xA4
IF_OP = 0xA0
LEQUAL_OP = 0x93
NOTIFY_OP = 0x86
ARG0_OP = 0x68
EXT_OP_PREFIX = 0x5B
DEVICE_OP = 0x82             # after EXT_OP_PREFIX
ROOT_CHAR = 0x5C             # "\"
PARENT_PREFIX = 0x5E         # "^"
DUAL_NAME_PREFIX = 0x2E
MULTI_NAME_PREFIX = 0x2F

# resource descriptors (6.4)
SMALL_IO = 0x47              # I/O port descriptor, 7 bytes of data
SMALL_IRQ_NO_FLAGS = 0x22    # IRQ descriptor without the information byte
SMALL_END_TAG = 0x79
LARGE_MEMORY32_FIXED = 0x86
LARGE_EXTENDED_IRQ = 0x89

Value = int | str | bytes

_SEG_RE = re.compile(r"[A-Z_][A-Z0-9_]{0,3}")


def pkg_length(body_len: int) -> bytes:
    """The PkgLength encoding for a package whose contents after the PkgLength are `body_len` bytes (the encoded
    length counts the PkgLength bytes themselves)."""
    for extra in range(4):
        total = body_len + 1 + extra
        if extra == 0 and total < 0x40:
            return bytes((total,))
        if extra and total < 1 << (4 + 8 * extra):
            out = [(extra << 6) | (total & 0xF)]
            out += [(total >> (4 + 8 * i)) & 0xFF for i in range(extra)]
            return bytes(out)
    raise ValueError(f"AML package of {body_len} bytes is too long")


def _seg(seg: str) -> bytes:
    if not _SEG_RE.fullmatch(seg):
        raise ValueError(f"bad AML name segment {seg!r}: 1-4 of A-Z, 0-9, _ (not starting with a digit)")
    return seg.ljust(4, "_").encode("ascii")


def name_string(path: str) -> bytes:
    """A NameString: "\\_SB.COM1", "^FOO", "_HID"."""
    out = b""
    rest = path
    if rest.startswith("\\"):
        out += bytes((ROOT_CHAR,))
        rest = rest[1:]
    while rest.startswith("^"):
        out += bytes((PARENT_PREFIX,))
        rest = rest[1:]
    segs = [s for s in rest.split(".")] if rest else []
    if not segs:
        return out + b"\0"                       # NullName (e.g. the root alone)
    encoded = b"".join(_seg(s) for s in segs)
    if len(segs) == 1:
        return out + encoded
    if len(segs) == 2:
        return out + bytes((DUAL_NAME_PREFIX,)) + encoded
    return out + bytes((MULTI_NAME_PREFIX, len(segs))) + encoded


def integer(value: int) -> bytes:
    """The shortest integer encoding (ZeroOp, OneOp, OnesOp, or a Byte/Word/DWord/QWord constant)."""
    if value < 0 or value >= 1 << 64:
        raise ValueError(f"AML integer {value} out of range")
    if value == 0:
        return bytes((ZERO_OP,))
    if value == 1:
        return bytes((ONE_OP,))
    if value == (1 << 64) - 1:
        return bytes((ONES_OP,))
    for prefix, fmt, limit in ((BYTE_PREFIX, "<B", 1 << 8), (WORD_PREFIX, "<H", 1 << 16),
                               (DWORD_PREFIX, "<I", 1 << 32), (QWORD_PREFIX, "<Q", 1 << 64)):
        if value < limit:
            return bytes((prefix,)) + struct.pack(fmt, value)
    raise AssertionError("unreachable")


def string(text: str) -> bytes:
    data = text.encode("ascii")
    if b"\0" in data:
        raise ValueError("AML strings cannot contain NUL")
    return bytes((STRING_PREFIX,)) + data + b"\0"


def value(v: Value) -> bytes:
    if isinstance(v, bool):
        return integer(int(v))
    if isinstance(v, int):
        return integer(v)
    if isinstance(v, str):
        return string(v)
    return bytes(v)


def eisa_id(text: str) -> bytes:
    """EisaId("PNP0501"): three letters (5 bits each) and four hex digits, as the 32-bit integer ASL makes."""
    if not re.fullmatch(r"[A-Z]{3}[0-9A-F]{4}", text):
        raise ValueError(f"bad EISA id {text!r}: three capital letters and four hex digits")
    a, b, c = (ord(ch) - 0x40 for ch in text[:3])
    raw = bytes(((a << 2) | (b >> 3), ((b & 7) << 5) | c, int(text[3:5], 16), int(text[5:7], 16)))
    return integer(int.from_bytes(raw, "little"))


def name(path: str, v: Value) -> bytes:
    """Name (path, value)."""
    return bytes((NAME_OP,)) + name_string(path) + value(v)


def _terms(children: Iterable[bytes]) -> bytes:
    return b"".join(children)


def scope(path: str, children: Iterable[bytes]) -> bytes:
    """Scope (path) { children }."""
    body = name_string(path) + _terms(children)
    return bytes((SCOPE_OP,)) + pkg_length(len(body)) + body


def device(path: str, children: Iterable[bytes]) -> bytes:
    """Device (path) { children }."""
    body = name_string(path) + _terms(children)
    return bytes((EXT_OP_PREFIX, DEVICE_OP)) + pkg_length(len(body)) + body


def method(path: str, body: Iterable[bytes], *, args: int = 0, serialized: bool = False) -> bytes:
    """Method (path, args, NotSerialized|Serialized) { body }."""
    if not 0 <= args <= 7:
        raise ValueError("a method takes 0-7 arguments")
    inner = name_string(path) + bytes((args | (0x08 if serialized else 0),)) + _terms(body)
    return bytes((METHOD_OP,)) + pkg_length(len(inner)) + inner


def return_(v: Value) -> bytes:
    """Return (value)."""
    return bytes((RETURN_OP,)) + value(v)


def arg(n: int) -> bytes:
    """ArgN, a method's argument."""
    if not 0 <= n <= 6:
        raise ValueError("a method has Arg0-Arg6")
    return bytes((ARG0_OP + n,))


def lequal(a: Value, b: Value) -> bytes:
    """LEqual (a, b)."""
    return bytes((LEQUAL_OP,)) + value(a) + value(b)


def if_(predicate: bytes, body: Iterable[bytes]) -> bytes:
    """If (predicate) { body }."""
    inner = predicate + _terms(body)
    return bytes((IF_OP,)) + pkg_length(len(inner)) + inner


def notify(path: str, code: int) -> bytes:
    """Notify (path, code)."""
    return bytes((NOTIFY_OP,)) + name_string(path) + integer(code)


def package(items: Sequence[Value]) -> bytes:
    """Package () { items } (at most 255 elements)."""
    if len(items) > 255:
        raise ValueError("a Package holds at most 255 elements")
    body = bytes((len(items),)) + b"".join(value(i) for i in items)
    return bytes((PACKAGE_OP,)) + pkg_length(len(body)) + body


def buffer(data: bytes) -> bytes:
    """Buffer () { data }."""
    body = integer(len(data)) + data
    return bytes((BUFFER_OP,)) + pkg_length(len(body)) + body


# --- resource templates (_CRS) ------------------------------------------------------------------------------------

def io_port(base: int, length: int, *, align: int = 1) -> bytes:
    """IO (Decode16, base, base, align, length): a fixed I/O port range."""
    return struct.pack("<BBHHBB", SMALL_IO, 0x01, base, base, align, length)


def irq_no_flags(*irqs: int) -> bytes:
    """IRQNoFlags () {irqs}: edge triggered, active high, ISA IRQs 0-15."""
    mask = 0
    for irq in irqs:
        if not 0 <= irq <= 15:
            raise ValueError(f"ISA IRQ {irq} is not 0-15")
        mask |= 1 << irq
    return struct.pack("<BH", SMALL_IRQ_NO_FLAGS, mask)


def memory32_fixed(base: int, length: int, *, writable: bool = True) -> bytes:
    """Memory32Fixed (ReadWrite|ReadOnly, base, length)."""
    return struct.pack("<BHBII", LARGE_MEMORY32_FIXED, 9, 1 if writable else 0, base, length)


def extended_interrupt(*gsis: int, edge: bool = True, active_low: bool = False, shared: bool = False) -> bytes:
    """Interrupt (ResourceConsumer, Edge|Level, ActiveHigh|ActiveLow, Exclusive|Shared) {gsis}."""
    if not 1 <= len(gsis) <= 255:
        raise ValueError("an Interrupt descriptor lists 1-255 interrupts")
    flags = 0x01 | (0x02 if edge else 0) | (0x04 if active_low else 0) | (0x08 if shared else 0)
    data = struct.pack("<BB", flags, len(gsis)) + b"".join(struct.pack("<I", g) for g in gsis)
    return struct.pack("<BH", LARGE_EXTENDED_IRQ, len(data)) + data


def resource_template(descriptors: Iterable[bytes]) -> bytes:
    """ResourceTemplate () { descriptors }: a Buffer ending with an End Tag (checksum 0: "ignore")."""
    return buffer(b"".join(descriptors) + bytes((SMALL_END_TAG, 0)))


__all__ = ["arg", "buffer", "device", "eisa_id", "extended_interrupt", "if_", "integer", "io_port", "irq_no_flags",
           "lequal", "memory32_fixed", "method", "name", "name_string", "notify", "package", "pkg_length",
           "resource_template", "return_", "scope", "string", "value"]
