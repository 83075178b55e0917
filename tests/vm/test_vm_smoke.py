"""The whole VM path at once: a booted Debian with systemd, gpio-sim lines named like a Pi's,
the release binary serving the guest's real kernel UART (/dev/ttyS1), the virtual ESP32 on the
host at the other end of that UART, and the host's real esptool 5 flashing it through qemu's
forwarded port:

    esptool (host) -> 127.0.0.1:P -> qemu hostfwd -> esp-bridge (guest) -> /dev/ttyS1 (8250)
        -> qemu chardev socket -> esp-bridge sim --connect-unix (host)

and the way later tests relay the guest's GPIO edges to the chip's straps:

    guest /dev/ttyS2 -> qemu chardev socket -> esp-bridge sim --control-unix (host)
"""

import json
import os
import sys
import time

import pytest
from conftest import esptool_cmd, run_esptool, start_sim, stop

ADDRESS = 0x10000
SIZE = 64 * 1024

GUEST_SCRIPT = r"""
set -euo pipefail
H=/mnt/host
say() { echo "== $* (uptime $(cut -d' ' -f1 /proc/uptime)s)"; }
fail() { echo "FAIL: $*"; exit 1; }

say "boot"
state=$(systemctl is-system-running --wait || true)
[ "$state" = running ] || { systemctl --failed --no-pager; fail "the system is '$state', not running"; }
systemd-analyze time

say "gpio-sim lines named like a Raspberry Pi's"
eval "$(bash $H/gpio-sim-pi.sh)"
for n in 10 22 14 15 17 27; do
    found=$(gpiofind "GPIO$n") || fail "gpiofind GPIO$n found no line"
    [ "$found" = "$GPIOSIM_CHIP $n" ] || fail "gpiofind GPIO$n said '$found', not '$GPIOSIM_CHIP $n'"
done
echo "gpiofind GPIO22: $(gpiofind GPIO22)"
read -r chip line < <(gpiofind GPIO22)
gpioset --mode=signal "$chip" "$line=1" &
setter=$!
for _ in $(seq 1 100); do [ "$(cat "$GPIO22_VALUE")" = 1 ] && break; sleep 0.1; done
value=$(cat "$GPIO22_VALUE")
kill "$setter"; wait "$setter" || true
[ "$value" = 1 ] || fail "GPIO22 driven high by gpioset, but $GPIO22_VALUE reads '$value'"
echo "GPIO22 driven high: $GPIO22_VALUE reads 1"
echo pull-up > "$GPIO10_PULL"; up=$(gpioget "$chip" 10)
echo pull-down > "$GPIO10_PULL"; down=$(gpioget "$chip" 10)
[ "$up$down" = 10 ] || fail "GPIO10 input read '$up' with pull-up and '$down' with pull-down"
echo "GPIO10 input follows the simulated pull"

say "strap relay: /dev/ttyS2 to the host sim's control socket"
stty -F /dev/ttyS2 115200 raw -echo
exec 4<> /dev/ttyS2
relay() {
    local answer
    echo "$1" >&4
    IFS= read -r -t 20 answer <&4 || fail "no answer to '$1' on /dev/ttyS2 (is the sim's --control-unix socket there?)"
    echo "relay: $1 -> $answer"
    [ "$answer" = "$2" ] || fail "'$1' was answered '$answer', not '$2'"
}
relay "en=low io0=low" ok
relay "en=high" ok
relay "io0=high" ok
relay get "en=high io0=high"
exec 4>&-

say "esp-bridge on /dev/ttyS1"
# This script runs in a unit whose output goes to the journal; without JOURNAL_STREAM the
# bridge logs to its stderr, the file the host shows on failure.
env -u JOURNAL_STREAM "$H/esp-bridge" --device /dev/ttyS1 --listen 0.0.0.0:2217 --control none \
    > "$H/bridge.log" 2>&1 &
bridge=$!
trap 'kill "$bridge" 2> /dev/null || true' EXIT
listening() { [ -n "$(ss -Hltn 'sport = :2217')" ]; }
for _ in $(seq 1 200); do
    listening && break
    kill -0 "$bridge" 2> /dev/null || fail "esp-bridge exited at start: $(cat "$H/bridge.log")"
    sleep 0.1
done
listening || fail "esp-bridge did not listen on :2217 within 20 s: $(cat "$H/bridge.log")"
touch "$H/ready"

say "serving the host's esptool"
for _ in $(seq 1 6000); do [ -e "$H/host-done" ] && break; sleep 0.1; done
[ -e "$H/host-done" ] || fail "the host never signalled host-done"
kill -TERM "$bridge"
rc=0; wait "$bridge" || rc=$?
trap - EXIT
say "esp-bridge stopped with exit status $rc"
"""


