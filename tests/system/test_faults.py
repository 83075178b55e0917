"""Fault injection: peers that vanish, dribble, flood, send garbage or stop reading, a SIGTERM
in the middle of a flash, and a soak of many sessions. Each test asserts a clear log line and
ends with the next client served (a pyserial round trip or a successful flash), and the heavy
ones check the bridge's memory from /proc/PID/status.

Memory is judged by VmHWM (the peak resident set since start): the bridge starts at about
4 MiB; 20 MiB leaves room for tokio's and the allocator's slack and catches anything that
buffers in proportion to its input (the floods here are 1 MB to 100 MB)."""

import ctypes
import os
import random
import re
import socket
import struct
import subprocess
import threading
import time

import pytest
import serial

from conftest import FakeNotify, esptool_cmd, free_port, spell
from test_reset import last_mode, pins_and_modes, wait_mode
from test_robustness import IAC, SB, SE, raw_client, recv_until, sb, server_replies

MiB = 1024 * 1024
RSS_LIMIT_KB = 20 * 1024
SET_BAUDRATE = 1


def status_kb(pid, key):
    """A field of /proc/PID/status in KiB (VmRSS, VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def fd_count(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def assert_memory_bounded(bridge, what):
    peak = status_kb(bridge.proc.pid, "VmHWM")
    assert peak < RSS_LIMIT_KB, f"{what}: bridge peak RSS {peak} KiB (limit {RSS_LIMIT_KB} KiB)"
    return peak


def config(tmp_path, text, name="faults.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def session_opened(bridge, sock, timeout=5):
    """Waits until the bridge has opened the device for the client on `sock`. Until then the
    pty has no reader (the master reads EIO) and what the device writes is stale: the bridge
    flushes the device's input when it opens it for a client."""
    bridge.log.wait_for(f"client 127.0.0.1:{sock.getsockname()[1]} connected", timeout)
    return sock


def connect(bridge):
    """A raw RFC 2217 client whose session is open."""
    return session_opened(bridge, raw_client(bridge))


def next_client_round_trip(bridge, device, timeout=10):
    """A full pyserial session after the fault: open, write, read, close. Tolerates what an
    earlier session may have left in the pty (the marker is unique)."""
    nonce = os.urandom(4).hex().encode()
    ser = serial.serial_for_url(bridge.url, timeout=timeout, baudrate=115200)
    try:
        ser.write(b"ping-" + nonce)
        got = b""
        deadline = time.monotonic() + timeout
        while b"ping-" + nonce not in got and time.monotonic() < deadline:
            got += device.read(64, timeout=0.2)
        assert b"ping-" + nonce in got, f"device got {got[-80:]!r}"
        device.write(b"pong-" + nonce)
        back = ser.read_until(b"pong-" + nonce)
        assert back.endswith(b"pong-" + nonce), f"client got {back[-80:]!r}"
    finally:
        ser.close()


def discard_from(sock):
    """Reads and drops what the server sends, in a thread, so that its replies never block
    it. (recv_until would set a timeout on the socket, which would also apply to sendall in
    the sending thread.)"""

    def run():
        try:
            while sock.recv(1 << 16):
                pass
        except OSError:
            pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def telnet_data(stream):
    """The data bytes of a server-to-client telnet stream: commands and subnegotiations
    removed, IAC IAC unescaped. Returns (data, rest) where rest is an incomplete command at
    the end, to be prepended to the next chunk."""
    out = bytearray()
    i = 0
    n = len(stream)
    while i < n:
        j = stream.find(IAC, i)
        if j < 0:
            out += stream[i:]
            return bytes(out), b""
        out += stream[i:j]
        if j + 1 >= n:
            return bytes(out), stream[j:]
        c = stream[j + 1]
        if c == IAC:
            out.append(IAC)
            i = j + 2
        elif c in (251, 252, 253, 254):
            if j + 2 >= n:
                return bytes(out), stream[j:]
            i = j + 3
        elif c == SB:
            end = stream.find(bytes([IAC, SE]), j + 2)
            if end < 0:
                return bytes(out), stream[j:]
            i = end + 2
        else:
            i = j + 2
    return bytes(out), b""


