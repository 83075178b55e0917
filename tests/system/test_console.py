"""A board's console and its output in the log (the sharing issue, its history part): the
read-only console port replays what the board printed while nobody was connected, each line
with the time it arrived, then follows it live; with `journal = true` the board's device is
read from the start, client or not, a missing one is tried again, and its output goes to the
log line by line (to the journal under systemd: tests/vm). Real TCP into the real binary, in
front of the virtual ESP32 (esp-sim) on a pseudo-terminal, its EN pin pulled from outside as a
person pressing the board's reset button would.
"""

import datetime
import os
import re
import socket
import subprocess
import time

from conftest import BIN, SIM_BIN, Bridge, free_port
from test_reset import wait_mode
from test_sharing import STAMP, Output, app_digest, esptool


def start_sim(link, control):
    """The virtual ESP32 running its application, its EN and IO0 pins driven through the
    unix socket `control` (nothing of esp-bridge's touches them: [control] backend none)."""
    proc = subprocess.Popen(
        [str(SIM_BIN), "--link", str(link), "--boot", "app", "--control-unix", str(control)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout.readline().strip(), "the sim prints its device path"
    return proc


def press_reset(control):
    """EN low for 100 ms, then high with IO0 high: the chip boots its application."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(control))
        s.settimeout(5)
        for line in (b"en=low io0=high\n", b"en=high\n"):
            s.sendall(line)
            assert s.recv(64).startswith(b"ok"), "the sim took the pin change"
            time.sleep(0.1)


def journal_bridge(tmp_path, link, journal=True, network=""):
    """esp-bridge serving the board on `link` with its console port, its output to the log."""
    port, raw_port, console_port = free_port(), free_port(), free_port()
    cfg = tmp_path / "bridge.toml"
    cfg.write_text(
        f'[serial]\ndevice = "{link}"\njournal = {"true" if journal else "false"}\n'
        f'[network]\nlisten = ["127.0.0.1:{port}"]\nraw_listen = ["127.0.0.1:{raw_port}"]\n'
        f'console_listen = ["127.0.0.1:{console_port}"]\n{network}[control]\nbackend = "none"\n')
    control = tmp_path / "control.sock"
    bridge = Bridge(["--config", str(cfg), "--control-socket", str(control)], port)
    bridge.raw_port, bridge.console_port, bridge.control = raw_port, console_port, control
    return bridge


def stamped(line):
    """The UTC time a console line's stamp says."""
    return datetime.datetime.strptime(line[:23].decode(), "%Y-%m-%d %H:%M:%S.%f").replace(
        tzinfo=datetime.timezone.utc).timestamp()


def output_lines(log):
    """The board's output as the service logged it (stderr here; the journal under systemd)."""
    return [line for line in log.splitlines() if line.endswith("serial_output=true")]


def test_the_console_replays_a_boot_log_printed_while_no_client_was_connected(tmp_path):
    link, pins = tmp_path / "ttyESP", tmp_path / "pins.sock"
    sim = start_sim(link, pins)
    bridge = journal_bridge(tmp_path, link)
    try:
        # Read from the start: the application's lines reach the log with nobody connected.
        bridge.log.wait_for("hello from the virtual ESP32, uptime", timeout=10)
        assert "waiting for a client" in subprocess.run(
            [str(BIN), "status", "--control-socket", str(bridge.control)],
            capture_output=True, text=True, timeout=20).stdout
        pressed = time.time()
        press_reset(pins)
        bridge.log.wait_for("App image MD5:", timeout=10)
        logged = output_lines(bridge.log.text())
        assert any("board{board=default}: rst:0x1 (POWERON_RESET)" in l for l in logged), logged
        assert any("I (30) boot: ESP-IDF v5.2.1 2nd stage bootloader" in l for l in logged), logged
        # Nobody was connected: no client ever came.
        assert "connected" not in bridge.log.text()
        time.sleep(1.0)

        connected = time.time()
        reader = socket.create_connection(("127.0.0.1", bridge.console_port))
        out = Output(sock=reader)
        try:
            out.wait_for(b"hello from the virtual ESP32, uptime", timeout=10, since=len(out.data))
            mark = len(out.data)
            # One more line after the connect: it follows live.
            out.wait_for(b"hello from the virtual ESP32, uptime", timeout=10, since=mark)
            text = bytes(out.data)
            lines = text.splitlines()
            assert lines[0] == b"[esp-bridge] board default (" + str(link).encode() + \
                b"): what it printed, then live; read-only", lines[0]
            boot = [l for l in lines if re.match(STAMP + rb"rst:0x1 \(POWERON_RESET\)", l)]
            assert boot, text[-3000:]
            # Stamped when the board printed them (after the press), not when replayed.
            assert pressed - 1 < stamped(boot[-1]) < connected, (pressed, boot[-1], connected)
            md5 = [l for l in lines if re.match(STAMP + rb"I \(156\) app_init: App image MD5:", l)]
            assert md5 and stamped(md5[-1]) < connected, text[-3000:]
            live = [l for l in lines[1:] if stamped(l) > connected]
            assert live, "live lines follow the history"
            # Read-only: a line typed at the console never reaches the chip (its application
            # echoes every line it receives, and the log would show it).
            reader.sendall(b"typed at the console\r\n")
            time.sleep(2.5)
            assert b"typed at the console" not in bytes(out.data)
            assert "typed at the console" not in bridge.log.text()
        finally:
            reader.close()
        bridge.log.wait_for("console reader", timeout=5)
    finally:
        bridge.stop()
        sim.terminate()
        sim.wait(10)


def test_a_missing_device_is_tried_again_and_its_output_logged_when_it_comes(tmp_path):
    link, pins = tmp_path / "ttyESP", tmp_path / "pins.sock"
    bridge = journal_bridge(tmp_path, link)
    sim = None
    try:
        bridge.log.wait_for("trying again every second", timeout=10)
        assert f"serial device {link} does not exist" in bridge.log.text()
        status = subprocess.run([str(BIN), "status", "--control-socket", str(bridge.control)],
                                capture_output=True, text=True, timeout=20).stdout
        assert f"device missing or unusable: {link}" in status, status
        # A console reader meanwhile is told why, not left hanging.
        with socket.create_connection(("127.0.0.1", bridge.console_port), timeout=5) as c:
            c.settimeout(5)
            told = c.recv(4096)
        assert b"does not exist" in told, told
        time.sleep(2.5)
        # Said once, not every second.
        assert bridge.log.text().count("trying again every second") == 1
        sim = start_sim(link, pins)
        bridge.log.wait_for(f"serial device {link} is back", timeout=5)
        bridge.log.wait_for("hello from the virtual ESP32, uptime", timeout=10)
        # The sim's device going away again: said, and tried again.
        sim.terminate()
        sim.wait(10)
        sim = None
        bridge.log.wait_for("failed", timeout=10)
        deadline = time.monotonic() + 10
        while bridge.log.text().count("trying again every second") < 2:
            assert time.monotonic() < deadline, bridge.log.text()[-2000:]
            time.sleep(0.1)
        assert bridge.proc.poll() is None, "the service runs on"
    finally:
        bridge.stop()
        if sim:
            sim.terminate()
            sim.wait(10)


def test_a_board_read_for_the_journal_keeps_the_service_from_its_idle_exit(tmp_path):
    """idle_exit_secs would stop a service with no client; a board whose output goes to the
    journal is read all the time, so the service stays (and says why), and check-config says
    so too."""
    link, pins = tmp_path / "ttyESP", tmp_path / "pins.sock"
    sim = start_sim(link, pins)
    bridge = journal_bridge(tmp_path, link, network="idle_exit_secs = 1\n")
    try:
        bridge.log.wait_for("idle_exit_secs does not apply: board default sends its output", timeout=5)
        time.sleep(3)
        assert bridge.proc.poll() is None, "the service exited"
        assert "hello from the virtual ESP32" in bridge.log.text()
        check = subprocess.run([str(BIN), "check-config", "--config", str(tmp_path / "bridge.toml")],
                               capture_output=True, text=True, timeout=20)
        assert "idle_exit_secs = 1 does not apply while a board's output goes to the journal" in check.stdout + check.stderr
        assert "output to the journal, line by line (journalctl -u esp-bridge BOARD=default)" in check.stdout + check.stderr
    finally:
        bridge.stop()
        sim.terminate()
        sim.wait(10)
    # Without journal, the same file lets it exit.
    sim = start_sim(link, pins)
    bridge = journal_bridge(tmp_path, link, journal=False, network="idle_exit_secs = 1\n")
    try:
        bridge.proc.wait(10)
        assert "no client for 1 s (idle_exit_secs): exiting" in bridge.log.text()
    finally:
        bridge.stop()
        sim.terminate()
        sim.wait(10)


def test_a_console_connected_while_esptool_flashes_shows_the_new_boot_log(demo, tmp_path):
    """A console is one more watcher: the flash is not held up by it, and the boot log of the
    new application, printed after esptool's final reset, reaches it. A board without
    `journal` is read while any client is connected, the console's too."""
    console_port = free_port()
    bridge = demo("--console-listen", f"127.0.0.1:{console_port}")
    wait_mode(bridge, "app")
    assert f"console: nc 127.0.0.1 {console_port}" in bridge.log.text(), "the banner says it"
    reader = socket.create_connection(("127.0.0.1", console_port))
    out = Output(sock=reader)
    try:
        out.wait_for(b"read-only\n", timeout=10)
        image = os.urandom(64 * 1024)
        path = tmp_path / "app.bin"
        path.write_bytes(image)
        mark = len(out.data)
        r, text = esptool(bridge, "write-flash", "0x10000", str(path))
        assert r.returncode == 0 and "Hash of data verified" in text, text
        out.wait_for(b"I (156) app_init: App image MD5:    " + app_digest(image).encode(),
                     timeout=20, since=mark)
        assert re.search(STAMP + rb"I \(156\) app_init: App image MD5:    " +
                         app_digest(image).encode() + rb"\n", bytes(out.data[mark:]))
        assert "serial_output" not in bridge.log.text(), "no journal for this board"
    finally:
        reader.close()
