"""The .deb in a booted Debian that looks like a Raspberry Pi: apt install, the generated board
sockets listening on 2217 and 2218 and `esp-bridge status` answering, the boot files changed
and backed up, a flash through the forwarded ports with resets through gpio-sim lines named
like the Pi's, a pin remapped in the TOML and put into effect with `esp-bridge apply`, an
upgrade that keeps the edited config and listens again, and apt purge restoring the boot
files byte for byte and leaving no unit, generated or not, and no listener."""

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from conftest import (ROOT, esptool_cmd, failure_context, run_esptool, slow_link_esptool_cfg, start_sim, stop,
                      wait_for_guest)

FIXTURE = ROOT / "tests" / "fixtures" / "pi" / "bookworm" / "root" / "boot" / "firmware"

# EN is wired to GPIO22 first and to GPIO27 after the remap; the other one floats high on its
# pull-up, so the board's EN is low when either is. Every change is relayed to the host chip.
GUEST_SCRIPT = r"""
set -euo pipefail
H=/mnt/host
say() { echo "== $* (uptime $(cut -d' ' -f1 /proc/uptime)s)"; }
fail() { echo "FAIL: $*"; exit 1; }
wait_host() { for _ in $(seq 1 9000); do [ -e "$H/$1" ] && return; sleep 0.1; done; fail "no $1 from the host"; }
# A failed check that later steps do not depend on: noted in failures.txt, the script goes on.
note() { echo "FAIL (going on): $*" | tee -a $H/failures.txt; }
listens() { ss -Hltn "sport = :$1" | grep -q .; }
systemctl is-system-running --wait >/dev/null || { systemctl --failed --no-pager; fail "system not running"; }

say "a Raspberry Pi's boot files (Bookworm layout)"
mkdir -p /boot/firmware
cp $H/config.txt $H/cmdline.txt /boot/firmware/
cp /boot/firmware/config.txt /root/config.orig
cp /boot/firmware/cmdline.txt /root/cmdline.orig

say "GPIO lines named like the Pi's, pulled up like a board's"
eval "$(bash $H/gpio-sim-pi.sh)"
for p in "$GPIO22_PULL" "$GPIO27_PULL" "$GPIO10_PULL"; do echo pull-up > "$p"; done
stty -F /dev/ttyS2 115200 raw -echo
python3 $H/strap-watcher.py $H/straps.log "en:g22=$GPIO22_VALUE" "en:g27=$GPIO27_VALUE" "io0:g10=$GPIO10_VALUE" &

say "apt install ./esp-bridge.deb"
# This x86 VM has no device tree: tell the package it is setting up a Pi, as an image build does.
ESP_BRIDGE_SETUP_PI=1 DEBIAN_FRONTEND=noninteractive apt-get install -y -q $H/esp-bridge-1.deb
systemctl is-active esp-bridge.socket || fail "the socket is not active after install"
# The package's generator made the boards' socket units from the shipped /etc/esp-bridge.toml.
[ -x /usr/lib/systemd/system-generators/esp-bridge-generator ] || fail "no generator installed"
for k in rfc2217 raw; do
    [ -e /run/systemd/generator/esp-bridge-default-$k.socket ] || fail "no generated esp-bridge-default-$k.socket"
    systemctl is-active esp-bridge-default-$k.socket || fail "esp-bridge-default-$k.socket is not active"
done
listens 2217 || fail "nothing listens on 2217"
listens 2218 || fail "nothing listens on 2218"
systemctl is-active esp-bridge.service && fail "the service runs before any client connected"
systemctl enable --now esp-bridge.socket
systemctl enable --now esp-bridge.socket
grep -qx 'enable_uart=1' /boot/firmware/config.txt || fail "enable_uart=1 missing"
grep -qx 'dtoverlay=disable-bt' /boot/firmware/config.txt || fail "dtoverlay=disable-bt missing"
grep -qx 'dtparam=uart0=on' /boot/firmware/config.txt || fail "dtparam=uart0=on missing"
grep -q 'console=serial0' /boot/firmware/cmdline.txt && fail "serial console still on cmdline.txt"
grep -q 'console=tty1' /boot/firmware/cmdline.txt || fail "cmdline.txt lost console=tty1"
ls -R /var/lib/esp-bridge
[ -n "$(find /var/lib/esp-bridge -name 'config.txt*' -type f)" ] || fail "no backup of config.txt"
[ -e /run/reboot-required ] || fail "no reboot-required notice"
getent group gpio >/dev/null || fail "group gpio was not created"
[ "$(stat -c %G "$GPIOSIM_DEV")" = gpio ] || fail "$GPIOSIM_DEV is not group gpio: $(ls -l $GPIOSIM_DEV)"

say "configure the UART of this VM (a Pi uses /dev/serial0) and apply it"
sed -i 's|^device = .*|device = "/dev/ttyS1"|' /etc/esp-bridge.toml
esp-bridge check-config > /dev/null
esp-bridge apply
esp-bridge status | tee $H/status.txt
systemctl is-active esp-bridge.service || fail "esp-bridge status did not start the service"
touch $H/ready-1
wait_host phase-1-done

say "remap EN from GPIO22 to GPIO27: edit the file, esp-bridge apply (the service runs)"
sed -i 's|^reset = "GPIO22"|reset = "GPIO27"|' /etc/esp-bridge.toml
rc=0; esp-bridge apply > $H/apply.txt 2>&1 || rc=$?
cat $H/apply.txt
[ $rc = 0 ] || note "esp-bridge apply after the remap exited $rc: $(cat $H/apply.txt)"
touch $H/ready-2
wait_host phase-2-done
journalctl -u esp-bridge.service --no-pager | grep -q 'GPIO27 (EN)' || note "the service does not use GPIO27 after esp-bridge apply"

say "upgrade to a higher version keeps the edited config"
DEBIAN_FRONTEND=noninteractive apt-get install -y -q $H/esp-bridge-2.deb
dpkg-query -W -f='${Version}\n' esp-bridge | tee $H/version-after-upgrade
grep -q '^reset = "GPIO27"' /etc/esp-bridge.toml || fail "the upgrade lost the edited config"
systemctl is-active esp-bridge.socket || fail "the socket is not active after the upgrade"
listens 2217 && listens 2218 || fail "not listening on 2217 and 2218 after the upgrade"
esp-bridge status | tee $H/status-after-upgrade.txt

say "apt purge"
DEBIAN_FRONTEND=noninteractive apt-get purge -y -q esp-bridge
cmp /root/config.orig /boot/firmware/config.txt || fail "config.txt not restored byte for byte"
cmp /root/cmdline.orig /boot/firmware/cmdline.txt || fail "cmdline.txt not restored byte for byte"
for f in /usr/bin/esp-bridge /etc/esp-bridge.toml /var/lib/esp-bridge \
         /usr/lib/systemd/system/esp-bridge.socket /usr/lib/systemd/system/esp-bridge.service \
         /usr/lib/systemd/system-generators/esp-bridge-generator \
         /run/systemd/generator/esp-bridge-default-rfc2217.socket /run/systemd/generator/esp-bridge-default-raw.socket \
         /run/systemd/generator/esp-bridge.socket.wants \
         /etc/systemd/system/sockets.target.wants/esp-bridge.socket; do
    [ -e "$f" ] && fail "$f left behind after purge"
done
systemctl list-unit-files --no-legend | grep esp-bridge && fail "unit files still known after purge"
systemctl list-units --all --plain --no-legend 'esp-bridge*' | grep . && fail "units still loaded after purge"
listens 2217 && fail "still listening on 2217 after purge"
listens 2218 && fail "still listening on 2218 after purge"
ss -Hlx | grep -F /run/esp-bridge/ && fail "the control socket still listens after purge"
getent passwd esp-bridge && fail "a user esp-bridge was left"
touch /run/strap-watcher-stop
say "done"
[ ! -s $H/failures.txt ] || exit 1
"""


