"""Typed KVM bindings: ABI structures, constants and ioctl wrappers. Nothing else lives here."""

from . import constants, structs
from .api import DirtyRing, IoctlPlan, Kvm, VcpuFd, VmFd, ioctl, plan_entry, run_plan

__all__ = ["DirtyRing", "IoctlPlan", "Kvm", "VcpuFd", "VmFd", "constants", "ioctl", "plan_entry", "run_plan", "structs"]
