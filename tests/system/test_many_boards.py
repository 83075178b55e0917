"""Many boards behind one service (the many-boards issue): every board on its own named
sockets, passed in by the real systemd-socket-activate, flashed at the same time by esptool 4
and 5 over both ports; one board's device vanishing mid-flash changes nothing for the others.
"""

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import BIN, SIM_BIN, LogReader, esptool_cmd, free_port, spell
from test_reset import last_mode, wait_mode

pytestmark = pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                                reason="systemd missing")

ADDRESS = 0x10000
IMAGE = 256 * 1024


class Board:
    def __init__(self, name, rfc, raw, events=None):
        self.name, self.rfc, self.raw, self.events = name, rfc, raw, events


def socket_activated(cmd, boards, env=None, control=None):
    """`cmd` under systemd-socket-activate, every board's two sockets passed and named (and
    the control socket at `control`, as esp-bridge.socket passes it)."""
    args = ["systemd-socket-activate"]
    names = []
    for b in boards:
        args += ["-l", f"127.0.0.1:{b.rfc}", "-l", f"127.0.0.1:{b.raw}"]
        names += [f"{b.name}.rfc2217", f"{b.name}.raw"]
    if control:
        args += ["-l", str(control)]
        names.append("control")
    args.append("--fdname=" + ":".join(names))
    proc = subprocess.Popen(args + cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            env={**os.environ, **(env or {})})
    log = LogReader(proc.stderr)
    log.wait_for("Listening on", 10)
    return proc, log


def flash(version, url, image, results, key, *extra):
    cmd = [str(esptool_cmd(version)), "--port", url, *extra,
           spell(version, "write-flash"), hex(ADDRESS), str(image)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    results[key] = r


def test_four_boards_flash_at_once_over_both_ports_with_esptool_4_and_5(tmp_path):
    """`esp-bridge demo --boards 4` is the service with four virtual ESP32s wired to it; here
    systemd passes it eight sockets named esp1.rfc2217 ... esp4.raw (the generator's names),
    and it must match each to its board by name, whatever the order."""
    boards = [Board(f"esp{i}", free_port(), free_port(), tmp_path / f"events-esp{i}.jsonl")
              for i in range(1, 5)]
    # The sockets are passed in another order than the demo's own port plan.
    order = [boards[2], boards[0], boards[3], boards[1]]
    control = tmp_path / "control.sock"
    proc, log = socket_activated(
        [str(BIN), "demo", "--boards", "4", "--event-log", str(tmp_path / "events.jsonl")], order,
        control=control)
    images = {}
    try:
        # The first connection starts the service; each board's chip boots its app.
        socket.create_connection(("127.0.0.1", boards[0].raw), timeout=5).close()
        for b in boards:
            wait_mode(b, "app", timeout=15)
        results = {}
        threads = []
        plan = [(boards[0], 5, "raw"), (boards[1], 4, "raw"), (boards[2], 5, "rfc2217"),
                (boards[3], 4, "rfc2217")]
        for b, version, kind in plan:
            images[b.name] = tmp_path / f"{b.name}.bin"
            images[b.name].write_bytes(os.urandom(IMAGE))
            if kind == "raw":
                url, extra = f"socket://127.0.0.1:{b.raw}", ("--baud", "921600")
            else:
                url, extra = f"rfc2217://127.0.0.1:{b.rfc}", ()
            t = threading.Thread(target=flash, args=(version, url, images[b.name], results, b.name, *extra))
            t.start()
            threads.append(t)
        for t in threads:
            t.join(700)
        for b, version, kind in plan:
            r = results[b.name]
            out = r.stdout + r.stderr
            assert r.returncode == 0 and "Hash of data verified" in out, f"{b.name} ({kind}, esptool {version}):\n{out}\n{log.text()[-3000:]}"
        # Each chip is back in its application: the raw port resets it when esptool leaves,
        # and esptool resets it over RFC 2217 itself.
        for b in boards:
            wait_mode(b, "app", timeout=10)
        text = log.text()
        for b in boards:
            assert f"board {b.name}: listening on 127.0.0.1:{b.rfc} for RFC 2217 clients" in text, text
            assert f"board {b.name}: listening on 127.0.0.1:{b.raw} for ESP raw clients" in text, text
        # `esp-bridge status` over the control socket: every board idle again, its device
        # there, and its last reset the one that put its chip back into the application.
        st = subprocess.run([str(BIN), "status", "--control-socket", str(control)],
                            capture_output=True, text=True, timeout=10)
        assert st.returncode == 0, st.stderr
        per_board = {}
        for line in st.stdout.splitlines():
            if not line.startswith("\t"):
                current = line.split("\t")[0]
            per_board.setdefault(current, []).append(line)
        assert sorted(per_board) == [b.name for b in boards], st.stdout
        for b in boards:
            head, device, reset = per_board[b.name]
            assert head.startswith(f"{b.name}\tidle: waiting for a client on 127.0.0.1:{b.rfc} (RFC 2217), "
                                   f"127.0.0.1:{b.raw} (ESP raw) (for "), st.stdout
            assert device.endswith(": present"), st.stdout
            assert reset.startswith("\tlast reset: into the application, ") and reset.endswith(" s ago"), st.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)