NO_RESET = ("--before", "no-reset", "--after", "no-reset")


def test_esptool_flashes_the_host_sim_through_the_bridge_in_a_booted_debian(boot, esp_bridge_bin, tmp_path):
    esptool_cmd(5)  # skips early if the venv is missing
    times = {}
    t0 = time.monotonic()
    v = boot(GUEST_SCRIPT, forwards=[2217], files=[esp_bridge_bin], ttyS2=True, timeout=900)
    flash_file = tmp_path / "flash.bin"
    events = tmp_path / "events.jsonl"
    sim, sim_log = start_sim(v, "--boot", "download", "--flash-file", str(flash_file),
                             "--event-log", str(events))

    def context():
        return f"\n--- sim log ---\n{sim_log.text()}\n--- bridge.log (guest) ---\n{v.read('bridge.log', '(none)')}"

    try:
        exercise(v, sim, context, times, t0, tmp_path, flash_file, events)
    finally:
        stop(sim)
    print("VM smoke timings: " + ", ".join(f"{k} {s:.1f}s" for k, s in times.items()), file=sys.stderr)


def exercise(v, sim, context, times, t0, tmp_path, flash_file, events):
    try:
        try:
            v.wait_for_file("ready", timeout=600)
        except Exception as e:
            pytest.fail(f"{e}{context()}", pytrace=False)
        times["boot to ready"] = time.monotonic() - t0
        assert sim.poll() is None, f"the sim exited with {sim.returncode}{context()}"
        url = f"rfc2217://127.0.0.1:{v.host_port(2217)}"

        rc, out, times["flash-id"] = run_esptool(url, *NO_RESET, "flash-id")
        assert rc == 0, f"esptool flash-id failed:\n{out}{context()}"
        assert "ESP32" in out and "Detected flash size: 4MB" in out, out

        image = tmp_path / "app.bin"
        data = os.urandom(SIZE)
        image.write_bytes(data)
        rc, out, times["write-flash 64 KiB"] = run_esptool(url, *NO_RESET, "write-flash", hex(ADDRESS), str(image))
        assert rc == 0, f"esptool write-flash failed:\n{out}{context()}"
        assert "Hash of data verified" in out, out
        rc, out, times["verify-flash 64 KiB"] = run_esptool(url, *NO_RESET, "verify-flash", hex(ADDRESS), str(image))
        assert rc == 0, f"esptool verify-flash failed:\n{out}{context()}"
        assert "digest matched" in out, out
    finally:
        v.signal("host-done")

    guest_rc = v.wait_exit(timeout=180)
    times["total"] = time.monotonic() - t0
    assert guest_rc == 0, f"the guest script failed (rc {guest_rc})\n{v.diagnostics()}{context()}"
    log = v.guest_log()
    assert "gpiofind GPIO22: " in log and "GPIO22 driven high" in log, log
    # What esptool wrote went through the guest's UART into the host's virtual flash (saved
    # when the sim stops).
    stop(sim)
    assert sim.returncode == 0, f"the sim exited with {sim.returncode}{context()}"
    assert flash_file.read_bytes()[ADDRESS : ADDRESS + SIZE] == data
    # The guest's strap requests reached the chip (nothing else drives its pins here): a reset
    # with IO0 low, so it came back in download mode.
    log = [json.loads(line) for line in events.read_text().splitlines()]
    edges = [(e["event"], e["level"]) for e in log if e["event"] in ("en", "io0")]
    assert edges == [("en", "low"), ("io0", "low"), ("en", "high"), ("io0", "high")], edges
    en_high = next(e["t_us"] for e in log if e["event"] == "en" and e["level"] == "high")
    booted = next(e for e in log if e["event"] == "mode" and e["t_us"] >= en_high)
    assert booted["mode"] == "download", log
