#!/usr/bin/env python3
"""esp-bridge benchmark: esp-bridge against ser2net, esptool's esp_rfc2217_server and pyserial's
PortManager, each started fresh in front of the same kind of device, in one run.

Run it through bench/run (which installs and builds what it needs and passes the paths in the
environment); `bench/run --help` lists the options. Sections:

  latency   1- and 64-byte round trips through an echo pty (p50/p99)
  bulk      throughput to the device, from the device, and both ways at once; server CPU
            seconds per MiB (utime+stime) and peak RSS (VmHWM)
  callgrind instructions per MiB under valgrind --tool=callgrind (lockstep transfer)
  esptool   esptool 5 write-flash / read-flash of 1 MiB to the virtual ESP32 paced at the
            wire rate (esp-sim --pace)
  boards    one service with 1, 2, 4 and 8 boards, all flashed at once through their raw
            ports, and one board flooded while the others flash (bench/boards.py)
  flash     the raw port's flash_baud against a local cable (bench/flash_rate.py)
  watchers  a flash with watchers attached against one without, and their memory
            (bench/watchers.py)

The esptool, latency and bulk sections run esp-bridge with flash_baud = 0 (the client's own
rate), so that they compare the bridge with a cable and its peers at the same rate; the flash
section shows what flash_baud adds.
"""

import argparse
import atexit
import datetime
import os
import platform
import random
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zlib

import serial
import serial.rfc2217

import boards
import flash_rate
import watchers

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
MiB = 1 << 20
PY = sys.executable

# --------------------------------------------------------------------------------------------
# Processes: every one is started in its own session, recorded, and killed on any exit.

PROCS = []
TMP = None


def spawn(args, log_name, env=None, stdin=subprocess.DEVNULL, stdout=None, text=False):
    log = open(os.path.join(TMP, log_name), "ab")
    p = subprocess.Popen(
        args,
        stdin=stdin,
        stdout=stdout if stdout is not None else log,
        stderr=log,
        env={**os.environ, **(env or {})},
        start_new_session=True,
        text=text,
    )
    p.log_path = log.name
    log.close()
    PROCS.append(p)
    return p


def stop(p, sig=signal.SIGTERM, timeout=10.0):
    """Stops a process this script started (its own process group), SIGKILL if it lingers."""
    if p.poll() is None:
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
    else:
        # The leader is gone; anything it left in its group goes too.
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if p in PROCS:
        PROCS.remove(p)


def cleanup():
    for p in list(PROCS):
        stop(p, timeout=3)
    if TMP and os.path.isdir(TMP) and not os.environ.get("BENCH_KEEP_TMP"):
        shutil.rmtree(TMP, ignore_errors=True)


def repeated(reps, cases, attempt, merge):
    """Runs every case `reps` times, interleaved, so that the machine's other work falls on
    all of them alike. `cases` is [(key, label)], `attempt(key)` returns a result dict (with
    "error" if it failed; an exception counts as that), and `merge(best, new)` keeps the better
    of two results. A case that ever succeeded is reported by its successes only."""
    results = {}
    for rep in range(reps):
        for key, label in cases:
            log(f"{label}, repetition {rep + 1}/{reps}")
            try:
                res = attempt(key)
            except Exception as e:  # noqa: BLE001
                res = {"error": str(e)}
            if "error" in res:
                log(f"  failed: {res['error']}")
                results.setdefault(key, res)
                continue
            secs = res["secs"] if isinstance(res["secs"], list) else [res["secs"]]
            log("  " + ", ".join(f"{s:.2f}" for s in secs) + " s")
            prev = results.get(key)
            results[key] = res if prev is None or "error" in prev else merge(prev, res)
    return results


class Interrupted(BaseException):
    """A signal asked the run to stop: not an Exception, so no per-measurement handler keeps
    going; main() stops everything it started and exits 130."""


def on_signal(signum, _frame):
    raise Interrupted(signal.Signals(signum).name)


def log_tail(p, n=15):
    try:
        with open(p.log_path, "rb") as f:
            lines = f.read().decode(errors="replace").splitlines()
        return "\n".join("    | " + line for line in lines[-n:])
    except OSError:
        return ""


# --------------------------------------------------------------------------------------------
# /proc helpers

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    """utime+stime of the whole process (all threads, also those that exited), seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def vm_hwm_kib(pid):
    """VmHWM, and the current RssAnon and RssFile beside it (KiB)."""
    got = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmHWM", "RssAnon", "RssFile"):
                got[key] = int(line.split()[1])
    return got or None


def listening(port):
    want = f"0100007F:{port:04X}"
    for table in ("/proc/net/tcp",):
        with open(table) as f:
            for line in f.readlines()[1:]:
                parts = line.split()
                if parts[1] == want and parts[3] == "0A":
                    return True
    return False


def wait_listening(proc, ports, timeout=20.0):
    deadline = time.monotonic() + timeout
    while True:
        if all(listening(p) for p in ports):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening:\n{log_tail(proc)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"server not listening on {ports} after {timeout:.0f} s:\n{log_tail(proc)}")
        time.sleep(0.02)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_line(stream, timeout, what):
    """One line from a child's stdout pipe, or an error after `timeout` seconds."""
    r, _, _ = select.select([stream], [], [], timeout)
    if not r:
        raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
    line = stream.readline()
    if not line:
        raise RuntimeError(f"{what}: the process ended")
    return line.strip()


# --------------------------------------------------------------------------------------------
# The device: bench/device.py in its own process (echo, sink or source).


