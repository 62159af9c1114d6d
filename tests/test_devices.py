"""Port devices, driven through a recording fake DeviceContext (no KVM needed)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import random
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

import pytest

from vmfork.devices import (
    I8042,
    STANDARD_DEVICE_NAMES,
    DeviceSetState,
    DeviceState,
    ExitDevice,
    HarnessPort,
    HarnessState,
    I8042State,
    PortBus,
    Rtc,
    RtcState,
    Serial16550A,
    SerialState,
    standard_devices,
)
from vmfork.devices.rtc import cmos_memory_fields
from vmfork.devices.serial import FLUSH_BYTES
from vmfork.errors import DeviceStateError, VmforkError

COM1 = 0x3F8
THR = RBR = DLL = COM1
IER = DLM = COM1 + 1
IIR = FCR = COM1 + 2
LCR = COM1 + 3
MCR = COM1 + 4
LSR = COM1 + 5
MSR = COM1 + 6
SCR = COM1 + 7

MIB = 1 << 20
GIB = 1 << 30


class FakeCtx:
    """Records every interrupt line change and stop request."""

    def __init__(self) -> None:
        self.irqs: list[tuple[int, bool]] = []
        self.stops: list[tuple[str, int | None]] = []

    def set_irq(self, gsi: int, level: bool) -> None:
        self.irqs.append((gsi, level))

    def request_stop(self, reason: str, status: int | None) -> None:
        self.stops.append((reason, status))

    def level(self, gsi: int = 4) -> bool:
        for g, lvl in reversed(self.irqs):
            if g == gsi:
                return lvl
        return False

    def take_irqs(self) -> list[tuple[int, bool]]:
        irqs, self.irqs = self.irqs, []
        return irqs


class Uart:
    """A UART with helpers for byte-wide register access."""

    def __init__(self, **kw: Any) -> None:
        self.ctx = FakeCtx()
        self.dev = Serial16550A(self.ctx, **kw)

    def r(self, port: int) -> int:
        return self.dev.io_read(port, 1)

    def w(self, port: int, value: int) -> None:
        self.dev.io_write(port, 1, value)


@pytest.fixture
def uart() -> Uart:
    return Uart()


# -- PortBus ----------------------------------------------------------------------------------------------------

class Recorder:
    state_type: ClassVar[type[DeviceState]] = HarnessState

    def __init__(self, name: str, ports: tuple[tuple[int, int], ...]) -> None:
        self.name = name
        self.ports = ports
        self.log: list[tuple[str, int, int, int]] = []

    def io_read(self, port: int, size: int) -> int:
        self.log.append(("r", port, size, 0))
        return 0x42

    def io_write(self, port: int, size: int, value: int) -> None:
        self.log.append(("w", port, size, value))

    def capture(self) -> HarnessState:
        return HarnessState(len(self.log))

    def restore(self, state: HarnessState) -> None:
        pass


def test_bus_routes_every_port_of_a_range_to_its_device() -> None:
    a = Recorder("a", ((0x100, 4),))
    b = Recorder("b", ((0x200, 1), (0x300, 2)))
    bus = PortBus([a, b])
    assert bus.io_read(0x103, 2) == 0x42
    bus.io_write(0x301, 4, 0xDEADBEEF)
    assert a.log == [("r", 0x103, 2, 0)]
    assert b.log == [("w", 0x301, 4, 0xDEADBEEF)]
    assert bus.device_at(0x100) is a and bus.device_at(0x200) is b and bus.device_at(0x104) is None
    assert bus.unknown_accesses == {}


@pytest.mark.parametrize(("size", "expected"), [(1, 0xFF), (2, 0xFFFF), (4, 0xFFFFFFFF)])
def test_bus_unknown_port_reads_all_ones_for_the_access_size(size: int, expected: int) -> None:
    bus = PortBus([Recorder("a", ((0x100, 1),))])
    assert bus.io_read(0x101, size) == expected


def test_bus_counts_unknown_accesses_per_port_and_calls_the_hook_once_per_port() -> None:
    seen: list[tuple[int, bool, int]] = []
    dev = Recorder("a", ((0x100, 1),))
    bus = PortBus([dev], on_unknown=lambda port, is_write, size: seen.append((port, is_write, size)))
    bus.io_write(0x80, 1, 0x12)
    bus.io_read(0x80, 1)
    bus.io_write(0x80, 2, 0x1234)
    bus.io_read(0xCF8, 4)
    bus.io_read(0x100, 1)  # a known port is not counted
    assert bus.unknown_accesses == {0x80: 3, 0xCF8: 1}
    assert seen == [(0x80, True, 1), (0xCF8, False, 4)]
    assert dev.log == [("r", 0x100, 1, 0)]  # the unknown writes reached no device


def test_bus_rejects_overlapping_ports_and_duplicate_names() -> None:
    with pytest.raises(ValueError, match="port 0x102 is claimed by both a and b"):
        PortBus([Recorder("a", ((0x100, 4),)), Recorder("b", ((0x102, 1),))])
    with pytest.raises(ValueError, match="two devices named 'a'"):
        PortBus([Recorder("a", ((0x100, 1),)), Recorder("a", ((0x200, 1),))])
    with pytest.raises(ValueError, match="bad port range"):
        PortBus([Recorder("a", ((0xFFFF, 2),))])


def test_bus_mmio_is_absent_hardware_and_counted() -> None:
    bus = PortBus([])
    assert bus.mmio_read(0xFED00000, 4) == 0xFFFFFFFF
    assert bus.mmio_read(0xFED00000, 8) == (1 << 64) - 1
    bus.mmio_write(0xFED00010, 4, 1)
    assert bus.unknown_mmio == {0xFED00000: 2, 0xFED00010: 1}


# -- UART: registers --------------------------------------------------------------------------------------------

def test_uart_reset_values(uart: Uart) -> None:
    assert uart.r(IER) == 0
    assert uart.r(IIR) == 0x01  # no interrupt pending, FIFOs off
    assert uart.r(LCR) == 0
    assert uart.r(MCR) == 0
    assert uart.r(LSR) == 0x60  # THR empty, transmitter empty
    assert uart.r(MSR) == 0xB0  # CTS, DSR, DCD asserted, no deltas
    assert uart.r(SCR) == 0
    assert uart.ctx.irqs == []


def test_uart_scratch_and_lcr_hold_any_byte(uart: Uart) -> None:
    for v in (0x00, 0x5A, 0xA5, 0xFF):
        uart.w(SCR, v)
        assert uart.r(SCR) == v
    uart.w(LCR, 0x1B)
    assert uart.r(LCR) == 0x1B


def test_uart_dlab_switches_offsets_0_and_1_to_the_divisor_latch(uart: Uart) -> None:
    uart.w(IER, 0x05)
    uart.w(LCR, 0x83)  # DLAB | 8N1
    uart.w(DLL, 0x01)
    uart.w(DLM, 0x02)
    assert uart.r(DLL) == 0x01 and uart.r(DLM) == 0x02
    assert uart.dev.output() == b""  # the DLL write did not transmit
    uart.w(LCR, 0x03)
    assert uart.r(IER) == 0x05  # the DLM write did not touch IER
    uart.w(THR, ord("x"))
    assert uart.dev.output() == b"x"
    uart.w(LCR, 0x83)
    assert (uart.r(DLL), uart.r(DLM)) == (0x01, 0x02)


def test_uart_dlab_read_of_offset_0_does_not_consume_received_data(uart: Uart) -> None:
    uart.dev.feed(b"Q")
    uart.w(LCR, 0x80)
    assert uart.r(DLL) == 12  # default divisor: 9600 baud
    uart.w(LCR, 0x00)
    assert uart.r(LSR) & 0x01
    assert uart.r(RBR) == ord("Q")


def test_uart_ier_and_mcr_keep_only_their_defined_bits(uart: Uart) -> None:
    uart.w(IER, 0xFF)
    assert uart.r(IER) == 0x0F
    uart.w(MCR, 0xFF)
    assert uart.r(MCR) == 0x1F


def test_uart_passes_the_linux_8250_autoconfig_probe(uart: Uart) -> None:
    # the IER test
    uart.w(IER, 0)
    assert uart.r(IER) & 0x0F == 0
    uart.w(IER, 0x0F)
    assert uart.r(IER) & 0x0F == 0x0F
    uart.w(IER, 0)
    # the loopback test: RTS|OUT2 in loopback must read back as CTS|DCD
    uart.w(MCR, 0x10 | 0x0A)
    assert uart.r(MSR) & 0xF0 == 0x90
    uart.w(MCR, 0)
    # FIFO detection: IIR bits 7:6 = 11 means a 16550A
    uart.w(FCR, 0x01)
    assert uart.r(IIR) >> 6 == 3
    # no 16750 64-byte FIFO bit
    uart.w(LCR, 0x80)
    uart.w(FCR, 0x21)
    uart.w(LCR, 0)
    assert uart.r(IIR) & 0x20 == 0
    uart.w(FCR, 0x00)
    assert uart.r(IIR) >> 6 == 0


def test_uart_wide_access_is_split_into_byte_accesses(uart: Uart) -> None:
    uart.w(MCR, 0x0B)
    assert uart.dev.io_read(MCR, 2) == 0x0B | (0x60 << 8)  # MCR, then LSR
    assert uart.dev.io_read(SCR, 2) == 0x00 | (0xFF << 8)  # past the register file floats high
    uart.dev.io_write(LCR, 2, 0x0103)  # LCR = 0x03, MCR = 0x01
    assert (uart.r(LCR), uart.r(MCR)) == (0x03, 0x01)


# -- UART: transmit and THRE interrupt --------------------------------------------------------------------------

def test_uart_polling_guest_transmits_without_any_interrupt(uart: Uart) -> None:
    for ch in b"hello\n":
        while not uart.r(LSR) & 0x20:
            pass
        uart.w(THR, ch)
    assert uart.dev.output() == b"hello\n"
    assert uart.r(LSR) == 0x60
    assert uart.ctx.irqs == []


def test_uart_enabling_thre_interrupt_raises_it_and_reading_iir_clears_it(uart: Uart) -> None:
    uart.w(IER, 0x02)
    assert uart.ctx.take_irqs() == [(4, True)]
    assert uart.r(IIR) == 0x02
    assert uart.ctx.take_irqs() == [(4, False)]
    assert uart.r(IIR) == 0x01  # cleared by the read that reported it
    assert uart.ctx.irqs == []


def test_uart_thre_interrupt_reports_fifo_bits_when_fifos_are_on(uart: Uart) -> None:
    uart.w(FCR, 0x01)
    uart.w(IER, 0x02)
    assert uart.r(IIR) == 0xC2
    assert uart.r(IIR) == 0xC1


def test_uart_retoggling_ier_thri_re_raises_thre(uart: Uart) -> None:
    # serial8250_do_startup's UART_BUG_THRE check: THRI, read IIR, IER=0, THRI again, read IIR must show THRE
    uart.w(IER, 0x02)
    assert uart.r(IIR) & 0x0F == 0x02
    uart.w(IER, 0)
    uart.w(IER, 0x02)
    assert uart.r(IIR) & 0x01 == 0
    uart.w(IER, 0)
    assert not uart.ctx.level()


def test_uart_clearing_ier_thri_drops_a_pending_thre(uart: Uart) -> None:
    uart.w(IER, 0x02)
    uart.w(IER, 0x00)
    assert uart.ctx.take_irqs() == [(4, True), (4, False)]
    assert uart.r(IIR) == 0x01
    uart.w(IER, 0x01)  # enabling another source does not bring THRE back
    assert uart.r(IIR) == 0x01


def test_uart_thr_write_pulses_the_line_so_an_edge_triggered_irqchip_sees_thre_again(uart: Uart) -> None:
    uart.w(IER, 0x02)
    uart.ctx.take_irqs()
    uart.w(THR, ord("a"))  # clears THRE (line drops), byte leaves, THRE again (line rises)
    assert uart.ctx.take_irqs() == [(4, False), (4, True)]
    assert uart.r(IIR) == 0x02
    assert uart.ctx.take_irqs() == [(4, False)]
    uart.w(THR, ord("b"))  # THRE was already cleared by the IIR read: only the rise
    assert uart.ctx.take_irqs() == [(4, True)]
    assert uart.dev.output() == b"ab"


def test_uart_linux_style_transmit_interrupt_cycle(uart: Uart) -> None:
    msg = b"0123456789abcdefghij"  # more than one FIFO load
    uart.w(FCR, 0x07)
    uart.w(MCR, 0x0B)
    uart.w(IER, 0x02)  # start_tx
    sent = 0
    handled = 0
    while uart.ctx.level():
        # the interrupt handler: read IIR until it says "no interrupt"
        while (iir := uart.r(IIR)) & 0x01 == 0:
            assert iir & 0x0F == 0x02
            handled += 1
            for _ in range(16):  # fill the TX FIFO
                if sent == len(msg):
                    uart.w(IER, 0)  # stop_tx
                    break
                uart.w(THR, msg[sent])
                sent += 1
    assert uart.dev.output() == msg
    assert handled == 2
    assert not uart.ctx.level()
    assert uart.r(IIR) == 0xC1


# -- UART: receive ----------------------------------------------------------------------------------------------

def test_uart_feed_without_fifo_delivers_one_byte_at_a_time(uart: Uart) -> None:
    uart.dev.feed(b"abc")
    assert uart.dev.capture().rx_fifo == b"a"
    assert uart.dev.capture().rx_pending == b"bc"
    got = bytearray()
    while uart.r(LSR) & 0x01:
        got.append(uart.r(RBR))
    assert got == b"abc"
    assert uart.r(LSR) == 0x60
    assert uart.r(RBR) == ord("c")  # RBR keeps the last byte


def test_uart_fifo_holds_16_bytes_and_refills_from_the_line(uart: Uart) -> None:
    uart.w(FCR, 0x01)
    data = bytes(range(40, 80))
    assert uart.dev.feed(data) == len(data)
    assert len(uart.dev.capture().rx_fifo) == 16
    got = bytearray()
    while uart.r(LSR) & 0x01:
        got.append(uart.r(RBR))
    assert got == data


def test_uart_rx_interrupt_no_fifo(uart: Uart) -> None:
    uart.w(IER, 0x01)
    assert uart.ctx.irqs == []
    uart.dev.feed(b"xy")
    assert uart.ctx.take_irqs() == [(4, True)]
    assert uart.r(IIR) == 0x04
    assert uart.r(RBR) == ord("x")
    assert uart.ctx.irqs == []  # the next byte arrived at once: the line stays up
    assert uart.r(IIR) == 0x04
    assert uart.r(RBR) == ord("y")
    assert uart.ctx.take_irqs() == [(4, False)]
    assert uart.r(IIR) == 0x01


def test_uart_rx_trigger_level_and_character_timeout(uart: Uart) -> None:
    uart.w(FCR, 0x81)  # FIFO on, trigger at 8 bytes (what Linux programs)
    uart.w(IER, 0x01)
    uart.dev.feed(b"abc")
    assert uart.r(IIR) == 0xCC  # below the trigger level: character timeout
    uart.dev.feed(b"defgh")
    assert uart.r(IIR) == 0xC4  # 8 bytes: received data available
    uart.r(RBR)
    assert uart.r(IIR) == 0xCC
    for _ in range(7):
        uart.r(RBR)
    assert uart.r(IIR) == 0xC1
    assert uart.ctx.irqs == [(4, True), (4, False)]


@pytest.mark.parametrize(("fcr", "level"), [(0x01, 1), (0x41, 4), (0x81, 8), (0xC1, 14)])
def test_uart_trigger_levels(uart: Uart, fcr: int, level: int) -> None:
    uart.w(FCR, fcr)
    uart.w(IER, 0x01)
    uart.dev.feed(b"z" * (level - 1))
    assert uart.r(IIR) == (0xCC if level > 1 else 0xC1)
    uart.dev.feed(b"z")
    assert uart.r(IIR) == 0xC4


def test_uart_linux_style_receive_interrupt_cycle(uart: Uart) -> None:
    uart.w(FCR, 0x81)
    uart.w(MCR, 0x0B)
    uart.w(IER, 0x05)  # RDI | RLSI
    uart.dev.feed(b"ls -l\n")
    assert uart.ctx.take_irqs() == [(4, True)]
    got = bytearray()
    while (iir := uart.r(IIR)) & 0x01 == 0:
        assert iir & 0x0F in (0x04, 0x0C)
        lsr = uart.r(LSR)
        while lsr & 0x01:
            got.append(uart.r(RBR))
            lsr = uart.r(LSR)
    assert got == b"ls -l\n"
    assert uart.ctx.take_irqs() == [(4, False)]


def test_uart_rx_data_outranks_thre_and_reading_iir_then_keeps_thre(uart: Uart) -> None:
    uart.w(IER, 0x03)
    uart.dev.feed(b"k")
    assert uart.r(IIR) == 0x04
    assert uart.r(IIR) == 0x04  # reading IIR does not clear received data
    uart.r(RBR)
    assert uart.r(IIR) == 0x02  # THRE survived behind the higher-priority source
    assert uart.r(IIR) == 0x01
    assert uart.ctx.irqs == [(4, True), (4, False)]


def test_uart_fcr_clear_rx_empties_the_fifo_then_takes_more_from_the_line(uart: Uart) -> None:
    uart.w(FCR, 0x01)
    uart.dev.feed(bytes(range(20)))
    uart.w(FCR, 0x03)  # clear RX FIFO: bytes 0..15 are lost, 16..19 arrive
    got = bytearray()
    while uart.r(LSR) & 0x01:
        got.append(uart.r(RBR))
    assert got == bytes(range(16, 20))


def test_uart_turning_fifos_on_or_off_resets_the_rx_fifo(uart: Uart) -> None:
    uart.dev.feed(b"AB")
    uart.w(FCR, 0x01)  # enabling resets the FIFO: "A" is lost, "B" arrives
    assert uart.dev.capture().rx_fifo == b"B"
    uart.dev.feed(b"CD")
    uart.w(FCR, 0x00)  # disabling resets it as well; one byte fits afterwards
    assert uart.dev.capture().rx_fifo == b""
    uart.dev.feed(b"E")
    assert uart.dev.capture().rx_fifo == b"E"
    assert uart.r(IIR) == 0x01


def test_uart_fcr_other_bits_are_ignored_unless_bit0_is_set(uart: Uart) -> None:
    uart.w(FCR, 0xC0)
    assert uart.dev.capture().fcr == 0
    uart.w(FCR, 0xC9)
    assert uart.dev.capture().fcr == 0xC9


def test_uart_feed_is_thread_safe() -> None:
    u = Uart()
    u.w(FCR, 0x01)
    chunks = [bytes([i]) * 50 for i in range(1, 11)]

    def producer() -> None:
        for chunk in chunks:
            u.dev.feed(chunk)

    t = threading.Thread(target=producer)
    t.start()
    got = bytearray()
    deadline = time.monotonic() + 10
    while len(got) < 500 and time.monotonic() < deadline:
        if u.r(LSR) & 0x01:
            got.append(u.r(RBR))
    t.join()
    assert bytes(got) == b"".join(chunks)


def test_uart_feed_limit_drops_the_excess() -> None:
    u = Uart(pending_limit=4)
    assert u.dev.feed(b"abcdef") == 4  # 4 fit on the wire; "a" then moves into the receiver at once
    assert u.dev.feed(b"ghi") == 1  # "bcd" wait: room for one more
    assert u.dev.feed(b"j") == 0
    got = bytearray()
    while u.r(LSR) & 0x01:
        got.append(u.r(RBR))
    assert got == b"abcdg"


# -- UART: loopback and modem status ----------------------------------------------------------------------------

def test_uart_loopback_sends_transmitted_bytes_to_the_receiver_not_the_sink(uart: Uart) -> None:
    uart.w(FCR, 0x01)
    uart.w(MCR, 0x10)
    for ch in b"loop":
        uart.w(THR, ch)
    assert uart.dev.output() == b""
    got = bytearray()
    while uart.r(LSR) & 0x01:
        got.append(uart.r(RBR))
    assert got == b"loop"


def test_uart_host_input_waits_while_in_loopback(uart: Uart) -> None:
    uart.w(MCR, 0x10)
    uart.dev.feed(b"typed")
    assert not uart.r(LSR) & 0x01
    uart.w(MCR, 0x00)
    assert uart.r(LSR) & 0x01
    assert uart.r(RBR) == ord("t")


def test_uart_loopback_overrun_sets_oe_and_raises_line_status_interrupt(uart: Uart) -> None:
    uart.w(IER, 0x05)
    uart.w(MCR, 0x10)
    uart.w(THR, ord("1"))
    uart.w(THR, ord("2"))  # no FIFO: overrun, the new byte replaces the old one
    assert uart.r(IIR) == 0x06  # line status outranks received data
    lsr = uart.r(LSR)
    assert lsr & 0x03 == 0x03  # DR | OE
    assert uart.r(LSR) & 0x02 == 0  # OE clears on read
    assert uart.r(IIR) == 0x04
    assert uart.r(RBR) == ord("2")
    assert uart.r(IIR) == 0x01


def test_uart_loopback_overrun_with_fifo_keeps_the_fifo(uart: Uart) -> None:
    uart.w(FCR, 0x01)
    uart.w(MCR, 0x10)
    for i in range(17):
        uart.w(THR, i)
    assert uart.r(LSR) & 0x02
    assert uart.dev.capture().rx_fifo == bytes(range(16))


def test_uart_loopback_modem_lines_and_delta_bits(uart: Uart) -> None:
    uart.w(MCR, 0x10)  # loopback, all outputs off: CTS/DSR/DCD drop
    assert uart.r(MSR) == 0x0B  # DCTS | DDSR | DDCD, nothing asserted
    assert uart.r(MSR) == 0x00  # deltas clear on read
    uart.w(MCR, 0x10 | 0x01)  # DTR -> DSR
    assert uart.r(MSR) == 0x22
    uart.w(MCR, 0x10 | 0x02)  # DTR off, RTS on -> DSR drops, CTS rises
    assert uart.r(MSR) == 0x13
    uart.w(MCR, 0x10 | 0x04)  # OUT1 -> RI; RTS off. RI rising is not a delta
    assert uart.r(MSR) == 0x41
    uart.w(MCR, 0x10 | 0x08)  # OUT1 off (RI trailing edge -> TERI), OUT2 -> DCD
    assert uart.r(MSR) == 0x8C
    uart.w(MCR, 0x00)  # leaving loopback: the line inputs CTS/DSR/DCD come back
    assert uart.r(MSR) == 0xB3


def test_uart_modem_status_interrupt_is_lowest_priority(uart: Uart) -> None:
    uart.w(IER, 0x0A)  # MSI | THRI
    uart.w(MCR, 0x10 | 0x02)
    assert uart.r(IIR) == 0x02  # THRE first
    assert uart.r(IIR) == 0x00  # then modem status (bit 0 clear: pending)
    assert uart.ctx.level()
    uart.r(MSR)
    assert uart.r(IIR) == 0x01
    assert not uart.ctx.level()


# -- UART: output sink ------------------------------------------------------------------------------------------

def test_uart_output_keeps_the_last_n_bytes() -> None:
    u = Uart(output_limit=10)
    data = bytes(range(65, 65 + 40))
    for ch in data:
        u.w(THR, ch)
    assert u.dev.output() == data[-10:]
    u.dev.clear_output()
    assert u.dev.output() == b""


def test_uart_log_file_gets_whole_lines_at_once_and_the_rest_on_close(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_bytes(b"old\n")
    u = Uart(log_path=str(log), flush_delay=3600)       # no timer flush during this test
    for ch in b"boot: ok\nlogin: ":
        u.w(THR, ch)
    assert log.read_bytes() == b"old\nboot: ok\n"      # appended; the line is on disk at its newline
    u.w(MCR, 0x10)
    u.w(THR, ord("!"))  # loopback bytes are not output
    u.dev.close()
    assert log.read_bytes() == b"old\nboot: ok\nlogin: "   # the partial line on close
    u.w(MCR, 0x00)
    u.w(THR, ord("?"))  # still works without the file
    assert u.dev.output() == b"boot: ok\nlogin: ?"


def test_uart_batches_output_into_lines_and_long_runs(uart: Uart) -> None:
    got: list[bytes] = []
    uart.dev.flush_delay = 3600
    uart.dev.add_listener(got.append)
    for ch in b"ab\ncd\n":
        uart.w(THR, ch)
    assert got == [b"ab\n", b"cd\n"]                     # one call (one write) per line, not per byte
    got.clear()
    for _ in range(FLUSH_BYTES + 10):
        uart.w(THR, ord("x"))
    assert got == [b"x" * FLUSH_BYTES]                    # a long run without a newline goes out in FLUSH_BYTES
    uart.dev.flush_output()
    assert got == [b"x" * FLUSH_BYTES, b"x" * 10]
    uart.dev.flush_output()                               # nothing left: no empty call
    assert len(got) == 2


def test_uart_flush_delay_zero_writes_every_byte_at_once(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    u = Uart(log_path=str(log), flush_delay=0)
    got: list[bytes] = []
    u.dev.add_listener(got.append)
    for ch in b"ab":
        u.w(THR, ch)
    assert got == [b"a", b"b"] and log.read_bytes() == b"ab"
    u.dev.flush_delay = 3600                              # switching delays on later works too
    u.w(THR, ord("c"))
    assert got == [b"a", b"b"]
    u.dev.flush_delay = 0                                 # and off again writes out what waits
    assert got == [b"a", b"b", b"c"] and log.read_bytes() == b"abc"
    with pytest.raises(ValueError, match="negative"):
        u.dev.flush_delay = -1


def test_uart_partial_line_reaches_log_and_listener_within_the_flush_delay(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    delay = 0.05
    u = Uart(log_path=str(log), flush_delay=delay)
    arrived = threading.Event()
    got: list[bytes] = []

    def listener(data: bytes) -> None:
        got.append(data)
        arrived.set()

    u.dev.add_listener(listener)
    t0 = time.monotonic()
    for ch in b"login: ":
        u.w(THR, ch)
    assert got == []                                      # batched: nothing yet
    assert arrived.wait(5), "the partial line never reached the listener"
    waited = time.monotonic() - t0
    assert got == [b"login: "] and log.read_bytes() == b"login: "
    # Not before the delay (it was batched), and not much after it (a loaded 2-core CI host gets some slack).
    assert delay * 0.9 <= waited < delay + 0.5, waited
    # A second prompt, after the timer thread went idle, is written out again (the timer re-arms).
    arrived.clear()
    for ch in b"Password: ":
        u.w(THR, ch)
    assert arrived.wait(5) and got == [b"login: ", b"Password: "]
    u.dev.close()


def test_uart_shorter_flush_delay_applies_to_the_next_partial_line(uart: Uart) -> None:
    got: list[bytes] = []
    arrived = threading.Event()
    uart.dev.add_listener(lambda data: (got.append(data), arrived.set()))
    uart.dev.flush_delay = 3600
    uart.w(THR, ord("a"))                                 # armed for an hour
    uart.dev.flush_delay = 0.05                           # writes out "a" and forgets the hour
    assert got == [b"a"]
    arrived.clear()
    uart.w(THR, ord("b"))
    assert arrived.wait(5) and got == [b"a", b"b"]


def test_uart_output_from_many_threads_and_the_timer_is_neither_lost_nor_reordered(tmp_path: Path) -> None:
    """Lines, partial lines that wait past the flush delay (so the timer thread writes them out while the guest
    side goes on), long runs and stop flushes, all racing: the log and the listener get exactly output()."""
    log = tmp_path / "console.log"
    u = Uart(log_path=str(log), flush_delay=0.002, output_limit=1 << 20)
    got = bytearray()
    u.dev.add_listener(got.extend)
    rng = random.Random(7)
    sent = bytearray()
    stop = threading.Event()

    def stopper() -> None:                                # the machine stopping now and then, on another thread
        while not stop.is_set():
            u.dev.flush_output()
            time.sleep(0.001)

    t = threading.Thread(target=stopper)
    t.start()
    try:
        for i in range(3000):
            chunk = bytes(rng.choice(b"abcdef \n") for _ in range(rng.randrange(1, 40)))
            if i % 500 == 0:
                chunk += b"y" * (FLUSH_BYTES + 1)
            for ch in chunk:
                u.w(THR, ch)
            sent += chunk
            if i % 100 == 0:
                time.sleep(0.005)                         # a partial line waits past the delay
    finally:
        stop.set()
        t.join()
    u.dev.close()
    assert u.dev.output() == bytes(sent)
    assert bytes(got) == bytes(sent)
    assert log.read_bytes() == bytes(sent)


def test_uart_log_file_that_cannot_be_opened_is_a_vmfork_error(tmp_path: Path) -> None:
    with pytest.raises(VmforkError, match=r"serial0: cannot open console log .*missing"):
        Serial16550A(FakeCtx(), log_path=str(tmp_path / "missing" / "console.log"))


def test_uart_listeners_get_bytes_and_a_failing_one_is_detached(uart: Uart) -> None:
    got: list[bytes] = []
    calls = 0

    def broken(data: bytes) -> None:
        nonlocal calls
        calls += 1
        raise OSError("console went away")

    uart.dev.flush_delay = 3600
    uart.dev.add_listener(broken)
    uart.dev.add_listener(got.append)
    for ch in b"a\nb\n":
        uart.w(THR, ch)
    assert got == [b"a\n", b"b\n"]
    assert calls == 1
    uart.w(THR, ord("c"))
    uart.dev.remove_listener(got.append)                 # it still gets what was sent while it was attached
    assert got == [b"a\n", b"b\n", b"c"]
    uart.w(THR, ord("d"))
    uart.dev.flush_output()
    assert got == [b"a\n", b"b\n", b"c"]
    late: list[bytes] = []
    uart.w(THR, ord("e"))
    uart.dev.add_listener(late.append)                    # a new listener gets only what is sent from now on
    uart.w(THR, ord("\n"))
    assert late == [b"\n"]


# -- UART: state ------------------------------------------------------------------------------------------------

def busy_uart() -> Uart:
    """A UART with something in every part of its state."""
    u = Uart()
    u.w(LCR, 0x80)
    u.w(DLL, 0x03)
    u.w(DLM, 0x01)
    u.w(LCR, 0x1B)
    u.w(SCR, 0x77)
    u.w(FCR, 0x41)
    u.w(IER, 0x0F)
    u.w(MCR, 0x10 | 0x02)  # loopback: CTS delta pending
    for i in range(17):
        u.w(THR, 0x30 + i)  # 16 bytes in the FIFO and an overrun
    u.dev.feed(b"pending input")
    return u


def read_everything(u: Uart) -> list[int]:
    """Drain a UART through its registers, recording every value read."""
    seen = [u.r(IIR), u.r(LSR), u.r(MSR), u.r(IIR)]
    u.w(MCR, 0x0B)  # leave loopback so the waiting input arrives
    for _ in range(40):
        seen += [u.r(IIR), u.r(LSR), u.r(RBR)]
    u.w(LCR, 0x9B)
    seen += [u.r(DLL), u.r(DLM), u.r(SCR), u.r(LCR)]
    return seen


def test_uart_state_round_trip_restores_identical_behaviour() -> None:
    a = busy_uart()
    state = a.dev.capture()
    b = Uart()
    b.dev.restore(state)
    assert b.dev.capture() == state
    assert b.ctx.irqs == [(4, True)]  # restore drives the line to the level the state implies
    a.ctx.take_irqs()
    b.ctx.take_irqs()
    assert read_everything(b) == read_everything(a)
    assert b.ctx.irqs == a.ctx.irqs
    assert b.dev.capture() == a.dev.capture()


def test_uart_restore_lowers_the_line_for_a_quiet_state() -> None:
    u = Uart()
    u.w(IER, 0x02)
    u.dev.restore(SerialState())
    assert u.ctx.irqs == [(4, True), (4, False)]
    assert u.r(IIR) == 0x01


def test_uart_state_pending_thre_survives_restore() -> None:
    a = Uart()
    a.w(IER, 0x02)
    b = Uart()
    b.dev.restore(a.dev.capture())
    assert b.r(IIR) == 0x02
    assert b.r(IIR) == 0x01


def test_uart_state_json_round_trip() -> None:
    state = busy_uart().dev.capture()
    data = json.loads(json.dumps(state.to_dict()))
    assert data["kind"] == "uart16550a" and data["version"] == 1
    assert SerialState.from_dict(data) == state


def test_uart_state_from_dict_rejects_bad_data() -> None:
    good = SerialState().to_dict()
    with pytest.raises(DeviceStateError, match="uart16550a state version 2, this vmfork supports 1"):
        SerialState.from_dict({**good, "version": 2})
    with pytest.raises(DeviceStateError, match="the data is a 'i8042' state"):
        SerialState.from_dict({**good, "kind": "i8042"})
    with pytest.raises(DeviceStateError, match=r"missing field.*scr"):
        SerialState.from_dict({k: v for k, v in good.items() if k != "scr"})
    with pytest.raises(DeviceStateError, match=r"unknown field.*bogus"):
        SerialState.from_dict({**good, "bogus": 1})
    with pytest.raises(DeviceStateError, match="field ier: expected an integer, got '1'"):
        SerialState.from_dict({**good, "ier": "1"})
    with pytest.raises(DeviceStateError, match="field thr_ipending: expected true or false"):
        SerialState.from_dict({**good, "thr_ipending": 1})
    with pytest.raises(DeviceStateError, match="field rx_fifo: expected a hex string"):
        SerialState.from_dict({**good, "rx_fifo": "zz"})
    with pytest.raises(DeviceStateError, match="2 bytes in the receive FIFO, at most 1 fit"):
        SerialState.from_dict({**good, "rx_fifo": "4142"})
    with pytest.raises(DeviceStateError, match=r"ier = 0x10 has bits outside 0xf"):
        SerialState.from_dict({**good, "ier": 0x10})


def test_uart_restore_rejects_another_devices_state(uart: Uart) -> None:
    with pytest.raises(DeviceStateError, match="serial0: expected a SerialState, got RtcState"):
        uart.dev.restore(RtcState(0, bytes(128), 0.0))  # type: ignore[arg-type]


# -- i8042 ------------------------------------------------------------------------------------------------------

@pytest.fixture
def kbc() -> tuple[I8042, FakeCtx]:
    ctx = FakeCtx()
    return I8042(ctx), ctx


def test_i8042_status_has_no_data_and_tracks_the_last_write(kbc: tuple[I8042, FakeCtx]) -> None:
    dev, _ = kbc
    assert dev.io_read(0x64, 1) == 0x14  # unlocked | system flag, nothing to read, input buffer empty
    assert dev.io_read(0x60, 1) == 0
    dev.io_write(0x64, 1, 0xAE)
    assert dev.io_read(0x64, 1) == 0x1C  # last write went to the command port
    dev.io_write(0x60, 1, 0xF4)  # a byte for the (absent) keyboard: dropped
    assert dev.io_read(0x64, 1) == 0x14
    assert dev.io_read(0x60, 1) == 0


def test_i8042_fe_resets_the_machine(kbc: tuple[I8042, FakeCtx]) -> None:
    dev, ctx = kbc
    dev.io_write(0x64, 1, 0xFE)
    assert ctx.stops == [("reset", None)]


@pytest.mark.parametrize(("cmd", "resets"), [(0xF0, True), (0xFC, True), (0xFE, True), (0xF1, False),
                                             (0xFF, False), (0xFD, False)])
def test_i8042_pulse_commands_reset_only_when_bit0_is_pulsed(kbc: tuple[I8042, FakeCtx], cmd: int,
                                                            resets: bool) -> None:
    dev, ctx = kbc
    dev.io_write(0x64, 1, cmd)
    assert ctx.stops == ([("reset", None)] if resets else [])


def test_i8042_command_byte_read_and_write(kbc: tuple[I8042, FakeCtx]) -> None:
    dev, ctx = kbc
    dev.io_write(0x64, 1, 0x20)
    assert dev.io_read(0x64, 1) & 0x01  # OBF
    assert dev.io_read(0x60, 1) == 0x45
    assert not dev.io_read(0x64, 1) & 0x01
    assert dev.io_read(0x60, 1) == 0  # nothing left
    dev.io_write(0x64, 1, 0x60)
    dev.io_write(0x60, 1, 0x20)  # no system flag, aux disabled
    assert dev.command_byte == 0x20
    assert dev.io_read(0x64, 1) & 0x04 == 0  # status system flag follows the command byte
    dev.io_write(0x64, 1, 0x20)
    assert dev.io_read(0x60, 1) == 0x20
    dev.io_write(0x60, 1, 0x99)  # the command took its byte already: this one goes to the keyboard
    assert dev.command_byte == 0x20
    assert ctx.stops == []


def test_i8042_controller_commands(kbc: tuple[I8042, FakeCtx]) -> None:
    dev, _ = kbc
    answers = {}
    for cmd in (0xAA, 0xAB, 0xA9, 0xD0):
        dev.io_write(0x64, 1, cmd)
        answers[cmd] = dev.io_read(0x60, 1)
    assert answers == {0xAA: 0x55, 0xAB: 0x00, 0xA9: 0x00, 0xD0: 0x03}
    dev.io_write(0x64, 1, 0xA7)
    dev.io_write(0x64, 1, 0xAD)
    assert dev.command_byte == 0x45 | 0x20 | 0x10
    dev.io_write(0x64, 1, 0xA8)
    dev.io_write(0x64, 1, 0xAE)
    assert dev.command_byte == 0x45


def test_i8042_self_test_sets_the_system_flag(kbc: tuple[I8042, FakeCtx]) -> None:
    dev, _ = kbc
    dev.io_write(0x64, 1, 0x60)
    dev.io_write(0x60, 1, 0x01)
    assert not dev.io_read(0x64, 1) & 0x04
    dev.io_write(0x64, 1, 0xAA)
    assert dev.io_read(0x60, 1) == 0x55
    assert dev.io_read(0x64, 1) & 0x04
    assert dev.command_byte == 0x05


def test_i8042_output_port_write_with_reset_bit_clear_resets(kbc: tuple[I8042, FakeCtx]) -> None:
    dev, ctx = kbc
    dev.io_write(0x64, 1, 0xD1)
    dev.io_write(0x60, 1, 0x03)
    assert ctx.stops == []
    dev.io_write(0x64, 1, 0xD1)
    dev.io_write(0x60, 1, 0x02)
    assert ctx.stops == [("reset", None)]


def test_i8042_state_round_trip_keeps_a_half_done_command(kbc: tuple[I8042, FakeCtx]) -> None:
    dev, _ = kbc
    dev.io_write(0x64, 1, 0xA7)
    dev.io_write(0x64, 1, 0x60)  # waiting for the new command byte
    state = dev.capture()
    other = I8042(FakeCtx())
    other.restore(state)
    assert other.capture() == state
    other.io_write(0x60, 1, 0x07)
    assert other.command_byte == 0x07
    assert I8042State.from_dict(json.loads(json.dumps(state.to_dict()))) == state
    dev.io_write(0x64, 1, 0x20)
    s2 = dev.capture()
    assert s2.output == 0x65
    assert I8042State.from_dict(json.loads(json.dumps(s2.to_dict()))) == s2
    fresh = I8042(FakeCtx())
    fresh.restore(s2)
    assert fresh.io_read(0x64, 1) & 0x01 and fresh.io_read(0x60, 1) == 0x65


def test_i8042_state_validation() -> None:
    with pytest.raises(DeviceStateError, match="pending_command 0x20 takes no data byte"):
        I8042State.from_dict({**I8042State().to_dict(), "pending_command": 0x20})
    with pytest.raises(DeviceStateError, match="output = 256 is not a byte"):
        I8042(FakeCtx()).restore(I8042State(output=256))


# -- RTC --------------------------------------------------------------------------------------------------------

T0 = dt.datetime(2024, 2, 29, 13, 45, 56, tzinfo=dt.UTC).timestamp()  # a Thursday


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make_rtc(ram_size: int = 256 * MIB, clock: Clock | None = None, **kw: Any) -> tuple[Rtc, Clock]:
    clock = clock or Clock()
    return Rtc(FakeCtx(), ram_size=ram_size, clock=clock, **kw), clock


def cmos(rtc: Rtc, reg: int) -> int:
    rtc.io_write(0x70, 1, reg)
    return rtc.io_read(0x71, 1)


def cmos_set(rtc: Rtc, reg: int, value: int) -> None:
    rtc.io_write(0x70, 1, reg)
    rtc.io_write(0x71, 1, value)


TIME_REGS = (0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32)


def clock_regs(rtc: Rtc) -> tuple[int, ...]:
    return tuple(cmos(rtc, r) for r in TIME_REGS)


def test_rtc_reads_the_time_in_bcd_24h_by_default() -> None:
    rtc, _ = make_rtc()
    assert cmos(rtc, 0x0B) == 0x02
    assert clock_regs(rtc) == (0x56, 0x45, 0x13, 0x05, 0x29, 0x02, 0x24, 0x20)


def test_rtc_binary_mode() -> None:
    rtc, _ = make_rtc()
    cmos_set(rtc, 0x0B, 0x06)
    assert clock_regs(rtc) == (56, 45, 13, 5, 29, 2, 24, 20)


@pytest.mark.parametrize(("hour", "b", "expected"), [
    (13, 0x00, 0x81), (13, 0x04, 0x81), (0, 0x00, 0x12), (0, 0x04, 12), (12, 0x00, 0x92), (11, 0x00, 0x11),
    (23, 0x00, 0x91), (23, 0x02, 0x23), (23, 0x06, 23),
])
def test_rtc_hour_encodings(hour: int, b: int, expected: int) -> None:
    t = dt.datetime(2024, 1, 7, hour, 0, 0, tzinfo=dt.UTC).timestamp()  # a Sunday
    rtc, _ = make_rtc(clock=Clock(t))
    cmos_set(rtc, 0x0B, b)
    assert cmos(rtc, 0x04) == expected
    assert cmos(rtc, 0x06) == 1  # Sunday


def test_rtc_follows_the_host_clock() -> None:
    rtc, clock = make_rtc()
    clock.t += 65
    assert clock_regs(rtc)[:3] == (0x01, 0x47, 0x13)
    clock.t += 11 * 3600
    assert clock_regs(rtc)[:6] == (0x01, 0x47, 0x00, 0x06, 0x01, 0x03)  # Friday 1 March


def test_rtc_start_time_sets_the_guest_clock() -> None:
    start = dt.datetime(1999, 12, 31, 23, 59, 58, tzinfo=dt.UTC).timestamp()
    rtc, clock = make_rtc(start_time=start)
    assert clock_regs(rtc) == (0x58, 0x59, 0x23, 0x06, 0x31, 0x12, 0x99, 0x19)
    clock.t += 3
    assert clock_regs(rtc) == (0x01, 0x00, 0x00, 0x07, 0x01, 0x01, 0x00, 0x20)
    assert rtc.guest_time() == start + 3


def test_rtc_set_bit_freezes_the_clock_and_clearing_it_starts_from_the_written_time() -> None:
    rtc, clock = make_rtc()
    cmos_set(rtc, 0x0B, 0x82)  # SET
    clock.t += 100
    assert cmos(rtc, 0x00) == 0x56  # frozen at the latch
    for reg, value in ((0x00, 0x30), (0x02, 0x15), (0x04, 0x08), (0x07, 0x04), (0x08, 0x07), (0x09, 0x76),
                       (0x32, 0x19)):
        cmos_set(rtc, reg, value)
    assert cmos(rtc, 0x02) == 0x15
    cmos_set(rtc, 0x0B, 0x02)
    assert clock_regs(rtc) == (0x30, 0x15, 0x08, 0x01, 0x04, 0x07, 0x76, 0x19)  # 1976-07-04 was a Sunday
    clock.t += 30
    assert cmos(rtc, 0x00) == 0x00 and cmos(rtc, 0x02) == 0x16


def test_rtc_writing_one_time_register_moves_the_clock() -> None:
    rtc, clock = make_rtc()
    cmos_set(rtc, 0x02, 0x10)  # minutes := 10
    assert clock_regs(rtc)[:3] == (0x56, 0x10, 0x13)
    clock.t += 4
    assert cmos(rtc, 0x00) == 0x00 and cmos(rtc, 0x02) == 0x11


def test_rtc_12h_binary_write_of_pm_hours() -> None:
    rtc, _ = make_rtc()
    cmos_set(rtc, 0x0B, 0x04)  # binary, 12 h
    cmos_set(rtc, 0x04, 0x80 | 12)  # 12 PM = noon
    cmos_set(rtc, 0x0B, 0x06)
    assert cmos(rtc, 0x04) == 12


def test_rtc_invalid_time_writes_are_ignored() -> None:
    rtc, _ = make_rtc()
    before = clock_regs(rtc)
    cmos_set(rtc, 0x08, 0x13)  # month 13
    cmos_set(rtc, 0x00, 0x5A)  # not BCD
    cmos_set(rtc, 0x07, 0x30)  # 30 February
    assert clock_regs(rtc) == before


def test_rtc_status_registers() -> None:
    rtc, _ = make_rtc()
    assert cmos(rtc, 0x0A) == 0x26
    cmos_set(rtc, 0x0A, 0xA6)
    assert cmos(rtc, 0x0A) == 0x26  # UIP is never set
    assert cmos(rtc, 0x0C) == 0x00
    cmos_set(rtc, 0x0D, 0x00)
    assert cmos(rtc, 0x0D) == 0x80
    ram = bytearray(rtc.capture().ram)
    ram[0x0A] = 0xA6  # a stored state claiming an update in progress
    rtc.restore(dataclasses.replace(rtc.capture(), ram=bytes(ram)))
    assert cmos(rtc, 0x0A) == 0x26


def test_rtc_index_port_nmi_bit_and_ram() -> None:
    rtc, _ = make_rtc()
    assert rtc.io_read(0x70, 1) == 0xFF
    cmos_set(rtc, 0x80 | 0x40, 0xAB)  # NMI disabled, register 0x40
    assert rtc.nmi_disabled
    assert cmos(rtc, 0x40) == 0xAB
    assert not rtc.nmi_disabled
    cmos_set(rtc, 0x7F, 0x11)
    assert cmos(rtc, 0x7F) == 0x11
    assert rtc.io_read(0x71, 2) == 0xFF11


@pytest.mark.parametrize(("ram", "expected"), [
    (16 * MIB, {0x15: 0x80, 0x16: 0x02, 0x17: 0x00, 0x18: 0x3C, 0x30: 0x00, 0x31: 0x3C, 0x34: 0, 0x35: 0,
                0x5B: 0, 0x5C: 0, 0x5D: 0}),
    (256 * MIB, {0x15: 0x80, 0x16: 0x02, 0x17: 0xFF, 0x18: 0xFF, 0x30: 0xFF, 0x31: 0xFF, 0x34: 0x00, 0x35: 0x0F,
                 0x5B: 0, 0x5C: 0, 0x5D: 0}),
    (8 * GIB, {0x15: 0x80, 0x16: 0x02, 0x17: 0xFF, 0x18: 0xFF, 0x30: 0xFF, 0x31: 0xFF, 0x34: 0x00, 0x35: 0xDF,
               0x5B: 0x00, 0x5C: 0x20, 0x5D: 0x01}),
])
def test_rtc_memory_size_fields(ram: int, expected: dict[int, int]) -> None:
    assert cmos_memory_fields(ram) == expected
    rtc, _ = make_rtc(ram_size=ram)
    assert {reg: cmos(rtc, reg) for reg in expected} == expected


def test_rtc_memory_fields_with_a_lower_pci_hole() -> None:
    fields = cmos_memory_fields(4 * GIB, low_ram_limit=0xC000_0000)
    assert (fields[0x35] << 8 | fields[0x34]) == (3 * GIB - 16 * MIB) // 65536
    assert (fields[0x5D] << 16 | fields[0x5C] << 8 | fields[0x5B]) == GIB // 65536


def test_rtc_checksum_covers_0x10_to_0x2d() -> None:
    rtc, _ = make_rtc(ram_size=64 * MIB)
    total = sum(cmos(rtc, r) for r in range(0x10, 0x2E))
    assert total > 0
    assert (cmos(rtc, 0x2E) << 8 | cmos(rtc, 0x2F)) == total


def test_rtc_state_round_trip() -> None:
    rtc, clock = make_rtc()
    cmos_set(rtc, 0x0B, 0x06)
    cmos_set(rtc, 0x02, 7)  # the clock moves: an offset
    cmos_set(rtc, 0x50, 0x5A)
    rtc.io_write(0x70, 1, 0x80 | 0x00)
    state = rtc.capture()
    assert state.offset != 0.0
    other = Rtc(FakeCtx(), ram_size=16 * MIB, clock=clock)
    other.restore(state)
    assert other.capture() == state
    assert other.nmi_disabled
    assert other.io_read(0x71, 1) == rtc.io_read(0x71, 1)
    assert clock_regs(other) == clock_regs(rtc)
    assert cmos(other, 0x50) == 0x5A and cmos(other, 0x17) == 0xFF  # RAM (incl. memory size) came along
    clock.t += 100
    assert clock_regs(other) == clock_regs(rtc)
    assert RtcState.from_dict(json.loads(json.dumps(state.to_dict()))) == state


def test_rtc_state_validation() -> None:
    with pytest.raises(DeviceStateError, match="ram has 3 bytes, expected 128"):
        make_rtc()[0].restore(RtcState(index=0, ram=b"abc", offset=0.0))
    data = RtcState(index=0, ram=bytes(128), offset=1).to_dict()
    assert RtcState.from_dict(data).offset == 1.0
    with pytest.raises(DeviceStateError, match="field offset: expected a number"):
        RtcState.from_dict({**data, "offset": "soon"})


# -- exit device and harness port -------------------------------------------------------------------------------

def test_exit_device_stops_with_the_low_byte() -> None:
    ctx = FakeCtx()
    dev = ExitDevice(ctx)
    assert dev.ports == ((0xF4, 1),)
    dev.io_write(0xF4, 1, 3)
    dev.io_write(0xF4, 2, 0x1234)
    assert ctx.stops == [("exit", 3), ("exit", 0x34)]
    assert dev.io_read(0xF4, 1) == 0xFF
    assert dev.io_read(0xF4, 2) == 0xFFFF
    dev.restore(dev.capture())
    with pytest.raises(DeviceStateError):
        dev.restore(HarnessState())  # type: ignore[arg-type]


def test_harness_markers() -> None:
    ctx = FakeCtx()
    dev = HarnessPort(ctx)
    dev.io_write(0xF6, 4, 1)
    dev.io_write(0xF6, 4, 2)
    dev.io_write(0xF6, 4, 0xDEADBEEF)
    dev.io_write(0xF6, 1, 0x101)  # a byte write: 0x01
    dev.io_write(0xF7, 1, 1)  # not the register
    assert ctx.stops == [("harness-start", 1), ("harness-end", 2), ("harness", 0xDEADBEEF), ("harness-start", 1)]
    assert dev.capture() == HarnessState(markers=4)
    assert dev.io_read(0xF6, 4) == 0xFFFFFFFF
    other = HarnessPort(FakeCtx())
    other.restore(dev.capture())
    assert other.markers == 4
    other.io_write(0xF6, 4, 2)
    assert other.capture().markers == 5
    assert HarnessState.from_dict(json.loads(json.dumps(dev.capture().to_dict()))) == HarnessState(4)


# -- the standard set and DeviceSetState ------------------------------------------------------------------------

def test_standard_devices_names_order_and_ports(tmp_path: Path) -> None:
    log = tmp_path / "c.log"
    ctx = FakeCtx()
    devices = standard_devices(ctx, ram_size=128 * MIB, console_log=str(log))
    assert [d.name for d in devices] == list(STANDARD_DEVICE_NAMES) == ["serial0", "i8042", "rtc", "exit", "harness",
                                                                        "env"]
    bus = PortBus(devices)
    expected = {0x3F8: "serial0", 0x3FF: "serial0", 0x60: "i8042", 0x64: "i8042", 0x70: "rtc", 0x71: "rtc",
                0xF4: "exit", 0xF6: "harness"}
    for port, name in expected.items():
        dev = bus.device_at(port)
        assert dev is not None and dev.name == name
    for port in (0x61, 0x80, 0xF5, 0x2F8, 0x400):
        assert bus.device_at(port) is None
    bus.io_write(0x3F8, 1, ord("!"))
    bus.io_write(0x3F8, 1, ord("\n"))
    assert log.read_bytes() == b"!\n"
    bus.io_write(0x70, 1, 0x35)
    assert bus.io_read(0x71, 1) == (128 - 16) * MIB // 65536 >> 8  # the RTC got ram_size
    bus.io_write(0xF4, 1, 7)
    assert ctx.stops == [("exit", 7)]


def serial(devices: list[Any]) -> Serial16550A:
    dev = devices[0]
    assert isinstance(dev, Serial16550A)
    return dev


def drive(devices: list[Any]) -> list[int]:
    """Exercise a standard device set through its ports, recording what it answers."""
    bus = PortBus(devices)
    out = []
    for port in (IIR, LSR, MSR, 0x64):
        out.append(bus.io_read(port, 1))
    bus.io_write(0x64, 1, 0x20)
    out.append(bus.io_read(0x60, 1))
    bus.io_write(0x70, 1, 0x45)
    out.append(bus.io_read(0x71, 1))
    while bus.io_read(LSR, 1) & 1:
        out.append(bus.io_read(RBR, 1))
    return out


def test_device_set_capture_and_restore_all() -> None:
    ctx_a = FakeCtx()
    a = standard_devices(ctx_a, ram_size=64 * MIB, console_log=None)
    bus = PortBus(a)
    bus.io_write(FCR, 1, 0x01)
    bus.io_write(IER, 1, 0x01)
    serial(a).feed(b"state")
    bus.io_write(0x64, 1, 0xA7)
    bus.io_write(0x70, 1, 0x45)
    bus.io_write(0x71, 1, 0x99)
    bus.io_write(0xF6, 4, 7)
    saved = DeviceSetState.capture_all(a)
    assert saved.names == STANDARD_DEVICE_NAMES
    b = standard_devices(FakeCtx(), ram_size=64 * MIB, console_log=None)
    DeviceSetState.restore_all(b, saved)
    assert DeviceSetState.capture_all(b) == saved
    assert drive(b) == drive(a)
    json_copy = DeviceSetState.from_dict(json.loads(json.dumps(saved.to_dict())))
    assert json_copy == saved
    assert hash(json_copy) == hash(saved)


def test_device_set_state_is_read_only() -> None:
    state = DeviceSetState.capture_all(standard_devices(FakeCtx(), ram_size=64 * MIB, console_log=None))
    with pytest.raises(TypeError):
        state.states["serial0"] = SerialState()  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.states = {}  # type: ignore[misc]


def test_restore_all_refuses_a_different_device_set() -> None:
    devices = standard_devices(FakeCtx(), ram_size=64 * MIB, console_log=None)
    state = DeviceSetState.capture_all(devices)
    fewer = DeviceSetState({k: v for k, v in state.states.items() if k != "harness"})
    with pytest.raises(DeviceStateError) as e:
        DeviceSetState.restore_all(devices, fewer)
    assert str(e.value) == ("device-state file has devices serial0, i8042, rtc, exit, env, "
                            "this VM has serial0, i8042, rtc, exit, harness, env")
    with pytest.raises(DeviceStateError, match=r"device-state file has devices serial0, i8042, rtc, exit, harness, "
                                               "env, this VM has serial0, i8042, rtc, exit$"):
        DeviceSetState.restore_all(devices[:4], state)
    with pytest.raises(DeviceStateError, match=r"device-state file has devices \(none\)"):
        DeviceSetState.restore_all(devices, DeviceSetState({}))


def test_restore_all_refuses_a_state_of_the_wrong_type_and_restores_nothing() -> None:
    ctx = FakeCtx()
    devices = standard_devices(ctx, ram_size=64 * MIB, console_log=None)
    before = DeviceSetState.capture_all(devices)
    other = standard_devices(FakeCtx(), ram_size=64 * MIB, console_log=None)
    serial(other).feed(b"x")
    states = dict(DeviceSetState.capture_all(other).states)
    states["exit"] = HarnessState(3)
    with pytest.raises(DeviceStateError, match="exit state is a 'harness-port' state, this VM's exit needs a "
                                               "'exit-port' state"):
        DeviceSetState.restore_all(devices, DeviceSetState(states))
    assert DeviceSetState.capture_all(devices) == before  # serial0 came first but was not touched
    assert ctx.irqs == []


@dataclasses.dataclass(frozen=True, slots=True)
class FutureSerialState(SerialState):
    VERSION: ClassVar[int] = 2


def test_restore_all_refuses_another_state_version() -> None:
    devices = standard_devices(FakeCtx(), ram_size=64 * MIB, console_log=None)
    states = dict(DeviceSetState.capture_all(devices).states)
    states["serial0"] = FutureSerialState()
    with pytest.raises(DeviceStateError) as e:
        DeviceSetState.restore_all(devices, DeviceSetState(states))
    assert str(e.value) == "serial0 state version 2, this vmfork supports 1"


def test_restore_all_validates_every_state_first() -> None:
    devices = standard_devices(FakeCtx(), ram_size=64 * MIB, console_log=None)
    states = dict(DeviceSetState.capture_all(devices).states)
    states["rtc"] = RtcState(index=0, ram=b"", offset=0.0)
    with pytest.raises(DeviceStateError, match=r"^rtc: cmos-rtc state: ram has 0 bytes"):
        DeviceSetState.restore_all(devices, DeviceSetState(states))


def test_device_set_from_dict_errors() -> None:
    devices = standard_devices(FakeCtx(), ram_size=64 * MIB, console_log=None)
    data = DeviceSetState.capture_all(devices).to_dict()
    future = json.loads(json.dumps(data))
    future["devices"]["serial0"]["version"] = 2
    with pytest.raises(DeviceStateError) as e:
        DeviceSetState.from_dict(future)
    assert str(e.value) == "serial0 state version 2, this vmfork supports 1"
    odd = json.loads(json.dumps(data))
    odd["devices"]["rtc"]["kind"] = "hpet"
    with pytest.raises(DeviceStateError, match="rtc state has unknown kind 'hpet'"):
        DeviceSetState.from_dict(odd)
    broken = json.loads(json.dumps(data))
    broken["devices"]["i8042"]["command_byte"] = "0x45"
    with pytest.raises(DeviceStateError, match=r"^i8042: i8042 state: field command_byte: expected an integer"):
        DeviceSetState.from_dict(broken)
    with pytest.raises(DeviceStateError, match="device-state set version 9, this vmfork supports 1"):
        DeviceSetState.from_dict({**data, "version": 9})
    with pytest.raises(DeviceStateError, match="\"devices\" must be an object"):
        DeviceSetState.from_dict({"version": 1, "devices": []})