def repack_with_version(deb, version, out):
    """The same package rebuilt under a higher version, as an upgrade would bring."""
    with tempfile.TemporaryDirectory() as d:
        subprocess.run(["dpkg-deb", "-R", str(deb), f"{d}/p"], check=True)
        control = Path(d, "p", "DEBIAN", "control")
        lines = [f"Version: {version}" if l.startswith("Version:") else l
                 for l in control.read_text().splitlines()]
        control.write_text("\n".join(lines) + "\n")
        subprocess.run(["dpkg-deb", "--root-owner-group", "-b", f"{d}/p", str(out)],
                       check=True, capture_output=True)


def test_deb_install_flash_remap_upgrade_purge(boot, esp_bridge_bin, tmp_path):
    esptool_cmd(5)
    debs = sorted((ROOT / "target" / "debian").glob("esp-bridge_*_amd64.deb"))
    if not debs:
        pytest.fail("no amd64 .deb: run scripts/build-debs amd64 first", pytrace=False)
    deb1 = tmp_path / "esp-bridge-1.deb"
    shutil.copy(debs[-1], deb1)
    version = subprocess.run(["dpkg-deb", "-f", str(deb1), "Version"], capture_output=True,
                             text=True, check=True).stdout.strip()
    upstream, _, revision = version.rpartition("-")
    deb2 = tmp_path / "esp-bridge-2.deb"
    repack_with_version(deb1, f"{upstream}-{int(revision) + 1}", deb2)
    v = boot(GUEST_SCRIPT, forwards=[2217, 2218],
             files=[deb1, deb2, FIXTURE / "config.txt", FIXTURE / "cmdline.txt"],
             ttyS2=True, timeout=1500)
    events = tmp_path / "events.jsonl"
    sim, sim_log = start_sim(v, "--boot", "app", "--event-log", str(events))

    context = failure_context(v, sim_log)

    cfg = slow_link_esptool_cfg(tmp_path)
    image = tmp_path / "app.bin"
    image.write_bytes(os.urandom(64 * 1024))
    try:
        rfc, raw = wait_for_guest(v, "ready-1", 1200, context)
        rc, out, _ = run_esptool(rfc, "write-flash", "0x10000", str(image), cfg=cfg)
        assert rc == 0 and "Hash of data verified" in out, f"{out}{context()}"
        rc, out, _ = run_esptool(raw, "verify-flash", "0x10000", str(image), cfg=cfg)
        assert rc == 0 and "digest matched" in out, f"{out}{context()}"
        v.signal("phase-1-done")
        rfc, _ = wait_for_guest(v, "ready-2", 300, context)
        rc, out, _ = run_esptool(rfc, "chip-id", cfg=cfg)
        assert rc == 0, f"after the remap:\n{out}{context()}"
    finally:
        v.signal("phase-1-done")
        v.signal("phase-2-done")
    guest_rc = v.wait_exit(timeout=600)
    stop(sim)
    assert not v.read("failures.txt"), f"{v.read('failures.txt')}{context()}"
    assert guest_rc == 0, f"guest script failed ({guest_rc})\n{v.diagnostics()}{context()}"
    for name in ("status.txt", "status-after-upgrade.txt"):
        status = v.read(name, "")
        assert status.startswith("default\tidle: waiting for a client on "), f"{name}: {status!r}"
        assert ":2217 (RFC 2217)" in status and ":2218 (ESP raw)" in status, f"{name}: {status!r}"
    # Resets came through GPIO22 before the remap and through GPIO27 after it.
    straps = v.read("straps.log", "").splitlines()
    assert any("g22=0" in l for l in straps), straps
    assert any("g27=0" in l for l in straps), straps
    log = [json.loads(line) for line in events.read_text().splitlines()]
    modes = [e["mode"] for e in log if e["event"] == "mode"]
    assert modes.count("download") >= 3, modes
    assert v.read("version-after-upgrade", "").strip().endswith(f"-{int(revision) + 1}")
