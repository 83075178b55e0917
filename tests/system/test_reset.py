"""Reset and boot mode over the network: the client's DTR/RTS drive the virtual ESP32's EN and
IO0, through the production reset engine, on both wirings (GPIO lines straight to the pins,
and the UART's DTR/RTS through a dev board's auto-program circuit)."""

import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import serial

from conftest import esptool_cmd, free_port

TOOLS = Path(__file__).parent / "tools"
WIRINGS = ["gpio", "modem"]


class LatencyProxy:
    """A TCP proxy on loopback that delays every chunk by `delay` seconds in each direction,
    keeping order, like a slow network link."""

    def __init__(self, target_port, delay):
        self.delay = delay
        self.target = target_port
        self.port = free_port()
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.stopping = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stopping:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((client, upstream), (upstream, client)):
                a.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src, dst):
        queue = []
        cond = threading.Condition()
        done = []

        def sender():
            while True:
                with cond:
                    while not queue and not done:
                        cond.wait()
                    if not queue and done:
                        break
                    due, data = queue.pop(0)
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                try:
                    if data is None:
                        dst.shutdown(socket.SHUT_WR)
                        break
                    dst.sendall(data)
                except OSError:
                    break

        t = threading.Thread(target=sender, daemon=True)
        t.start()
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            with cond:
                queue.append((time.monotonic() + self.delay, data or None))
                cond.notify()
            if not data:
                break
        with cond:
            done.append(True)
            cond.notify()

    @property
    def url(self):
        return f"rfc2217://127.0.0.1:{self.port}"

    def close(self):
        self.stopping = True
        self.listener.close()


def events(bridge):
    if not bridge.events.exists():
        return []
    return [json.loads(line) for line in bridge.events.read_text().splitlines() if line.strip()]


def pins_and_modes(bridge, since_us=0):
    return [
        e for e in events(bridge)
        if e["event"] in ("en", "io0", "mode") and e["t_us"] >= since_us
    ]


def bootloader_entries(evs):
    """For each entry into download mode: how long EN was low before it, and how long IO0
    stayed low after EN rose (None if still low at the end of the log)."""
    out = []
    en_low_at = None
    io0 = "high"
    rise = None
    for e in evs:
        if e["event"] == "en" and e["level"] == "low":
            en_low_at = e["t_us"]
        elif e["event"] == "en" and e["level"] == "high":
            if io0 == "low" and en_low_at is not None:
                rise = (e["t_us"], e["t_us"] - en_low_at)
                out.append({"en_low_us": rise[1], "io0_hold_us": None, "at": e["t_us"]})
            en_low_at = None
        elif e["event"] == "io0":
            io0 = e["level"]
            if io0 == "high" and out and out[-1]["io0_hold_us"] is None:
                out[-1]["io0_hold_us"] = e["t_us"] - out[-1]["at"]
    return out


def last_mode(bridge):
    modes = [e["mode"] for e in events(bridge) if e["event"] == "mode"]
    return modes[-1] if modes else None