class DeviceWriter:
    """Plays a device that keeps talking: writes `pattern(offset, n)` to the pty master as
    fast as the kernel takes it, until stopped. `written` counts what the kernel accepted."""

    def __init__(self, device, pattern=None):
        self.device = device
        self.pattern = pattern or (lambda offset, n: b"\x55" * n)
        self.written = 0
        self.last_progress = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            chunk = self.pattern(self.written, 4096)
            try:
                n = os.write(self.device.master, chunk)
            except BlockingIOError:
                time.sleep(0.002)
                continue
            except OSError:
                return
            self.written += n
            self.last_progress = time.monotonic()

    def stop(self):
        self._stop.set()
        self._thread.join(5)


# ---------------------------------------------------------------------------------------------
# A half-open peer: the client's machine vanishes (unplugged, Wi-Fi lost) without FIN or RST.


SO_ATTACH_FILTER = 26  # from <asm-generic/socket.h>; Python's socket module lacks the name


def vanish(sock):
    """Makes this end of a loopback TCP connection behave like a host that disappeared: a
    classic BPF socket filter of one instruction (`ret #0`) makes the kernel discard every
    segment that arrives for the socket before TCP sees it, so nothing is acknowledged, no
    keepalive probe is answered and no RST is sent, while the socket stays open (no FIN).
    The same effect as an iptables DROP rule, without root or iptables, and only for this
    one connection. Returns the program buffer, which must stay alive while attached."""
    insn = struct.pack("HBBI", 0x06, 0, 0, 0)  # BPF_RET | BPF_K, k = 0: keep 0 bytes
    program = ctypes.create_string_buffer(insn)
    fprog = struct.pack("HL", 1, ctypes.addressof(program))  # struct sock_fprog
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
    return program


@pytest.mark.parametrize("traffic", ["idle", "device-streaming"])
def test_half_open_peer_is_dropped_by_keepalive(bridge_on, device, tmp_path, traffic):
    """keepalive_secs = 2: probes start after 2 s of silence, 3 probes 1 s apart, and a TCP
    user timeout of the same total covers the case where the bridge has unacknowledged data
    in flight (the device keeps talking). Either way the session must end within about
    keepalive_secs * 2 plus a margin, and the port must be free for the next client."""
    keepalive = 2
    bridge = bridge_on("--config", config(tmp_path, f"[network]\nkeepalive_secs = {keepalive}\n"))
    s = connect(bridge)
    s.sendall(b"hello")
    assert device.read(5) == b"hello"
    device.write(b"hi")
    recv_until(s, lambda d: b"hi" in d)
    writer = DeviceWriter(device) if traffic == "device-streaming" else None
    if writer:
        time.sleep(0.3)
        assert writer.written > 0
    program = vanish(s)
    vanished = time.monotonic()
    # While the bridge still believes in the peer, a newcomer watches: it is let in at once
    # (and gets what the device prints), it only cannot write.
    watcher = connect(bridge)
    device.write(b"to-the-watcher")
    recv_until(watcher, lambda d: b"to-the-watcher" in d)
    watcher.close()
    bridge.log.wait_for("stopped answering", timeout=keepalive * 2 + 10)
    took = time.monotonic() - vanished
    if writer:
        writer.stop()
    assert took <= keepalive * 2 + 3, f"half-open peer detected only after {took:.1f} s"
    print(f"half-open peer ({traffic}) dropped {took:.1f} s after it vanished")
    ended = r"session with 127\.0\.0\.1:\d+ ended \(client stopped answering"
    assert re.search(ended, bridge.log.text())
    next_client_round_trip(bridge, device)
    s.close()
    del program