class Device:
    def __init__(self, mode):
        self.proc = spawn([PY, os.path.join(BENCH, "device.py"), mode], f"device-{mode}.log",
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.path = read_line(self.proc.stdout, 10, "the device's pty path")

    def command(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def wait(self, word, timeout):
        got = read_line(self.proc.stdout, timeout, f"device '{word}'")
        if got != word:
            raise RuntimeError(f"device said {got!r}, expected {word!r}")

    def close(self):
        stop(self.proc)


# --------------------------------------------------------------------------------------------
# The servers.


class Server:
    """A running server in front of a device path. `port` is the TCP port to use."""

    def __init__(self, proc, port, kind, url_suffix="", ports=None):
        self.proc = proc
        self.port = port
        self.kind = kind  # "rfc2217" or "raw"
        self.url = (f"rfc2217://127.0.0.1:{port}{url_suffix}" if kind == "rfc2217"
                    else f"socket://127.0.0.1:{port}")
        wait_listening(proc, ports or [port], timeout=180 if "valgrind" in proc.args[0] else 20)

    @property
    def pid(self):
        return self.proc.pid

    def hwm_kib(self):
        try:
            return vm_hwm_kib(self.pid)
        except OSError:
            return None

    def close(self):
        stop(self.proc, timeout=120 if "valgrind" in self.proc.args[0] else 10)


class Route:
    """One way to reach the device: a server (or none: the floor) and the port kind to use."""

    def __init__(self, key, label, peer, kind, launch=None, url_suffix=""):
        self.key, self.label, self.peer, self.kind = key, label, peer, kind
        self._launch = launch
        self.url_suffix = url_suffix

    @property
    def floor(self):
        return self._launch is None

    def start(self, device_path, wrap=(), tag=""):
        return self._launch(self, device_path, list(wrap), tag)


def launch_esp_bridge(route, dev, wrap, tag):
    rfc, raw = free_port(), free_port()
    args = wrap + [CFG.bin, "--config", CFG.empty_toml, "--device", dev,
                   "--listen", f"127.0.0.1:{rfc}", "--raw-listen", f"127.0.0.1:{raw}", "--control", "none"]
    proc = spawn(args, f"esp-bridge{tag}.log", env=CFG.server_env)
    port = rfc if route.kind == "rfc2217" else raw
    return Server(proc, port, route.kind, ports=[rfc, raw])


def launch_ser2net(route, dev, wrap, tag):
    port = free_port()
    cfg = os.path.join(TMP, f"ser2net-{port}.yaml")
    with open(cfg, "w") as f:
        f.write(
            "%YAML 1.1\n---\n"
            "connection: &bench\n"
            f"  accepter: telnet(rfc2217),tcp,127.0.0.1,{port}\n"
            "  enable: on\n"
            f"  connector: serialdev,{dev},115200n81,local\n"
            "  options:\n"
            "    kickolduser: true\n"
            "    chardelay: false\n"
        )
    args = wrap + ["ser2net", "-n", "-u", "-c", cfg, "-P", os.path.join(TMP, f"ser2net-{port}.pid")]
    return Server(spawn(args, f"ser2net{tag}.log", env=CFG.server_env), port, "rfc2217")


def launch_esp_rfc2217_server(route, dev, wrap, tag):
    port = free_port()
    args = wrap + [PY, os.path.join(BENCH, "esp_rfc2217_launch.py"), dev, "-p", str(port)]
    return Server(spawn(args, f"esp_rfc2217_server{tag}.log", env=CFG.server_env), port, "rfc2217",
                  url_suffix=route.url_suffix)


def launch_pyserial(route, dev, wrap, tag):
    port = free_port()
    args = wrap + [PY, os.path.join(BENCH, "pyserial_rfc2217_server.py"), dev, str(port)]
    return Server(spawn(args, f"pyserial{tag}.log", env=CFG.server_env), port, "rfc2217")


def launch_relay(route, dev, wrap, tag):
    port = free_port()
    return Server(spawn(wrap + [CFG.relay, dev, str(port)], f"relay{tag}.log", env=CFG.server_env), port, "raw")


ROUTES = [
    Route("floor", "direct pty (floor)", False, "pty"),
    Route("eb-raw", "esp-bridge raw port", False, "raw", launch_esp_bridge),
    Route("eb-rfc", "esp-bridge RFC 2217", False, "rfc2217", launch_esp_bridge),
    Route("ser2net", "ser2net 4 RFC 2217", True, "rfc2217", launch_ser2net),
    Route("esptool-srv", "esp_rfc2217_server", True, "rfc2217", launch_esp_rfc2217_server,
          url_suffix="?ign_set_control"),
    Route("pyserial", "pyserial PortManager", True, "rfc2217", launch_pyserial),
    # Latency only: what the kernel's part of a bridged round trip costs (see relay.c).
    Route("relay", "reference: minimal C relay", False, "raw", launch_relay),
]
SERVER_ROUTES = [r for r in ROUTES if not r.floor]
PEERS = [r for r in ROUTES if r.peer]


# --------------------------------------------------------------------------------------------
# Clients.

IAC, DONT, DO, WONT, WILL, SB, SE = 255, 254, 253, 252, 251, 250, 240
COM_PORT = 44


class TelnetStrip:
    """Removes telnet commands from a received stream (the payload never contains 0xFF)."""

    def __init__(self):
        self.state = 0  # 0 data, 1 after IAC, 2 option byte, 3 in SB, 4 IAC in SB
        self.requests = []  # (verb, option) the server asked for

    def feed(self, chunk):
        """Returns the number of payload bytes in chunk."""
        if self.state == 0 and IAC not in chunk:
            return len(chunk)
        n = 0
        for b in chunk:
            s = self.state
            if s == 0:
                if b == IAC:
                    self.state = 1
                else:
                    n += 1
            elif s == 1:
                if b == IAC:
                    n += 1
                    self.state = 0
                elif b in (DO, DONT, WILL, WONT):
                    self.state = 2
                    self._verb = b
                elif b == SB:
                    self.state = 3
                else:
                    self.state = 0
            elif s == 2:
                self.requests.append((self._verb, b))
                self.state = 0
            elif s == 3:
                if b == IAC:
                    self.state = 4
            elif s == 4:
                self.state = 0 if b == SE else 3
        return n


class TcpClient:
    """A plain TCP client. With telnet=True it opens like pyserial's RFC 2217 client (the same
    option requests, polite answers to the server's), then moves raw payload (never 0xFF)."""

    def __init__(self, port, telnet):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.strip = TelnetStrip() if telnet else None
        if telnet:
            self._handshake()

    def _handshake(self):
        sent = {(DO, 1), (WILL, 3), (DO, 3), (DO, COM_PORT), (WILL, COM_PORT)}
        self.sock.sendall(bytes([IAC, DO, 1, IAC, WILL, 3, IAC, DO, 3, IAC, DO, COM_PORT, IAC, WILL, COM_PORT]))
        deadline = time.monotonic() + 3
        seen_com_port = False
        while time.monotonic() < deadline:
            r, _, _ = select.select([self.sock], [], [], 0.05)
            if r:
                data = self.sock.recv(65536)
                if not data:
                    raise RuntimeError("server closed during the telnet handshake")
                self.strip.feed(data)
                for verb, opt in self.strip.requests:
                    if verb == DO and opt == COM_PORT:
                        seen_com_port = True
                    answer = {DO: WILL if opt in (0, 3, COM_PORT) else WONT,
                              WILL: DO if opt in (0, 1, 3, COM_PORT) else DONT,
                              DONT: WONT, WONT: DONT}[verb]
                    if (answer, opt) not in sent:
                        sent.add((answer, opt))
                        self.sock.sendall(bytes([IAC, answer, opt]))
                self.strip.requests.clear()
            elif seen_com_port:
                break
        if not seen_com_port:
            raise RuntimeError("server never sent DO COM-PORT-OPTION")

    def payload(self, data):
        return self.strip.feed(data) if self.strip else len(data)

    def close(self):
        self.sock.close()


# --------------------------------------------------------------------------------------------
# Latency.


def pct(sorted_vals, q):
    i = min(len(sorted_vals) - 1, max(0, int(round(q * (len(sorted_vals) - 1)))))
    return sorted_vals[i]


def summarize(ns):
    s = sorted(ns)
    return {"p50": pct(s, 0.50) / 1000, "p99": pct(s, 0.99) / 1000, "n": len(s)}


def pattern(size, k):
    return bytes((k + i) % 255 for i in range(size))


def open_raw_tty(path):
    import tty
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
    tty.setraw(fd)
    return fd


def task_cpu_ns(pid):
    """On-CPU time of every live thread of pid (schedstat, ns): finer than utime+stime."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total


class LatencyPair:
    """One route with one client kind: a fresh echo device, a fresh server in front of it (none
    for the floor), and an open client. `once(msg)` is one timed round trip."""

    def __init__(self, route, client):
        self.route, self.client = route, client
        self.dev = Device("echo")
        self.server = None
        self.closer = None
        try:
            if route.floor:
                if client == "pyserial":
                    self.port = serial.Serial(self.dev.path, 115200, timeout=5)
                    self.closer = self.port.close
                    self.once = self._pyserial
                else:
                    self.fd = open_raw_tty(self.dev.path)
                    self.closer = lambda: os.close(self.fd)
                    self.once = self._fd
            else:
                self.server = route.start(self.dev.path, tag=f"-lat-{client}")
                if client == "pyserial":
                    self.port = serial.serial_for_url(self.server.url, baudrate=115200, timeout=5)
                    self.closer = self.port.close
                    self.once = self._pyserial
                else:
                    self.tcp = TcpClient(self.server.port, telnet=(route.kind == "rfc2217"))
                    self.closer = self.tcp.close
                    self.once = self._tcp
        except BaseException:
            self.close()
            raise

    def _pyserial(self, msg):
        t0 = time.perf_counter_ns()
        self.port.write(msg)
        got = self.port.read(len(msg))
        t1 = time.perf_counter_ns()
        if got != msg:
            raise RuntimeError(f"echo mismatch: sent {len(msg)} bytes, got {len(got)}")
        return t1 - t0

    def _tcp(self, msg):
        sock = self.tcp.sock
        t0 = time.perf_counter_ns()
        sock.sendall(msg)
        got = 0
        while got < len(msg):
            data = sock.recv(65536)
            if not data:
                raise RuntimeError("connection closed")
            got += self.tcp.payload(data)
        t1 = time.perf_counter_ns()
        return t1 - t0

    def _fd(self, msg):
        t0 = time.perf_counter_ns()
        os.write(self.fd, msg)
        got = 0
        while got < len(msg):
            got += len(os.read(self.fd, 65536))
        t1 = time.perf_counter_ns()
        return t1 - t0

    def cpu_ns(self):
        return task_cpu_ns(self.server.pid) if self.server else None

    def close(self):
        if self.closer:
            try:
                self.closer()
            except Exception:  # noqa: BLE001
                pass
            self.closer = None
        hwm = self.server.hwm_kib() if self.server else None
        if self.server:
            self.server.close()
        self.dev.close()
        return hwm


LAT_BURST = 25  # round trips in a row on one route before moving to the next


def run_latency_interleaved(pairs_wanted, n, warmup, blocks, note_hwm):
    """Every (route, client) pair is set up at once, each with its own fresh server and device;
    then the round trips are interleaved: each step does LAT_BURST round trips in a row on
    every pair, in a shuffled order (in a row, so each server runs warm as under real traffic;
    interleaved, so load from other work on the machine hits every pair alike and the ratios
    hold even when the absolute figures move); sizes alternate in blocks. Only one round trip
    is ever in flight: the other servers sleep.
    Returns {(route key, client): {size: summary} or {"error": ...}}."""
    results = {}
    pairs = []
    try:
        for route, client in pairs_wanted:
            log(f"latency: starting {route.label}, {client} client")
            try:
                pairs.append(LatencyPair(route, client))
            except Exception as e:  # noqa: BLE001
                results[(route.key, client)] = {"error": str(e)}
                log(f"  failed: {e}")
        rng = random.Random(2217)
        live = {id(p): p for p in pairs}
        samples = {(id(p), sz): [] for p in pairs for sz in (1, 64)}
        cpu = {(id(p), sz): 0 for p in pairs for sz in (1, 64)}
        order = list(pairs)
        for p in pairs:  # warm-up, not timed
            for k in range(warmup):
                p.once(pattern(1 + k % 64, k))
        per_block = n // blocks
        log(f"latency: {blocks} blocks of {per_block} 1-byte then {per_block} 64-byte round trips on "
            f"each of {len(pairs)} routes, interleaved")
        for b in range(blocks):
            for size in (1, 64):
                c0 = {i: p.cpu_ns() for i, p in live.items()}
                for k in range(per_block // LAT_BURST):
                    rng.shuffle(order)
                    for p in order:
                        if id(p) not in live:
                            continue
                        try:
                            for j in range(LAT_BURST):
                                samples[(id(p), size)].append(p.once(pattern(size, j)))
                        except Exception as e:  # noqa: BLE001
                            results[(p.route.key, p.client)] = {"error": str(e)}
                            del live[id(p)]
                for i, p in live.items():
                    if c0[i] is not None:
                        cpu[(i, size)] += p.cpu_ns() - c0[i]
        for i, p in live.items():
            res = {}
            for size in (1, 64):
                res[size] = summarize(samples[(i, size)])
                res[size]["cpu_us"] = cpu[(i, size)] / len(samples[(i, size)]) / 1000 if p.server else None
            results[(p.route.key, p.client)] = res
    finally:
        for p in pairs:
            note_hwm(p.route.key, p.close())
    return results


def syscalls_per_rt(route, n=500, warmup=50):
    """System calls the server makes per 1-byte round trip (tcp client), counted by strace -c -f
    attached to it after a warm-up. Counting only: strace slows the server, no timing is taken."""
    dev = Device("echo")
    server = route.start(dev.path, tag="-strace")
    out = os.path.join(TMP, f"strace-{route.key}.txt")
    st = None
    try:
        pair = TcpClient(server.port, telnet=(route.kind == "rfc2217"))
        for j in range(warmup):
            rt_once(pair, pattern(1, j))
        st = spawn(["strace", "-c", "-f", "-p", str(server.pid), "-o", out], f"strace-{route.key}.log")
        time.sleep(1.0)  # attached to every thread
        for j in range(n):
            rt_once(pair, pattern(1, j))
        time.sleep(0.2)
        stop(st, signal.SIGINT)
        st = None
        pair.close()
    finally:
        if st:
            stop(st)
        server.close()
        dev.close()
    with open(out) as f:
        for line in f:
            parts = line.split()
            if parts and parts[-1] == "total":
                return int(parts[3]) / n
    raise RuntimeError("no strace summary")


def rt_once(client, msg):
    client.sock.sendall(msg)
    got = 0
    while got < len(msg):
        data = client.sock.recv(65536)
        if not data:
            raise RuntimeError("connection closed")
        got += client.payload(data)


# --------------------------------------------------------------------------------------------
# Bulk.

BULK_CHUNK = 65536
BULK_DATA = bytes(range(255)) * (BULK_CHUNK // 255 + 1)


class FdEnd:
    """The floor's client end: the pty slave itself, made to look like a socket."""

    def __init__(self, path):
        self.fd = open_raw_tty(path)

    def fileno(self):
        return self.fd

    def sendall(self, data):
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]

    def send(self, data):
        return os.write(self.fd, data)

    def recv(self, n):
        return os.read(self.fd, n)

    def setblocking(self, flag):
        os.set_blocking(self.fd, flag)

    def close(self):
        os.close(self.fd)


def wait_device_open(pid, path, deadline):
    """Waits until process `pid` has `path` open (its /proc fd links), or raises."""
    target = os.path.realpath(path)
    while time.monotonic() < deadline:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                        return
                except OSError:
                    continue
        except OSError:
            pass
        time.sleep(0.002)
    raise RuntimeError(f"the server did not open {path} in time")


def bulk_once(route, mode, nbytes, timeout):
    """One transfer through a fresh server in front of a fresh device. Returns a dict."""
    dev = Device({"up": "sink", "down": "source", "both": "echo"}[mode])
    server = None
    end = None
    client = None
    try:
        if route.floor:
            end = FdEnd(dev.path)
            count = len
        else:
            server = route.start(dev.path, tag=f"-bulk-{mode}")
            client = TcpClient(server.port, telnet=(route.kind == "rfc2217"))
            end = client.sock
            count = client.payload
            if mode == "down":
                # A raw client has no handshake to wait for, and esp-bridge empties the tty's
                # input when its session opens the device (bytes from before are stale): the
                # device starts sending only once the server holds it open. A client that has
                # never written is a watcher on esp-bridge (its output may be dropped when it
                # falls behind), so the client writes one byte first, as every terminal user
                # does, and the transfer starts once that byte reached the device (every
                # server gets the same byte).
                wait_device_open(server.pid, dev.path, deadline=time.monotonic() + 10)
                dev.command("expect 1")
                end.sendall(b"\r")
                dev.wait("done", 10)
            cpu0 = cpu_seconds(server.pid)
            ns0 = task_cpu_ns(server.pid)
        deadline = time.monotonic() + timeout
        if mode == "up":
            dev.command(f"expect {nbytes}")
            t0 = time.perf_counter()
            left = nbytes
            while left:
                k = min(left, BULK_CHUNK)
                end.sendall(BULK_DATA[:k])
                left -= k
            dev.wait("done", max(1.0, deadline - time.monotonic()))
            t1 = time.perf_counter()
        elif mode == "down":
            t0 = time.perf_counter()
            dev.command(f"send {nbytes}")
            got = 0
            end_sock = end
            while got < nbytes:
                r, _, _ = select.select([end_sock], [], [], max(0.0, deadline - time.monotonic()))
                if not r:
                    raise RuntimeError(f"timeout after {got} of {nbytes} bytes")
                data = end_sock.recv(262144)
                if not data:
                    raise RuntimeError("connection closed")
                got += count(data)
            t1 = time.perf_counter()
        else:
            end.setblocking(False)
            t0 = time.perf_counter()
            sent = got = 0
            while got < nbytes:
                wl = [end] if sent < nbytes else []
                r, w, _ = select.select([end], wl, [], max(0.0, deadline - time.monotonic()))
                if not r and not w:
                    raise RuntimeError(f"timeout after {got} of {nbytes} bytes")
                if w:
                    try:
                        sent += end.send(BULK_DATA[:min(BULK_CHUNK, nbytes - sent)])
                    except (BlockingIOError, InterruptedError):
                        pass
                if r:
                    try:
                        data = end.recv(262144)
                    except (BlockingIOError, InterruptedError):
                        data = None
                    if data == b"":
                        raise RuntimeError("connection closed")
                    if data:
                        got += count(data)
            t1 = time.perf_counter()
        bridged = nbytes * (2 if mode == "both" else 1)
        res = {"secs": t1 - t0, "mib_s": nbytes / MiB / (t1 - t0), "bridged": bridged}
        if server:
            res["cpu"] = cpu_seconds(server.pid) - cpu0
            res["cpu_ns"] = task_cpu_ns(server.pid) - ns0
            res["hwm"] = server.hwm_kib()
        return res
    finally:
        if client:
            client.close()
        elif end:
            end.close()
        if server:
            server.close()
        dev.close()


# --------------------------------------------------------------------------------------------
# Callgrind: instructions per MiB for a lockstep transfer.

CG_CHUNK = 4096


def callgrind_once(route, nbytes, chunk=CG_CHUNK):
    """Runs the server under callgrind, moves nbytes each way in lockstep `chunk`-byte pieces
    (one in flight, so each is one read and one write at every hop whatever the speed),
    stops it, and returns the total instruction count (Ir)."""
    import pty
    import tty
    master, slave = pty.openpty()
    tty.setraw(master)
    tty.setraw(slave)
    path = os.ttyname(slave)
    out = os.path.join(TMP, f"callgrind-{route.key}-{nbytes}x{chunk}-{time.monotonic_ns()}.out")
    wrap = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--dump-instr=no"]
    server = route.start(path, wrap=wrap, tag=f"-callgrind-{nbytes}")
    try:
        c = TcpClient(server.port, telnet=(route.kind == "rfc2217"))
        c.sock.settimeout(120)
        piece = BULK_DATA[:chunk]
        for _ in range(nbytes // chunk):
            c.sock.sendall(piece)
            got = 0
            while got < chunk:
                r, _, _ = select.select([master], [], [], 120)
                if not r:
                    raise RuntimeError("callgrind up: timeout")
                got += len(os.read(master, 65536))
        for _ in range(nbytes // chunk):
            os.write(master, piece)
            got = 0
            while got < chunk:
                data = c.sock.recv(65536)
                if not data:
                    raise RuntimeError("callgrind down: closed")
                got += c.payload(data)
        c.close()
        time.sleep(1.0)  # let the server see the close and settle
    finally:
        server.close()
        os.close(master)
        os.close(slave)
    with open(out) as f:
        for line in f:
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    raise RuntimeError(f"no totals in {out}")


# --------------------------------------------------------------------------------------------
# esptool against the paced virtual ESP32.


def image_file(size):
    """The benchmark's image of `size` bytes, written to the run's directory."""
    path = os.path.join(TMP, "image.bin")
    with open(path, "wb") as f:
        f.write(make_image(size))
    return path


def timed_write_flash(cmd, timeout):
    """Runs an esptool write-flash command: {"secs"} on success (whole command), {"error"}
    with esptool's last lines otherwise."""
    t0 = time.perf_counter()
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    secs = time.perf_counter() - t0
    text = r.stdout.decode(errors="replace")
    if r.returncode != 0 or "Hash of data verified" not in text:
        return {"error": f"rc {r.returncode}: " + " / ".join(text.strip().splitlines()[-3:])}
    return {"secs": secs}


def make_image(size):
    """A deterministic image that zlib -9 (esptool's compression) shrinks to about half, as it
    does ESP-IDF application images (50-65 %): 4 KiB blocks of 1664 random bytes followed by
    2432 low-entropy ones."""
    r = random.Random(2217)
    out = bytearray()
    while len(out) < size:
        out += r.randbytes(1664)
        out += bytes(r.choices(b"\x00\xff\x01\x20", weights=[40, 4, 1, 1], k=4096 - 1664))
    return bytes(out[:size])


class Sim:
    def __init__(self, tag, event_log=None):
        link = os.path.join(TMP, f"esp32-{tag}")
        extra = ["--event-log", event_log] if event_log else []
        self.proc = spawn([CFG.sim, "--pace", "--boot", "download", "--link", link, *extra],
                          f"sim-{tag}.log", stdout=subprocess.PIPE, text=True)
        read_line(self.proc.stdout, 10, "the sim's device path")
        self.path = os.path.realpath(link)

    def close(self):
        stop(self.proc)


def esptool_once(route, op, image_path, size, timeout):
    tag = f"{route.key}-{op}-{time.monotonic_ns()}"
    sim = Sim(tag)
    server = None
    try:
        if route.floor:
            port = sim.path
        else:
            server = route.start(sim.path, tag=f"-esptool-{op}")
            port = server.url
        base = [CFG.esptool, "--port", port, "--before", "no-reset", "--after", "no-reset"]
        if op == "write115":
            cmd = base + ["-b", "115200", "write-flash", "0x10000", image_path]
        elif op == "write921":
            cmd = base + ["-b", "921600", "write-flash", "0x10000", image_path]
        else:
            readback = os.path.join(TMP, f"read-{tag}.bin")
            cmd = base + ["-b", "921600", "read-flash", "0", str(size), readback]
        t0 = time.perf_counter()
        try:
            r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout,
                               stdin=subprocess.DEVNULL)
            secs = time.perf_counter() - t0
        except subprocess.TimeoutExpired:
            return {"error": f"timeout {timeout:.0f} s", "cmd": cmd}
        text = r.stdout.decode(errors="replace")
        ok = r.returncode == 0 and (
            "Hash of data verified" in text if op.startswith("write")
            else os.path.getsize(readback) == size)
        if not ok:
            return {"error": f"rc {r.returncode}: " + " / ".join(text.strip().splitlines()[-3:]), "cmd": cmd}
        return {"secs": secs, "cmd": cmd}
    finally:
        if server:
            server.close()
        sim.close()


# --------------------------------------------------------------------------------------------
# Reporting.


def fmt(v, digits=1):
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if v >= 100:
        return f"{v:.0f}"
    return f"{v:.{digits}f}"


def ratio(v, best):
    if v is None or best in (None, 0) or isinstance(v, str):
        return "-"
    return f"{v / best:.2f}x"


def best_of(values, lower_is_better=True):
    vals = [v for v in values if isinstance(v, (int, float))]
    if not vals:
        return None
    return min(vals) if lower_is_better else max(vals)


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=30).stdout.strip()
    except Exception as e:  # noqa: BLE001
        return f"({e})"


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def cpu_model():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


# --------------------------------------------------------------------------------------------


class Config:
    pass


CFG = Config()


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def main():
    global TMP
    ap = argparse.ArgumentParser(prog="bench/run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer iterations, smaller transfers (~3 min)")
    ap.add_argument("--only", default="latency,bulk,callgrind,esptool,boards,flash,watchers",
                    help="comma-separated sections to run (default: all)")
    ap.add_argument("--routes", default=",".join(r.key for r in ROUTES),
                    help="comma-separated routes: " + ",".join(r.key for r in ROUTES))
    ap.add_argument("--no-write", action="store_true", help="do not rewrite bench/RESULTS.md")
    args = ap.parse_args()
    sections = set(args.only.split(","))
    wanted = args.routes.split(",")
    routes = [r for r in ROUTES if r.key in wanted]

    TMP = tempfile.mkdtemp(prefix="esp-bridge-bench-")
    atexit.register(cleanup)
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)

    quick = args.quick
    lat_n = 1000 if quick else 3000  # round trips per size and route
    lat_warm = 100 if quick else 200
    lat_blocks = 2 if quick else 4
    bulk_n = (4 if quick else 20) * MiB
    bulk_reps = 1 if quick else 2
    cg_n = (256 << 10) if quick else (1 * MiB)
    cg_py_n = 64 << 10
    cg_msgs = 200 if quick else 1000
    img_size = (512 << 10) if quick else MiB
    esptool_ops = ["write921"] if quick else ["write115", "write921", "read921"]

    # Inputs from bench/run.
    CFG.bin = os.path.join(TMP, "esp-bridge")
    shutil.copy2(os.environ["BENCH_ESP_BRIDGE"], CFG.bin)  # immune to rebuilds during the run
    # The virtual ESP32 (crates/esp-sim) is the same for every route: this tree's build.
    CFG.sim = os.path.join(TMP, "esp-sim")
    shutil.copy2(os.environ["BENCH_ESP_SIM"], CFG.sim)
    CFG.esptool = os.path.join(os.path.dirname(PY), "esptool")
    CFG.empty_toml = os.path.join(TMP, "empty.toml")
    # The client's own rate on the raw port (flash_baud = 0), where the build knows the key
    # (a build from before it is compared as it is).
    with open(CFG.empty_toml, "w") as f:
        f.write("[serial]\nflash_baud = 0\n")
    if subprocess.run([CFG.bin, "check-config", "--config", CFG.empty_toml, "--control", "none"],
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 78:
        open(CFG.empty_toml, "w").close()
    shim = os.path.join(TMP, "ptymodem.so")
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", shim, os.path.join(BENCH, "ptymodem.c"), "-ldl"],
                   check=True)
    CFG.relay = os.path.join(TMP, "relay")
    subprocess.run(["cc", "-O2", "-o", CFG.relay, os.path.join(BENCH, "relay.c")], check=True)
    CFG.server_env = {"LD_PRELOAD": shim, "RUST_LOG": "info"}

    started = datetime.datetime.now().astimezone()
    t_start = time.monotonic()
    load_start = loadavg()
    ser2net_deb = sh("dpkg-query -W -f='${Version}' ser2net")
    esptool_version = sh(shlex.quote(PY) + " -c 'import esptool; print(esptool.__version__)'")
    command = os.environ.get("BENCH_COMMAND", "bench/run " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    head = [
        f"- command: `{command}`",
        f"- date: {started.isoformat(timespec='seconds')}",
        f"- machine: {os.cpu_count()} CPUs (nproc {sh('nproc')}), {cpu_model()}, "
        f"Linux {platform.release()}, {sh('. /etc/os-release; echo $PRETTY_NAME')}",
        f"- load average at start: {load_start}",
        (f"- esp-bridge: {sh(CFG.bin + ' --version')} (git {sh('git -C ' + shlex.quote(ROOT) + ' describe --always --dirty')}),"
         f" {sh('rustc --version')}, `cargo build --release`" if not os.environ.get("BENCH_ESP_BRIDGE_OVERRIDDEN") else
         f"- esp-bridge: {sh(CFG.bin + ' --version')}, the build named by BENCH_ESP_BRIDGE="
         f"{os.environ['BENCH_ESP_BRIDGE']} (not this tree's)"),
        f"- ser2net: {sh('ser2net -v')} (Debian package {ser2net_deb})",
        f"- esptool {esptool_version}, "
        f"pyserial {serial.VERSION}, Python {platform.python_version()} ({PY})",
        f"- {sh('valgrind --version')}; {sh('strace -V | head -1')}; {sh('cc --version | head -1')};"
        f" perf: {'available' if shutil.which('perf') else 'not installed'}",
        f"- mode: {'--quick' if quick else 'full'}; latency {lat_n} round trips per size and route"
        f" after {lat_warm} warm-up ones, interleaved over the routes in {lat_blocks} blocks per size;"
        f" bulk {bulk_n // MiB} MiB per direction, best of {bulk_reps}; callgrind {cg_n >> 10} KiB each way"
        f" ({cg_py_n >> 10} KiB for the Python servers) in {CG_CHUNK}-byte lockstep;"
        f" esptool image {img_size >> 10} KiB",
    ]
    print("\n".join(head), flush=True)
    results = {"lat": {}, "bulk": {}, "cg": {}, "esptool": {}, "hwm": {}, "boards": {}}

    def note_hwm(key, mem):
        if mem and "VmHWM" in mem:
            prev = results["hwm"].get(key)
            if prev is None or mem["VmHWM"] > prev["VmHWM"]:
                results["hwm"][key] = mem

    try:
        # ---- latency
        if "latency" in sections:
            wanted = [(r, c) for r in routes
                      for c in (["pyserial", "tcp"] if r.kind in ("rfc2217", "pty") else ["tcp"])]
            results["lat"] = run_latency_interleaved(wanted, lat_n, lat_warm, lat_blocks, note_hwm)
            if shutil.which("strace"):
                for r in routes:
                    if r.floor or "error" in results["lat"].get((r.key, "tcp"), {"error": 1}):
                        continue
                    log(f"latency: system calls per round trip, {r.label} (strace -c)")
                    try:
                        results["lat"][(r.key, "tcp")]["syscalls"] = syscalls_per_rt(r)
                    except Exception as e:  # noqa: BLE001
                        log(f"  failed: {e}")

        # ---- bulk: repetitions interleaved over the routes; the best throughput of each
        # (the run least disturbed by other work on the machine) and the least CPU are kept.
        if "bulk" in sections:
            for rep in range(bulk_reps):
                for r in routes:
                    if r.key == "relay":
                        continue
                    for mode in ("up", "down", "both"):
                        key = (r.key, mode)
                        if "error" in results["bulk"].get(key, {}):
                            continue
                        log(f"bulk {rep + 1}/{bulk_reps}: {r.label}, {mode}")
                        try:
                            res = bulk_once(r, mode, bulk_n, timeout=120)
                            note_hwm(r.key, res.get("hwm"))
                        except Exception as e:  # noqa: BLE001
                            results["bulk"][key] = {"error": str(e)}
                            log(f"  failed: {e}")
                            continue
                        prev = results["bulk"].get(key)
                        if prev:
                            res["mib_s"] = max(res["mib_s"], prev["mib_s"])
                            if "cpu" in res:
                                res["cpu"] = min(res["cpu"], prev["cpu"])
                                res["cpu_ns"] = min(res["cpu_ns"], prev["cpu_ns"])
                        results["bulk"][key] = res

        # ---- callgrind
        if "callgrind" in sections:
            for r in routes:
                if r.floor or r.key == "relay":
                    continue
                python = r.key in ("esptool-srv", "pyserial")
                n = cg_py_n if python else cg_n
                if python and quick:
                    continue
                log(f"callgrind: {r.label} (a 0-byte baseline, {n >> 10} KiB each way, {cg_msgs} 1-byte messages each way)")
                try:
                    base = callgrind_once(r, 0)
                    full = callgrind_once(r, n)
                    msgs = callgrind_once(r, cg_msgs, chunk=1)
                    results["cg"][r.key] = {"per_mib": (full - base) / (2 * n / MiB), "base": base,
                                            "per_msg": (msgs - base) / (2 * cg_msgs)}
                except Exception as e:  # noqa: BLE001
                    results["cg"][r.key] = {"error": str(e)}
                    log(f"  failed: {e}")

        # ---- esptool
        if "esptool" in sections:
            image = os.path.join(TMP, "image.bin")
            data = make_image(img_size)
            with open(image, "wb") as f:
                f.write(data)
            results["image_ratio"] = len(zlib.compress(data, 9)) / len(data)
            for op in esptool_ops:
                for r in routes:
                    if r.key == "relay":
                        continue
                    log(f"esptool {op}: {r.label}")
                    timeout = 400 if op == "write115" else 240
                    try:
                        res = esptool_once(r, op, image, img_size, timeout)
                    except Exception as e:  # noqa: BLE001
                        res = {"error": str(e)}
                    if "error" in res:
                        log(f"  failed: {res['error']}")
                    else:
                        log(f"  {res['secs']:.1f} s")
                    results["esptool"][(r.key, op)] = res

        # ---- many boards behind one service
        if "boards" in sections:
            image = image_file(img_size)
            results["boards"] = boards.run(sys.modules[__name__], image, img_size,
                                           counts=(1, 2, 4) if quick else (1, 2, 4, 8),
                                           reps=1 if quick else 2)
            results["boards_size"] = img_size

        # ---- the raw port's flash rate
        if "flash" in sections:
            image = image_file(img_size)
            results["flash"] = flash_rate.run(sys.modules[__name__], image, reps=1 if quick else 2)
            results["flash_size"] = img_size

        # ---- watchers beside the writer
        if "watchers" in sections:
            image = image_file(img_size)
            results["watchers"] = watchers.run(sys.modules[__name__], image, reps=1 if quick else 3)
            results["watchers_size"] = img_size
    except Interrupted as e:
        log(f"interrupted ({e}): stopping every process this run started")
        cleanup()
        sys.exit(130)

    load_end = loadavg()
    elapsed = time.monotonic() - t_start
    tail = [f"- load average at end: {load_end}; wall time {elapsed / 60:.1f} min"]
    body = report(results, routes, esptool_ops, img_size, quick)
    text = "\n".join(head + tail) + "\n\n" + body
    print("\n".join(tail))
    print()
    print(body, flush=True)
    if not args.no_write:
        write_results(text)
        if not quick and len(routes) == len(ROUTES) and sections == {"latency", "bulk", "callgrind", "esptool",
                                                                      "boards", "flash", "watchers"}:
            write_readme_summary(head[:3] + head[4:5], summary(results, routes))


def report(results, routes, esptool_ops, img_size, quick):
    out = []
    peers = [r for r in routes if r.peer]
    lat = results["lat"]
    if lat:
        out.append("### 1. Round-trip latency through an echo pty (µs)\n")
        out.append("Client `pyserial`: pyserial's rfc2217 client (serial.Serial on the pty for the "
                   "floor); `tcp`: a plain socket (telnet handshake only on RFC 2217 ports; os.read/"
                   "os.write on the pty for the floor). Ratios: p50 over the best peer's p50 with the "
                   "same client. All routes run at once, each with its own fresh server and echo "
                   f"device; their round trips are interleaved in runs of {LAT_BURST} in shuffled order, "
                   "so load from other work on the machine hits them alike. Server CPU: on-CPU time of "
                   "all its threads (schedstat) per round trip, user and kernel. Server syscalls: "
                   "counted by `strace -c -f` over 500 1-byte round trips in a separate run.\n")
        rows = []
        best = {}
        for c in ("pyserial", "tcp"):
            for sz in (1, 64):
                best[(c, sz)] = best_of(lat.get((p.key, c), {}).get(sz, {}).get("p50") for p in peers)
        for c in ("pyserial", "tcp"):
            for r in routes:
                res = lat.get((r.key, c))
                if res is None:
                    continue
                if "error" in res:
                    rows.append([r.label, c, "error: " + res["error"][:80]] + [""] * 8)
                    continue
                row = [r.label, c]
                for sz in (1, 64):
                    row += [fmt(res[sz]["p50"]), fmt(res[sz]["p99"]), ratio(res[sz]["p50"], best[(c, sz)])]
                row += [fmt(res[1].get("cpu_us")), fmt(res[64].get("cpu_us"))]
                sc = res.get("syscalls")
                row += [f"{sc:.1f}" if sc else "-"]
                rows.append(row)
        out.append(table(["route", "client", "1 B p50", "1 B p99", "p50 / best peer",
                          "64 B p50", "64 B p99", "p50 / best peer",
                          "server CPU µs/RT 1 B", "64 B", "server syscalls/RT"], rows))
        out.append("")

    routes = [r for r in routes if r.key != "relay"]  # the relay is a latency reference only
    bulk = results["bulk"]
    if bulk:
        out.append("### 2-4. Bulk throughput (MiB/s), server CPU per MiB bridged, peak RSS\n")
        out.append("up = client to device, down = device to client, both = both at once (echo; "
                   "MiB/s each way); a plain TCP client (telnet handshake only on RFC 2217 ports), "
                   "payload never 0xFF, every transfer through a fresh server and device; the best of "
                   "the repetitions. CPU = server utime+stime (/proc/PID/stat, 10 ms ticks) over the three "
                   "transfers (the least of the repetitions each) / MiB bridged (both counts twice); "
                   "schedstat = the same from the threads' on-CPU nanoseconds, as a finer cross-check. Peak RSS = the highest "
                   "VmHWM of all the server's fresh instances in this run (latency and bulk); beside it "
                   "that instance's RssAnon at its end (the rest is mapped program and library "
                   "files).\n")
        modes = ("up", "down", "both")
        best_tp = {m: best_of((bulk.get((p.key, m), {}).get("mib_s") for p in peers), False) for m in modes}
        cpu, cpu_ss = {}, {}
        for r in routes:
            tot_cpu = tot_ns = tot_b = 0.0
            okk = True
            for m in modes:
                b = bulk.get((r.key, m), {})
                if "cpu" not in b:
                    okk = False
                    break
                tot_cpu += b["cpu"]
                tot_ns += b["cpu_ns"]
                tot_b += b["bridged"]
            if okk and tot_b:
                cpu[r.key] = tot_cpu / (tot_b / MiB) * 1000
                cpu_ss[r.key] = tot_ns / 1e6 / (tot_b / MiB)
                # Too few clock ticks to mean anything: say so rather than print 0.
                if tot_cpu * CLK_TCK < 3:
                    cpu[r.key] = f"<{3 / CLK_TCK / (tot_b / MiB) * 1000:.2f}"
        best_cpu = best_of(cpu.get(p.key) for p in peers)
        best_ss = best_of(cpu_ss.get(p.key) for p in peers)
        hwm = {k: v["VmHWM"] / 1024 for k, v in results["hwm"].items()}
        anon = {k: v.get("RssAnon", 0) / 1024 for k, v in results["hwm"].items()}
        best_hwm = best_of(hwm.get(p.key) for p in peers)
        rows = []
        for r in routes:
            row = [r.label]
            for m in modes:
                b = bulk.get((r.key, m))
                if b is None:
                    row += ["-", "-"]
                elif "error" in b:
                    row += ["error", "-"]
                    log(f"bulk {r.key} {m}: {b['error']}")
                else:
                    row += [fmt(b["mib_s"]), ratio(b["mib_s"], best_tp[m])]
            row += [fmt(cpu.get(r.key), 2), ratio(cpu.get(r.key), best_cpu),
                    fmt(cpu_ss.get(r.key), 2), ratio(cpu_ss.get(r.key), best_ss),
                    fmt(hwm.get(r.key), 1), ratio(hwm.get(r.key), best_hwm),
                    fmt(anon.get(r.key), 1)]
            rows.append(row)
        out.append(table(["route", "up", "/ best", "down", "/ best", "both", "/ best",
                          "CPU ms/MiB", "/ best", "schedstat ms/MiB", "/ best",
                          "peak RSS MiB", "/ best", "of it anonymous"], rows))
        out.append("")
        results["cpu_per_mib"] = cpu
        results["cpu_ss_per_mib"] = cpu_ss
        results["hwm_mib"] = hwm
        results["anon_mib"] = anon

    cg = results["cg"]
    if cg:
        out.append("### 5. Instructions per MiB under callgrind\n")
        out.append(f"Lockstep transfers (one piece in flight) each way: {CG_CHUNK}-byte pieces for "
                   "the per-MiB figure, 1-byte messages for the per-message one; each minus a 0-byte "
                   "baseline run (start, connect, handshake, close, stop); all threads, user space "
                   "only (the kernel's share is not counted).\n")
        best_cg = best_of(cg.get(p.key, {}).get("per_mib") for p in peers)
        best_msg = best_of(cg.get(p.key, {}).get("per_msg") for p in peers)
        rows = []
        for r in routes:
            c = cg.get(r.key)
            if c is None:
                continue
            if "error" in c:
                rows.append([r.label, "error: " + c["error"][:80], "", "", "", ""])
            else:
                rows.append([r.label, f"{c['per_mib'] / 1e6:.2f} M", ratio(c["per_mib"], best_cg),
                             f"{c['per_msg'] / 1e3:.1f} k", ratio(c["per_msg"], best_msg),
                             f"{c['base'] / 1e6:.1f} M"])
        out.append(table(["route", "instructions/MiB", "/ best peer", "instructions per 1-byte message",
                          "/ best peer", "baseline run"], rows))
        out.append("")

    est = results["esptool"]
    if est:
        out.append("### 6. esptool 5 against the virtual ESP32 paced at the wire rate (s, whole command)\n")
        out.append(f"`esp-sim --pace --boot download`; image {img_size >> 10} KiB, deterministic, "
                   f"zlib -9 to {results.get('image_ratio', 0) * 100:.0f} %; every route "
                   "`--before no-reset --after no-reset`; esp_rfc2217_server needs `?ign_set_control`."
                   " read = `-b 921600 read-flash` of the same size.\n")
        names = {"write115": "write 115200", "write921": "write -b 921600", "read921": "read -b 921600"}
        rows = []
        best_peer = {op: best_of(est.get((p.key, op), {}).get("secs") for p in peers) for op in esptool_ops}
        floor = {op: est.get(("floor", op), {}).get("secs") for op in esptool_ops}
        for r in routes:
            row = [r.label]
            for op in esptool_ops:
                e = est.get((r.key, op))
                if e is None:
                    row += ["-", "-", "-"]
                elif "error" in e:
                    row += ["error", "-", "-"]
                    log(f"esptool {r.key} {op}: {e['error']}")
                else:
                    row += [f"{e['secs']:.2f}", ratio(e["secs"], floor[op]), ratio(e["secs"], best_peer[op])]
            rows.append(row)
        hdr = ["route"]
        for op in esptool_ops:
            hdr += [names[op], "/ floor", "/ best peer"]
        out.append(table(hdr, rows))
        out.append("")

    board_lines = []
    if results.get("boards"):
        text, board_lines = boards.report(results["boards"], results["boards_size"], table,
                                          lambda ok: "**met**" if ok else "**missed**")
        out.append(text)
    if results.get("flash"):
        text, lines = flash_rate.report(results["flash"], results["flash_size"], table,
                                        lambda ok: "**met**" if ok else "**missed**")
        out.append(text)
        board_lines += lines
    if results.get("watchers"):
        text, lines = watchers.report(results["watchers"], results["watchers_size"], table,
                                      lambda ok: "**met**" if ok else "**missed**")
        out.append(text)
        board_lines += lines

    out.append("### Targets\n")
    out.append(targets(results, routes, esptool_ops))
    if board_lines:
        out.append("\n".join(board_lines))
    return "\n".join(out)


def targets(results, routes, esptool_ops):
    lines = []
    peers = [r.key for r in routes if r.peer]

    def verdict(ok):
        return "**met**" if ok else "**missed**"

    est = results["esptool"]
    if est:
        for op in esptool_ops:
            raw = est.get(("eb-raw", op), {}).get("secs")
            floor = est.get(("floor", op), {}).get("secs")
            if raw and floor:
                lines.append(f"- esptool {op}: raw port / direct pty = {raw / floor:.2f}x (target <= 1.15x): "
                             f"{verdict(raw / floor <= 1.15)}")
            peer_secs = [est.get((p, op), {}).get("secs") for p in peers]
            peer_secs = [s for s in peer_secs if s]
            if raw and peer_secs:
                worst = min(peer_secs) / raw
                ceiling = f"; a raw port costing nothing would reach {min(peer_secs) / floor:.2f}x" if floor else ""
                lines.append(f"- esptool {op}: raw port speed-up over the fastest RFC 2217 peer = {worst:.2f}x "
                             f"(target >= 5x over every peer{ceiling}): {verdict(worst >= 5)}")
            rfc = est.get(("eb-rfc", op), {}).get("secs")
            if rfc and peer_secs:
                best = min(peer_secs)
                v = verdict(rfc <= best) if rfc <= best or rfc > best * 1.02 else "**met (a tie: within 2 %, run-to-run noise)**"
                lines.append(f"- esptool {op}: esp-bridge RFC 2217 / fastest peer = {rfc:.2f} s / {best:.2f} s = "
                             f"{rfc / best:.3f}x (target <= 1.00x): {v}")
    lat = results["lat"]
    for c in ("pyserial", "tcp"):
        for key, name in (("eb-rfc", "esp-bridge RFC 2217"), ("eb-raw", "esp-bridge raw port")):
            if key == "eb-raw" and c != "tcp":
                continue
            for sz in (1, 64):
                mine = lat.get((key, c), {}).get(sz, {}).get("p50")
                best = best_of(lat.get((p, c), {}).get(sz, {}).get("p50") for p in peers)
                if not (mine and best):
                    continue
                refs = []
                for ref, label in (("floor", "the direct pty, no server at all"),
                                   ("relay", "the minimal C relay")):
                    v = lat.get((ref, c), {}).get(sz, {}).get("p50")
                    if v:
                        refs.append(f"{label} {v / best:.2f}x")
                refs = f"; for scale: {', '.join(refs)}" if refs else ""
                lines.append(f"- latency p50, {sz} B, {c} client: {name} / best peer = "
                             f"{mine / best:.2f}x (target <= 0.5x{refs}): {verdict(mine / best <= 0.5)}")
    cpu = results.get("cpu_per_mib", {})
    cpu_ss = results.get("cpu_ss_per_mib", {})
    best = best_of(cpu.get(p) for p in peers)
    best_ss = best_of(cpu_ss.get(p) for p in peers)
    for key in ("eb-rfc", "eb-raw"):
        mine = cpu.get(key)
        if isinstance(mine, (int, float)) and best:
            lines.append(f"- CPU per MiB, {key}: {mine:.2f} ms vs best peer {best:.2f} ms = "
                         f"{mine / best:.2f}x (target <= 0.5x): {verdict(mine / best <= 0.5)}")
        elif cpu_ss.get(key) and best_ss:
            lines.append(f"- CPU per MiB, {key}: utime+stime {mine} ms (under its resolution); schedstat "
                         f"{cpu_ss[key]:.2f} ms vs best peer {best_ss:.2f} ms = {cpu_ss[key] / best_ss:.2f}x "
                         f"(target <= 0.5x): {verdict(cpu_ss[key] / best_ss <= 0.5)}")
    hwm = results.get("hwm_mib", {})
    anon = results.get("anon_mib", {})
    for key in ("eb-rfc", "eb-raw"):
        if hwm.get(key):
            lines.append(f"- peak RSS, {key}: {hwm[key]:.2f} MiB, of it {anon.get(key, 0):.2f} MiB anonymous "
                         f"(target <= 4 MiB): {verdict(hwm[key] <= 4)}")
    return "\n".join(lines) if lines else "(no targets measured in this run)"


def summary(results, routes):
    """One row per route with the headline figures, for the README."""
    peers = [r for r in routes if r.peer]
    lat = results["lat"]
    est = results["esptool"]
    cpu = results.get("cpu_per_mib", {})
    hwm = results.get("hwm_mib", {})

    def p50(key):
        return lat.get((key, "tcp"), {}).get(1, {}).get("p50")

    def secs(key, op):
        return est.get((key, op), {}).get("secs")

    best = {
        "lat": best_of(p50(p.key) for p in peers),
        "cpu": best_of(cpu.get(p.key) for p in peers),
        "hwm": best_of(hwm.get(p.key) for p in peers),
        "w921": best_of(secs(p.key, "write921") for p in peers),
    }
    rows = []
    for r in routes:
        if r.key == "relay":
            continue
        w = secs(r.key, "write921")
        rows.append([r.label,
                     fmt(p50(r.key)), ratio(p50(r.key), best["lat"]),
                     fmt(cpu.get(r.key), 2), ratio(cpu.get(r.key), best["cpu"]),
                     fmt(hwm.get(r.key), 1), ratio(hwm.get(r.key), best["hwm"]),
                     f"{w:.1f}" if w else "-", ratio(w, best["w921"])])
    return table(["route", "1-byte round trip p50 µs", "/ best peer", "server CPU ms/MiB", "/ best peer",
                  "peak RSS MiB", "/ best peer", "esptool write 1 MiB -b 921600 s", "/ best peer"], rows)


README_BEGIN = "<!-- bench/run summary: begin -->"
README_END = "<!-- bench/run summary: end -->"


def write_readme_summary(head, table_text):
    """The headline table of a full run, between the README's markers (left alone if absent)."""
    path = os.path.join(BENCH, "..", "README.md")
    with open(path) as f:
        old = f.read()
    if README_BEGIN not in old or README_END not in old:
        log(f"no summary markers in {path}: README left as is")
        return
    pre, rest = old.split(README_BEGIN, 1)
    post = rest.split(README_END, 1)[1]
    block = (f"{README_BEGIN}\nOne machine's full run (bench/RESULTS.md has every figure and how each was "
             f"measured):\n\n" + "\n".join(head) + "\n\n" + table_text + "\n" + README_END)
    with open(path, "w") as f:
        f.write(pre + block + post)
    log(f"wrote the summary into {path}")


BEGIN = "<!-- bench/run output: begin -->"
END = "<!-- bench/run output: end -->"


def write_results(text):
    path = os.path.join(BENCH, "RESULTS.md")
    block = f"{BEGIN}\n## Latest run\n\n{text}\n{END}"
    try:
        with open(path) as f:
            old = f.read()
    except FileNotFoundError:
        old = "# esp-bridge benchmark results\n\n" + BEGIN + "\n" + END + "\n"
    if BEGIN in old and END in old:
        pre, rest = old.split(BEGIN, 1)
        post = rest.split(END, 1)[1]
        new = pre + block + post
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(new)
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
