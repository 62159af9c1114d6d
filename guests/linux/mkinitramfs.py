#!/usr/bin/env python3
"""Write vmfork's busybox initramfs: a gzip-compressed newc cpio archive.

Usage: mkinitramfs.py BUSYBOX INIT OUTPUT

Contents (all owned by root, mtime 0, so the output is reproducible for the same inputs):
  /init               the INIT script (mode 0755)
  /bin/busybox        BUSYBOX, which must be a static x86-64 ELF (Debian's busybox-static)
  /bin/<applet>       a symlink to busybox for every applet `BUSYBOX --list` names
  /bin/vmfork-exit    a 196-byte static ELF: `vmfork-exit [N]` writes the byte N (default 0) to the exit device
                      port 0xf4 after ioperm(0xf4, 1, 1); exit status 0 if the write was made, 1 if ioperm failed
  /bin/vmfork-env     vmfork-env.c beside this script, compiled here (gcc, freestanding, static): reads vmfork's env
                      channel (per-fork strings, `fork-vm --set`); `eval "$(vmfork-env)"` applies them
  /sbin -> bin, /usr/bin -> ../bin, /usr/sbin -> ../bin
  /dev/console (c 5:1), /dev/null (c 1:3), and empty /dev /proc /sys /tmp /root /etc /mnt
"""

from __future__ import annotations

import gzip
import os
import stat
import struct
import subprocess
import sys

# Machine code of vmfork-exit (x86-64, assembled with GNU as; loaded at 0x400000 + 0x78):
#   xor ebx, ebx                 ; status = 0
#   cmp qword ptr [rsp], 2       ; argc < 2 -> keep 0
#   jb  do_out
#   mov rsi, [rsp+16]            ; argv[1]
# parse:
#   movzx eax, byte ptr [rsi]
#   sub eax, '0'
#   cmp eax, 9
#   ja  do_out                   ; stop at the first non-digit
#   imul ebx, ebx, 10
#   add ebx, eax
#   inc rsi
#   jmp parse
# do_out:
#   mov eax, 173                 ; ioperm(0xf4, 1, 1)
#   mov edi, 0xf4
#   mov esi, 1
#   mov edx, esi
#   syscall
#   mov edi, 1                   ; exit status 1 if ioperm failed
#   test eax, eax
#   jnz done
#   mov eax, ebx
#   out 0xf4, al                 ; the exit device (vmfork; QEMU's isa-debug-exit,iobase=0xf4)
#   xor edi, edi
# done:
#   mov eax, 60                  ; exit(edi)
#   syscall
EXIT_CODE = bytes.fromhex(
    "31db48833c2402721a488b7424100fb60683e83083f809770a6bdb0a01c3"
    "48ffc6ebebb8ad000000bff4000000be0100000089f20f05bf0100000085"
    "c0750689d8e6f431ffb83c0000000f05"
)


def tiny_elf(code: bytes, base: int = 0x400000) -> bytes:
    """A static ELF64 executable: ELF header, one PT_LOAD program header (R+X, whole file), then code."""
    ehsize, phsize = 64, 56
    entry = base + ehsize + phsize
    total = ehsize + phsize + len(code)
    ehdr = struct.pack(
        "<4sBBBBB7sHHIQQQIHHHHHH",
        b"\x7fELF", 2, 1, 1, 0, 0, b"\0" * 7,  # ELF64, little endian, version 1, System V ABI
        2, 62, 1,  # ET_EXEC, EM_X86_64, EV_CURRENT
        entry, ehsize, 0,  # e_entry, e_phoff, e_shoff
        0, ehsize, phsize, 1, 0, 0, 0,  # flags, ehsize, phentsize, phnum, shentsize, shnum, shstrndx
    )
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 0, base, base, total, total, 0x1000)  # PT_LOAD, PF_R|PF_X
    return ehdr + phdr + code