# ---------------------------------------------------------------------------------------------
# Slowloris: one byte per second of a subnegotiation that never ends.


class Slowloris:
    """Opens RFC 2217, then sends `IAC SB COM-PORT SIGNATURE` and one byte per second of the
    value, never the closing IAC SE, until stopped or disconnected."""

    def __init__(self, bridge):
        self.sock = connect(bridge)
        self.received = bytearray()
        self.sent = 0
        self.closed_by_server = threading.Event()
        self._stop = threading.Event()
        self.sock.sendall(bytes([IAC, SB, 44, 0]))
        threading.Thread(target=self._dribble, daemon=True).start()
        threading.Thread(target=self._read, daemon=True).start()

    def _dribble(self):
        while not self._stop.wait(1.0):
            try:
                self.sock.send(b"s")
                self.sent += 1
            except OSError:
                return

    def _read(self):
        while True:
            try:
                chunk = self.sock.recv(4096)
            except OSError:
                chunk = b""
            if not chunk:
                self.closed_by_server.set()
                return
            self.received += chunk

    def stop(self):
        self._stop.set()
        # shutdown first: close() alone does not send the FIN while the reader thread is
        # still blocked in recv() on the socket.
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def test_slowloris_is_closed_and_never_blocks_the_board(bridge_on, device):
    """A client that opens a subnegotiation and dribbles it, never closing it, is closed after
    the negotiation time (5 s) with the reason, in its stream and in the log; meanwhile it
    blocks nobody (it is a watcher), and what it costs is bounded (the value is capped at 256
    bytes)."""
    bridge = bridge_on()
    loris = Slowloris(bridge)
    time.sleep(1.5)
    t = time.monotonic()
    next_client_round_trip(bridge, device)
    assert time.monotonic() - t < 3.0, "the slowloris held the board"
    assert loris.closed_by_server.wait(8), "the slowloris was not disconnected"
    assert b"stalled in a telnet subnegotiation" in bytes(loris.received)
    loris.stop()
    bridge.log.wait_for("stalled in a telnet subnegotiation")
    next_client_round_trip(bridge, device)
    assert_memory_bounded(bridge, "slowloris")


def test_a_writing_slowloris_is_closed_too(bridge_on, device):
    """The same once the client writes (a writer's session, not a watcher, is stalled)."""
    bridge = bridge_on()
    s = connect(bridge)
    s.sendall(b"w")
    assert device.read(1) == b"w"
    s.sendall(bytes([IAC, SB, 44, 0]) + b"slow")
    data = recv_until(s, lambda d: b"closing" in d, timeout=10)
    assert b"stalled in a telnet subnegotiation" in data
    bridge.log.wait_for("stalled in a telnet subnegotiation")
    next_client_round_trip(bridge, device)


# ---------------------------------------------------------------------------------------------
# Floods.


