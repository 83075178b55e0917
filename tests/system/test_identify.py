"""`esp-bridge identify` (the discovery issue, its chip-identity part): through the running
service, which resets the virtual ESP32 into its ROM loader with its own reset engine, reads
its chip, revision, MAC and flash size, and resets it into its application; esptool's own
`chip-id` and `flash-id` say the same. Refused while a client writes (the writer undisturbed),
a client claiming meanwhile gets the board right after, and the result is kept across a
restart in systemd's state directory ($STATE_DIRECTORY).
"""

import re
import socket
import subprocess
import threading
import time

from conftest import BIN, Bridge, esptool_cmd, free_port
from test_reset import events, wait_mode
from test_sharing import Output

MAC = "24:0a:c4:12:34:56"


def start(tmp_path, state):
    port, raw_port = free_port(), free_port()
    control = tmp_path / "control.sock"
    events_path = tmp_path / "events.jsonl"
    bridge = Bridge(["demo", "--listen", f"127.0.0.1:{port}", "--raw-listen", f"127.0.0.1:{raw_port}",
                     "--control-socket", str(control), "--event-log", str(events_path),
                     "--flash-file", str(tmp_path / "flash.bin")],
                    port, env={"STATE_DIRECTORY": str(state)})
    bridge.raw_port, bridge.control, bridge.events = raw_port, control, events_path
    wait_mode(bridge, "app")
    return bridge


def identify(bridge, *board):
    return subprocess.run([str(BIN), "identify", *board, "--control-socket", str(bridge.control)],
                          capture_output=True, text=True, timeout=60)


def status(bridge):
    return subprocess.run([str(BIN), "status", "--control-socket", str(bridge.control)],
                          capture_output=True, text=True, timeout=20).stdout


def esptool(bridge, *args):
    r = subprocess.run([str(esptool_cmd(5)), "--port", f"socket://127.0.0.1:{bridge.raw_port}", *args],
                       capture_output=True, text=True, timeout=120)
    return r.returncode, r.stdout + r.stderr


def test_identify_reads_the_chip_and_puts_it_back_into_its_application(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    bridge = start(tmp_path, state)
    try:
        before = len(events(bridge))
        r = identify(bridge)
        assert r.returncode == 0, r.stderr
        assert r.stdout == f"ESP32 v3.1, MAC {MAC}, 4 MiB flash\n", r.stdout
        # Its own reset engine: into the bootloader, then back into the application.
        wait_mode(bridge, "app")
        modes = [e["mode"] for e in events(bridge)[before:] if e["event"] == "mode"]
        assert modes.index("download") < len(modes) - 1 and modes[-1] == "app", modes
        # esptool reads the same through the raw port.
        rc, out = esptool(bridge, "chip-id")
        assert rc == 0 and re.search(rf"MAC:\s+{MAC}", out) and "(revision v3.1)" in out, out
        rc, out = esptool(bridge, "flash-id")
        assert rc == 0 and "Detected flash size: 4MB" in out, out
        text = status(bridge)
        assert f"\tchip: ESP32 v3.1, MAC {MAC}, 4 MiB flash (identified " in text, text
        assert (state / "chip-default").read_text().startswith("chip=ESP32\n")
        # A board that is not there is named, with the ones that are.
        bad = identify(bridge, "nosuch")
        assert bad.returncode == 1 and 'no board named "nosuch"' in bad.stderr, bad
    finally:
        bridge.stop()
    # Kept across a restart: the status says it before anyone asks again.
    bridge = start(tmp_path, state)
    try:
        assert f"\tchip: ESP32 v3.1, MAC {MAC}, 4 MiB flash (identified " in status(bridge)
    finally:
        bridge.stop()


def test_identify_is_refused_while_a_client_writes_and_a_claim_meanwhile_waits(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    bridge = start(tmp_path, state)
    try:
        # A writer: a raw client that typed a line (the application echoes it).
        writer = socket.create_connection(("127.0.0.1", bridge.raw_port))
        out = Output(sock=writer)
        writer.sendall(b"first line\r\n")
        out.wait_for(b"first line", timeout=10)
        before = len(events(bridge))
        r = identify(bridge)
        assert r.returncode == 1, r.stdout
        assert "writes to this board; try again when it is done" in r.stderr, r.stderr
        # The writer goes on, and nothing reset its chip.
        writer.sendall(b"second line\r\n")
        out.wait_for(b"second line", timeout=10)
        assert not [e for e in events(bridge)[before:] if e["event"] == "en"], "the chip was reset"
        writer.close()
        time.sleep(0.5)
        # esptool claiming while an identification runs gets the board right after it.
        result = {}
        t = threading.Thread(target=lambda: result.setdefault("id", identify(bridge)))
        t.start()
        time.sleep(0.05)
        rc, text = esptool(bridge, "chip-id")
        t.join(60)
        assert result["id"].returncode == 0, result["id"].stderr
        assert rc == 0 and re.search(rf"MAC:\s+{MAC}", text), text
    finally:
        bridge.stop()
