"""A 16550A UART (the PC's COM1 at 0x3f8, IRQ 4), written from the National Semiconductor PC16550D datasheet.

Register map (offset from the base port; DLAB is LCR bit 7):

    0  read: RBR (receive buffer)      write: THR (transmit holding)    DLAB=1: DLL (divisor latch low)
    1  IER (interrupt enable, bits 0-3)                                 DLAB=1: DLM (divisor latch high)
    2  read: IIR (interrupt ident)     write: FCR (FIFO control)
    3  LCR (line control)          4  MCR (modem control, bits 0-4)     5  LSR (line status)
    6  MSR (modem status)          7  SCR (scratch)

Timing model: there is no baud clock. A byte written to THR is transmitted at once, so LSR always reports THR empty
and transmitter empty, and the THRE interrupt condition returns right after each THR write (the line drops and
rises again, so an edge-triggered irqchip sees a new edge). Received bytes arrive at once too: `feed()` queues
bytes on the "wire" (`rx_pending`) and the receiver moves them into the RX FIFO (16 bytes; 1 byte with FIFOs off)
whenever there is room, so host input is flow-controlled instead of overrunning. Because no time passes, the
character-timeout interrupt (IIR 0x0C) is reported as soon as the FIFO holds data below the trigger level.

Interrupts, in 16550A priority order, each gated by its IER bit: receiver line status (LSR error bits; only a
loopback overrun produces one here), received data available / character timeout, THR empty, modem status. The
THRE interrupt becomes pending when IER's THRE bit goes from 0 to 1 (THR is always empty) and after each
transmitted byte; it is cleared by reading IIR while it is the reported source, by writing THR, or by clearing
IER's THRE bit. The interrupt output follows "IIR reports an interrupt" and drives `ctx.set_irq(irq, level)` on
every change. Like QEMU's model, the output is not gated by MCR OUT2 (a real PC's COM port is).

Loopback (MCR bit 4): transmitted bytes go into the receiver instead of the output sink (overrunning when the
FIFO is full, which sets LSR OE), host input waits on the wire, and the modem status inputs follow MCR:
CTS=RTS, DSR=DTR, RI=OUT1, DCD=OUT2. Outside loopback the modem inputs read CTS, DSR and DCD asserted.

Output sink: every transmitted byte is appended at once to a bounded in-memory buffer (`output()`). The console log
file (if one is configured) and the listeners (`add_listener`) get the bytes in order, in batches: a guest prints
one byte per VM exit, and a write() per byte to a pipe nearly halves the exit rate (bench/boot.py). A batch goes at each
newline, when it reaches FLUSH_BYTES, when the machine stops (the machine calls `flush_output()`), when the device is
closed or the process exits, and at the latest `flush_delay` seconds after its first byte, so a prompt without a
newline ("login: ", or the echo of a typed key) reaches the log and the console clients promptly even when the
guest then waits for input: a halted guest waits inside KVM_RUN, where its vCPU thread cannot notice time passing,
so one timer thread per process (`_FlushTimer`) writes out partial lines that are due. `flush_delay = 0` writes
every byte at once (the unbatched behaviour, kept for side-by-side benchmarks). Capture/restore covers the
registers, the FIFO, the bytes still on the wire and the pending interrupt conditions, not the output buffer, log
file or listeners.
"""

from __future__ import annotations

import atexit
import collections
import logging
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO, ClassVar

from ..errors import DeviceStateError, VmforkError
from .base import DeviceContext, DeviceState, split_read, split_write

__all__ = ["COM1_BASE", "COM1_IRQ", "FIFO_SIZE", "Serial16550A", "SerialState"]

log = logging.getLogger(__name__)

COM1_BASE = 0x3F8
COM1_IRQ = 4
FIFO_SIZE = 16
DEFAULT_OUTPUT_LIMIT = 64 * 1024
DEFAULT_PENDING_LIMIT = 1 << 20
FLUSH_DELAY = 0.01              # seconds a partial line may wait for the rest of its line before it is written out
FLUSH_BYTES = 4096              # a batch this long is written out without waiting for its newline

