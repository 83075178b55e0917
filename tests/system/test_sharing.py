"""Sharing a board (the sharing issue): one client writes, every other one watches. Real clients
over real TCP into the real binary: idf.py's monitor (esp-idf-monitor), esptool 5, miniterm,
socat and pyserial, against the virtual ESP32 (`esp-bridge demo`, or esp-sim on its own) or a
pseudo-terminal.
"""

import hashlib
import os
import pty
import re
import socket
import struct
import subprocess
import sys
import threading
import time

import serial

from conftest import BIN, SIM_BIN, Bridge, LogReader, esptool_cmd, free_port
from test_reset import events, wait_mode
from test_faults import telnet_data
from test_robustness import IAC, SB, raw_client, recv_until

PYTHON = sys.executable


class Output:
    """Collects a process's (or a socket's) output on a thread."""

    def __init__(self, stream=None, sock=None):
        self.data = bytearray()
        self.closed = threading.Event()
        self._stream, self._sock = stream, sock
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while True:
            try:
                chunk = self._sock.recv(65536) if self._sock else os.read(self._stream.fileno(), 65536)
            except OSError:
                chunk = b""
            if not chunk:
                self.closed.set()
                return
            self.data += chunk

    def wait_for(self, needle, timeout=20, since=0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.data[since:]:
                return
            time.sleep(0.05)
        raise AssertionError(f"never saw {needle!r}; last output: {bytes(self.data[-1500:])!r}")


class Monitor:
    """idf.py's monitor (esp-idf-monitor) on `url`, driven through its non-interactive mode:
    commands on standard input (`send TEXT`, `exit`), the board's output on standard output."""

    def __init__(self, url):
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "esp_idf_monitor", "--no-reset", "--port", url],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        self.out = Output(self.proc.stdout)

    def command(self, line):
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def close(self):
        if self.proc.poll() is None:
            try:
                self.command("exit")
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(5)


def esptool(bridge, *args, timeout=300):
    cmd = [str(esptool_cmd(5)), "--port", f"socket://127.0.0.1:{bridge.raw_port}", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    return r, r.stdout + r.stderr


def resets(bridge, since_us=0):
    """Times EN went low (the chip was reset), from the virtual chip's event log."""
    return [e for e in events(bridge) if e["event"] == "en" and e["level"] == "low" and e["t_us"] >= since_us]


def last_event_us(bridge):
    evs = events(bridge)
    return evs[-1]["t_us"] if evs else 0


def app_digest(image):
    """What the virtual chip prints for the image at 0x10000 (its first 64 KiB, MD5)."""
    return hashlib.md5(image[: 64 * 1024]).hexdigest()[:16]


def flash_under_a_monitor(demo, tmp_path, typed):
    bridge = demo("--takeover-idle-secs", "2", "--claim-wait-secs", "10")
    wait_mode(bridge, "app")
    before = last_event_us(bridge)
    monitor = Monitor(bridge.url)
    try:
        monitor.out.wait_for(b"hello from the virtual ESP32", timeout=30)
        if typed:
            # A typed line claims the board: the application echoes it.
            monitor.command("send ping-from-the-monitor")
            monitor.out.wait_for(b"ping-from-the-monitor", timeout=10)
            bridge.log.wait_for("writes on the RFC 2217 port")
            # Then it stays silent for longer than takeover_idle_secs (and its first seconds
            # as a writer are over).
            time.sleep(5.5)
        assert not resets(bridge, before), "the monitor's connect reset the chip"
        image = os.urandom(96 * 1024)
        path = tmp_path / "app.bin"
        path.write_bytes(image)
        mark = len(monitor.out.data)
        r, out = esptool(bridge, "write-flash", "0x10000", str(path))
        assert r.returncode == 0 and "Hash of data verified" in out, out + bridge.log.text()[-3000:]
        # The new application's boot log reaches the monitor, which never stopped.
        monitor.out.wait_for(b"App image MD5:    " + app_digest(image).encode(), timeout=20, since=mark)
        assert monitor.proc.poll() is None, "the monitor exited"
        r, out = esptool(bridge, "verify-flash", "0x10000", str(path))
        assert r.returncode == 0 and "verify OK" in out.replace("Verification successful", "verify OK"), out
        log = bridge.log.text()
        if typed:
            assert "takes the board over from" in log, log[-3000:]
            assert "another client writes to this board now" in monitor.out.data.decode(errors="replace")
        else:
            assert "takes the board over" not in log
        # Two esptool runs reset the chip (into the bootloader and back each); the monitor
        # never did.
        assert len(resets(bridge, before)) >= 2
    finally:
        monitor.close()


def test_idf_monitor_that_typed_then_went_idle_lets_esptool_flash_and_shows_the_new_boot(demo, tmp_path):
    flash_under_a_monitor(demo, tmp_path, typed=True)


def test_idf_monitor_watching_lets_esptool_flash_and_shows_the_new_boot(demo, tmp_path):
    flash_under_a_monitor(demo, tmp_path, typed=False)


class Miniterm:
    """pyserial's miniterm on `url`, with a pseudo-terminal as its console (it needs one)."""

    def __init__(self, url):
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "serial.tools.miniterm", "--raw", "--quiet", url, "115200"],
            stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )
        os.close(slave)
        self.out = Output(self.proc.stdout)

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        os.close(self.master)


