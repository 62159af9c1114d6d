"""Shared fixtures: the test guests (built by guests/build.sh) and machines booted from them."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli_harness import CliHarness
from vmfork.toolstack.jail import TEST_ENV
from vmfork.vmi.symbols import SymbolTable

ROOT = Path(__file__).resolve().parents[1]
GUESTS = ROOT / "build" / "guests"


@pytest.fixture(scope="session")
def guest_dir() -> Path:
    """The built test guests; builds them if needed (the README's test command does this first anyway)."""
    subprocess.run([str(ROOT / "guests" / "build.sh")], check=True)
    return GUESTS


@pytest.fixture(scope="session")
def pvh_guest(guest_dir: Path) -> Path:
    return guest_dir / "testguest-pvh.elf"


@pytest.fixture(scope="session")
def multiboot_guest(guest_dir: Path) -> Path:
    return guest_dir / "testguest-multiboot.elf"


@pytest.fixture(scope="session")
def symbol_map(tmp_path_factory: pytest.TempPathFactory, pvh_guest: Path) -> Path:
    """The PVH test guest's nasm symbol map: the same sources assembled again with a map, checked to give the very
    bytes of build/guests/testguest-pvh.elf."""
    tmp = tmp_path_factory.mktemp("guest-map")
    out = tmp / "testguest-pvh.map"
    src = ROOT / "guests" / "testguest"
    subprocess.run(["nasm", "-f", "bin", "-DVARIANT_PVH", "-I", f"{src}/", "-o", str(tmp / "tg.bin"),
                    "--before", f"[map symbols {out}]", str(src / "main.asm")], check=True)
    assert (tmp / "tg.bin").read_bytes() == pvh_guest.read_bytes(), "the map is not of the built guest"
    return out


@pytest.fixture(scope="session")
def symbols(symbol_map: Path) -> SymbolTable:
    """The PVH test guest's symbols (a test module may define its own `symbols`)."""
    return SymbolTable.load(symbol_map)


@pytest.fixture
def machines() -> Iterator[list]:  # type: ignore[type-arg]
    """Collects machines a test creates and destroys them (whole trees) afterwards."""
    made: list = []  # type: ignore[type-arg]
    yield made
    for m in reversed(made):
        m.destroy(tree=True)


from linux_guest import linux_at_prompt  # noqa: E402,F401  (the session-scoped Linux at its shell prompt)


@pytest.fixture
def ts(tmp_path: Path, pvh_guest: Path) -> Iterator[CliHarness]:
    """The CLI (tests/cli_harness.py) with a run directory of its own, on the PVH test guest; its domains are
    destroyed afterwards. (A test module may define its own `ts`.)"""
    with CliHarness(tmp_path, pvh_guest) as t:
        yield t


@pytest.fixture
def jail_probe(ts: CliHarness) -> CliHarness:
    """`ts` whose domains have the test-only QMP command `vmfork-jail-probe` (toolstack/jail_probe.py): for the
    jailer's tests (`pytestmark = pytest.mark.usefixtures("jail_probe")`)."""
    ts.env[TEST_ENV] = "1"
    return ts
