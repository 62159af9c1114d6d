"""Typed KVM bindings: ABI structures, constants and ioctl wrappers. Nothing else lives here."""

from . import constants, structs
from .api import (
                  DirtyRing,
                  Entry,
                  FdPlan,
                  IoctlPlan,
                  Kvm,
                  PackedPlan,
                  VcpuFd,
                  VmFd,
                  fastpath_built,
                  ioctl,
                  plan_entry,
                  run_fd_plan,
                  run_plan,
)

__all__ = ["DirtyRing", "Entry", "FdPlan", "IoctlPlan", "Kvm", "PackedPlan", "VcpuFd", "VmFd", "constants",
           "fastpath_built", "ioctl", "plan_entry", "run_fd_plan", "run_plan", "structs"]
