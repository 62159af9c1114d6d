"""Domain configuration files in xl.cfg syntax (see Xen's xl.cfg(5)).

Syntax (the subset of xl's grammar vmfork reads):

    # a comment runs to the end of the line
    name = "web-1"                 # strings in "double" or 'single' quotes, on one line; C escapes (\\n, \\", \\x41)
    memory = 512                   # integers: decimal or 0x hex (a leading 0 is refused: xl reads it as octal)
    cmdline = 'console=ttyS0'; vcpus = 2     # ";" ends a setting like a newline does (as in xl)
    some_list = [ "a", "b",        # lists may span lines and end with a comma; they do not nest
                  "c" ]

Keys are lower-case identifiers ([a-z][a-z0-9_]*). Integer keys also take a string holding an integer, as xl's
do. Each key may be set once.

Keys:
    name            required; letters, digits, "-", "_" and "."; not all digits; at most 64 characters
    memory          MiB, an integer >= 1, default 256
    vcpus           1..64, default 1
    kernel          the kernel image; required (unless `require_kernel=False`); relative paths are resolved
                    against the directory of the config file
    ramdisk         an initial ramdisk (resolved like kernel)
    cmdline         the kernel command line; `extra` is an alias (setting both is an error)
    on_poweroff     what to do when the guest powers off, default "destroy"
    on_reboot       ... reboots, default "restart"
    on_crash        ... crashes, default "destroy"
                    (each one of destroy, restart, preserve, coredump-destroy, coredump-restart, rename-restart)
    boot_protocol   auto | multiboot | pvh | linux, default auto (a vmfork extension)
    cpuid           the CPU features the vCPUs are shown, in libxl's syntax: "host,popcnt=0,xsave=0" (see
                    vmfork.arch.x86.cpuid_policy); default: this host's default policy (the host's features minus
                    those its KVM cannot run in guest kernel mode; base word "default")

Every error is a `ConfigError` whose message starts with "FILE:LINE: KEY: ..." (or "FILE: ..." for a missing key).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, get_args

from .errors import ConfigError

__all__ = [
    "ACTIONS",
    "BOOT_PROTOCOLS",
    "KEYS",
    "Action",
    "BootProtocol",
    "DomainConfig",
    "load_config",
    "parse_config",
]

Action = Literal["destroy", "restart", "preserve", "coredump-destroy", "coredump-restart", "rename-restart"]
BootProtocol = Literal["auto", "multiboot", "pvh", "linux"]
ACTIONS: tuple[str, ...] = get_args(Action)
BOOT_PROTOCOLS: tuple[str, ...] = get_args(BootProtocol)

KEYS = ("name", "memory", "vcpus", "kernel", "ramdisk", "cmdline", "extra", "on_poweroff", "on_reboot", "on_crash",
        "boot_protocol", "cpuid")

MAX_NAME = 64
MAX_VCPUS = 64
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
_KEY_RE = re.compile(r"[a-z][a-z0-9_]*")
_WORD_RE = re.compile(r"[A-Za-z0-9_.+\-]+")
_DECIMAL_RE = re.compile(r"0|[1-9][0-9]*")
_HEX_RE = re.compile(r"0[xX][0-9a-fA-F]+")
_OCTAL_LOOKING_RE = re.compile(r"0[0-9]+")
_ESCAPES = {"\\": "\\", '"': '"', "'": "'", "n": "\n", "t": "\t", "r": "\r", "a": "\a", "b": "\b", "f": "\f",
            "v": "\v", "0": "\0"}


class _Invalid(Exception):
    """A value problem, before the file and line are known."""


def _show(value: object) -> str:
    """How an offending value appears in a message: strings quoted, lists as "a list"."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "a list"
    if value is None:
        return "nothing"
    return str(value)


def _token(text: str) -> str:
    """How a piece of source text appears in a syntax message."""
    if text[:1] in ("'", '"'):
        return text
    return json.dumps(text, ensure_ascii=False)


# -- field validation (shared by the parser, DomainConfig() and with_overrides) ----------------------------------

def _check_name(value: object) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"expected a string, got {_show(value)}")
    if not value:
        raise _Invalid("must not be empty")
    if len(value) > MAX_NAME:
        raise _Invalid(f"{_show(value)} is {len(value)} characters long, at most {MAX_NAME} are allowed")
    if not _NAME_RE.fullmatch(value):
        bad = next(ch for ch in value if not _NAME_RE.fullmatch(ch))
        raise _Invalid(f"{_show(value)} contains {_show(bad)}; use letters, digits, \"-\", \"_\" and \".\"")
    if value.isdigit():
        raise _Invalid(f"{_show(value)} is all digits, which would read as a domain id")
    if value in (".", ".."):
        raise _Invalid(f"{_show(value)} is not a usable name")
    return value