def pattern(n):
    """A device stream with no 0xFF (kept simple for the telnet watchers) and no CR/LF
    translation trouble: printable, numbered lines."""
    lines = b"".join(b"line %06d of the board's output\n" % i for i in range(n))
    return lines


def read_until_notice(sock, needle, timeout):
    """Reads `sock` until `needle` arrives; returns the bytes around it. Linear in what is read
    (megabytes here): only the newest bytes are searched."""
    sock.settimeout(1)
    tail = b""
    total = 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(1 << 16)
        except socket.timeout:
            continue
        if not chunk:
            break
        total += len(chunk)
        window = tail + chunk
        at = window.find(needle)
        if at >= 0:
            return window[max(0, at - 200):at + 200]
        tail = window[-4096:]
    raise AssertionError(f"no {needle!r} in the {total} bytes read; the last: {tail[-200:]!r}")


def test_watchers_see_what_the_writer_sees_and_one_that_stops_reading_slows_nothing(bridge_on, device):
    bridge = bridge_on()
    # The writer: a plain telnet client (it reads faster than pyserial's reader thread, which
    # a burst of megabytes needs).
    writer = raw_client(bridge)
    writer.sendall(b"w")
    assert device.read(1) == b"w"
    bridge.log.wait_for("writes on the RFC 2217 port")
    writer.settimeout(5)
    pending = [b""]

    def writer_read(n, within):
        got = bytearray()
        deadline = time.monotonic() + within
        while len(got) < n and time.monotonic() < deadline:
            try:
                chunk = writer.recv(1 << 20)
            except socket.timeout:
                continue
            data, pending[0] = telnet_data(pending[0] + chunk)
            got += data
        return bytes(got)
    watchers = [Miniterm(bridge.url), Miniterm(bridge.url)]
    raw = bridge.log.text()
    raw_port = int(re.search(r"listening on 127\.0\.0\.1:(\d+) for ESP raw clients", raw).group(1))
    socat = subprocess.Popen(["socat", "-u", f"TCP:127.0.0.1:{raw_port}", "STDOUT"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    socat_out = Output(socat.stdout)
    # One more watcher that never reads, with a small receive buffer.
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    stalled.connect(("127.0.0.1", bridge.port))
    stalled.sendall(bytes([IAC, 251, 44, IAC, 253, 44]))
    try:
        deadline = time.monotonic() + 10
        while bridge.log.text().count("it watches until") < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        # 6 MB as fast as the pty takes it, more than the kernel buffers for the watcher that
        # never reads: the writer still gets every byte, at full speed. (A watcher that stays
        # stalled for the keepalive's user timeout, 20 s here, is dropped by the kernel.)
        burst = bytes(i % 251 for i in range(1 << 20)) * 6
        t = time.monotonic()
        threading.Thread(target=device.write, args=(burst,), daemon=True).start()
        got = writer_read(len(burst), 60)
        took = time.monotonic() - t
        assert len(got) == len(burst) and bytes(got) == burst, f"the writer got {len(got)} of {len(burst)} bytes"
        # The one that did not read lost output, and is told how much once it reads.
        try:
            said = read_until_notice(stalled, b"bytes of output lost here", timeout=15)
        except AssertionError:
            port = stalled.getsockname()[1]
            lines = [l for l in bridge.log.text().splitlines() if f":{port} " in l]
            print("\n".join(lines[-30:]))
            raise
        found = re.search(rb"\[esp-bridge\] (\d+) bytes of output lost here", said)
        assert found, said[-300:]
        lost = int(found.group(1))
        assert 0 < lost < len(burst)
        print(f"writer got {len(burst)} bytes in {took:.2f} s beside a stalled watcher; it lost {lost}")
        # The watchers that read catch up with what their kernel buffers took of the burst
        # (or were told what they lost).
        outs = [w.out for w in watchers] + [socat_out]
        sizes = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            now = [len(o.data) for o in outs]
            if now == sizes:
                break
            sizes = now
            time.sleep(1.0)
        # Then at a UART's pace (about 921600 baud): every watcher that reads gets every byte.
        stream = pattern(10_000)  # 330 KB

        def paced(data, per_chunk=4096, interval=0.04):
            for i in range(0, len(data), per_chunk):
                device.write(data[i:i + per_chunk])
                time.sleep(interval)

        t = time.monotonic()
        threading.Thread(target=paced, args=(stream,), daemon=True).start()
        got = writer_read(len(stream), 60)
        assert bytes(got) == stream, f"the writer got {len(got)} of {len(stream)} bytes"
        for w in watchers:
            w.out.wait_for(stream[-40:], timeout=30)
            assert stream in bytes(w.out.data), "a miniterm watcher missed bytes"
        socat_out.wait_for(stream[-40:], timeout=30)
        assert stream in bytes(socat_out.data), "the socat watcher missed bytes"
        # The writer still writes.
        writer.sendall(b"after")
        assert device.read(5) == b"after"
    finally:
        for w in watchers:
            w.close()
        socat.terminate()
        socat.wait(5)
        stalled.close()
        writer.close()


def start_sim(link):
    proc = subprocess.Popen([str(SIM_BIN), "--link", str(link), "--boot", "download"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout.readline().strip(), "the sim prints its device path"
    return proc


def sim_bridge(tmp_path, network=""):
    """esp-bridge with a config file in front of a virtual ESP32 held in its bootloader (no
    control lines: esptool syncs with it as it is)."""
    link = tmp_path / "ttyESP"
    sim = start_sim(link)
    port, raw_port = free_port(), free_port()
    cfg = tmp_path / "bridge.toml"
    cfg.write_text(f'[serial]\ndevice = "{link}"\n[network]\nlisten = ["127.0.0.1:{port}"]\n'
                   f'raw_listen = ["127.0.0.1:{raw_port}"]\n{network}[control]\nbackend = "none"\n')
    bridge = Bridge(["--config", str(cfg)], port)
    bridge.raw_port = raw_port
    return sim, bridge


def test_idle_and_stalled_connections_do_not_block_esptool(tmp_path):
    """What the outside attack found: an idle connection, one stalled inside a telnet
    subnegotiation and an idle raw connection each held the board for as long as they stayed
    open. Now they watch, and esptool flashes through either port meanwhile."""
    sim, bridge = sim_bridge(tmp_path)
    try:
        idle = socket.create_connection(("127.0.0.1", bridge.port))
        idle_out = Output(sock=idle)
        stalled = raw_client(bridge)
        stalled.sendall(bytes([IAC, SB, 44, 0]) + b"esp")
        stalled_out = Output(sock=stalled)
        idle_raw = socket.create_connection(("127.0.0.1", bridge.raw_port))
        for url in (f"rfc2217://127.0.0.1:{bridge.port}", f"socket://127.0.0.1:{bridge.raw_port}"):
            r = subprocess.run([str(esptool_cmd(5)), "--port", url, "--before", "no-reset",
                                "--after", "no-reset", "flash-id"],
                               capture_output=True, text=True, timeout=120)
            assert r.returncode == 0 and "Detecting chip type" in r.stdout, r.stdout + r.stderr
        # The telnet connections that never finished negotiating are closed, with the reason.
        idle_out.closed.wait(10)
        assert b"did not answer the telnet negotiation" in idle_out.data
        stalled_out.closed.wait(10)
        assert b"stalled in a telnet subnegotiation" in stalled_out.data
        # The idle raw connection is a watcher: still open, harmless.
        idle_raw.settimeout(0.2)
        try:
            assert idle_raw.recv(1) != b"", "the idle raw watcher was closed"
        except socket.timeout:
            pass
        idle_raw.close()
    finally:
        bridge.stop()
        sim.terminate()
        sim.wait(5)


def takeovers(log):
    """Takeovers the log reports, counting those the rate limit summed up."""
    said = log.count("takes the board over from")
    summed = sum(int(n) for n in re.findall(r"and (\d+) more takeovers like it", log))
    return said + summed


def test_two_clients_taking_the_board_from_each_other_settle(tmp_path):
    """With second_client = "replace", two clients that reconnect and write as fast as they
    can took the board from each other 40,753 times in 20 s and no esptool run got through.
    Now a writer keeps the board for its first seconds and takeovers are spaced: a handful in
    10 s, and esptool flashes once one of them stops."""
    sim, bridge = sim_bridge(tmp_path, 'second_client = "replace"\n')
    stop = threading.Event()
    counts = [0, 0]

    def fight(i):
        while not stop.is_set():
            try:
                s = socket.create_connection(("127.0.0.1", bridge.raw_port), timeout=2)
                s.settimeout(0.05)
                while not stop.is_set():
                    s.sendall(b"mine %d\n" % i)
                    counts[i] += 1
                    try:
                        if s.recv(4096) == b"":
                            break
                    except socket.timeout:
                        pass
                s.close()
            except OSError:
                time.sleep(0.01)

    fighters = [threading.Thread(target=fight, args=(i,), daemon=True) for i in (0, 1)]
    try:
        for f in fighters:
            f.start()
        time.sleep(10)
        stop.set()
        for f in fighters:
            f.join(5)
        time.sleep(11)  # the rate limit's window closes and says its counts
        n = takeovers(bridge.log.text())
        assert 1 <= n <= 3, f"{n} takeovers in 10 s"
        assert min(counts) > 0, counts
        r = subprocess.run([str(esptool_cmd(5)), "--port", f"socket://127.0.0.1:{bridge.raw_port}",
                            "flash-id"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        stop.set()
        bridge.stop()
        sim.terminate()
        sim.wait(5)


def test_a_writer_hands_over_only_after_its_first_seconds_and_keeps_watching(bridge_on, device, tmp_path):
    """takeover_idle_secs: a silent writer is replaced by a client that wants to write, but
    not before its first seconds are over; it then watches on."""
    cfg = tmp_path / "idle.toml"
    cfg.write_text("[network]\ntakeover_idle_secs = 1\nclaim_wait_secs = 20\n")
    bridge = bridge_on("--config", str(cfg))
    first = raw_client(bridge)
    first.sendall(b"one")
    assert device.read(3) == b"one"
    t = time.monotonic()
    second = raw_client(bridge)
    time.sleep(1.5)  # the first writer is silent for longer than takeover_idle_secs
    second.sendall(b"two")
    # Not yet: the first writer's first 5 seconds protect it; the claim waits.
    assert device.read(3, timeout=5 - (time.monotonic() - t) - 0.5) == b""
    # Then the claim made again (as terminals and esptool do) gets it.
    while time.monotonic() - t < 5.2:
        time.sleep(0.1)
    second.sendall(b"two")
    assert device.read(3, timeout=5) == b"two"
    said = recv_until(first, lambda d: b"goes on watching" in d)
    assert b"another client writes to this board now" in said
    device.write(b"both see this")
    recv_until(first, lambda d: b"both see this" in d)
    recv_until(second, lambda d: b"both see this" in d)
    first.close()
    second.close()


def test_a_connection_past_the_limit_is_told_why(bridge_on, device):
    """32 connections a board, counting both ports; the 33rd is told why and closed."""
    bridge = bridge_on()
    raw_port = int(re.search(r"listening on 127\.0\.0\.1:(\d+) for ESP raw clients", bridge.log.text()).group(1))
    held = [socket.create_connection(("127.0.0.1", raw_port)) for _ in range(32)]
    try:
        time.sleep(1.0)
        extra = socket.create_connection(("127.0.0.1", bridge.port))
        said = recv_until(extra, lambda d: d.endswith(b"\n"))
        assert b"has 32 connections already" in said, said
        extra.close()
        # One leaves: the next is let in.
        held.pop().close()
        time.sleep(0.5)
        again = raw_client(bridge)
        device.write(b"seen")
        recv_until(again, lambda d: b"seen" in d)
        again.close()
    finally:
        for s in held:
            s.close()


def test_a_watcher_flooding_requests_without_reading_stays_bounded(bridge_on, device):
    """A watcher's requests are answered from its own view; one that sends 100,000 of them and
    does not read the answers is not read further once 64 KiB of answers wait for it: the
    bridge's memory stays flat, and every answer arrives once it reads."""
    bridge = bridge_on()
    s = raw_client(bridge)
    count = 100_000
    request = bytes([IAC, SB, 44, 1]) + struct.pack(">I", 115200) + bytes([IAC, 240])
    sender = threading.Thread(target=s.sendall, args=(request * count,), daemon=True)
    sender.start()
    time.sleep(2.0)
    with open(f"/proc/{bridge.proc.pid}/status") as f:
        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    assert hwm < 20 * 1024, f"peak RSS {hwm} KiB while the watcher did not read"
    reply = bytes([IAC, SB, 44, 101]) + struct.pack(">I", 115200) + bytes([IAC, 240])
    s.settimeout(5)
    got = 0
    tail = b""
    deadline = time.monotonic() + 60
    while got < count and time.monotonic() < deadline:
        chunk = tail + s.recv(1 << 16)
        got += chunk.count(reply)
        cut = chunk.rfind(reply)
        tail = chunk[cut + len(reply):] if cut >= 0 else chunk[-len(reply):]
    sender.join(10)
    assert got == count, f"{got} of {count} answered"
    s.close()


STAMP = rb"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} "


def test_the_boot_log_after_a_flash_is_kept_and_esp_bridge_log_replays_and_follows(demo, tmp_path):
    """No client watches while esptool flashes through socket://: the boot log the new
    application prints after esptool's final reset is in the board's history all the same
    (the device stays open a few seconds after the last client), and `esp-bridge log` replays
    it with timestamps; `esp-bridge log -f` then follows the board's output."""
    control = tmp_path / "control.sock"
    bridge = demo("--control-socket", str(control))
    wait_mode(bridge, "app")
    image = os.urandom(80 * 1024)
    path = tmp_path / "app.bin"
    path.write_bytes(image)
    r, out = esptool(bridge, "write-flash", "0x10000", str(path))
    assert r.returncode == 0 and "Hash of data verified" in out, out
    line = STAMP + rb"I \(156\) app_init: App image MD5:    " + app_digest(image).encode() + rb"\n"
    deadline = time.monotonic() + 10
    while True:
        log = subprocess.run([str(BIN), "log", "--control-socket", str(control)],
                             capture_output=True, timeout=20)
        assert log.returncode == 0, log.stderr
        if re.search(line, log.stdout) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert re.search(line, log.stdout), log.stdout[-2000:]
    assert re.search(STAMP + rb"I \(30\) boot: ESP-IDF", log.stdout), "the bootloader's lines"
    # Following: what the board prints from now on (here while a watcher keeps it served).
    follower = subprocess.Popen([str(BIN), "log", "-f", "--control-socket", str(control)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    followed = Output(follower.stdout)
    watcher = socket.create_connection(("127.0.0.1", bridge.raw_port))
    try:
        followed.wait_for(b"hello from the virtual ESP32, uptime", timeout=15)
        assert re.search(STAMP + rb"I \(\d+\) app: hello from the virtual ESP32", bytes(followed.data))
    finally:
        watcher.close()
        follower.terminate()
        follower.wait(5)
    # A board that is not there is named, with the ones that are.
    bad = subprocess.run([str(BIN), "log", "nosuch", "--control-socket", str(control)],
                         capture_output=True, text=True, timeout=20)
    assert bad.returncode != 0 and 'no board named "nosuch"' in bad.stderr and "default" in bad.stderr, bad