# register offsets
REG_DATA = 0  # RBR / THR / DLL
REG_IER = 1  # IER / DLM
REG_IIR = 2  # IIR (read) / FCR (write)
REG_LCR = 3
REG_MCR = 4
REG_LSR = 5
REG_MSR = 6
REG_SCR = 7

IER_RDI = 0x01  # received data available
IER_THRI = 0x02  # THR empty
IER_RLSI = 0x04  # receiver line status
IER_MSI = 0x08  # modem status
IER_MASK = 0x0F

IIR_NO_INT = 0x01
IIR_MSI = 0x00
IIR_THRI = 0x02
IIR_RDI = 0x04
IIR_RLSI = 0x06
IIR_TIMEOUT = 0x0C
IIR_FIFO_ENABLED = 0xC0

FCR_ENABLE = 0x01
FCR_CLEAR_RX = 0x02
FCR_CLEAR_TX = 0x04
FCR_DMA = 0x08
FCR_TRIGGER = 0xC0
FCR_KEPT = FCR_ENABLE | FCR_DMA | FCR_TRIGGER
TRIGGER_LEVELS = (1, 4, 8, 14)

LCR_DLAB = 0x80

MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
MCR_MASK = 0x1F

LSR_DR = 0x01
LSR_OE = 0x02
LSR_PE = 0x04
LSR_FE = 0x08
LSR_BI = 0x10
LSR_THRE = 0x20
LSR_TEMT = 0x40
LSR_ERRORS = LSR_OE | LSR_PE | LSR_FE | LSR_BI

MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_TERI = 0x04
MSR_DDCD = 0x08
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80
MSR_DELTAS = 0x0F
LINE_INPUTS = MSR_CTS | MSR_DSR | MSR_DCD  # modem inputs outside loopback

DEFAULT_DIVISOR = 12  # 9600 baud from the 1.8432 MHz clock

Listener = Callable[[bytes], None]


@dataclass(frozen=True, slots=True)
class SerialState(DeviceState):
    """Everything a 16550A remembers. `rx_fifo` is the receiver FIFO (oldest first), `rx_pending` the host input
    not yet received; `thr_ipending` is the THRE interrupt condition."""

    KIND: ClassVar[str] = "uart16550a"
    VERSION: ClassVar[int] = 1

    ier: int = 0
    lcr: int = 0
    mcr: int = 0
    scr: int = 0
    dll: int = DEFAULT_DIVISOR
    dlm: int = 0
    fcr: int = 0
    lsr_errors: int = 0
    msr_deltas: int = 0
    rbr: int = 0
    rx_fifo: bytes = b""
    rx_pending: bytes = b""
    thr_ipending: bool = False

    def validate(self) -> None:
        for field in ("lcr", "scr", "dll", "dlm", "rbr"):
            value = getattr(self, field)
            if not 0 <= value <= 0xFF:
                raise DeviceStateError(f"{self.KIND} state: {field} = {value} is not a byte")
        for field, mask in (("ier", IER_MASK), ("mcr", MCR_MASK), ("fcr", FCR_KEPT),
                            ("lsr_errors", LSR_ERRORS), ("msr_deltas", MSR_DELTAS)):
            value = getattr(self, field)
            if value < 0 or value & ~mask:
                raise DeviceStateError(f"{self.KIND} state: {field} = {value:#x} has bits outside {mask:#x}")
        capacity = FIFO_SIZE if self.fcr & FCR_ENABLE else 1
        if len(self.rx_fifo) > capacity:
            raise DeviceStateError(
                f"{self.KIND} state: {len(self.rx_fifo)} bytes in the receive FIFO, at most {capacity} fit")


