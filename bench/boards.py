"""The `boards` section of bench/bench.py: one esp-bridge service serving 1, 2, 4 and 8 boards,
every board flashed at once through its raw port, and a hostile client flooding one board
while the others flash.

Each board is its own virtual ESP32 (`esp-sim --pace --boot download`: the UART paced at the
wire rate, as a real chip's is) on its own pty, behind one service started from a TOML file
with one [[board]] per chip. Each board's esptool 5 `-b 921600 write-flash` of the same image
is timed as a whole command; "alone" is the one-board run of the same run, so every ratio
compares figures taken minutes apart on the same machine.

Server figures: utime+stime of the whole process over the flashing (every thread, also
those that ended), divided by the MiB written (the image size times the boards), and VmHWM.
"""

import os
import random
import socket
import subprocess
import threading
import time

MiB = 1 << 20


def _config(b, tag, devices):
    """A configuration file with one board per device; returns (path, raw ports, rfc ports)."""
    raw, rfc = [], []
    lines = ["[control]", 'backend = "none"', ""]
    for i, dev in enumerate(devices):
        rfc.append(b.free_port())
        raw.append(b.free_port())
        lines += [
            "[[board]]",
            f'name = "esp{i + 1}"',
            f'device = "{dev}"',
            f'listen = ["127.0.0.1:{rfc[-1]}"]',
            f'raw_listen = ["127.0.0.1:{raw[-1]}"]',
            "",
        ]
    path = os.path.join(b.TMP, f"boards-{tag}.toml")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path, raw, rfc


