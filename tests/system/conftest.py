"""Fixtures for the system tests: the real esp-bridge binary, real pseudo-terminals, real
pyserial and esptool clients over real TCP.

Environment (set by scripts/test):
  ESP_BRIDGE_BIN     the binary under test (default: target/release/esp-bridge)
  ESP_SIM_BIN        the virtual ESP32 (default: esp-sim beside ESP_BRIDGE_BIN)
  ESP_BRIDGE_VENV4   a venv with esptool 4.x (default: ~/.cache/esp-bridge/venv-esptool4)
  ESP_BRIDGE_VENV5   a venv with esptool 5.x (default: ~/.cache/esp-bridge/venv-esptool5)
"""

import os
import pty
import signal
import socket
import subprocess
import threading
import time
import tty
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("ESP_BRIDGE_CACHE", Path.home() / ".cache" / "esp-bridge"))
BIN = Path(os.environ.get("ESP_BRIDGE_BIN", ROOT / "target" / "release" / "esp-bridge"))
# The virtual ESP32 on its own (crates/esp-sim), for tests that put a chip behind a device path.
SIM_BIN = Path(os.environ.get("ESP_SIM_BIN", BIN.parent / "esp-sim"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port, proc, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"esp-bridge exited early with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"esp-bridge did not listen on {port}")


class LogReader:
    """Collects a process's stderr lines in the background so tests can assert on them."""

    def __init__(self, stream):
        self.lines = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self._thread.start()

    def _run(self, stream):
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace").rstrip()
            with self._lock:
                self.lines.append(line)

    def text(self):
        with self._lock:
            return "\n".join(self.lines)

    def wait_for(self, needle, timeout=10.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.text():
                return
            time.sleep(0.05)
        raise AssertionError(f"log never said {needle!r}; log:\n{self.text()}")


class Bridge:
    """A running esp-bridge process."""

    def __init__(self, args, port, env=None):
        self.port = port
        self.url = f"rfc2217://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [str(BIN), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})},
        )
        self.log = LogReader(self.proc.stderr)
        # The log line, not a probe connection: a probe would be a client session of its own.
        # "control lines:" is logged once every listener is bound.
        deadline = time.monotonic() + 10
        while "control lines:" not in self.log.text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"esp-bridge did not start (exit {self.proc.poll()}):\n{self.log.text()}"
                )
            time.sleep(0.02)

    def stop(self, sig=signal.SIGTERM, timeout=10):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


class Pty:
    """A pseudo-terminal: the bridge opens `path`; the test plays the device on `master`."""

    def __init__(self):
        self.master, slave = pty.openpty()
        tty.setraw(self.master)
        tty.setraw(slave)
        self.path = os.ttyname(slave)
        os.close(slave)
        os.set_blocking(self.master, False)

    def read(self, n, timeout=5.0):
        """Reads exactly n bytes from the device side."""
        buf = bytearray()
        deadline = time.monotonic() + timeout
        while len(buf) < n and time.monotonic() < deadline:
            try:
                chunk = os.read(self.master, n - len(buf))
                buf.extend(chunk)
            except BlockingIOError:
                time.sleep(0.005)
            except OSError:
                time.sleep(0.005)
        return bytes(buf)

    def drain(self):
        try:
            while os.read(self.master, 65536):
                pass
        except OSError:
            pass

    def write(self, data):
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.master, view)
                view = view[n:]
            except BlockingIOError:
                time.sleep(0.001)

    def close(self):
        try:
            os.close(self.master)
        except OSError:
            pass


@pytest.fixture
def device():
    p = Pty()
    yield p
    p.close()


@pytest.fixture
def bridge_on(device):
    """Starts esp-bridge in front of the `device` pty; extra args may be given."""
    started = []

    def start(*extra, env=None, device_path=None):
        port = free_port()
        path = device_path or device.path
        b = Bridge(
            ["--device", str(path), "--listen", f"127.0.0.1:{port}", "--raw-listen", "127.0.0.1:0",
             "--control", "none", *extra],
            port,
            env=env,
        )
        started.append(b)
        return b

    yield start
    for b in started:
        b.stop()


@pytest.fixture
def demo(tmp_path):
    """Starts `esp-bridge demo` (the virtual ESP32 behind the bridge)."""
    started = []

    def start(*extra):
        port = free_port()
        raw_port = free_port()
        events = tmp_path / f"events-{port}.jsonl"
        b = Bridge(
            ["demo", "--listen", f"127.0.0.1:{port}", "--raw-listen", f"127.0.0.1:{raw_port}",
             "--event-log", str(events), *extra],
            port,
        )
        b.events = events
        b.raw_port = raw_port
        started.append(b)
        return b

    yield start
    for b in started:
        b.stop()


def esptool_cmd(version):
    """The esptool executable of a pinned venv, and how its commands are spelled."""
    venv = Path(os.environ.get(f"ESP_BRIDGE_VENV{version}", CACHE / f"venv-esptool{version}"))
    exe = venv / "bin" / ("esptool.py" if version == 4 else "esptool")
    if not exe.exists():
        pytest.skip(f"esptool {version}.x venv missing at {venv}: run scripts/setup-test-env")
    return exe


def spell(version, command):
    """esptool 5 spells commands with dashes, 4 with underscores."""
    return command if version == 5 else command.replace("-", "_")


class FakeNotify:
    """A unix datagram socket standing in for systemd's notification socket."""

    def __init__(self, tmp_path):
        self.path = str(tmp_path / "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages = []
        self.running = True
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while self.running:
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def lines(self):
        return [line for _, msg in self.messages for line in msg.split("\n") if line]

    def wait_for(self, needle, timeout=10):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(needle in line for line in self.lines()):
                return
            time.sleep(0.05)
        raise AssertionError(f"no {needle!r} in {self.lines()}")
