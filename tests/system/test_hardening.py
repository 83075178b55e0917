"""What an outside attack and a first-time user found (the hardening issue), one test per
finding, each against the release binary over real TCP in front of a real pty. Every test here
failed on the code before its fix; the docstring names the finding.

The bridge runs with a short keepalive where departures are timed, so the bounds stay small."""

import fcntl
import os
import signal
import socket
import struct
import subprocess
import termios
import threading
import time

import pytest
import serial

from conftest import BIN, Bridge, FakeNotify, Pty, esptool_cmd, free_port, spell
from test_faults import discard_from, next_client_round_trip, session_opened, status_kb, vanish
from test_pyserial import device_speed
from test_robustness import raw_client, recv_until, sb, server_replies

XOFF = b"\x13"
SET_BAUDRATE, SET_DATASIZE, SET_CONTROL = 1, 2, 5


def start(tmp_path, device, text="", *extra, env=None):
    """esp-bridge with a config file (so SIGHUP has something to re-read) in front of `device`."""
    port = free_port()
    path = tmp_path / "bridge.toml"
    path.write_text(f'[serial]\ndevice = "{device.path}"\n' + text)
    return Bridge(["--config", str(path), "--listen", f"127.0.0.1:{port}", "--raw-listen",
                   f"127.0.0.1:{free_port()}", "--control", "none", *extra], port, env=env), path


