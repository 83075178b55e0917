"""systemd integration on the host: the real systemd-socket-activate, a fake NOTIFY_SOCKET,
exit codes, SIGHUP, idle exit, and the unit's security score."""

import os
import re
import shutil
import signal
import socket
import subprocess
import time

import pytest
import serial

from conftest import BIN, ROOT, SIM_BIN, FakeNotify, LogReader, esptool_cmd, free_port
from test_pyserial import device_speed

UNIT = ROOT / "packaging" / "esp-bridge.service"


def start_sim(tmp_path):
    link = tmp_path / "ttyESP"
    proc = subprocess.Popen(
        [str(SIM_BIN), "--link", str(link), "--boot", "download"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    assert proc.stdout.readline().strip(), "sim prints its device path"
    return proc, link


def wait_log(log, needle, timeout=10):
    log.wait_for(needle, timeout)


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None, reason="systemd missing")
def test_socket_activation_flash_through_the_passed_socket(tmp_path):
    sim, link = start_sim(tmp_path)
    port = free_port()
    unused = free_port()
    bridge = subprocess.Popen(
        ["systemd-socket-activate", "-l", f"127.0.0.1:{port}", "--fdname=rfc2217",
         str(BIN), "--device", str(link), "--control", "none", "--listen", f"127.0.0.1:{unused}",
         "--raw-listen", "127.0.0.1:0"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
    )
    log = LogReader(bridge.stderr)
    try:
        wait_log(log, "Listening on")
        image = tmp_path / "app.bin"
        image.write_bytes(os.urandom(64 * 1024))
        url = f"rfc2217://127.0.0.1:{port}"
        for args in (["write-flash", "0x10000", str(image)], ["verify-flash", "0x10000", str(image)]):
            r = subprocess.run(
                [str(esptool_cmd(5)), "--port", url, "--before", "no-reset", "--after", "no-reset", *args],
                capture_output=True, text=True, timeout=300,
            )
            assert r.returncode == 0, r.stdout + r.stderr + log.text()
        # The passed socket is used, named by the board and protocol it serves; the
        # configured --listen address is not bound.
        assert (f"board default: listening on 127.0.0.1:{port} for RFC 2217 clients (socket passed by systemd)"
                in log.text()), log.text()
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", unused), timeout=1).close()
    finally:
        bridge.send_signal(signal.SIGTERM)
        bridge.wait(10)
        sim.terminate()
        sim.wait(10)


def test_unknown_socket_name_is_a_config_error(tmp_path):
    port = free_port()
    bridge = subprocess.Popen(
        ["systemd-socket-activate", "-l", f"127.0.0.1:{port}", "--fdname=mystery",
         str(BIN), "--device", "/dev/ttyESP-absent", "--control", "none"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
    )
    log = LogReader(bridge.stderr)
    wait_log(log, "Listening on")
    socket.create_connection(("127.0.0.1", port)).close()
    assert bridge.wait(10) == 78
    assert 'named "mystery"' in log.text() and "BOARD.rfc2217" in log.text(), log.text()


def test_notify_ready_status_watchdog_stopping(tmp_path, device):
    notify = FakeNotify(tmp_path)
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN), "--device", device.path, "--control", "none", "--listen", f"127.0.0.1:{port}",
         "--raw-listen", "127.0.0.1:0"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
        env={**os.environ, "NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "400000"},
    )
    LogReader(proc.stderr)
    try:
        notify.wait_for("READY=1")
        notify.wait_for(f"STATUS=idle: waiting for a client on 127.0.0.1:{port}")
        t0 = time.monotonic()
        time.sleep(2.0)
        pings = [t for t, m in notify.messages if "WATCHDOG=1" in m and t >= t0]
        # Every 200 ms (half of WATCHDOG_USEC): about 10 in 2 s.
        assert 7 <= len(pings) <= 13, len(pings)
        ser = serial.serial_for_url(f"rfc2217://127.0.0.1:{port}", baudrate=921600, timeout=1)
        notify.wait_for("STATUS=watched by 1 client(s); nobody writes")
        ser.write(b"w")  # now it writes
        notify.wait_for(f"STATUS=serving 127.0.0.1:{ser._socket.getsockname()[1]} at 921600 baud")
        ser.close()
        notify.wait_for("STATUS=idle")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        notify.wait_for("STOPPING=1")
    finally:
        notify.running = False
        if proc.poll() is None:
            proc.kill()


def test_missing_gpio_line_exits_78_naming_the_key(tmp_path):
    cfg = tmp_path / "gpio.toml"
    cfg.write_text('[control]\nbackend = "gpio"\n[control.gpio]\nreset = "GPIO99X"\n')
    r = subprocess.run(
        [str(BIN), "--config", str(cfg), "--device", "/dev/ttyESP-absent", "--listen", f"127.0.0.1:{free_port()}",
         "--raw-listen", "127.0.0.1:0"],
        capture_output=True, text=True, timeout=10,
    )
    assert r.returncode == 78, r.stderr
    assert '"GPIO99X" ([control.gpio] reset)' in r.stderr and "gpioinfo" in r.stderr


def test_sighup_rereads_the_config_for_the_next_client(tmp_path, device):
    cfg = tmp_path / "c.toml"
    port = free_port()
    cfg.write_text(f'[serial]\ndevice = "{device.path}"\nbaud = 115200\n'
                   f'[network]\nlisten = ["127.0.0.1:{port}"]\nraw_listen = ["127.0.0.1:0"]\n'
                   '[control]\nbackend = "none"\n')
    proc = subprocess.Popen([str(BIN), "--config", str(cfg)], stderr=subprocess.PIPE)
    log = LogReader(proc.stderr)
    try:
        wait_log(log, f"listening on 127.0.0.1:{port}")
        s = socket.create_connection(("127.0.0.1", port))
        wait_log(log, "connected")
        assert device_speed(device.master) == 115200
        s.close()
        wait_log(log, "stopped watching")
        cfg.write_text(cfg.read_text().replace("115200", "57600"))
        proc.send_signal(signal.SIGHUP)
        wait_log(log, "configuration re-read")
        s = socket.create_connection(("127.0.0.1", port))
        deadline = time.monotonic() + 5
        while log.text().count("connected to the") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert device_speed(device.master) == 57600
        s.close()
        # A broken file on SIGHUP keeps the running configuration.
        cfg.write_text("[serial\n")
        proc.send_signal(signal.SIGHUP)
        wait_log(log, "keeping the running configuration")
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def test_idle_exit(tmp_path):
    cfg = tmp_path / "idle.toml"
    cfg.write_text("[network]\nidle_exit_secs = 1\n")
    port = free_port()
    start = time.monotonic()
    r = subprocess.run(
        [str(BIN), "--config", str(cfg), "--device", "/dev/ttyESP-absent", "--control", "none",
         "--listen", f"127.0.0.1:{port}", "--raw-listen", "127.0.0.1:0"],
        capture_output=True, text=True, timeout=20,
    )
    assert r.returncode == 0, r.stderr
    assert 1.0 <= time.monotonic() - start < 10
    assert "idle_exit_secs" in r.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd missing")
def test_unit_security_exposure_at_most_1_5():
    r = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(UNIT)],
        capture_output=True, text=True, timeout=60,
    )
    m = re.search(r"Overall exposure level for esp-bridge.service: ([0-9.]+)", r.stdout + r.stderr)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= 1.5, r.stdout


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None, reason="systemd missing")
def test_passed_sockets_are_told_apart_by_name_not_by_port(tmp_path):
    """The generated socket units name their sockets BOARD.rfc2217 / BOARD.raw /
    BOARD.console and the control socket `control`; which protocol a socket speaks never
    depends on a config key. Here the configuration says nothing of these ports (its
    raw_listen is another port altogether, and it has no console_listen)."""
    sim, link = start_sim(tmp_path)
    rfc, raw, console = free_port(), free_port(), free_port()
    control = tmp_path / "control.sock"
    bridge = subprocess.Popen(
        ["systemd-socket-activate", "-l", f"127.0.0.1:{rfc}", "-l", f"127.0.0.1:{raw}",
         "-l", f"127.0.0.1:{console}", "-l", str(control),
         "--fdname=default.rfc2217:default.raw:default.console:control",
         str(BIN), "--device", str(link), "--control", "none",
         "--raw-listen", f"127.0.0.1:{free_port()}"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
    )
    log = LogReader(bridge.stderr)
    try:
        wait_log(log, "Listening on")
        # The control socket starts the service (socket activation) and answers.
        r = subprocess.run([str(BIN), "status", "--control-socket", str(control)],
                           capture_output=True, text=True, timeout=20)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("default\tidle: waiting for a client on"), r.stdout
        r = subprocess.run(
            [str(esptool_cmd(5)), "--port", f"socket://127.0.0.1:{raw}", "chip-id"],
            capture_output=True, text=True, timeout=120,
        )
        assert r.returncode == 0, r.stdout + r.stderr + log.text()
        assert f"listening on 127.0.0.1:{raw} for ESP raw clients" in log.text()
        assert f"listening on 127.0.0.1:{rfc} for RFC 2217 clients" in log.text()
        # The console socket serves the board's console.
        with socket.create_connection(("127.0.0.1", console), timeout=10) as c:
            c.settimeout(10)
            got = b""
            while b"\n" not in got:
                chunk = c.recv(4096)
                assert chunk, got
                got += chunk
        assert got.startswith(b"[esp-bridge] board default ("), got
        assert f"listening on 127.0.0.1:{console} for console clients" in log.text()
        # With [control] backend none the chip cannot be reset: said once, clearly.
        assert "cannot reset the chip" in log.text()
    finally:
        bridge.send_signal(signal.SIGTERM)
        bridge.wait(10)
        sim.terminate()
        sim.wait(10)