class Flooder:
    """A hostile client on a board's RFC 2217 port: random bytes, a share of them telnet
    IAC sequences and COM-PORT-OPTION subnegotiations, written as fast as the server takes
    them, nothing ever read."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock.settimeout(0.5)
        self.sent = 0
        self.stop = threading.Event()
        rnd = random.Random(7)
        junk = bytearray(rnd.randbytes(48 << 10))
        for k in range(0, len(junk) - 16, 97):
            junk[k:k + 9] = bytes([255, 250, 44, 1, 0, 1, 194, 0, 255])  # SET-BAUDRATE 115200, no SE
        self.junk = bytes(junk)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.is_set():
            try:
                self.sent += self.sock.send(self.junk)
            except socket.timeout:
                continue
            except OSError:
                return

    def close(self):
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


def flash_all(b, tag, ports, image, timeout):
    """esptool 5 `-b 921600 write-flash` of `image` to every port at once. Returns
    {"secs": [each port's whole command]} or {"error": ...}; kills what is left on the way out."""
    procs = []
    try:
        for i, port in enumerate(ports):
            cmd = [b.CFG.esptool, "--port", port, "--before", "no-reset", "--after", "no-reset",
                   "-b", "921600", "write-flash", "0x10000", image]
            out = open(os.path.join(b.TMP, f"esptool-boards-{tag}-{i}.log"), "wb")
            procs.append((time.perf_counter(), subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL), out))
        secs = {}
        deadline = time.monotonic() + timeout
        while len(secs) < len(procs):
            if time.monotonic() > deadline:
                return {"error": f"timeout {timeout} s with {len(procs) - len(secs)} unfinished"}
            for i, (t0, p, _) in enumerate(procs):
                if i not in secs and p.poll() is not None:
                    secs[i] = time.perf_counter() - t0
            time.sleep(0.005)
        for i, (_, p, out) in enumerate(procs):
            out.close()
            with open(out.name, "rb") as f:
                text = f.read().decode(errors="replace")
            if p.returncode != 0 or "Hash of data verified" not in text:
                return {"error": f"{ports[i]}: rc {p.returncode}: " + " / ".join(text.strip().splitlines()[-3:])}
        return {"secs": [secs[i] for i in range(len(procs))]}
    finally:
        for _, p, out in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            out.close()


def flash_at_once(b, n, image, size, flood=False, direct=False, timeout=300):
    """n boards behind one service; every board flashed at once, or with flood=True board 1
    flooded and boards 2..n flashed. Returns per-board seconds and the server's figures.
    direct=True: the same n flashes at once on the chips' own ptys, with no service (the
    floor: how much the machine itself slows n esptools and n chips down)."""
    tag = f"{n}{'-flood' if flood else ''}{'-direct' if direct else ''}-{time.monotonic_ns()}"
    sims = [b.Sim(f"boards-{tag}-{i}") for i in range(n)]
    server = None
    flooder = None
    try:
        if direct:
            return flash_all(b, tag, [s.path for s in sims], image, timeout)
        cfg, raw, rfc = _config(b, tag, [s.path for s in sims])
        server = b.spawn([b.CFG.bin, "--config", cfg], f"esp-bridge-boards-{tag}.log", env=b.CFG.server_env)
        b.wait_listening(server, raw + rfc, timeout=20)
        flashed = list(range(1, n)) if flood else list(range(n))
        if flood:
            flooder = Flooder(rfc[0])
            time.sleep(1.0)  # the flood is in full swing before the others start
        cpu0 = b.cpu_seconds(server.pid)
        res = flash_all(b, tag, [f"socket://127.0.0.1:{raw[i]}" for i in flashed], image, timeout)
        if "error" in res:
            return res
        cpu = b.cpu_seconds(server.pid) - cpu0
        mem = b.vm_hwm_kib(server.pid) or {}
        res["cpu_ms_per_mib"] = cpu * 1000 / (size * len(flashed) / MiB)
        res["hwm_mib"] = mem.get("VmHWM", 0) / 1024
        if flooder:
            res["flood_mib"] = flooder.sent / MiB
            res["server_alive"] = server.poll() is None
        return res
    finally:
        if flooder:
            flooder.close()
        if server:
            b.stop(server)
        for s in sims:
            s.close()


def run(b, image, size, counts=(1, 2, 4, 8), reps=2):
    """Every count `reps` times, interleaved; each board's best time is kept (the run least
    disturbed by the machine's other work), as are the least CPU and the highest VmHWM."""
    order = [(n, False) for n in counts] + [(max(counts[-2], 2), True)]
    cases = [((n, flood), f"boards: {n} at once{' (board 1 flooded)' if flood else ''}")
             for n, flood in order]
    cases += [((n, "direct"), f"boards: {n} chips flashed at once on their own ptys, no service")
              for n in counts if n > 1]

    def merge(best, res):
        best["secs"] = [min(a, c) for a, c in zip(best["secs"], res["secs"])]
        if "cpu_ms_per_mib" not in best:
            return best
        best["cpu_ms_per_mib"] = min(best["cpu_ms_per_mib"], res["cpu_ms_per_mib"])
        best["hwm_mib"] = max(best["hwm_mib"], res["hwm_mib"])
        if "flood_mib" in res:
            best["flood_mib"] = max(best["flood_mib"], res["flood_mib"])
        return best

    return b.repeated(reps, cases, lambda key: flash_at_once(
        b, key[0], image, size, flood=key[1] is True, direct=key[1] == "direct"), merge)


def report(results, size, table, verdict):
    """The section's table and its target lines."""
    out = ["### 7. Many boards on one service: every board flashed at once through its raw port\n",
           f"One `esp-bridge --config` with N [[board]]s, each a `esp-sim --pace --boot download` on "
           f"its own pty; esptool 5 `-b 921600 write-flash` of the same {size >> 10} KiB image to every "
           "board at once (whole command each, best of the repetitions per board); 'flooded' = "
           "board 1's RFC 2217 port taking random bytes and telnet subnegotiations as fast as the "
           "server reads them while the others flash.\n"]
    alone = results.get((1, False), {}).get("secs", [None])[0]
    one_cpu = results.get((1, False), {}).get("cpu_ms_per_mib")
    rows, lines = [], []
    direct = {n: r for (n, kind), r in results.items() if kind == "direct" and "error" not in r}
    for (n, flood), r in sorted(results.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        if flood == "direct":
            if "error" in r:
                rows.append([f"{n} chips, no service (local ptys)", "error: " + r["error"][:80], "", "", "", ""])
            else:
                worst = max(r["secs"])
                rows.append([f"{n} chips, no service (local ptys)", ", ".join(f"{s:.2f}" for s in r["secs"]),
                             f"{worst / alone:.3f}x" if alone else "-", "-", "-", "-"])
            continue
        label = f"{n} boards" + (", board 1 flooded" if flood else "")
        if "error" in r:
            rows.append([label, "error: " + r["error"][:80], "", "", "", ""])
            continue
        worst = max(r["secs"])
        rows.append([label, ", ".join(f"{s:.2f}" for s in r["secs"]),
                     f"{worst / alone:.3f}x" if alone else "-",
                     f"{r['cpu_ms_per_mib']:.1f}", f"{r['hwm_mib']:.2f}",
                     f"{r.get('flood_mib', 0):.1f}" if flood else "-"])
        if alone and n > 1:
            what = "the flashing boards beside a flooded one" if flood else f"{n} boards"
            lines.append(f"- {what}: slowest board / one board alone = {worst / alone:.3f}x (target <= 1.05x): "
                         f"{verdict(worst / alone <= 1.05)}")
            floor = direct.get(n - 1 if flood else n)
            if floor:
                lines.append(f"  - against the same {len(floor['secs'])} chips flashed at once on their own ptys "
                             f"with no service (the machine's own slowdown of that many esptools and chips): "
                             f"{worst / max(floor['secs']):.3f}x (not a target: what the service adds)")
        if one_cpu is not None and n > 1 and not flood:
            # utime+stime count in 10 ms ticks: each figure may be off by one tick over its MiB.
            tick = 10 / (size / MiB) + 10 / (size * n / MiB)
            lines.append(f"- {n} boards: server CPU per MiB {r['cpu_ms_per_mib']:.1f} ms vs one board "
                         f"{one_cpu:.1f} ms (target: no higher, give or take the 10 ms tick of utime+stime, "
                         f"{tick:.1f} ms/MiB here): {verdict(r['cpu_ms_per_mib'] <= one_cpu + tick)}")
        if not flood:
            cap = 4 + 0.5 * (n - 1)
            lines.append(f"- {n} boards: peak RSS {r['hwm_mib']:.2f} MiB (target <= {cap:.1f} MiB): "
                         f"{verdict(r['hwm_mib'] <= cap)}")
    out.append(table(["boards", "each board's esptool s", "slowest / one alone", "server CPU ms/MiB",
                      "peak RSS MiB", "flood MiB taken"], rows))
    out.append("")
    return "\n".join(out), lines
