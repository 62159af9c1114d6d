"""Shared fixtures: the test guests (built by guests/build.sh) and machines booted from them."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

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


@pytest.fixture
def machines() -> Iterator[list]:  # type: ignore[type-arg]
    """Collects machines a test creates and destroys them (whole trees) afterwards."""
    made: list = []  # type: ignore[type-arg]
    yield made
    for m in reversed(made):
        m.destroy(tree=True)
