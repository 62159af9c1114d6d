"""What tests use to skip when this host's KVM lacks a feature.

The answers come from `vmfork doctor` (tiny guests measuring the host, see vmfork/doctor.py), cached per process and
for a day in ~/.cache/vmfork/doctor.json, so a test session normally pays nothing for them:

    import hostprobe

    def test_single_step_coverage():
        hostprobe.require("single_step")    # skips with "host KVM: KVM_SET_GUEST_DEBUG(SINGLESTEP) in CPL3 ..."

A feature name is a probe name (`vmfork doctor` lists them); an unknown name is a KeyError, not a skip.
"""

from __future__ import annotations

import pytest

from vmfork.doctor import HostReport, probe_host

__all__ = ["report", "require"]


def report() -> HostReport:
    """The host report (measured at most once a day per kernel, CPU and vmfork version)."""
    return probe_host(cached=True)


def require(feature: str) -> None:
    """Skip the calling test, naming the measurement, unless the host supports `feature`."""
    r = report()
    if not r.supports(feature):
        pytest.skip(r.reason(feature))