Validator = Callable[[object], object]


def _check_int(what: str, low: int, high: int | None, unit: str = "") -> Validator:
    def check(value: object) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise _Invalid(f"expected {what}, got {_show(value)}")
        if high is None:
            if value < low:
                raise _Invalid(f"must be at least {low}{unit}, got {value}")
        elif not low <= value <= high:
            raise _Invalid(f"must be between {low} and {high}, got {value}")
        return value
    return check


def _check_string(value: object) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"expected a string, got {_show(value)}")
    return value


def _check_path(optional: bool) -> Validator:
    def check(value: object) -> str | None:
        if value is None and optional:
            return None
        if not isinstance(value, str):
            raise _Invalid(f"expected a path in quotes, got {_show(value)}")
        if not value:
            raise _Invalid("must not be empty")
        if "\0" in value:
            raise _Invalid("contains a NUL character")
        return value
    return check


def _check_choice(choices: tuple[str, ...]) -> Validator:
    def check(value: object) -> str:
        if not isinstance(value, str) or value not in choices:
            raise _Invalid(f"expected one of {', '.join(choices)}; got {_show(value)}")
        return value
    return check


def _check_cpuid(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _Invalid(f"expected a string like \"host,popcnt=0\", got {_show(value)}")
    from .arch.x86.cpuid_policy import CpuidPolicy
    prefix = "cpuid: "
    try:
        CpuidPolicy.parse(value, where="cpuid")
    except ConfigError as e:
        message = str(e)
        raise _Invalid(message[len(prefix):] if message.startswith(prefix) else message) from None
    return value


_VALIDATORS: dict[str, Validator] = {
    "name": _check_name,
    "memory": _check_int("an integer number of MiB", 1, None, " MiB"),
    "vcpus": _check_int("an integer", 1, MAX_VCPUS),
    "kernel": _check_path(optional=True),
    "ramdisk": _check_path(optional=True),
    "cmdline": _check_string,
    "on_poweroff": _check_choice(ACTIONS),
    "on_reboot": _check_choice(ACTIONS),
    "on_crash": _check_choice(ACTIONS),
    "boot_protocol": _check_choice(BOOT_PROTOCOLS),
    "cpuid": _check_cpuid,
}
_INT_KEYS = ("memory", "vcpus")
_PATH_KEYS = ("kernel", "ramdisk")


def _suggest(key: str, candidates: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.7)
    return f" (did you mean \"{close[0]}\"?)" if close else ""


@dataclass(frozen=True, slots=True)
class DomainConfig:
    """A domain's configuration. Constructing one validates every field (raising `ConfigError`)."""

    name: str
    memory: int = 256
    vcpus: int = 1
    kernel: str | None = None
    ramdisk: str | None = None
    cmdline: str = ""
    on_poweroff: Action = "destroy"
    on_reboot: Action = "restart"
    on_crash: Action = "destroy"
    boot_protocol: BootProtocol = "auto"
    cpuid: str | None = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            try:
                _VALIDATORS[f.name](getattr(self, f.name))
            except _Invalid as e:
                raise ConfigError(f"{f.name}: {e}") from None

    @property
    def memory_bytes(self) -> int:
        return self.memory << 20

    def with_overrides(self, **overrides: object) -> DomainConfig:
        """A copy with some fields replaced (e.g. for a fork), validated like a config file's values.

        `extra` is accepted as an alias of `cmdline`. Paths are taken as given.
        """
        changes: dict[str, object] = {}
        for key, value in overrides.items():
            field_name = "cmdline" if key == "extra" else key
            if field_name not in _VALIDATORS:
                raise ConfigError(f"override: unknown key {_show(key)}{_suggest(key, KEYS)}")
            if field_name in changes:
                raise ConfigError("override: cmdline and extra both given; extra is an alias of cmdline")
            changes[field_name] = value
        try:
            return dataclasses.replace(self, **changes)  # type: ignore[arg-type]
        except ConfigError as e:
            raise ConfigError(f"override: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- the parser --------------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _Value:
    kind: Literal["string", "number", "list"]
    value: Any  # str for string and number (the number's text), list[_Value] for a list
    line: int

    def plain(self) -> object:
        """The value as Python data: numbers become int, lists lists."""
        if self.kind == "number":
            return _number(self.value)
        if self.kind == "list":
            return [item.plain() for item in self.value]
        return self.value


def _number(text: str) -> int:
    if _DECIMAL_RE.fullmatch(text):
        return int(text)
    if _HEX_RE.fullmatch(text):
        return int(text, 16)
    raise ValueError(text)


@dataclass(frozen=True, slots=True)
class _Setting:
    key: str
    value: _Value
    line: int


class _Parser:
    def __init__(self, text: str, where: str) -> None:
        if text.startswith("\ufeff"):
            text = text[1:]
        self.text = text
        self.where = where
        self.pos = 0
        self.line = 1
        self.key = ""

    def error(self, message: str, line: int | None = None) -> ConfigError:
        prefix = f"{self.key}: " if self.key else ""
        return ConfigError(f"{self.where}:{self.line if line is None else line}: {prefix}{message}")

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def skip_blanks(self) -> None:
        """Skip spaces, tabs, carriage returns and a comment (not the newline ending it)."""
        text, n = self.text, len(self.text)
        while self.pos < n:
            ch = text[self.pos]
            if ch in " \t\r\f\v":
                self.pos += 1
            elif ch == "#":
                end = text.find("\n", self.pos)
                self.pos = n if end < 0 else end
            else:
                break

    def newline(self) -> None:
        self.pos += 1
        self.line += 1

    def parse(self) -> list[_Setting]:
        settings: list[_Setting] = []
        while True:
            self.key = ""
            self.skip_blanks()
            ch = self.peek()
            if not ch:
                return settings
            if ch == "\n":
                self.newline()
                continue
            if ch == ";":
                self.pos += 1
                continue
            settings.append(self.setting())

    def word(self) -> str:
        m = _WORD_RE.match(self.text, self.pos)
        if not m:
            return ""
        self.pos = m.end()
        return m.group()

    def setting(self) -> _Setting:
        line = self.line
        key = self.word()
        if not key:
            raise self.error(f"expected a setting (key = value), got {_token(self.rest_of_token())}")
        if not _KEY_RE.fullmatch(key):
            raise self.error(f"invalid key {_show(key)}: keys are lower-case letters, digits and \"_\", "
                             "starting with a letter")
        self.key = key
        self.skip_blanks()
        ch = self.peek()
        if ch != "=":
            if self.text.startswith("+=", self.pos):
                raise self.error("\"+=\" is not supported; set each key once with \"=\"")
            got = "the end of the line" if ch in ("", "\n", ";") else _token(self.rest_of_token())
            raise self.error(f"expected \"=\" after the key, got {got}")
        self.pos += 1
        self.skip_blanks()
        value = self.value(in_list=False)
        self.skip_blanks()
        ch = self.peek()
        if ch not in ("", "\n", ";"):
            raise self.error(f"unexpected {_token(self.rest_of_token())} after the value "
                             "(one setting per line, or separate settings with \";\")")
        return _Setting(key, value, line)

    def rest_of_token(self) -> str:
        m = re.compile(r"[^\s;#,\[\]]+|.").match(self.text, self.pos)
        return m.group() if m else ""

    def value(self, *, in_list: bool) -> _Value:
        ch = self.peek()
        line = self.line
        if ch in ("'", '"'):
            return _Value("string", self.string(), line)
        if ch.isdigit():
            text = self.word()
            try:
                _number(text)
            except ValueError:
                if _OCTAL_LOOKING_RE.fullmatch(text) and all(c in "01234567" for c in text):
                    octal = int(text, 8)
                    raise self.error(f"{text} has a leading zero, which xl reads as octal; "
                                     f"write {octal} or {octal:#x}") from None
                raise self.error(f"invalid number {_show(text)} (write decimal digits, or 0x and hex digits)"
                                 ) from None
            return _Value("number", text, line)
        if ch == "[":
            if in_list:
                raise self.error("lists cannot be nested")
            return self.list_value()
        if ch in ("", "\n", ";"):
            raise self.error("missing value after \"=\"")
        token = self.rest_of_token()
        if re.fullmatch(r"[+-][0-9].*", token):
            hint = " (numbers cannot have a sign)"
        elif _WORD_RE.fullmatch(token):
            hint = " (strings need quotes)"
        else:
            hint = ""
        raise self.error(f"expected a value (a \"quoted string\", a number or a [list]), got {_token(token)}{hint}")

    def string(self) -> str:
        quote = self.text[self.pos]
        start_line = self.line
        self.pos += 1
        out: list[str] = []
        text, n = self.text, len(self.text)
        while True:
            if self.pos >= n or text[self.pos] == "\n":
                raise self.error("unterminated string (a string must end on the line it starts)", start_line)
            ch = text[self.pos]
            if ch == quote:
                self.pos += 1
                return "".join(out)
            if ch == "\\":
                out.append(self.escape())
                continue
            out.append(ch)
            self.pos += 1

    def escape(self) -> str:
        text = self.text
        self.pos += 1  # the backslash
        ch = text[self.pos] if self.pos < len(text) else ""
        if ch in ("", "\n"):
            raise self.error("unterminated string (a string must end on the line it starts)")
        if ch == "x":
            m = re.compile(r"[0-9a-fA-F]{1,2}").match(text, self.pos + 1)
            if not m:
                raise self.error("\"\\x\" must be followed by hex digits")
            self.pos = m.end()
            return chr(int(m.group(), 16))
        m = re.compile(r"[0-7]{1,3}").match(text, self.pos)
        if m and not (ch == "0" and m.group() == "0"):
            self.pos = m.end()
            return chr(int(m.group(), 8))
        if ch in _ESCAPES:
            self.pos += 1
            return _ESCAPES[ch]
        raise self.error(f"unknown escape \"\\{ch}\" in a string (write \"\\\\\" for a backslash)")

    def list_value(self) -> _Value:
        start_line = self.line
        self.pos += 1  # "["
        items: list[_Value] = []
        expect_item = True
        while True:
            self.skip_blanks()
            ch = self.peek()
            if not ch:
                raise self.error(f"unterminated list (the \"[\" is never closed; the file ends at line {self.line})",
                                 start_line)
            if ch == "\n":
                self.newline()
                continue
            if ch == "]":
                self.pos += 1
                return _Value("list", items, start_line)
            if ch == ",":
                if expect_item:
                    raise self.error("unexpected \",\" in the list (an item is missing)")
                self.pos += 1
                expect_item = True
                continue
            if ch == ";":
                raise self.error(f"unterminated list (the \"[\" is never closed before the \";\" on line {self.line})",
                                 start_line)
            if re.compile(r"[a-z][a-z0-9_]*[ \t]*=").match(self.text, self.pos):
                raise self.error(f"unterminated list (the \"[\" is not closed before the next setting, on line "
                                 f"{self.line})", start_line)
            if not expect_item:
                raise self.error(f"expected \",\" or \"]\" in the list, got {_token(self.rest_of_token())}")
            items.append(self.value(in_list=True))
            expect_item = False


def _display_name(path: str | os.PathLike[str] | None) -> str:
    return "<config>" if path is None else os.fspath(path)


def parse_config(text: str, *, path: str | os.PathLike[str] | None = None, require_kernel: bool = True
                 ) -> DomainConfig:
    """Parse xl.cfg text. `path` names the file in messages and anchors relative kernel/ramdisk paths (without it
    they stay as written). `require_kernel=False` accepts a config without a kernel (e.g. a fork template)."""
    where = _display_name(path)
    parser = _Parser(text, where)
    settings = parser.parse()
    base_dir = os.path.dirname(os.path.abspath(os.fspath(path))) if path is not None else None

    values: dict[str, object] = {}
    set_by: dict[str, _Setting] = {}  # field -> the setting that set it
    for s in settings:
        def fail(message: str, s: _Setting = s) -> ConfigError:
            return ConfigError(f"{where}:{s.line}: {s.key}: {message}")

        if s.key not in KEYS:
            raise ConfigError(f"{where}:{s.line}: unknown key {_show(s.key)}{_suggest(s.key, KEYS)}")
        field_name = "cmdline" if s.key == "extra" else s.key
        earlier = set_by.get(field_name)
        if earlier is not None:
            if earlier.key != s.key:
                raise fail(f"cannot be used together with {earlier.key} (line {earlier.line}); "
                           "extra is an alias of cmdline")
            raise fail(f"already set on line {earlier.line}")
        raw = s.value.plain()
        if field_name in _INT_KEYS and isinstance(raw, str):
            try:
                raw = _number(raw.strip())  # xl takes a number in quotes too
            except ValueError:
                pass  # the validator reports the string as written
        try:
            value = _VALIDATORS[field_name](raw)
        except _Invalid as e:
            raise fail(str(e)) from None
        if field_name in _PATH_KEYS and base_dir is not None and isinstance(value, str):
            value = os.path.join(base_dir, value)
        values[field_name] = value
        set_by[field_name] = s

    if "name" not in values:
        raise ConfigError(f"{where}: missing required key \"name\"")
    if require_kernel and "kernel" not in values:
        raise ConfigError(f"{where}: missing required key \"kernel\"")
    return DomainConfig(**values)  # type: ignore[arg-type]


def load_config(path: str | os.PathLike[str], *, require_kernel: bool = True) -> DomainConfig:
    """Read and parse the config file at `path`."""
    where = _display_name(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"{where}: cannot read the config file: {e.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(f"{where}:{line}: the file is not UTF-8 text") from None
    return parse_config(text, path=path, require_kernel=require_kernel)