def stuck_client(bridge, device, size):
    """A client whose input the device does not take: it asks for XON/XOFF, the device sends
    XOFF, and the client sends `size` bytes, more than the pty takes. Returns the socket and
    the sending thread."""
    s = session_opened(bridge, raw_client(bridge))
    s.sendall(sb(SET_CONTROL, bytes([2])))
    recv_until(s, lambda d: (105, bytes([2])) in server_replies(d))
    device.write(XOFF)
    time.sleep(0.3)
    discard_from(s)
    blob = (bytes(range(0, 255)) * (size // 255 + 1))[:size]  # no IAC
    sender = threading.Thread(target=lambda: _send_quietly(s, blob), daemon=True)
    sender.start()
    return s, sender


def _read_until_count(sock, buf, needle, count):
    sock.settimeout(30)
    while buf.count(needle) < count:
        chunk = sock.recv(1 << 20)
        if not chunk:
            return
        buf.extend(chunk)


def _send_quietly(sock, data):
    try:
        sock.sendall(data)
    except OSError:
        pass


def wait_log(bridge, needle, timeout):
    bridge.log.wait_for(needle, timeout)


# --- 1. Durations and counts get a range at parse time -----------------------------------


def test_an_out_of_range_duration_is_a_config_error_and_a_reload_keeps_running(tmp_path, device):
    """idle_exit_secs = 9223372036854775807 passed check-config, then panicked the service at
    start and after SIGHUP."""
    huge = "[network]\nidle_exit_secs = 9223372036854775807\n"
    path = tmp_path / "huge.toml"
    path.write_text(huge)
    for cmd in (["check-config", "--config", str(path)],
                ["--config", str(path), "--listen", f"127.0.0.1:{free_port()}", "--control", "none"]):
        r = subprocess.run([str(BIN), *cmd], capture_output=True, text=True, timeout=10)
        assert r.returncode == 78, (cmd, r.stdout, r.stderr)
        assert "line 2" in r.stderr and "idle_exit_secs" in r.stderr and "604800" in r.stderr, r.stderr
    bridge, cfg = start(tmp_path, device)
    try:
        cfg.write_text(f'[serial]\ndevice = "{device.path}"\n' + huge)
        bridge.proc.send_signal(signal.SIGHUP)
        wait_log(bridge, "keeping the running configuration", 5)
        time.sleep(0.3)
        assert bridge.proc.poll() is None, "the service died on the reload"
        next_client_round_trip(bridge, device)
    finally:
        bridge.stop()


# --- 2. A client that leaves while the device takes no input -----------------------------


@pytest.mark.parametrize("how", ["reset", "close", "vanish"])
def test_a_departed_client_is_noticed_while_its_input_waits_for_the_device(tmp_path, device, how):
    """The session stopped reading the socket while input was queued, so a client that left
    (RST, FIN, or a vanished host) kept the board busy for as long as the device did not read."""
    bridge, _ = start(tmp_path, device, "[network]\nkeepalive_secs = 2\n")
    try:
        # A close is a FIN only once everything sent before it has arrived: the client's
        # data must fit in what the pty and the bridge's socket take (a client closing with
        # more unsent is still sending, as far as TCP can tell).
        s, sender = stuck_client(bridge, device, 120_000 if how == "close" else 500_000)
        time.sleep(1.0)
        keep = None
        if how == "reset":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
        elif how == "close":
            sender.join(5)
            assert not sender.is_alive(), "the bridge did not take 120 kB into its buffers"
            s.close()
        else:
            keep = vanish(s)
        # Keepalive 2 s, 3 probes 1 s apart, user timeout 5 s; the session checks the socket
        # every second while it is not read.
        wait_log(bridge, "ended (", 20)
        device.write(b"\x11")  # XON: the device reads again; the next client starts clean
        device.drain()
        next_client_round_trip(bridge, device)
        del keep
    finally:
        bridge.stop()


def test_a_stuck_device_keeps_the_order_and_sigterm_still_ends_the_process(tmp_path, device):
    """With the device not taking input, the session must neither lose the order of data and
    commands nor hang SIGTERM. (A pty's tcdrain never waits, so the bounded drain itself is
    tested in uart.rs and on a real UART in the VM test.)"""
    bridge, _ = start(tmp_path, device)
    try:
        s = session_opened(bridge, raw_client(bridge))
        s.sendall(sb(SET_CONTROL, bytes([2])))
        recv_until(s, lambda d: (105, bytes([2])) in server_replies(d))
        device.write(XOFF)
        time.sleep(0.3)
        stuck = b"x" * 100_000
        threading.Thread(target=lambda: _send_quietly(s, stuck + sb(SET_BAUDRATE, struct.pack(">I", 57600))),
                         daemon=True).start()
        time.sleep(1.5)
        assert device_speed(device.master) == 115200, "the rate changed before the data went out"
        device.write(b"\x11")  # XON
        got = device.read(len(stuck), timeout=10)
        assert got == stuck
        data = recv_until(s, lambda d: any(c == 101 for c, _ in server_replies(d)), timeout=10)
        assert (101, struct.pack(">I", 57600)) in server_replies(data)
        # Stuck again, then SIGTERM: the process ends well inside TimeoutStopSec (15 s).
        device.write(XOFF)
        time.sleep(0.3)
        threading.Thread(target=lambda: _send_quietly(s, b"y" * 200_000), daemon=True).start()
        time.sleep(0.5)
        started = time.monotonic()
        code = bridge.stop(timeout=14)
        assert time.monotonic() - started < 12, "SIGTERM took too long"
        assert code == 0
        s.close()
    finally:
        bridge.stop()


# --- 3. sd_notify never blocks the data path ---------------------------------------------


def test_a_full_notification_socket_does_not_stall_esptool(tmp_path):
    """With NOTIFY_SOCKET set and not drained, the send blocked after net.unix.max_dgram_qlen
    datagrams and an esptool chip-id through the bridge failed."""
    path = str(tmp_path / "notify.sock")
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(path)  # never read
    port = free_port()
    bridge = Bridge(["demo", "--listen", f"127.0.0.1:{port}", "--raw-listen", f"127.0.0.1:{free_port()}"],
                    port, env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})
    try:
        time.sleep(1.5)  # many watchdog pings: the socket is full by now
        esptool = esptool_cmd(5)
        for _ in range(2):
            r = subprocess.run([str(esptool), "--port", bridge.url, spell(5, "chip-id")],
                               capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, r.stdout + r.stderr
    finally:
        bridge.stop()
        sink.close()


# --- 4. Signal handlers before READY=1 ---------------------------------------------------


def test_sighup_right_after_ready_is_handled(tmp_path, device):
    """The SIGHUP handler was installed after READY=1: a reload sent right after readiness
    killed the process (17 and 23 of 30 tries). The test reads the notification socket itself
    and signals the moment READY=1 arrives."""
    killed = 0
    for attempt in range(30):
        path = str(tmp_path / f"notify-{attempt}.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.settimeout(10)
        proc = subprocess.Popen(
            [str(BIN), "--device", device.path, "--control", "none", "--listen", f"127.0.0.1:{free_port()}",
             "--raw-listen", "127.0.0.1:0"],
            stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            env={**os.environ, "NOTIFY_SOCKET": path},
        )
        try:
            while b"READY=1" not in sock.recv(4096):
                pass
            proc.send_signal(signal.SIGHUP)
            time.sleep(0.2)
            if proc.poll() is not None:
                killed += 1
        finally:
            proc.terminate()
            proc.wait(10)
            sock.close()
    assert killed == 0, f"SIGHUP right after READY=1 killed the process {killed} of 30 times"


# --- 5. Reading the configuration never blocks serving -----------------------------------


def test_a_fifo_or_a_huge_file_as_the_config_is_refused_without_stalling(tmp_path, device):
    """SIGHUP with the config path a FIFO froze the runtime; a 46 MB file took peak RSS from
    3.5 MB to 273 MB and stalled the served client."""
    bridge, cfg = start(tmp_path, device)
    try:
        ser = serial.serial_for_url(bridge.url, timeout=2)
        try:
            cfg.unlink()
            os.mkfifo(cfg)
            bridge.proc.send_signal(signal.SIGHUP)
            wait_log(bridge, "is a FIFO, not a regular file", 5)
            for _ in range(3):
                ser.write(b"ping")
                assert device.read(4, timeout=2) == b"ping", "serving stalled after SIGHUP"
            cfg.unlink()
            with open(cfg, "wb") as f:
                f.write(b"# " + b"x" * (46 << 20) + b"\n")
            bridge.proc.send_signal(signal.SIGHUP)
            wait_log(bridge, "more than any configuration", 5)
            ser.write(b"pong")
            assert device.read(4, timeout=2) == b"pong"
        finally:
            ser.close()
        assert status_kb(bridge.proc.pid, "VmHWM") < 20 * 1024, "the huge file was read"
    finally:
        bridge.stop()


# --- 6. A missing file on reload keeps the running configuration -------------------------


def test_a_config_deleted_before_sighup_keeps_the_running_configuration(tmp_path, device):
    """SIGHUP with /etc/esp-bridge.toml deleted silently switched to the built-in defaults (the
    next client was told /dev/serial0 does not exist). ESP_BRIDGE_CONFIG names the default
    file, as /etc/esp-bridge.toml is for the installed service."""
    cfg = tmp_path / "default.toml"
    cfg.write_text(f'[serial]\ndevice = "{device.path}"\n[control]\nbackend = "none"\n')
    port = free_port()
    bridge = Bridge(["--listen", f"127.0.0.1:{port}", "--raw-listen", "127.0.0.1:0"], port,
                    env={"ESP_BRIDGE_CONFIG": str(cfg)})
    try:
        next_client_round_trip(bridge, device)
        cfg.unlink()
        bridge.proc.send_signal(signal.SIGHUP)
        wait_log(bridge, "keeping the running configuration", 5)
        next_client_round_trip(bridge, device)
        assert "/dev/serial0" not in bridge.log.text()
    finally:
        bridge.stop()


# --- 7. Log lines a network peer can trigger are rate-limited ----------------------------


def test_connection_floods_and_invalid_requests_are_rate_limited_in_the_log(tmp_path, device):
    """2,000 refused connections wrote 2,000 warnings in 0.26 s; one 700 kB burst of
    SET-DATASIZE 9 wrote 100,000 lines. (Connections are no longer refused, they watch: the
    flood is 2,000 watchers coming and going.)"""
    bridge, _ = start(tmp_path, device)
    try:
        holder = session_opened(bridge, raw_client(bridge))
        # The board's writer: its settings reach the UART, and are logged when refused.
        holder.sendall(b"w")
        assert device.read(1) == b"w"
        refused = 0
        for _ in range(2000):
            try:
                c = socket.create_connection(("127.0.0.1", bridge.port), timeout=2)
                c.close()
                refused += 1
            except OSError:
                pass
        assert refused > 1500
        # Every request is answered (with the data size in force); read the answers while
        # sending, so that neither side's buffers fill.
        reply = bytes([255, 250, 44, 102, 8, 255, 240])
        answers = bytearray()
        reader = threading.Thread(target=lambda: _read_until_count(holder, answers, reply, 100_000))
        reader.start()
        holder.sendall(sb(SET_DATASIZE, bytes([9])) * 100_000)
        reader.join(60)
        assert answers.count(reply) == 100_000, answers.count(reply)
        time.sleep(12)  # one rate-limit window: the counts are said
        text = bridge.log.text()
        lines = text.splitlines()
        connect_lines = [line for line in lines if "connected to the RFC 2217 port" in line]
        leave_lines = [line for line in lines if "stopped watching" in line]
        datasize_lines = [line for line in lines if "data size 9" in line]
        assert len(connect_lines) <= 12, len(connect_lines)
        assert len(leave_lines) <= 12, len(leave_lines)
        assert len(datasize_lines) <= 12, len(datasize_lines)
        assert "more clients connect like it" in text, text[-2000:]
        assert "more watchers leave like it" in text, text[-2000:]
        assert "more unsupported settings asked for by clients like it" in text, text[-2000:]
        assert len(lines) < 200, f"{len(lines)} log lines"
        holder.close()
    finally:
        bridge.stop()


# --- 8. A client reconnecting at once is served, not refused -----------------------------


@pytest.mark.parametrize("port_kind", ["rfc2217", "raw"])
def test_quick_reconnects_are_served(tmp_path, device, port_kind):
    """A client arriving while the previous session was still wrapping up was refused as "in
    use" (30 and 17 of 40 quick reconnects): each client here connects the moment the one
    before it closes, as idf.py flash monitor and chained CI commands do."""
    bridge, _ = start(tmp_path, device)
    raw_port = int(bridge.proc.args[bridge.proc.args.index("--raw-listen") + 1].rsplit(":", 1)[1])
    port = bridge.port if port_kind == "rfc2217" else raw_port
    collected = bytearray()
    try:
        clients = []
        for i in range(40):
            if clients:
                clients[-1].close()
            c = socket.create_connection(("127.0.0.1", port), timeout=5)
            c.sendall(b"<hello %d>" % i)
            clients.append(c)
            collected += device.read(4096, timeout=0.02)
        replies = []
        for c in clients[:-1]:
            replies.append(b"")  # closed at once; what it was told is in the log
        clients[-1].close()
        collected += device.read(4096, timeout=2)
        refused = bridge.log.text().count("refused client")
        assert refused == 0, f"{refused} of 40 reconnects refused"
        missing = [i for i in range(40) if b"<hello %d>" % i not in collected]
        assert not missing, f"never reached the device: {missing}"
    finally:
        bridge.stop()


# --- 9. A half-closed client still gets the device's output ------------------------------


@pytest.mark.parametrize("port_kind", ["rfc2217", "raw"])
def test_a_half_closed_client_gets_the_reply(tmp_path, device, port_kind):
    """A client that shut down its sending side (socat -t 2 - TCP:... < file) was treated as
    gone: the reply never came back (0 of 3 tries)."""
    bridge, _ = start(tmp_path, device)
    raw_port = int(bridge.proc.args[bridge.proc.args.index("--raw-listen") + 1].rsplit(":", 1)[1])
    try:
        for attempt in range(3):
            c = socket.create_connection(("127.0.0.1", bridge.port if port_kind == "rfc2217" else raw_port))
            c.sendall(b"question %d" % attempt)
            c.shutdown(socket.SHUT_WR)
            assert device.read(10, timeout=5) == b"question %d" % attempt
            time.sleep(0.5)
            device.write(b"answer %d" % attempt)
            got = b""
            c.settimeout(5)
            try:
                while True:
                    chunk = c.recv(4096)
                    if not chunk:
                        break
                    got += chunk
            except OSError:
                pass
            c.close()
            assert b"answer %d" % attempt in got, (attempt, got)
            wait_log(bridge, "closed its sending side", 10)
    finally:
        bridge.stop()


# --- 12. Every session ends with the configured settings --------------------------------


def test_a_session_leaves_the_port_as_configured(tmp_path, device):
    """BREAK, flow control and line settings were left as the client set them (with the modem
    backend's descriptor open, the next client found them)."""
    bridge, _ = start(tmp_path, device)
    try:
        ser = serial.serial_for_url(bridge.url, timeout=1, baudrate=115200)
        ser.write(b"w")  # the board's writer: its settings reach the UART
        assert device.read(1) == b"w"
        ser.xonxoff = True
        ser.baudrate = 921600
        # A pty keeps the flow control and the rate (it forces 8N1 itself).
        assert termios.tcgetattr(device.master)[0] & termios.IXON
        assert device_speed(device.master) == 921600
        ser.close()
        wait_log(bridge, "client disconnected", 5)
        time.sleep(0.3)
        assert not termios.tcgetattr(device.master)[0] & termios.IXON, "XON/XOFF left on"
        assert device_speed(device.master) == 115200, "the client's rate left on"
    finally:
        bridge.stop()


# --- 14. The modem backend comes and goes like the data path -----------------------------


def test_the_modem_backend_serves_a_device_that_appears_later(tmp_path):
    """backend = "modem" with the adapter absent exited 78 at start (a socket-activated client
    got 0 bytes), and the control fd opened once at start failed for good after a replug."""
    link = tmp_path / "ttyUSB-board"
    port = free_port()
    bridge = Bridge(["--device", str(link), "--control", "modem", "--listen", f"127.0.0.1:{port}",
                     "--raw-listen", "127.0.0.1:0"], port)
    try:
        c = socket.create_connection(("127.0.0.1", port), timeout=5)
        c.settimeout(5)
        assert b"does not exist" in c.recv(4096)
        c.close()
        device = Pty()
        os.symlink(device.path, link)
        next_client_round_trip(bridge, device)
        os.unlink(link)
        device.close()
        c = socket.create_connection(("127.0.0.1", port), timeout=5)
        c.settimeout(5)
        # Either the device was closed with the last client and cannot be opened again, or
        # (the last client's connection still wrapping up) it was open and fails now.
        said = recv_until(c, lambda d: d.endswith(b"\n"), timeout=5)
        assert b"does not exist" in said or b"failed or disappeared" in said, said
        c.close()
        device = Pty()
        os.symlink(device.path, link)
        next_client_round_trip(bridge, device)
        device.close()
    finally:
        bridge.stop()


# --- 15. Messages that name the real cause -------------------------------------------------


def test_a_device_held_by_another_program_is_said_to_be_in_use(tmp_path, device):
    """serialport reports EBUSY (or its lock) as "no device": the client was told the device
    did not exist."""
    holder = os.open(device.path, os.O_RDWR | os.O_NOCTTY)
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    bridge, _ = start(tmp_path, device)
    try:
        c = socket.create_connection(("127.0.0.1", bridge.port), timeout=5)
        c.settimeout(5)
        text = c.recv(4096)
        assert b"in use by another program" in text, text
        c.close()
        wait_log(bridge, "in use by another program", 5)
    finally:
        bridge.stop()
        os.close(holder)


@pytest.mark.parametrize("what", ["regular", "null", "fifo"])
def test_a_device_path_that_is_no_serial_port_is_a_config_error(tmp_path, what):
    """A regular file, /dev/null or a FIFO as the device gave "Not a typewriter" to every
    client; check-config approved it."""
    path = {"regular": tmp_path / "file", "null": "/dev/null", "fifo": tmp_path / "fifo"}[what]
    if what == "regular":
        path.write_text("")
    elif what == "fifo":
        os.mkfifo(path)
    r = subprocess.run([str(BIN), "--device", str(path), "--control", "none", "--listen",
                        f"127.0.0.1:{free_port()}"], capture_output=True, text=True, timeout=10)
    assert r.returncode == 78, r.stderr
    assert "not a serial" in r.stderr and "Not a typewriter" not in r.stderr, r.stderr


def test_a_privileged_port_says_why_and_what_to_do(tmp_path):
    """listen on a port below 1024 as an unprivileged user exited 1 with "another program may
    use the port"."""
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to nobody")
    r = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", str(BIN),
                        "--device", "/dev/ttyESP-absent", "--control", "none", "--listen", "127.0.0.1:217",
                        "--raw-listen", "127.0.0.1:0"], capture_output=True, text=True, timeout=10)
    assert r.returncode == 78, r.stderr
    assert "below 1024" in r.stderr and "another program" not in r.stderr, r.stderr