class Cpio:
    """newc ("070701") archive writer."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.ino = 1

    @staticmethod
    def _pad(n: int) -> bytes:
        return b"\0" * (-n % 4)

    def add(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0), nlink: int = 1) -> None:
        encoded = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        header = b"070701" + b"".join(b"%08X" % v for v in fields)
        self.parts += [header, encoded, self._pad(len(header) + len(encoded)), data, self._pad(len(data))]
        self.ino += 1

    def dir(self, name: str) -> None:
        self.add(name, stat.S_IFDIR | 0o755, nlink=2)

    def file(self, name: str, data: bytes, perm: int = 0o755) -> None:
        self.add(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self.add(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, perm: int) -> None:
        self.add(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def finish(self) -> bytes:
        self.ino = 0
        self.add("TRAILER!!!", 0)
        return b"".join(self.parts)


def check_static_elf64(path: str, data: bytes) -> None:
    if data[:4] != b"\x7fELF" or data[4] != 2 or struct.unpack_from("<H", data, 18)[0] != 62:
        raise SystemExit(f"mkinitramfs: {path} is not an x86-64 ELF64 executable")
    phoff, = struct.unpack_from("<Q", data, 32)
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    for i in range(phnum):
        if struct.unpack_from("<I", data, phoff + i * phentsize)[0] == 3:  # PT_INTERP
            raise SystemExit(f"mkinitramfs: {path} is dynamically linked; install Debian's busybox-static")


def applets(busybox: str) -> list[str]:
    try:
        out = subprocess.run([busybox, "--list"], capture_output=True, check=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise SystemExit(f"mkinitramfs: `{busybox} --list` failed: {exc}") from exc
    names = sorted({n for n in out.split() if n and "/" not in n and n != "busybox"})
    for needed in ("sh", "echo", "mount", "poweroff"):
        if needed not in names:
            raise SystemExit(f"mkinitramfs: {busybox} has no `{needed}` applet")
    return names


HERE = os.path.dirname(os.path.abspath(__file__))
ENV_HELPER_SOURCE = os.path.join(HERE, "vmfork-env.c")
GCC_FLAGS = ["-Os", "-static", "-nostdlib", "-ffreestanding", "-fno-stack-protector", "-fno-pie", "-no-pie",
             "-fcf-protection=none", "-mgeneral-regs-only", "-fno-asynchronous-unwind-tables", "-Wl,--build-id=none",
             "-Wall", "-Werror"]


def env_helper(source: str = ENV_HELPER_SOURCE) -> bytes:
    """vmfork-env compiled from `source` (needs gcc; the same compiler gives the same bytes)."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "vmfork-env")
        try:
            subprocess.run(["gcc", *GCC_FLAGS, "-o", out, source], capture_output=True, check=True, text=True)
        except FileNotFoundError:
            raise SystemExit("mkinitramfs: gcc is missing (apt-get install gcc)") from None
        except subprocess.CalledProcessError as exc:
            raise SystemExit(f"mkinitramfs: compiling {source} failed:\n{exc.stderr}") from None
        subprocess.run(["strip", out], check=False)
        with open(out, "rb") as f:
            return f.read()


def build(busybox: str, init: str) -> bytes:
    with open(busybox, "rb") as f:
        bb = f.read()
    check_static_elf64(busybox, bb)
    with open(init, "rb") as f:
        init_data = f.read()
    if not init_data.startswith(b"#!"):
        raise SystemExit(f"mkinitramfs: {init} has no #! line")

    a = Cpio()
    for d in ("bin", "dev", "etc", "mnt", "proc", "root", "sys", "tmp", "usr"):
        a.dir(d)
    a.chardev("dev/console", 5, 1, 0o600)
    a.chardev("dev/null", 1, 3, 0o666)
    a.symlink("sbin", "bin")
    a.symlink("usr/bin", "../bin")
    a.symlink("usr/sbin", "../bin")
    a.file("bin/busybox", bb)
    for name in applets(busybox):
        a.symlink(f"bin/{name}", "busybox")
    a.file("bin/vmfork-exit", tiny_elf(EXIT_CODE))
    a.file("bin/vmfork-env", env_helper())
    a.file("init", init_data)
    return gzip.compress(a.finish(), compresslevel=9, mtime=0)


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(f"usage: {argv[0]} BUSYBOX INIT OUTPUT", file=sys.stderr)
        return 2
    data = build(argv[1], argv[2])
    tmp = f"{argv[3]}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, argv[3])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
