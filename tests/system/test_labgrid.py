"""labgrid end to end (the discovery issue, its labgrid part): the real labgrid 26 coordinator,
one exporter per esp-bridge host and the labgrid client, all from PyPI, on this machine. Two
esp-bridge hosts on their own loopback addresses (127.0.0.2 and 127.0.0.3), each serving two
virtual ESP32s from its configuration file (`esp-bridge demo --config`), each exported with
the configuration `esp-bridge labgrid` prints for it and the places its comments say to make.
A client reserves a board by its tags, locks its place, reads the board's console through
labgrid's SerialDriver and flashes it with esptool through the place's raw resource; a second
client's reservation of the same board waits until the first lets it go.
"""

import os
import shlex
import subprocess
import time
from pathlib import Path

import pytest

from conftest import BIN, CACHE, Bridge, LogReader, esptool_cmd, free_port

LABGRID = Path(os.environ.get("ESP_BRIDGE_VENV_LABGRID", CACHE / "venv-labgrid")) / "bin"

HOSTS = {"pi-a": "127.0.0.2", "pi-b": "127.0.0.3"}

# A labgrid client of its own: the place reserved with LG_TOKEN, its RFC 2217 resource read
# through labgrid's SerialDriver until the board's application speaks, then the URL of its raw
# resource for esptool.
CLIENT = r'''
import sys, time
from labgrid import Environment
env = Environment(sys.argv[1])
target = env.get_target("main")
serial = target.get_driver("SerialDriver")
target.activate(serial)
seen = b""
deadline = time.monotonic() + 30
while b"hello from the virtual ESP32" not in seen and time.monotonic() < deadline:
    seen += serial.read(size=4096, timeout=1.0) or b""
print("console:", seen.decode(errors="replace").replace("\r", "").replace("\n", " | ")[-400:])
raw = target.get_resource("NetworkSerialPort", name="raw")
print(f"raw: socket://{raw.host}:{raw.port}")
'''

ENV_YAML = """targets:
  main:
    resources:
      RemotePlace:
        name: "+"
    drivers:
      SerialDriver:
        bindings:
          port: rfc2217
"""


def labgrid_tool(name):
    exe = LABGRID / name
    if not exe.exists():
        pytest.skip(f"labgrid venv missing at {LABGRID.parent}: run scripts/setup-test-env")
    return str(exe)


def started(proc, needle, what, timeout=30):
    log = LogReader(proc.stdout)
    try:
        log.wait_for(needle, timeout)
    except AssertionError:
        raise AssertionError(f"{what} did not start: {log.text()[-2000:]}")
    return log


def host_config(tmp_path, name, ip):
    """A Pi's /etc/esp-bridge.toml with two boards, on `ip`."""
    ports = [free_port() for _ in range(4)]
    path = tmp_path / f"{name}.toml"
    path.write_text(
        '[control]\nbackend = "modem"\n'
        f'[[board]]\nname = "esp1"\ndevice = "/dev/ttyESP-{name}-1"\n'
        f'listen = ["{ip}:{ports[0]}"]\nraw_listen = ["{ip}:{ports[1]}"]\n'
        f'[[board]]\nname = "esp2"\ndevice = "/dev/ttyESP-{name}-2"\n'
        f'listen = ["{ip}:{ports[2]}"]\nraw_listen = ["{ip}:{ports[3]}"]\n')
    return path, ports


