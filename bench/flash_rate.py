"""The `flash` section of bench/bench.py: the raw port's flash rate (`flash_baud`) against a
local cable, esptool 5 `write-flash` of the same 1 MiB image, whole command, against the
virtual ESP32 paced at the wire rate (`esp-sim --pace --boot download`).

- no `-b` (esptool's 115200): on the local pty the whole transfer runs at 115200; through the
  raw port with `flash_baud = 921600` the stub runs at 921600 from its start;
- `-b 921600`: on the local pty the stub runs at 921600; through the raw port with
  `flash_baud = 2000000`, at 2 Mbaud.

The same image and chip for every row; each row's best of the repetitions (the run least
disturbed by the machine's other work).
"""

import json
import os
import time

MiB = 1 << 20

ROWS = [
    # key, label, route ("floor" or flash_baud), esptool's -b
    ("pty-115", "local pty, no -b", None, None),
    ("raw-921-nob", "raw port, flash_baud 921600, no -b", 921_600, None),
    ("pty-921", "local pty, -b 921600", None, 921_600),
    ("raw-2M-b921", "raw port, flash_baud 2000000, -b 921600", 2_000_000, 921_600),
]


def once(b, flash_baud, client_baud, image, timeout=400):
    tag = f"flash-{flash_baud}-{client_baud}-{time.monotonic_ns()}"
    events = os.path.join(b.TMP, f"events-{tag}.jsonl")
    sim = b.Sim(tag, event_log=events)
    server = None
    try:
        if flash_baud is None:
            port = sim.path
        else:
            cfg = os.path.join(b.TMP, f"{tag}.toml")
            raw = b.free_port()
            with open(cfg, "w") as f:
                f.write(f'[serial]\ndevice = "{sim.path}"\nflash_baud = {flash_baud}\n'
                        f'[network]\nlisten = []\nraw_listen = ["127.0.0.1:{raw}"]\n'
                        '[control]\nbackend = "none"\n')
            proc = b.spawn([b.CFG.bin, "--config", cfg], f"esp-bridge-{tag}.log", env=b.CFG.server_env)
            server = b.Server(proc, raw, "raw")
            port = server.url
        cmd = [b.CFG.esptool, "--port", port, "--before", "no-reset", "--after", "no-reset"]
        if client_baud:
            cmd += ["-b", str(client_baud)]
        cmd += ["write-flash", "0x10000", image]
        result = b.timed_write_flash(cmd, timeout)
        if "error" not in result:
            result["stub_secs"] = stub_at_work(events)
        return result
    finally:
        if server:
            server.close()
        sim.close()


def stub_at_work(path):
    """Seconds from the flasher stub's start to the chip's last loader command, from the
    virtual ESP32's event log: the part of the command whose length the rate decides (what
    comes before, esptool's start, SYNC and the stub upload at the ROM's 115200, is the same
    on every route)."""
    try:
        with open(path) as f:
            log = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return None
    start = next((e["t_us"] for e in log if e.get("event") == "stub"), None)
    last = max((e["t_us"] for e in log if e.get("event") == "command"), default=None)
    if start is None or last is None or last <= start:
        return None
    return (last - start) / 1e6


def run(b, image, reps=2):
    settings = {key: (flash_baud, client_baud) for key, _, flash_baud, client_baud in ROWS}
    return b.repeated(reps, [(key, f"flash: {label}") for key, label, _, _ in ROWS],
                     lambda key: once(b, *settings[key], image),
                     lambda best, res: res if res["secs"] < best["secs"] else best)


def report(results, size, table, verdict):
    out = ["### 8. The raw port's flash rate (flash_baud) against a local cable\n",
           f"esptool 5 `write-flash` of a {size >> 10} KiB image (whole command, best of the "
           "repetitions) to `esp-sim --pace --boot download`, `--before no-reset --after no-reset`; "
           "the raw port's esp-bridge with `[control] backend = \"none\"`.\n"]
    rows = []
    for key, label, _, _ in ROWS:
        r = results.get(key, {"error": "not run"})
        if "error" in r:
            rows.append([label, "error: " + r["error"][:80], "-"])
        else:
            stub = r.get("stub_secs")
            rows.append([label, f"{r['secs']:.2f}", f"{stub:.2f}" if stub else "-"])
    out.append(table(["route", "write-flash s", "of which the stub at work s"], rows))
    out.append("")
    lines = []

    def secs(key):
        return results.get(key, {}).get("secs")

    for slow, fast, target, what in (("pty-115", "raw-921-nob", 5.0, "no -b, flash_baud 921600"),
                                     ("pty-921", "raw-2M-b921", 1.7, "-b 921600, flash_baud 2000000")):
        if secs(slow) and secs(fast):
            x = secs(slow) / secs(fast)
            lines.append(f"- flash rate, {what}: local pty / raw port = {secs(slow):.1f} s / "
                         f"{secs(fast):.1f} s = {x:.2f}x faster (target >= {target}x): {verdict(x >= target)}")
            stub_slow = results[slow].get("stub_secs")
            stub_fast = results[fast].get("stub_secs")
            if stub_slow and stub_fast:
                lines.append(f"  - the same with the stub at work only (the part the rate decides): "
                             f"{stub_slow:.1f} s / {stub_fast:.1f} s = {stub_slow / stub_fast:.2f}x; "
                             f"before the stub runs, {secs(slow) - stub_slow:.1f} s and "
                             f"{secs(fast) - stub_fast:.1f} s (not a target, the reason for the whole)")
    return "\n".join(out), lines