def wait_mode(bridge, mode, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if last_mode(bridge) == mode:
            return
        time.sleep(0.05)
    raise AssertionError(f"chip never reached {mode}; events: {pins_and_modes(bridge)[-12:]}")


def esptool_python(version):
    return esptool_cmd(version).parent / "python"


@pytest.mark.parametrize("wiring", WIRINGS)
@pytest.mark.parametrize("version", [4, 5])
@pytest.mark.parametrize("latency_ms", [0, 20, 100])
def test_default_reset_enters_download_mode_20_of_20(demo, tmp_path, wiring, version, latency_ms):
    bridge = demo("--wiring", wiring)
    proxy = LatencyProxy(bridge.port, latency_ms / 1000)
    # esptool waits only 0.1 s for a SYNC reply; over a slow link the test raises that, as
    # users on slow links do (DOMAIN.md). Whether the chip entered download mode is the
    # bridge's part, and is what is asserted below.
    cfg = tmp_path / "esptool.cfg"
    cfg.write_text("[esptool]\nsync_timeout = 2\nmem_end_rom_timeout = 2\ntimeout = 5\n")
    start_us = events(bridge)[-1]["t_us"] if events(bridge) else 0
    try:
        result = subprocess.run(
            [str(esptool_python(version)), str(TOOLS / "esptool_connect.py"), proxy.url, "20"],
            capture_output=True, text=True, timeout=900,
            env={**os.environ, "ESPTOOL_CFGFILE": str(cfg)},
        )
    finally:
        proxy.close()
    out = result.stdout + result.stderr
    assert "connected 20 of 20" in out, out[-3000:]
    entries = bootloader_entries(pins_and_modes(bridge, start_us))
    assert len(entries) == 20, entries
    for e in entries:
        assert e["en_low_us"] >= 100_000, e
        assert e["io0_hold_us"] is None or e["io0_hold_us"] >= 50_000, e
    downloads = [e for e in pins_and_modes(bridge, start_us) if e.get("mode") == "download"]
    assert len(downloads) == 20


@pytest.mark.parametrize("wiring", WIRINGS)
def test_monitor_open_never_resets_and_manual_toggles_work(demo, wiring):
    bridge = demo("--wiring", wiring)
    wait_mode(bridge, "app")
    before = events(bridge)[-1]["t_us"]
    # pyserial's defaults: DTR and RTS asserted on open, as miniterm and idf.py monitor do.
    ser = serial.serial_for_url(bridge.url, baudrate=115200, timeout=0.5)
    got = b""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        got += ser.read(4096)
    during = pins_and_modes(bridge, before)
    assert not [e for e in during if e["event"] == "en"], f"EN moved while monitoring: {during}"
    assert b"hello from the virtual ESP32" in got, got[-500:]
    # idf.py monitor's reset (Ctrl-T Ctrl-R): DTR off, RTS pulse: reset into the app.
    mark = events(bridge)[-1]["t_us"]
    ser.dtr = False
    ser.rts = True
    time.sleep(0.2)
    ser.rts = False
    wait_mode(bridge, "app")
    pulse = pins_and_modes(bridge, mark)
    lows = [e for e in pulse if e["event"] == "en" and e["level"] == "low"]
    highs = [e for e in pulse if e["event"] == "en" and e["level"] == "high"]
    assert lows and highs and highs[-1]["t_us"] - lows[0]["t_us"] >= 100_000, pulse
    assert "download" not in [e.get("mode") for e in pulse]
    # The esptool sequence by hand (idf.py monitor's Ctrl-T Ctrl-P): the bootloader.
    mark = events(bridge)[-1]["t_us"]
    ser.dtr = False
    ser.rts = True
    time.sleep(0.1)
    ser.dtr = True
    ser.rts = False
    time.sleep(0.05)
    ser.dtr = False
    wait_mode(bridge, "download")
    ser.read(4096)
    entries = bootloader_entries(pins_and_modes(bridge, mark))
    assert len(entries) == 1 and entries[0]["en_low_us"] >= 100_000, entries
    ser.close()
    # The client left the chip in download mode: it is reset into its application.
    wait_mode(bridge, "app")


@pytest.mark.parametrize("wiring", WIRINGS)
def test_hard_reset_after_flashing_runs_the_app(demo, wiring, tmp_path):
    bridge = demo("--wiring", wiring)
    image = tmp_path / "app.bin"
    image.write_bytes(os.urandom(8192))
    result = subprocess.run(
        [str(esptool_cmd(5)), "--port", bridge.url, "--after", "hard-reset",
         "write-flash", "0x10000", str(image)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    wait_mode(bridge, "app")
    evs = pins_and_modes(bridge)
    assert evs[-1]["mode"] == "app"


def raw_session(bridge, steps, hold=0.3):
    """Opens a raw RFC 2217 connection, sends SET-CONTROL values, then vanishes."""
    s = socket.create_connection(("127.0.0.1", bridge.port))
    s.sendall(bytes([255, 251, 44, 255, 253, 44]))
    for value in steps:
        s.sendall(bytes([255, 250, 44, 5, value, 255, 240]))
        time.sleep(0.02)
    time.sleep(hold)
    s.close()


@pytest.mark.parametrize("wiring", WIRINGS)
@pytest.mark.parametrize("state", ["reset-held", "mid-sequence", "download"])
def test_disconnect_in_any_state_leaves_the_chip_running(demo, wiring, state):
    bridge = demo("--wiring", wiring)
    wait_mode(bridge, "app")
    DTR_ON, DTR_OFF, RTS_ON, RTS_OFF = 8, 9, 11, 12
    steps = {
        "reset-held": [DTR_OFF, RTS_ON],
        "mid-sequence": [DTR_OFF, RTS_ON, DTR_ON],
        "download": [DTR_OFF, RTS_ON, DTR_ON, RTS_OFF],
    }[state]
    mark = events(bridge)[-1]["t_us"]
    raw_session(bridge, steps)
    if state == "download":
        assert "download" in [e.get("mode") for e in pins_and_modes(bridge, mark)]
    bridge.log.wait_for("client disconnected")
    wait_mode(bridge, "app")
    time.sleep(0.3)
    final = {}
    for e in pins_and_modes(bridge):
        if e["event"] in ("en", "io0"):
            final[e["event"]] = e["level"]
    assert final.get("en", "high") == "high" and final.get("io0", "high") == "high", final
    assert last_mode(bridge) == "app"


def test_start_up_does_not_glitch_and_sigterm_releases(demo):
    bridge = demo("--wiring", "gpio")
    wait_mode(bridge, "app")
    time.sleep(0.5)
    assert not [e for e in events(bridge) if e["event"] in ("en", "io0")], events(bridge)
    # Hold the chip in reset, then stop the service: the lines are released first.
    s = socket.create_connection(("127.0.0.1", bridge.port))
    s.sendall(bytes([255, 251, 44, 255, 250, 44, 5, 9, 255, 240, 255, 250, 44, 5, 11, 255, 240]))
    deadline = time.monotonic() + 5
    while last_mode(bridge) != "reset" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert bridge.stop() == 0
    s.close()
    levels = {}
    for e in events(bridge):
        if e["event"] in ("en", "io0"):
            levels[e["event"]] = e["level"]
    assert levels == {"en": "high"} or levels.get("en") == "high", levels


def test_direct_mode_is_the_literal_seed_mapping(demo):
    bridge = demo("--wiring", "gpio", "--mode", "direct")
    wait_mode(bridge, "app")
    ser = serial.serial_for_url(bridge.url, timeout=0.2)
    # pyserial asserts DTR and RTS on open; while it only watches, that reaches nothing.
    time.sleep(0.5)
    assert last_mode(bridge) == "app"
    # Once it writes, its lines apply as they are, literally: EN and IO0 low, held in reset.
    ser.write(b"\n")
    wait_mode(bridge, "reset")
    ser.close()
    wait_mode(bridge, "app")