class Serial16550A:
    """A 16550A UART. See the module docstring for the model."""

    state_type: ClassVar[type[DeviceState]] = SerialState

    def __init__(
        self,
        ctx: DeviceContext,
        *,
        name: str = "serial0",
        base: int = COM1_BASE,
        irq: int = COM1_IRQ,
        log_path: str | None = None,
        output_limit: int = DEFAULT_OUTPUT_LIMIT,
        pending_limit: int = DEFAULT_PENDING_LIMIT,
        flush_delay: float = FLUSH_DELAY,
    ) -> None:
        if output_limit < 1:
            raise ValueError("output_limit must be at least 1")
        if flush_delay < 0:
            raise ValueError("flush_delay must not be negative")
        self.name = name
        self.ports: tuple[tuple[int, int], ...] = ((base, 8),)
        self.base = base
        self.irq = irq
        self._ctx = ctx
        self._lock = threading.RLock()
        self._output_limit = output_limit
        self._pending_limit = pending_limit
        self._out = bytearray()
        self._listeners: list[Listener] = []
        self._log: BinaryIO | None = None
        self._log_failed = False
        # The batch not yet given to the log and the listeners, when its first byte came, and whether the timer
        # thread has this device on its list (both guarded by self._lock).
        self._batch = bytearray()
        self._batch_since = 0.0
        self._timer_armed = False
        self._flush_delay = flush_delay
        self.log_path = log_path
        if log_path is not None:
            try:
                self._log = open(log_path, "ab", buffering=0)
            except OSError as e:
                raise VmforkError(f"{name}: cannot open console log {log_path}: {e.strerror}") from e
        _live_devices.add(self)     # written out at interpreter exit
        # registers
        self._ier = 0
        self._lcr = 0
        self._mcr = 0
        self._scr = 0
        self._dll = DEFAULT_DIVISOR
        self._dlm = 0
        self._fcr = 0
        self._lsr_errors = 0
        self._msr_deltas = 0
        self._rbr = 0
        self._rx_fifo: collections.deque[int] = collections.deque()
        self._rx_pending: collections.deque[int] = collections.deque()
        self._thr_ipending = False
        self._irq_level = False

    # -- port interface ---------------------------------------------------------------------------------------

    def io_read(self, port: int, size: int) -> int:
        offset = port - self.base
        with self._lock:
            if size == 1:
                return self._read(offset)
            return split_read(self._read, offset, size, 8)

    def io_write(self, port: int, size: int, value: int) -> None:
        offset = port - self.base
        with self._lock:
            if size == 1:
                self._write(offset, value & 0xFF)
            else:
                split_write(self._write, offset, size, value, 8)

    def _read(self, offset: int) -> int:
        if offset == REG_DATA:
            if self._lcr & LCR_DLAB:
                return self._dll
            if self._rx_fifo:
                self._rbr = self._rx_fifo.popleft()
                self._refill()
                self._update_irq()
            return self._rbr
        if offset == REG_IER:
            return self._dlm if self._lcr & LCR_DLAB else self._ier
        if offset == REG_IIR:
            ident = self._interrupt_id()
            if ident == IIR_THRI:
                self._thr_ipending = False
                self._update_irq()
            return ident | (IIR_FIFO_ENABLED if self._fcr & FCR_ENABLE else 0)
        if offset == REG_LCR:
            return self._lcr
        if offset == REG_MCR:
            return self._mcr
        if offset == REG_LSR:
            value = self._lsr()
            if self._lsr_errors:
                self._lsr_errors = 0
                self._update_irq()
            return value
        if offset == REG_MSR:
            value = self._msr_deltas | self._modem_inputs()
            if self._msr_deltas:
                self._msr_deltas = 0
                self._update_irq()
            return value
        if offset == REG_SCR:
            return self._scr
        return 0xFF

    def _write(self, offset: int, value: int) -> None:
        if offset == REG_DATA:
            if self._lcr & LCR_DLAB:
                self._dll = value
            else:
                self._transmit(value)
        elif offset == REG_IER:
            if self._lcr & LCR_DLAB:
                self._dlm = value
            else:
                self._write_ier(value & IER_MASK)
        elif offset == REG_IIR:
            self._write_fcr(value)
        elif offset == REG_LCR:
            self._lcr = value
        elif offset == REG_MCR:
            self._write_mcr(value & MCR_MASK)
        elif offset == REG_SCR:
            self._scr = value
        # LSR and MSR writes (factory test on some parts) are ignored.

    # -- registers --------------------------------------------------------------------------------------------

    def _lsr(self) -> int:
        return LSR_THRE | LSR_TEMT | self._lsr_errors | (LSR_DR if self._rx_fifo else 0)

    def _capacity(self) -> int:
        return FIFO_SIZE if self._fcr & FCR_ENABLE else 1

    def _interrupt_id(self) -> int:
        ier = self._ier
        if ier & IER_RLSI and self._lsr_errors:
            return IIR_RLSI
        if ier & IER_RDI and self._rx_fifo:
            if self._fcr & FCR_ENABLE and len(self._rx_fifo) < TRIGGER_LEVELS[self._fcr >> 6]:
                return IIR_TIMEOUT
            return IIR_RDI
        if ier & IER_THRI and self._thr_ipending:
            return IIR_THRI
        if ier & IER_MSI and self._msr_deltas:
            return IIR_MSI
        return IIR_NO_INT

    def _update_irq(self) -> None:
        level = self._interrupt_id() != IIR_NO_INT
        if level != self._irq_level:
            self._irq_level = level
            self._ctx.set_irq(self.irq, level)

    def _write_ier(self, value: int) -> None:
        changed = self._ier ^ value
        self._ier = value
        if changed & IER_THRI:
            # Enabling the THRE interrupt while THR is empty (always, here) makes it pending; disabling drops it.
            self._thr_ipending = bool(value & IER_THRI)
        self._update_irq()

    def _write_fcr(self, value: int) -> None:
        was_enabled = self._fcr & FCR_ENABLE
        if not value & FCR_ENABLE:
            # FCR bit 0 must be set for the other bits to be written; clearing it turns the FIFOs off.
            if was_enabled:
                self._rx_fifo.clear()
            self._fcr = 0
        else:
            if not was_enabled or value & FCR_CLEAR_RX:
                self._rx_fifo.clear()  # switching the FIFOs on resets them, as does FCR bit 1
            # The TX FIFO is always empty (bytes leave at once), so FCR bit 2 has nothing to clear.
            self._fcr = value & FCR_KEPT
        self._refill()
        self._update_irq()

    def _modem_inputs(self) -> int:
        mcr = self._mcr
        if not mcr & MCR_LOOP:
            return LINE_INPUTS
        return ((MSR_CTS if mcr & MCR_RTS else 0) | (MSR_DSR if mcr & MCR_DTR else 0)
                | (MSR_RI if mcr & MCR_OUT1 else 0) | (MSR_DCD if mcr & MCR_OUT2 else 0))

    def _write_mcr(self, value: int) -> None:
        before = self._modem_inputs()
        self._mcr = value
        after = self._modem_inputs()
        changed = before ^ after
        deltas = 0
        if changed & MSR_CTS:
            deltas |= MSR_DCTS
        if changed & MSR_DSR:
            deltas |= MSR_DDSR
        if changed & MSR_DCD:
            deltas |= MSR_DDCD
        if before & MSR_RI and not after & MSR_RI:
            deltas |= MSR_TERI  # trailing edge of RI
        self._msr_deltas |= deltas
        self._refill()  # leaving loopback lets waiting host input in
        self._update_irq()

    # -- data path --------------------------------------------------------------------------------------------

    def _transmit(self, byte: int) -> None:
        # Writing THR clears a pending THRE interrupt; the byte leaves at once and THR is empty again.
        self._thr_ipending = False
        self._update_irq()
        if self._mcr & MCR_LOOP:
            self._loopback_receive(byte)
        else:
            self._emit(byte)
        if self._ier & IER_THRI:
            self._thr_ipending = True
        self._update_irq()

    def _loopback_receive(self, byte: int) -> None:
        if len(self._rx_fifo) < self._capacity():
            self._rx_fifo.append(byte)
        else:
            self._lsr_errors |= LSR_OE
            if not self._fcr & FCR_ENABLE:
                self._rx_fifo[-1] = byte  # without FIFOs the new character overwrites RBR

    def _refill(self) -> None:
        if self._mcr & MCR_LOOP:
            return
        fifo, pending = self._rx_fifo, self._rx_pending
        capacity = self._capacity()
        while pending and len(fifo) < capacity:
            fifo.append(pending.popleft())

    def _emit(self, byte: int) -> None:
        out = self._out
        out.append(byte)
        if len(out) >= 2 * self._output_limit:
            del out[: len(out) - self._output_limit]
        if self._log is None and not self._listeners:
            return
        batch = self._batch
        if not batch:
            self._batch_since = time.monotonic()
        batch.append(byte)
        if byte == 0x0A or len(batch) >= FLUSH_BYTES or not self._flush_delay:
            self._flush_locked()
        elif not self._timer_armed:
            self._timer_armed = True
            _flush_timer.arm(self, self._batch_since + self._flush_delay)

    def _flush_locked(self) -> None:
        """Give the batch to the log file and the listeners. The caller holds self._lock."""
        if not self._batch:
            return
        data = bytes(self._batch)
        self._batch.clear()
        if self._log is not None:
            self._write_log(data)
        for listener in list(self._listeners):
            try:
                listener(data)
            except Exception:
                log.exception("%s: console listener %r failed; detaching it", self.name, listener)
                if listener in self._listeners:
                    self._listeners.remove(listener)

    def _write_log(self, data: bytes) -> None:
        assert self._log is not None
        view = memoryview(data)
        try:
            while view:
                # An unbuffered write may take part of the data (a pipe write interrupted by the vCPU kick signal),
                # or none (None: a non-blocking pipe is full): the rest is written again, never dropped.
                n = self._log.write(view)
                view = view[n or 0:]
        except OSError as e:
            # A full disk or a closed pipe must not stop the guest: output() and the listeners still get it all.
            if not self._log_failed:
                self._log_failed = True
                log.error("%s: cannot write to console log %s: %s (output to it is lost until writes succeed)",
                          self.name, self.log_path, e.strerror or e)

    def _disarm_locked(self) -> None:
        """Take this device off the timer's list; its next partial line arms it again. Needs self._lock."""
        if self._timer_armed:
            self._timer_armed = False
            _flush_timer.disarm(self)

    def _timer_fired(self) -> float | None:
        """The timer thread's call: write out a partial line that has waited flush_delay. Returns the deadline
        to be called again at (a newer partial line is waiting), or None (nothing waits; the device is off the
        timer's list until its next partial line)."""
        with self._lock:
            if self._batch and time.monotonic() >= self._batch_since + self._flush_delay:
                self._flush_locked()
            if self._batch:
                return self._batch_since + self._flush_delay
            self._timer_armed = False
            return None

    # -- host side --------------------------------------------------------------------------------------------

    def feed(self, data: bytes) -> int:
        """Queue `data` as received from the line (thread-safe) and raise the receive interrupt if enabled.

        Returns how many bytes were accepted: at most `pending_limit` bytes wait on the wire, the rest is dropped.
        """
        with self._lock:
            room = max(0, self._pending_limit - len(self._rx_pending))
            accepted = data[:room]
            self._rx_pending.extend(accepted)
            self._refill()
            self._update_irq()
            return len(accepted)

    def output(self) -> bytes:
        """The last `output_limit` bytes the guest transmitted (loopback bytes excluded)."""
        with self._lock:
            return bytes(self._out[-self._output_limit:])

    def clear_output(self) -> None:
        with self._lock:
            self._out.clear()

    def add_listener(self, listener: Listener) -> None:
        """Call `listener(data)` with the transmitted bytes, in order and in batches (see the module docstring), on
        a vCPU thread or the flush timer's thread. It gets the bytes transmitted from now on.

        A listener that raises is logged and detached, so a broken console connection cannot stop the guest.
        """
        with self._lock:
            self._flush_locked()            # earlier bytes belong to the listeners attached when they were sent
            self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        with self._lock:
            self._flush_locked()            # bytes sent while it was attached are its own
            if listener in self._listeners:
                self._listeners.remove(listener)

    def flush_output(self) -> None:
        """Write out the batch now (the machine calls this whenever it stops)."""
        if self._batch:                     # unlocked peek: most stops (a fuzzer's thousands a second) have none
            with self._lock:
                self._flush_locked()

    @property
    def flush_delay(self) -> float:
        """Seconds a partial line may wait before it is written out; 0 writes every byte at once."""
        return self._flush_delay

    @flush_delay.setter
    def flush_delay(self, value: float) -> None:
        if value < 0:
            raise ValueError("flush_delay must not be negative")
        with self._lock:
            self._flush_delay = value
            self._flush_locked()
            self._disarm_locked()           # a deadline from the old delay must not hold back the next prompt

    @property
    def irq_level(self) -> bool:
        """The level this device currently drives its interrupt line to."""
        return self._irq_level

    def close(self) -> None:
        """Write out the batch and close the console log file (the device keeps working without it)."""
        with self._lock:
            self._flush_locked()
            self._disarm_locked()           # the timer's list must not keep a closed device (and its machine) alive
            if self._log is not None:
                self._log.close()
                self._log = None

    # -- state ------------------------------------------------------------------------------------------------

    def capture(self) -> SerialState:
        with self._lock:
            return SerialState(
                ier=self._ier, lcr=self._lcr, mcr=self._mcr, scr=self._scr, dll=self._dll, dlm=self._dlm,
                fcr=self._fcr, lsr_errors=self._lsr_errors, msr_deltas=self._msr_deltas, rbr=self._rbr,
                rx_fifo=bytes(self._rx_fifo), rx_pending=bytes(self._rx_pending), thr_ipending=self._thr_ipending,
            )

    def restore(self, state: SerialState) -> None:
        """Load `state` and drive the interrupt line to the level it implies (always, to resync the irqchip)."""
        if not isinstance(state, SerialState):
            raise DeviceStateError(f"{self.name}: expected a SerialState, got {type(state).__name__}")
        state.validate()
        with self._lock:
            self._ier = state.ier
            self._lcr = state.lcr
            self._mcr = state.mcr
            self._scr = state.scr
            self._dll = state.dll
            self._dlm = state.dlm
            self._fcr = state.fcr
            self._lsr_errors = state.lsr_errors
            self._msr_deltas = state.msr_deltas
            self._rbr = state.rbr
            self._rx_fifo = collections.deque(state.rx_fifo)
            self._rx_pending = collections.deque(state.rx_pending)
            self._thr_ipending = state.thr_ipending
            self._irq_level = self._interrupt_id() != IIR_NO_INT
            self._ctx.set_irq(self.irq, self._irq_level)


