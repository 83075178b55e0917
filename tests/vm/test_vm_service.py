"""esp-bridge as a systemd service in a booted Debian, with real GPIO lines:

- the units from packaging/ installed, `systemctl enable --now esp-bridge.socket` (twice),
  the hardened service started by its socket (DynamicUser, DevicePolicy=closed, PrivateNetwork,
  system-call filter) and scored by `systemd-analyze security` in the guest;
- the gpio backend on the kernel's gpio-sim lines named like a Pi's (GPIO22 = EN,
  GPIO10 = IO0): real /dev/gpiochipN, real gpiocdev. A guest watcher (guest/strap-watcher.py) samples the lines and
  relays their levels over /dev/ttyS2 to the straps of the host's virtual ESP32, which sits
  behind the guest's real UART /dev/ttyS1;
- the host's esptool 5 flashes through the forwarded ports with its default reset (RFC 2217)
  and through the raw port; the reset sequences seen on the sim lines keep their timing
  (EN low >= 100 ms, IO0 low >= 50 ms after EN rises); journald has the session's fields.
"""

import json
import os
import sys

from conftest import (ROOT, esptool_cmd, failure_context, run_esptool, slow_link_esptool_cfg, start_sim, stop,
                      wait_for_guest)

ADDRESS = 0x10000
SIZE = 64 * 1024

# guest/strap-watcher.py samples EN (GPIO22) and IO0 (GPIO10) as the board sees them and
# relays each change to the host sim's straps, logging it with the guest's monotonic clock.
GUEST_SCRIPT = r"""
set -euo pipefail
H=/mnt/host
say() { echo "== $* (uptime $(cut -d' ' -f1 /proc/uptime)s)"; }
fail() { echo "FAIL: $*"; exit 1; }
systemctl is-system-running --wait >/dev/null || { systemctl --failed --no-pager; fail "system not running"; }

say "gpio-sim lines named like a Pi's; EN and IO0 pulled up as on a board"
eval "$(bash $H/gpio-sim-pi.sh)"
echo pull-up > "$GPIO22_PULL"; echo pull-up > "$GPIO10_PULL"
# Raspberry Pi OS gives the gpiochips to group gpio; plain Debian has no such group.
getent group gpio >/dev/null || groupadd --system gpio
chgrp gpio "$GPIOSIM_DEV"; chmod 660 "$GPIOSIM_DEV"
ls -l "$GPIOSIM_DEV" /dev/ttyS1

stty -F /dev/ttyS2 115200 raw -echo
python3 $H/strap-watcher.py $H/straps.log "en:g22=$GPIO22_VALUE" "io0:g10=$GPIO10_VALUE" &
watcher=$!

say "install the units and enable the socket"
install -m 755 $H/esp-bridge /usr/bin/esp-bridge
install -m 644 $H/esp-bridge.socket $H/esp-bridge.service /etc/systemd/system/
cat > /etc/esp-bridge.toml <<'EOF'
[serial]
device = "/dev/ttyS1"
[network]
raw_listen = ["0.0.0.0:2218"]
[control]
backend = "gpio"
EOF
chmod 644 /etc/esp-bridge.toml
esp-bridge check-config

say "start-up errors name the key and the fix (exit 78)"
gpioset --mode=signal "$GPIOSIM_CHIP" 22=1 &
holder=$!
sleep 1
rc=0; out=$(env -u JOURNAL_STREAM timeout 20 esp-bridge --listen 127.0.0.1:9999 2>&1) || rc=$?
kill $holder; wait $holder || true
echo "line held by gpioset: rc=$rc: $out"
[ $rc = 78 ] || fail "a busy line should exit 78, got $rc"
grep -q 'in use by "gpioset"' <<<"$out" || fail "the consumer is not named"
grep -qF '[control.gpio] reset' <<<"$out" || fail "the config key is not named"
rc=0; out=$(env -u JOURNAL_STREAM setpriv --reuid=nobody --regid=nogroup --clear-groups \
    timeout 20 esp-bridge --listen 127.0.0.1:9999 2>&1) || rc=$?
echo "without the gpio group: rc=$rc: $out"
[ $rc = 78 ] || fail "no permission should exit 78, got $rc"
grep -q "no permission to open $GPIOSIM_DEV" <<<"$out" || fail "the permission problem is not named"
grep -q "group gpio" <<<"$out" || fail "the fix is not named"
systemctl daemon-reload
systemctl enable --now esp-bridge.socket
systemctl enable --now esp-bridge.socket   # idempotent
systemctl is-active esp-bridge.socket
ss -Hltn | grep -E ':(2217|2218) ' || fail "the socket is not listening"
touch $H/ready

say "serving the host"
for _ in $(seq 1 9000); do [ -e $H/host-done ] && break; sleep 0.1; done
[ -e $H/host-done ] || fail "the host never signalled host-done"

say "service state and security"
systemctl status esp-bridge.service --no-pager | head -12 || true
systemctl show esp-bridge.service -p StatusText -p User -p ActiveState
systemd-analyze security --no-pager esp-bridge.service | tail -1 | tee $H/security.txt

say "journal"
journalctl -u esp-bridge.service -o json --no-pager > $H/journal.json
journalctl -u esp-bridge.service --no-pager | tail -30

say "stop: lines released"
systemctl stop esp-bridge.service esp-bridge.socket
sleep 0.5
echo "after stop: GPIO22=$(cat "$GPIO22_VALUE") GPIO10=$(cat "$GPIO10_VALUE")" | tee $H/after-stop.txt
touch /run/strap-watcher-stop; wait $watcher || true
"""