@pytest.mark.parametrize("values", ["same", "alternating"])
def test_set_baudrate_flood(bridge_on, device, values, tmp_path):
    """100 000 SET-BAUDRATE commands in one burst: every one is answered, in order, with the
    rate in force; a rate equal to the current one does not touch the UART; neither the log nor
    systemd's notification socket gets a line per command; memory stays flat."""
    count = 100_000
    notify = FakeNotify(tmp_path)
    bridge = bridge_on(env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "400000"})
    rates = [115200] * count if values == "same" else [230400, 115200] * (count // 2)
    burst = b"".join(sb(SET_BAUDRATE, struct.pack(">I", r)) for r in rates)
    s = connect(bridge)
    # As the board's writer (a watcher's rates never reach the UART).
    s.sendall(b"w")
    assert device.read(1) == b"w"
    received = bytearray()

    def reader():
        s.settimeout(30)
        while received.count(bytes([IAC, SB, 44, 101])) < count:
            chunk = s.recv(1 << 20)
            if not chunk:
                return
            received.extend(chunk)

    t = threading.Thread(target=reader)
    t.start()
    started = time.monotonic()
    s.sendall(burst)
    t.join(60)
    took = time.monotonic() - started
    replies = [struct.unpack(">I", v)[0] for c, v in server_replies(bytes(received)) if c == 101]
    assert len(replies) == count, f"{len(replies)} of {count} answered in {took:.1f} s"
    assert replies == rates, "replies out of order or wrong"
    s.close()
    bridge.log.wait_for("client disconnected")
    log = bridge.log.text()
    changes = log.count("baud rate changed")
    if values == "same":
        assert changes == 0, "an unchanged rate touched the UART"
    else:
        assert "further baud rate changes of this session are logged at debug level" in log
    assert len(log.splitlines()) < 50, f"log spam: {len(log.splitlines())} lines"
    # STATUS= at most every 100 ms while the rate flips, and the last one systemd gets is true.
    # The idle line may be held back for up to a watchdog period (200 ms here).
    deadline = time.monotonic() + 5
    while True:
        statuses = [line for line in notify.lines() if line.startswith("STATUS=")]
        if statuses[-1].startswith("STATUS=idle") or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    notify.running = False
    assert statuses[-1].startswith("STATUS=idle"), statuses[-3:]
    assert len(statuses) <= 10 + 20 * took, f"{len(statuses)} STATUS= lines in {took:.1f} s"
    assert_memory_bounded(bridge, f"{count} SET-BAUDRATE ({values})")
    next_client_round_trip(bridge, device)
    print(f"{count} SET-BAUDRATE ({values}) answered in {took:.2f} s")


def test_100_mb_of_iac_reaches_the_device_intact(bridge_on, device):
    """50 MiB of 0xFF data, sent as 100 MiB of IAC IAC: the worst case for the unescaping
    path. Every byte arrives at the pty, none added or lost, and memory stays bounded."""
    data_bytes = 50 * MiB
    bridge = bridge_on()
    s = connect(bridge)
    discard_from(s)
    chunk = b"\xff" * MiB  # 512 KiB of data, escaped

    def sender():
        for _ in range(2 * data_bytes // len(chunk)):
            s.sendall(chunk)

    started = time.monotonic()
    t = threading.Thread(target=sender, daemon=True)
    t.start()
    got = 0
    bad = 0
    deadline = time.monotonic() + 120
    while got < data_bytes and time.monotonic() < deadline:
        try:
            block = os.read(device.master, 1 << 16)
        except BlockingIOError:
            time.sleep(0.0005)
            continue
        got += len(block)
        bad += len(block) - block.count(b"\xff")
    took = time.monotonic() - started
    t.join(5)
    assert got == data_bytes and bad == 0, f"{got} bytes at the device, {bad} not 0xFF"
    time.sleep(0.3)
    assert device.read(1, timeout=0.3) == b"", "more bytes than were sent"
    peak = assert_memory_bounded(bridge, "100 MiB of IAC")
    s.shutdown(socket.SHUT_RDWR)  # wakes the discarding thread; close() alone sends no FIN
    s.close()
    bridge.log.wait_for(f"{data_bytes} bytes to the device")
    next_client_round_trip(bridge, device)
    rate = 2 * data_bytes / MiB / took
    print(f"100 MiB of IAC in {took:.1f} s ({rate:.0f} MiB/s), peak RSS {peak} KiB")


def test_seeded_garbage_is_survived(bridge_on, device):
    """A few MB of random bytes (seeded, so a failure reproduces): telnet commands, broken
    subnegotiations and COM-PORT requests with random values all appear in it. The bridge
    survives, reports what it ignored, and the next client is served normally."""
    seed = 2217
    garbage = random.Random(seed).randbytes(4 * MiB)
    bridge = bridge_on()
    s = connect(bridge)
    stop = threading.Event()

    def drain_device():
        while not stop.is_set():
            device.drain()
            time.sleep(0.005)

    threading.Thread(target=drain_device, daemon=True).start()
    discard_from(s)
    s.sendall(garbage)
    # A half-close: the client still reads what the device says for a moment (session.rs
    # HALF_CLOSE_LINGER), then the bridge ends the session and closes.
    s.shutdown(socket.SHUT_WR)
    bridge.log.wait_for("ended (client closed its sending side", timeout=60)
    stop.set()
    s.close()
    assert bridge.proc.poll() is None, f"bridge died on garbage (seed {seed})"
    log = bridge.log.text()
    assert "ignored input from the client" in log
    assert re.search(r"\d+ malformed requests ignored", log), log[-2000:]
    assert "panicked" not in log
    assert_memory_bounded(bridge, f"garbage seed {seed}")
    device.drain()
    next_client_round_trip(bridge, device)


# ---------------------------------------------------------------------------------------------
# A client that stops reading while the device keeps sending.


def pattern(offset, n):
    """A stream where every byte's value follows from its position (values 0..250, so no
    0xFF and no escaping): any lost, repeated or reordered byte shows."""
    return bytes((offset + i) % 251 for i in range(n))


def test_client_that_stops_reading_pauses_the_uart_and_loses_nothing(bridge_on, device):
    """What "no loss" means here: the device (the pty master) counts every byte the kernel
    accepted from it. A pty pushes back on its writer when its buffer is full, so when the
    bridge stops reading the UART, the device's writes stall instead of being dropped; the
    client, once it reads, must receive exactly the bytes the device wrote, contiguous and in
    order. (A real UART cannot push back on the far end without RTS/CTS: once the kernel's
    tty buffer is full, the driver drops further bytes as overruns, on the device's side of
    the bridge. What the bridge read, it delivers.)"""
    bridge = bridge_on()
    s = socket.socket()
    # A small receive buffer keeps what the kernel holds for the client small, so that the
    # bridge's own buffering is what is being measured.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    s.connect(("127.0.0.1", bridge.port))
    s.sendall(bytes([IAC, 251, 44, IAC, 253, 44]))
    session_opened(bridge, s)
    # The board's writer: its output is never dropped (a watcher's would be).
    s.sendall(b"w")
    assert device.read(1) == b"w"
    writer = DeviceWriter(device, pattern)
    # The client reads nothing now. The writer stalls once the bridge stops reading the pty.
    deadline = time.monotonic() + 20
    while time.monotonic() - writer.last_progress < 1.5 and time.monotonic() < deadline:
        time.sleep(0.1)
    stalled_at = writer.written
    assert time.monotonic() - writer.last_progress >= 1.5, (
        f"the device could write without end ({writer.written} bytes): the bridge never paused"
    )
    time.sleep(0.5)
    assert writer.written == stalled_at
    # What the device got in before stalling is what the kernel buffers hold (the bridge's
    # socket send buffer, autotuned to a few MiB on loopback, the client's receive buffer, the
    # pty's) plus the bridge's own 64 KiB (session.rs HIGH_WATER).
    assert stalled_at < 16 * MiB, f"{stalled_at} bytes taken before the bridge paused"
    peak = assert_memory_bounded(bridge, "client not reading")
    writer.stop()
    total = writer.written
    # Now read: everything the device wrote arrives, contiguous.
    s.settimeout(5)
    data = bytearray()
    rest = b""
    while len(data) < total:
        try:
            chunk = s.recv(1 << 16)
        except TimeoutError:
            raise AssertionError(f"only {len(data)} of {total} bytes arrived") from None
        assert chunk, f"connection closed after {len(data)} of {total} bytes"
        d, rest = telnet_data(rest + chunk)
        data += d
    assert len(data) == total, f"{len(data)} bytes received, {total} written"
    assert bytes(data) == pattern(0, total), "stream not contiguous"
    s.close()
    bridge.log.wait_for("client disconnected")
    next_client_round_trip(bridge, device)
    print(f"device stalled after {total} bytes; bridge peak RSS {peak} KiB")


# ---------------------------------------------------------------------------------------------
# SIGTERM in the middle of a flash, through the demo's virtual ESP32.


class RecordingProxy:
    """Forwards one TCP connection to `target` and records what the server sent. When the
    server closes, the client's connection is closed too, as if it had been direct."""

    def __init__(self, target_port):
        self.target = target_port
        self.port = free_port()
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.from_server = bytearray()
        self.server_closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        client, _ = self.listener.accept()
        # One connection only: esptool's reconnection attempts must be refused, as they
        # would be by the stopped service, not left waiting in this listener's backlog.
        self.listener.close()
        upstream = socket.create_connection(("127.0.0.1", self.target))
        threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
        threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src, dst, from_server):
        while True:
            try:
                data = src.recv(65536)
                if data:
                    if from_server:
                        self.from_server.extend(data)
                    dst.sendall(data)
                    continue
            except OSError:
                pass
            break
        if from_server:
            self.server_closed.set()
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def test_sigterm_during_write_flash_leaves_the_chip_safe(demo, tmp_path):
    bridge = demo()
    wait_mode(bridge, "app")
    image = tmp_path / "image.bin"
    image.write_bytes(os.urandom(MiB))
    proxy = RecordingProxy(bridge.port)
    cmd = [str(esptool_cmd(5)), "--port", f"rfc2217://127.0.0.1:{proxy.port}",
           spell(5, "write-flash"), "0x10000", str(image)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        output.append(line)
        if "Writing at" in line:
            break
    assert any("Writing at" in l for l in output), "".join(output) + bridge.log.text() 
    assert last_mode(bridge) in ("download", "stub"), "the flash is not under way"
    stopped = time.monotonic()
    code = bridge.stop()
    took = time.monotonic() - stopped
    assert code == 0, f"exit code {code}"
    assert took < 8, f"stopping took {took:.1f} s"
    # The client was told why, in its data stream, before the connection closed.
    assert proxy.server_closed.wait(5)
    assert b"service is shutting down" in bytes(proxy.from_server)
    # esptool now retries for about 10 s before it gives up; that is its business.
    proc.kill()
    proc.communicate()
    log = bridge.log.text()
    assert "SIGTERM received" in log and "ended (service shutting down)" in log
    # The lines went to their safe state before the process ended: EN and IO0 released, and
    # the chip reset out of the flasher stub with IO0 high, i.e. into its application. (The
    # virtual chip takes ROM_STARTUP after EN rises to report "app"; the demo process, and the
    # chip with it, ends before that, so the boot is judged by the straps at EN's rise, as
    # the real chip latches them.)
    evs = pins_and_modes(bridge)
    levels = {"en": "high", "io0": "high"}
    en_low_at = rise = None
    for e in evs:
        if e["event"] in ("en", "io0"):
            levels[e["event"]] = e["level"]
        if e["event"] == "en" and e["level"] == "low":
            en_low_at = e["t_us"]
        if e["event"] == "en" and e["level"] == "high":
            rise = {"after_low_us": e["t_us"] - en_low_at, "io0": levels["io0"], "t_us": e["t_us"]}
    assert levels == {"en": "high", "io0": "high"}, f"lines not released: {evs[-8:]}"
    modes = [e for e in evs if e["event"] == "mode"]
    stub_at = max(e["t_us"] for e in modes if e["mode"] in ("download", "stub"))
    assert rise and rise["t_us"] > stub_at, f"the chip was not reset out of the loader: {evs[-8:]}"
    assert rise["io0"] == "high", f"EN rose with IO0 low (download mode): {evs[-8:]}"
    assert rise["after_low_us"] >= 100_000, f"reset pulse too short: {rise}"
    assert modes[-1]["mode"] in ("reset", "app"), modes[-3:]
    # The next run of the service flashes normally (on the raw port, which is quick).
    again = demo()
    small = tmp_path / "small.bin"
    small.write_bytes(os.urandom(16 * 1024))
    r = subprocess.run([str(esptool_cmd(5)), "--port", f"socket://127.0.0.1:{again.raw_port}",
                        "write-flash", "0x10000", str(small)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "Hash of data verified" in r.stdout, r.stdout + r.stderr


# ---------------------------------------------------------------------------------------------
# Soak: many sessions in a row; resources must not creep.


def test_soak_connect_flash_disconnect(demo, tmp_path):
    """Connect / flash a small image / disconnect, over and over, for ESP_BRIDGE_SOAK_SECS
    (default 60): esptool on the raw port (the bridge resets the chip itself) and, every third
    cycle, a pyserial session on the RFC 2217 port. After a warm-up of a few cycles, the
    process's resident memory and open file descriptors, read while it is idle between
    sessions, must stay within a small tolerance of where they settled.

    The demo process also runs the virtual ESP32, which keeps its pin and mode events in
    memory (up to 100 000 of them, about 12 per cycle here, some 40 bytes each): the memory
    tolerance grows by 64 bytes per recorded event, so that what is measured is the bridge."""
    soak_secs = float(os.environ.get("ESP_BRIDGE_SOAK_SECS", "60"))
    bridge = demo()
    raw = bridge.raw_port
    wait_mode(bridge, "app")
    pid = bridge.proc.pid
    exe = str(esptool_cmd(5))
    samples = []
    cycle = 0
    started = time.monotonic()
    while time.monotonic() - started < soak_secs or cycle < 6:
        cycle += 1
        image = tmp_path / "soak.bin"
        image.write_bytes(os.urandom(16 * 1024))
        r = subprocess.run([exe, "--port", f"socket://127.0.0.1:{raw}", "write-flash", "0x10000",
                            str(image)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "Hash of data verified" in r.stdout, (
            f"cycle {cycle}:\n{r.stdout}{r.stderr}\n{bridge.log.text()[-3000:]}"
        )
        if cycle % 3 == 0:
            ser = serial.serial_for_url(bridge.url, timeout=1)
            ser.write(b"\r\n")
            ser.close()
        # Sample while idle: every session has ended and its device was closed.
        expected = cycle + cycle // 3
        deadline = time.monotonic() + 10
        while bridge.log.text().count("ended (") < expected and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.1)
        sim_events = len(bridge.events.read_bytes().splitlines())
        samples.append((status_kb(pid, "VmRSS"), fd_count(pid), sim_events))
    warm = max(3, len(samples) // 5)
    base_rss = max(rss for rss, _, _ in samples[:warm])
    base_fds = max(fds for _, fds, _ in samples[:warm])
    base_events = samples[warm - 1][2]
    # Each later sample against the settled level plus 1 MiB plus the chip's event history.
    excess = [
        rss - base_rss - (events - base_events) * 64 // 1024 for rss, _, events in samples[warm:]
    ]
    worst_fds = max(fds for _, fds, _ in samples[warm:])
    trend = [samples[min(len(samples) - 1, len(samples) * q // 4)][0] for q in range(1, 5)]
    summary = (f"{cycle} cycles in {time.monotonic() - started:.0f} s; RSS after warm-up "
               f"{base_rss} KiB, at 1/4, 1/2, 3/4, end: {trend} KiB; net of the virtual chip's "
               f"event history ({samples[-1][2]} events) the worst growth is {max(excess)} KiB; "
               f"open fds {base_fds} -> {worst_fds}")
    print(summary)
    assert max(excess) <= 1024, f"RSS grows: {summary}; samples {samples}"
    assert worst_fds <= base_fds, f"file descriptors leak: {summary}; samples {samples}"
    assert "panicked" not in bridge.log.text()
