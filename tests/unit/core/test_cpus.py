import pytest

from histotransfer.core import cpus


def test_available_cpus_follows_the_override_then_affinity_and_the_container_limit(monkeypatch):
    monkeypatch.setenv(cpus.ENV, "3")
    assert cpus.available_cpus() == 3
    monkeypatch.setenv(cpus.ENV, "three")
    with pytest.raises(ValueError, match="HISTOTRANSFER_CPUS='three'"):
        cpus.available_cpus()
    monkeypatch.delenv(cpus.ENV)
    monkeypatch.setattr(cpus.os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setattr(cpus, "_cgroup_quota", lambda: 1.5)  # limits.cpu: 1500m on a 64-core node
    assert cpus.available_cpus() == 2
    monkeypatch.setattr(cpus, "_cgroup_quota", lambda: None)
    assert cpus.available_cpus() == 64


def test_cgroup_quota_reads_cpu_max(monkeypatch, tmp_path):
    files = {"/sys/fs/cgroup/cpu.max": "250000 100000\n"}
    real_read = cpus.Path.read_text

    def read_text(path, *args, **kwargs):
        if str(path) in files:
            return files[str(path)]
        if str(path).startswith("/sys/fs/cgroup"):
            raise FileNotFoundError(path)
        return real_read(path, *args, **kwargs)

    monkeypatch.setattr(cpus.Path, "read_text", read_text)
    assert cpus._cgroup_quota() == 2.5
    files["/sys/fs/cgroup/cpu.max"] = "max 100000\n"
    assert cpus._cgroup_quota() is None
