#!/bin/bash
# Guest-side helper (runs inside the VM image of tests/vm/build-image): creates a gpio-sim chip
# whose lines are named like a Raspberry Pi's header GPIO chip, so code that finds lines by
# name (gpiofind GPIO22) meets what it meets on a Pi. Line N is BCM GPIO N, named "GPION"
# (0 and 1 are ID_SDA/ID_SCL, as on a Pi), 58 lines, label pinctrl-bcm2711 (a Pi 4).
#
#   eval "$(bash /mnt/host/gpio-sim-pi.sh)"        create (or reuse) the chip; then e.g.
#   echo "$GPIO22_VALUE"                            /sys/.../sim_gpio22/value: the line's level
#   echo pull-up > "$GPIO10_PULL"                   what an input on GPIO10 reads
#   gpioset "$GPIOSIM_CHIP" 22=1
#
#   gpio-sim-pi.sh [--label LABEL] [--name NAME]   LABEL e.g. pinctrl-rp1 for a Pi 5
#   gpio-sim-pi.sh --remove [--name NAME]           take the chip away again
#
# Prints shell assignments on stdout: GPIOSIM_CHIP (gpiochipN), GPIOSIM_DEV (/dev/gpiochipN),
# GPIOSIM_SYSFS (the chip's sysfs directory), and for N in 2..27 GPION_LINE (the offset),
# GPION_VALUE and GPION_PULL (its sim_gpioN/value and /pull files).
#
# A line's value is what a consumer drives it to, or its pull when nobody drives it (an input,
# or an open-drain line released: tests/vm/build-image patches gpio-sim so the latter holds).
set -euo pipefail

name=pi-header
label=pinctrl-bcm2711
num_lines=58
remove=0
die() { echo "gpio-sim-pi.sh: $*" >&2; exit 1; }
while [ $# -gt 0 ]; do
    case "$1" in
        --label) label=${2:?--label needs a value}; shift 2 ;;
        --name) name=${2:?--name needs a value}; shift 2 ;;
        --remove) remove=1; shift ;;
        *) die "unknown argument '$1' (see the comment at the top of this script)" ;;
    esac
done

line_name() {
    case "$1" in
        0) echo ID_SDA ;;
        1) echo ID_SCL ;;
        *) echo "GPIO$1" ;;
    esac
}

[ "$(id -u)" = 0 ] || die "needs root (modprobe, configfs)"
modprobe gpio-sim 2> /dev/null ||
    die "cannot load the gpio-sim module; Debian's kernel lacks it and tests/vm/build-image builds it into the image: is this that image ($(uname -r))?"
mountpoint -q /sys/kernel/config || mount -t configfs none /sys/kernel/config
cfg=/sys/kernel/config/gpio-sim/$name

if [ "$remove" = 1 ]; then
    [ -d "$cfg" ] || exit 0
    echo 0 > "$cfg/live"
    for l in "$cfg"/bank0/line*; do [ -d "$l" ] && rmdir "$l"; done
    rmdir "$cfg/bank0" "$cfg"
    exit 0
fi

if [ ! -d "$cfg" ]; then
    mkdir "$cfg" "$cfg/bank0"
    echo "$label" > "$cfg/bank0/label"
    echo "$num_lines" > "$cfg/bank0/num_lines"
    for n in $(seq 0 27); do
        mkdir "$cfg/bank0/line$n"
        line_name "$n" > "$cfg/bank0/line$n/name"
    done
fi
[ "$(cat "$cfg/live")" = 1 ] || echo 1 > "$cfg/live"

dev=$(cat "$cfg/dev_name")
chip=$(cat "$cfg/bank0/chip_name")
sysfs=/sys/devices/platform/$dev/$chip
[ -d "$sysfs" ] || die "gpio-sim is live but $sysfs does not exist"
# udev creates the character device a moment after the chip appears.
for _ in $(seq 1 100); do
    [ -c "/dev/$chip" ] && break
    sleep 0.05
done
[ -c "/dev/$chip" ] || die "/dev/$chip did not appear (is systemd-udevd running?)"

echo "GPIOSIM_CHIP=$chip"
echo "GPIOSIM_DEV=/dev/$chip"
echo "GPIOSIM_SYSFS=$sysfs"
for n in $(seq 2 27); do
    echo "GPIO${n}_LINE=$n"
    echo "GPIO${n}_VALUE=$sysfs/sim_gpio$n/value"
    echo "GPIO${n}_PULL=$sysfs/sim_gpio$n/pull"
done
