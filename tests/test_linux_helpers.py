"""etwmon.sources._linux: capabilities, whether a process is alive, and socket receive buffer sizing."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

if not sys.platform.startswith("linux"):
    pytest.skip("Linux only.", allow_module_level=True)

from etwmon.sources import _linux  # noqa: E402


def _status_with(capeff: str | None):
    def read_proc(path: str, size: int = 4096):
        if path == "/proc/self/status":
            return None if capeff is None else f"Name:\tx\nCapEff:\t{capeff}\n".encode()
        return None
    return read_proc


def test_capabilities_come_from_cap_eff(monkeypatch):
    monkeypatch.setattr(_linux, "read_proc", _status_with("0000000000001000"))  # CAP_NET_ADMIN only
    monkeypatch.setattr(_linux.os, "geteuid", lambda: 0)
    assert _linux.effective_capabilities() == 1 << 12
    assert _linux.has_capability(_linux.CAP_NET_ADMIN)
    assert not _linux.has_capability(_linux.CAP_AUDIT_CONTROL)  # root without it (a container) lacks it
    monkeypatch.setattr(_linux.os, "geteuid", lambda: 1000)
    assert _linux.has_capability(_linux.CAP_NET_ADMIN)  # a user with it (setcap/ambient) has it


def test_unreadable_capabilities_fall_back_to_root_has_them_all(monkeypatch):
    monkeypatch.setattr(_linux, "read_proc", _status_with(None))
    assert _linux.effective_capabilities() is None
    monkeypatch.setattr(_linux.os, "geteuid", lambda: 0)
    assert _linux.has_capability(_linux.CAP_AUDIT_READ)
    monkeypatch.setattr(_linux.os, "geteuid", lambda: 1000)
    assert not _linux.has_capability(_linux.CAP_AUDIT_READ)


def test_this_process_has_what_the_kernel_says():
    with open("/proc/self/status") as f:
        capeff = int(next(line for line in f if line.startswith("CapEff:")).split()[1], 16)
    assert _linux.effective_capabilities() == capeff
    for cap in (_linux.CAP_NET_ADMIN, _linux.CAP_AUDIT_CONTROL, _linux.CAP_AUDIT_READ):
        assert _linux.has_capability(cap) == bool(capeff >> cap & 1)


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    return data[data.rfind(b")") + 2:][:1].decode()


def test_a_zombie_is_not_alive():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = _linux.live_process_start(child.pid)
        with open(f"/proc/{child.pid}/stat", "rb") as f:
            data = f.read()
        assert start == int(data[data.rfind(b")") + 2:].split()[19])
        os.kill(child.pid, signal.SIGKILL)
        # not reaped yet: the pid stays, as a zombie, until wait() (checked by state, not by sleeping)
        deadline = time.monotonic() + 10
        while _state(child.pid) != "Z" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _state(child.pid) == "Z"
        assert _linux.live_process_start(child.pid) is None
    finally:
        child.kill()
        child.wait()
    assert _linux.live_process_start(child.pid) is None  # reaped: no such process (or a new one, younger)


def test_live_process_start_of_this_process():
    assert _linux.live_process_start(os.getpid()) == _linux.live_process_start(os.getpid()) > 0


class _CappedSocket:
    """A socket as a process without CAP_NET_ADMIN sees it: SO_RCVBUFFORCE refused, SO_RCVBUF capped at
    ``rmem_max`` and doubled."""

    def __init__(self, rmem_max: int) -> None:
        self.rmem_max = rmem_max
        self.value = 0

    def setsockopt(self, level: int, option: int, value: int) -> None:
        if option == _linux._SO_RCVBUFFORCE:
            raise PermissionError(1, "Operation not permitted")
        assert option == socket.SO_RCVBUF
        self.value = 2 * min(value, self.rmem_max)

    def getsockopt(self, level: int, option: int) -> int:
        return self.value


def test_a_capped_receive_buffer_says_what_happened_and_what_to_do(monkeypatch, caplog):
    monkeypatch.setattr(_linux, "_rmem_max", lambda: 4 << 20)
    with caplog.at_level(logging.WARNING, logger="etwmon.sources._linux"):
        granted = _linux.set_receive_buffer(_CappedSocket(4 << 20), 8 << 20, "etwmon netlink")
    assert granted == 8 << 20  # what SO_RCVBUF reports: twice the 4 MiB granted
    (message,) = [r.getMessage() for r in caplog.records]
    assert message.startswith("etwmon netlink: asked for a socket receive buffer of 8 MiB, got 4 MiB: ")
    assert "net.core.rmem_max caps it at 4194304 bytes without CAP_NET_ADMIN" in message
    assert "every loss is counted" in message
    assert message.endswith("run as root or raise the cap: sysctl -w net.core.rmem_max=8388608")
    assert "16777216" not in message  # the kernel's doubling is not shown as if it were what was asked


def test_a_receive_buffer_granted_in_full_is_not_warned_about(caplog):
    with caplog.at_level(logging.WARNING, logger="etwmon.sources._linux"):
        granted = _linux.set_receive_buffer(_CappedSocket(16 << 20), 8 << 20, "etwmon netlink")
    assert granted == 16 << 20 and not caplog.records