class _FlushTimer:
    """One daemon thread per process that writes out partial lines once they have waited their device's
    flush_delay. A device is on its list from its first unwritten partial line until a call finds nothing waiting,
    so a guest printing many lines costs one wake-up per flush_delay here, none per line."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._due: dict[Serial16550A, float] = {}
        self._thread: threading.Thread | None = None

    def arm(self, dev: Serial16550A, deadline: float) -> None:
        with self._cond:
            self._due[dev] = deadline
            if self._thread is None:
                self._thread = threading.Thread(target=self._main, name="vmfork-console-flush", daemon=True)
                self._thread.start()
            self._cond.notify()

    def disarm(self, dev: Serial16550A) -> None:
        with self._cond:
            self._due.pop(dev, None)

    def _main(self) -> None:
        while True:
            with self._cond:
                now = time.monotonic()
                due = [d for d, when in self._due.items() if when <= now]
                if not due:
                    earliest = min(self._due.values(), default=None)
                    self._cond.wait(None if earliest is None else earliest - now)
                    continue
                for d in due:
                    del self._due[d]
            # Outside our lock: a device's vCPU thread holds the device lock when it takes ours.
            for d in due:
                try:
                    again = d._timer_fired()
                except Exception:           # a bug here must not end the thread every console depends on
                    log.exception("%s: flushing the console output failed", d.name)
                    again = time.monotonic() + max(d.flush_delay, FLUSH_DELAY)
                if again is not None:
                    with self._cond:        # keep an earlier deadline armed meanwhile (flush_delay was shortened)
                        self._due[d] = min(again, self._due.get(d, again))


_flush_timer = _FlushTimer()
_live_devices: weakref.WeakSet[Serial16550A] = weakref.WeakSet()


@atexit.register
def _flush_all_at_exit() -> None:
    """A script that ends without stopping or destroying its machine still gets every byte into its log."""
    for dev in list(_live_devices):
        try:
            dev.flush_output()
        except Exception:
            log.exception("%s: flushing the console output at exit failed", dev.name)