def test_two_hosts_booked_through_labgrid(tmp_path):
    coordinator_bin, exporter_bin, client_bin = (labgrid_tool(n) for n in (
        "labgrid-coordinator", "labgrid-exporter", "labgrid-client"))
    python = str(LABGRID / "python")
    coordinator_port = free_port()
    env = {**os.environ, "LG_COORDINATOR": f"127.0.0.1:{coordinator_port}", "PYTHONUNBUFFERED": "1"}
    env.pop("LG_TOKEN", None)
    procs = []

    def spawn(cmd, **kw):
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, **kw)
        procs.append(p)
        return p

    def client(*args, extra_env=None, timeout=60):
        r = subprocess.run([client_bin, *args], capture_output=True, text=True, timeout=timeout,
                           env={**env, **(extra_env or {})})
        assert r.returncode == 0, f"labgrid-client {' '.join(args)}: {r.stdout}{r.stderr}"
        return r.stdout

    bridges = []
    try:
        # The coordinator keeps its places in its working directory.
        coordinator = spawn([coordinator_bin, "--listen", f"127.0.0.1:{coordinator_port}"],
                            cwd=tmp_path)
        started(coordinator, "listening on", "the coordinator")
        exported = {}
        for name, ip in HOSTS.items():
            cfg, ports = host_config(tmp_path, name, ip)
            bridge = Bridge(["demo", "--config", str(cfg), "--wiring", "modem",
                             "--flash-file", str(tmp_path / f"flash-{name}.bin")], ports[0])
            bridges.append(bridge)
            made = subprocess.run([str(BIN), "labgrid", "--config", str(cfg), "--name", name,
                                   "--host", ip], capture_output=True, text=True, timeout=20)
            assert made.returncode == 0, made.stderr
            yaml = tmp_path / f"{name}.yaml"
            yaml.write_text(made.stdout)
            exported[name] = (ports, made.stdout)
            exporter = spawn([exporter_bin, "--name", name, str(yaml)])
            started(exporter, "Exporter ready", f"the exporter of {name}")
            # The places, as the file's comments say to make them.
            for line in made.stdout.splitlines():
                if line.startswith("##   labgrid-client "):
                    args = shlex.split(line[len("##   labgrid-client "):])
                    client(*args)
        places = client("places")
        for name in HOSTS:
            for board in ("esp1", "esp2"):
                assert f"{name}-{board}" in places, places
        shown = client("-p", "pi-b-esp1", "show")
        rfc, raw = exported["pi-b"][0][:2]
        assert "pi-b/esp1/NetworkSerialPort/rfc2217" in shown, shown
        assert f"'port': {rfc}" in shown and f"'port': {raw}" in shown, shown
        assert "'host': '127.0.0.3'" in shown and "'protocol': 'raw'" in shown, shown

        # The first client: a board by its tags, its place locked.
        # (README's flow: `eval $(labgrid-client reserve --wait --shell ...)`, then `-p +`.)
        out = client("reserve", "--wait", "--shell", "board=esp1", "host=pi-b")
        token1 = out.strip().split("LG_TOKEN=")[1]
        mine = {"LG_TOKEN": token1}
        client("-p", "+", "lock", extra_env=mine)
        assert "pi-b-esp1" in client("-p", "+", "show", extra_env=mine)

        # The second client wants the same board: it waits.
        second = spawn([client_bin, "reserve", "--wait", "--shell", "board=esp1", "host=pi-b"])
        time.sleep(5)
        assert second.poll() is None, "the second reservation was allocated while the first held the board"

        # The first client works with the board: its console through labgrid, then esptool
        # through the raw resource's URL.
        (tmp_path / "env.yaml").write_text(ENV_YAML)
        (tmp_path / "client.py").write_text(CLIENT)
        r = subprocess.run([python, str(tmp_path / "client.py"), str(tmp_path / "env.yaml")],
                           capture_output=True, text=True, timeout=120,
                           env={**env, "LG_TOKEN": token1})
        assert r.returncode == 0, r.stdout + r.stderr
        assert "hello from the virtual ESP32" in r.stdout, r.stdout
        url = r.stdout.split("raw: ")[1].split()[0]
        assert url == f"socket://127.0.0.3:{raw}", r.stdout
        image = os.urandom(48 * 1024)
        (tmp_path / "app.bin").write_bytes(image)
        flash = subprocess.run([str(esptool_cmd(5)), "--port", url, "write-flash", "0x10000",
                                str(tmp_path / "app.bin")], capture_output=True, text=True, timeout=300)
        assert flash.returncode == 0 and "Hash of data verified" in flash.stdout, flash.stdout + flash.stderr

        # It lets the board go: the second reservation is allocated.
        client("-p", "+", "unlock", extra_env=mine)
        client("cancel-reservation", extra_env=mine)
        out2, _ = second.communicate(timeout=60)
        token2 = out2.decode().strip().split("LG_TOKEN=")[1]
        assert token2 != token1
        assert "pi-b-esp1" in client("-p", f"+{token2}", "show")
        client("cancel-reservation", token2)
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
        for b in bridges:
            b.stop()
    # The image went to pi-b's esp1 (the virtual chips keep their flash in files, saved as
    # their service stops), not to pi-a's.
    flashed = (tmp_path / "flash-pi-b-esp1.bin").read_bytes()
    assert flashed[0x10000:0x10000 + len(image)] == image, "pi-b's esp1 holds the image"
    for other in ("flash-pi-a-esp1.bin", "flash-pi-b-esp2.bin"):
        path = tmp_path / other
        assert not path.exists() or image not in path.read_bytes(), other