def bootloader_entries(lines):
    """(EN low duration, IO0 low after EN rose) for each rise of EN with IO0 low, in seconds,
    from the watcher's log."""
    out = []
    en_low_at = None
    rise_at = None
    for line in lines:
        t, en, io0 = line.split()[:3]
        t = float(t)
        if en == "low" and en_low_at is None:
            en_low_at = t
        if en == "high" and en_low_at is not None:
            if io0 == "low":
                out.append([t - en_low_at, None])
                rise_at = t
            en_low_at = None
        if io0 == "high" and rise_at is not None and out and out[-1][1] is None:
            out[-1][1] = t - rise_at
            rise_at = None
    return out


def test_service_with_gpio_lines_in_a_booted_debian(boot, esp_bridge_bin, tmp_path):
    esptool_cmd(5)
    units = [ROOT / "packaging" / "esp-bridge.socket", ROOT / "packaging" / "esp-bridge.service"]
    v = boot(GUEST_SCRIPT, forwards=[2217, 2218], files=[esp_bridge_bin, *units],
             ttyS2=True, timeout=1200)
    flash_file = tmp_path / "flash.bin"
    events = tmp_path / "events.jsonl"
    sim, sim_log = start_sim(v, "--boot", "app", "--flash-file", str(flash_file),
                             "--event-log", str(events))

    context = failure_context(v, sim_log)

    cfg = slow_link_esptool_cfg(tmp_path)
    image = tmp_path / "app.bin"
    data = os.urandom(SIZE)
    image.write_bytes(data)
    try:
        rfc, raw = wait_for_guest(v, "ready", 900, context)
        rc, out, _ = run_esptool(rfc, "flash-id", cfg=cfg)
        assert rc == 0, f"flash-id over RFC 2217 failed:\n{out}{context()}"
        rc, out, _ = run_esptool(rfc, "write-flash", hex(ADDRESS), str(image), cfg=cfg)
        assert rc == 0 and "Hash of data verified" in out, f"{out}{context()}"
        rc, out, _ = run_esptool(raw, "verify-flash", hex(ADDRESS), str(image), cfg=cfg)
        assert rc == 0 and "digest matched" in out, f"raw port verify failed:\n{out}{context()}"
    finally:
        v.signal("host-done")
    guest_rc = v.wait_exit(timeout=300)
    assert guest_rc == 0, f"guest script failed ({guest_rc})\n{v.diagnostics()}{context()}"
    stop(sim)
    assert flash_file.read_bytes()[ADDRESS:ADDRESS + SIZE] == data

    # Timing of every bootloader entry as seen on the gpio-sim lines.
    entries = bootloader_entries(v.read("straps.log", "").splitlines())
    assert len(entries) >= 3, f"{entries}{context()}"
    for en_low, io0_hold in entries:
        assert en_low >= 0.100, entries
        assert io0_hold is None or io0_hold >= 0.050, entries
    # The chip saw them as the board would: download mode each time, app at the end.
    log = [json.loads(line) for line in events.read_text().splitlines()]
    modes = [e["mode"] for e in log if e["event"] == "mode"]
    assert modes.count("download") >= 3, modes
    assert modes[-1] == "app", modes

    # The hardened unit, scored on the running system.
    security = v.read("security.txt", "")
    exposure = float(security.split("service:")[1].split()[0])
    assert exposure <= 1.5, security
    # journald got the session lines with structured fields.
    journal = [json.loads(line) for line in v.read("journal.json", "").splitlines() if line.strip()]
    ended = [j for j in journal if "ended" in j.get("MESSAGE", "")]
    assert ended, journal[-10:]
    assert all(k in ended[0] for k in ("SESSION", "PEER", "BYTES_TO_DEVICE", "BYTES_TO_CLIENT")), ended[0]
    assert any("entered the bootloader" in j.get("MESSAGE", "") for j in journal)
    # Stopped service: EN and IO0 back high (released, pulled up).
    assert "GPIO22=1 GPIO10=1" in v.read("after-stop.txt", ""), v.read("after-stop.txt", "")
    print(f"VM service test: {len(entries)} bootloader entries, timing {entries}", file=sys.stderr)
