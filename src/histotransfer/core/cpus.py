"""How many CPUs this process may use: what the stages split between reading tiles and the model."""

from __future__ import annotations

import math
import os
from pathlib import Path

ENV = "HISTOTRANSFER_CPUS"  # set it to override (e.g. when sharing a node with another job)


def _cgroup_quota() -> float | None:
    """The CPU limit of this container (cgroup v2 ``cpu.max`` or v1 CFS quota), None when unlimited."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def available_cpus() -> int:
    """CPUs this process may use: ``$HISTOTRANSFER_CPUS`` if set, else its affinity mask capped by the
    container's CPU limit (a Kubernetes ``limits.cpu`` of 2 on a 64-core node is 2), at least 1."""
    if value := os.environ.get(ENV):
        try:
            return max(1, int(value))
        except ValueError:
            raise ValueError(f"{ENV}={value!r}: give a whole number of CPUs") from None
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        count = os.cpu_count() or 1
    if (quota := _cgroup_quota()) is not None:
        count = min(count, math.ceil(quota))
    return max(1, count)
