"""The `watchers` section of bench/bench.py: what watchers cost the writer (the sharing issue).

- esptool 5 `write-flash -b 921600` of the same 1 MiB image through the raw port to the virtual
  ESP32 paced at the wire rate (`esp-sim --pace --boot download`), with no watcher and with
  three: a reading RFC 2217 one, a reading raw one, and a raw one that never reads (a small
  receive buffer, full at once). Whole command; each case's best of the repetitions.
- esp-bridge's peak RSS (VmHWM) after that flash with no watcher and with 20 (ten reading,
  ten not), each case in a fresh process.
"""

import socket
import threading
import time

CASES = [
    # key, label, watchers: (reading, not reading)
    ("none", "no watcher", 0, 0),
    ("three", "3 watchers, one not reading", 2, 1),
    ("twenty", "20 watchers, ten not reading", 10, 10),
]
TELNET_OPEN = bytes([255, 251, 44, 255, 253, 44])


class Watchers:
    """`reading` connections that read and discard (every other one on the RFC 2217 port, with
    the telnet handshake) and `stalled` raw ones that never read."""

    def __init__(self, rfc, raw, reading, stalled):
        self.socks = []
        self.stop = threading.Event()
        self.received = [0] * reading
        for i in range(reading):
            port = rfc if i % 2 == 0 else raw
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            if port == rfc:
                s.sendall(TELNET_OPEN)
            self.socks.append(s)
            threading.Thread(target=self._drain, args=(s, i), daemon=True).start()
        for _ in range(stalled):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(("127.0.0.1", raw))
            self.socks.append(s)

    def _drain(self, s, i):
        s.settimeout(0.5)
        while not self.stop.is_set():
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            if not chunk:
                return
            self.received[i] += len(chunk)

    def close(self):
        self.stop.set()
        for s in self.socks:
            try:
                s.close()
            except OSError:
                pass


def once(b, reading, stalled, image, timeout=400):
    tag = f"watchers-{reading}-{stalled}-{time.monotonic_ns()}"
    sim = b.Sim(tag)
    server = None
    watchers = None
    try:
        cfg = f"{b.TMP}/{tag}.toml"
        rfc, raw = b.free_port(), b.free_port()
        with open(cfg, "w") as f:
            f.write(f'[serial]\ndevice = "{sim.path}"\n'
                    f'[network]\nlisten = ["127.0.0.1:{rfc}"]\nraw_listen = ["127.0.0.1:{raw}"]\n'
                    '[control]\nbackend = "none"\n')
        proc = b.spawn([b.CFG.bin, "--config", cfg], f"esp-bridge-{tag}.log", env=b.CFG.server_env)
        server = b.Server(proc, raw, "raw", ports=[rfc, raw])
        watchers = Watchers(rfc, raw, reading, stalled)
        time.sleep(0.3)
        cmd = [b.CFG.esptool, "--port", server.url, "--before", "no-reset", "--after", "no-reset",
               "-b", "921600", "write-flash", "0x10000", image]
        result = b.timed_write_flash(cmd, timeout)
        if "error" not in result:
            result["hwm_kib"] = (b.vm_hwm_kib(proc.pid) or {}).get("VmHWM", 0)
            result["watched"] = min(watchers.received, default=None)
        return result
    finally:
        if watchers:
            watchers.close()
        if server:
            server.close()
        sim.close()


def run(b, image, reps=2):
    settings = {key: (reading, stalled) for key, _, reading, stalled in CASES}
    return b.repeated(reps, [(key, f"watchers: {label}") for key, label, _, _ in CASES],
                      lambda key: once(b, *settings[key], image),
                      lambda best, res: {**(res if res["secs"] < best["secs"] else best),
                                         "hwm_kib": max(res["hwm_kib"], best["hwm_kib"])})


def report(results, size, table, verdict):
    out = ["### 9. What watchers cost the writer\n",
           f"esptool 5 `write-flash -b 921600` of a {size >> 10} KiB image (whole command, best of "
           "the repetitions) through the raw port to `esp-sim --pace --boot download`, with watchers "
           "connected to the board's two ports before it starts; esp-bridge's peak RSS (VmHWM, the "
           "highest of the repetitions) after the flash, a fresh process for each.\n"]
    rows = []
    for key, label, _, _ in CASES:
        r = results.get(key, {"error": "not run"})
        if "error" in r:
            rows.append([label, "error: " + r["error"][:80], "-", "-"])
        else:
            watched = r.get("watched")
            rows.append([label, f"{r['secs']:.2f}", f"{r['hwm_kib'] / 1024:.2f}",
                         "-" if watched is None else f"{watched >> 10}"])
    out.append(table(["case", "write-flash s", "peak RSS MiB", "KiB the slowest reading watcher got"], rows))
    out.append("")
    lines = []
    none, three, twenty = (results.get(k, {}) for k in ("none", "three", "twenty"))
    if none.get("secs") and three.get("secs"):
        x = three["secs"] / none["secs"]
        lines.append(f"- write-flash with 3 watchers (one not reading) / with none = {three['secs']:.2f} s / "
                     f"{none['secs']:.2f} s = {x:.3f}x (target <= 1.02x): {verdict(x <= 1.02)}")
    if none.get("hwm_kib") and twenty.get("hwm_kib"):
        d = (twenty["hwm_kib"] - none["hwm_kib"]) / 1024
        lines.append(f"- peak RSS with 20 watchers - with none = {twenty['hwm_kib'] / 1024:.2f} - "
                     f"{none['hwm_kib'] / 1024:.2f} = {d:.2f} MiB (target <= 1 MiB): {verdict(d <= 1.0)}")
    return "\n".join(out), lines
