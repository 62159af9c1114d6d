"""Typed KVM bindings: ABI structures, constants and ioctl wrappers. Nothing else lives here."""

from . import constants, structs
from .api import Kvm, VcpuFd, VmFd, ioctl

__all__ = ["Kvm", "VcpuFd", "VmFd", "constants", "ioctl", "structs"]