def start_sim(link):
    proc = subprocess.Popen([str(SIM_BIN), "--link", str(link), "--boot", "download", "--pace"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout.readline().strip(), "the sim prints its device path"
    return proc


def test_one_board_losing_its_device_mid_flash_changes_nothing_for_the_others(tmp_path):
    """Four boards on their own virtual ESP32s (separate processes, paced at the wire rate);
    while all four flash, one chip's process goes away with its pseudo-terminal, as an
    unplugged USB adapter would. Its client is told, the other three finish intact, and the
    board is served again once its device is back."""
    names = [f"lab{i}" for i in range(1, 5)]
    links = {n: tmp_path / f"tty-{n}" for n in names}
    sims = {n: start_sim(links[n]) for n in names}
    boards = [Board(n, free_port(), free_port()) for n in names]
    config = tmp_path / "boards.toml"
    config.write_text("[control]\nbackend = \"none\"\n" + "".join(
        f'\n[[board]]\nname = "{b.name}"\ndevice = "{links[b.name]}"\n'
        f'listen = ["127.0.0.1:{b.rfc}"]\nraw_listen = ["127.0.0.1:{b.raw}"]\n' for b in boards))
    check = subprocess.run([str(BIN), "check-config", "--config", str(config)],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    proc, log = socket_activated([str(BIN), "--config", str(config)], boards)
    try:
        results = {}
        threads = []
        images = {}
        for b in boards:
            images[b.name] = tmp_path / f"{b.name}.bin"
            images[b.name].write_bytes(os.urandom(IMAGE))
            t = threading.Thread(target=flash, args=(
                5, f"socket://127.0.0.1:{b.raw}", images[b.name], results, b.name,
                "--before", "no-reset", "--after", "no-reset", "--baud", "460800"))
            t.start()
            threads.append(t)
        victim = "lab2"
        log.wait_for(f"board {victim}", 20)
        time.sleep(2.0)  # well into the flash (256 KiB at 460800 takes about 6 s paced)
        sims[victim].terminate()
        sims[victim].wait(10)
        for t in threads:
            t.join(300)
        for b in boards:
            r = results[b.name]
            out = r.stdout + r.stderr
            if b.name == victim:
                assert r.returncode != 0, f"{victim} finished although its device vanished:\n{out}"
            else:
                assert r.returncode == 0 and "Hash of data verified" in out, f"{b.name}:\n{out}\n{log.text()[-3000:]}"
        log.wait_for("serial device failed or vanished", 10)
        # The device comes back: the board is served again.
        sims[victim] = start_sim(links[victim])
        again = {}
        flash(5, f"socket://127.0.0.1:{boards[1].raw}", images[victim], again, victim,
              "--before", "no-reset", "--after", "no-reset", "--baud", "460800")
        r = again[victim]
        assert r.returncode == 0 and "Hash of data verified" in r.stdout, r.stdout + r.stderr
        # status names every board.
        text = log.text()
        for b in boards:
            assert f"board {b.name}: listening on 127.0.0.1:{b.raw}" in text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
        for p in sims.values():
            p.terminate()
            p.wait(10)


def test_status_and_check_config_speak_of_every_board(tmp_path):
    """`esp-bridge status` on the control socket answers a line per board; check-config
    refuses boards that share a port, a device or a GPIO line, and prints every board."""
    links = [tmp_path / f"tty{i}" for i in range(2)]
    for link in links:
        link.symlink_to("/dev/null")
    config = tmp_path / "two.toml"
    ports = [free_port() for _ in range(4)]
    config.write_text(
        "[control]\nbackend = \"none\"\n"
        f'[[board]]\nname = "a"\ndevice = "/dev/ttyESP-a"\nlisten = ["127.0.0.1:{ports[0]}"]\n'
        f'raw_listen = ["127.0.0.1:{ports[1]}"]\n'
        f'[[board]]\nname = "b"\ndevice = "/dev/ttyESP-b"\nlisten = ["127.0.0.1:{ports[2]}"]\n'
        f'raw_listen = ["127.0.0.1:{ports[3]}"]\n')
    r = subprocess.run([str(BIN), "check-config", "--config", str(config)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("[[board]]") == 2 and 'name = "b"' in r.stdout, r.stdout
    control = tmp_path / "control.sock"
    proc = subprocess.Popen([str(BIN), "--config", str(config), "--control-socket", str(control)],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    log = LogReader(proc.stderr)
    try:
        log.wait_for("control lines:", 10)
        deadline = time.monotonic() + 5
        while not Path(control).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        s = subprocess.run([str(BIN), "status", "--control-socket", str(control)],
                           capture_output=True, text=True, timeout=10)
        assert s.returncode == 0, s.stderr
        lines = s.stdout.splitlines()
        heads = [line for line in lines if not line.startswith("\t")]
        assert [line.split("\t")[0] for line in heads] == ["a", "b"], s.stdout
        assert all("idle: waiting for a client on 127.0.0.1:" in line for line in heads), s.stdout
        # Neither device exists; with no control lines, resets are not tracked.
        assert "\tdevice /dev/ttyESP-a: missing" in lines and "\tdevice /dev/ttyESP-b: missing" in lines, s.stdout
        assert lines.count('\tlast reset: not tracked (no control lines, or mode = "direct")') == 2, s.stdout
        # A client on board a: its line says so, b stays idle.
        c = socket.create_connection(("127.0.0.1", ports[0]))
        log.wait_for("not served", 5)  # /dev/ttyESP-a does not exist
        c.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
    for clash, said in [(f"127.0.0.1:{ports[2]}", f"both use port {ports[2]}")]:
        bad = tmp_path / "bad.toml"
        bad.write_text(config.read_text().replace(f"127.0.0.1:{ports[0]}", clash))
        r = subprocess.run([str(BIN), "check-config", "--config", str(bad)], capture_output=True, text=True)
        assert r.returncode == 78 and said in r.stderr and "boards a and b" in r.stderr, r.stderr


def test_a_flooded_or_stuck_board_does_not_slow_the_others(tmp_path):
    """Board a gets a client flooding SET-BAUDRATE and garbage, then one stuck behind an XOFF
    from its device; board b's client meanwhile exchanges data with its device. Every byte
    of b's arrives, in order, each round trip within a second."""
    from conftest import Pty
    from test_faults import discard_from
    from test_robustness import raw_client, recv_until, sb, server_replies
    import struct
    devices = {n: Pty() for n in ("a", "b")}
    ports = {n: (free_port(), free_port()) for n in ("a", "b")}
    config = tmp_path / "two.toml"
    config.write_text("[control]\nbackend = \"none\"\n" + "".join(
        f'[[board]]\nname = "{n}"\ndevice = "{devices[n].path}"\n'
        f'listen = ["127.0.0.1:{ports[n][0]}"]\nraw_listen = ["127.0.0.1:{ports[n][1]}"]\n'
        for n in ("a", "b")))
    proc = subprocess.Popen([str(BIN), "--config", str(config)], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL)
    log = LogReader(proc.stderr)
    try:
        log.wait_for("control lines:", 10)

        class Holder:
            port = ports["a"][0]

        flooder = raw_client(Holder)
        discard_from(flooder)
        stop = threading.Event()

        def flood():
            burst = b"".join(sb(1, struct.pack(">I", r)) for r in [230400, 115200] * 500)
            burst += os.urandom(64 * 1024).replace(b"\xff", b"\x00")
            while not stop.is_set():
                try:
                    flooder.sendall(burst)
                except OSError:
                    return
                devices["a"].drain()

        threading.Thread(target=flood, daemon=True).start()
        b = socket.create_connection(("127.0.0.1", ports["b"][1]), timeout=5)
        b.settimeout(5)
        worst = 0.0
        for i in range(200):
            msg = b"round trip %04d;" % i
            started = time.monotonic()
            b.sendall(msg)
            got = devices["b"].read(len(msg), timeout=5)
            assert got == msg, (i, got)
            devices["b"].write(msg[::-1])
            back = b""
            while len(back) < len(msg):
                back += b.recv(len(msg) - len(back))
            assert back == msg[::-1], (i, back)
            worst = max(worst, time.monotonic() - started)
            if i == 100:
                # Now board a's device stops reading (XOFF) under a client that keeps sending.
                stop.set()
                stuck = raw_client(Holder)
                stuck.sendall(sb(5, bytes([2])))
                devices["a"].write(b"\x13")
                threading.Thread(target=lambda: stuck.sendall(b"x" * 500_000), daemon=True).start()
        assert worst < 1.0, f"worst round trip on board b: {worst:.3f} s"
        b.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
        for d in devices.values():
            d.close()
