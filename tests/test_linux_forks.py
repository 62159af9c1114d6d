"""Forks of a Linux at its shell prompt (issue 15): each fork's console answers, and no two forks produce the same
"random" bytes, because each gets a new VMGenID generation and Linux reseeds (add_vmfork_randomness). Forks made
with new_generation=False keep the parent's RNG state and print the same bytes: the test can fail."""

from __future__ import annotations

import re
import time

import pytest

from linux_guest import PROMPT, Booted
from vmfork.fork import VM

COMMAND = b"head -c 16 /dev/urandom | od -An -tx1\n"


def _ask(vm: VM, command: bytes, timeout: float = 300) -> bytes:
    serial = vm.device("serial0")
    since = len(serial.output())
    vm.feed_console(command)
    vm.start()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and vm.wait(0.2).reason == "timeout":
            if bytes(serial.output())[since:].count(PROMPT) >= 1:
                break
    finally:
        if vm.state == "running":
            vm.pause()
    return bytes(serial.output())[since:]


def _random_bytes(answer: bytes) -> str:
    m = re.search(rb"((?:[0-9a-f]{2}\s+){15}[0-9a-f]{2})", answer)
    assert m, answer
    return m.group(1).decode().replace(" ", "").replace("\n", "")


def test_forks_of_a_linux_shell_answer_with_different_random_bytes(linux_at_prompt: Booted) -> None:
    if linux_at_prompt.vm is None:
        pytest.skip(f"Linux did not reach its shell here: {linux_at_prompt.reason}")
    parent = linux_at_prompt.vm
    fresh = [parent.fork() for _ in range(3)]
    same = [parent.fork(new_generation=False) for _ in range(2)]
    try:
        got = [_random_bytes(_ask(f, COMMAND)) for f in fresh]
        assert len(set(got)) == len(got), got
        kept = [_random_bytes(_ask(f, COMMAND)) for f in same]
        assert kept[0] == kept[1], kept
        assert kept[0] not in got
    finally:
        for f in fresh + same:
            f.destroy()
