#!/usr/bin/env python3
"""pyserial's serial.rfc2217.PortManager, served the way pyserial's examples/rfc2217_server.py
serves it (written for this benchmark, not copied): the port opened once with timeout=3 and
DTR/RTS released; one client at a time on a TCP_NODELAY socket; a thread copies
serial -> socket reading `in_waiting or 1` bytes and IAC-escaping through the PortManager;
the main thread copies socket -> serial with recv(1024) through PortManager.filter(); a
third thread calls check_modem_lines() every second; on disconnect the port's settings are
restored. Loopback only.

    python pyserial_rfc2217_server.py SERIALPORT PORT
"""

import socket
import sys
import threading
import time

import serial
import serial.rfc2217


class Session:
    def __init__(self, port, sock):
        self.port = port
        self.sock = sock
        self.lock = threading.Lock()
        self.alive = True
        self.manager = serial.rfc2217.PortManager(port, self)

    def write(self, data):
        # The PortManager's connection interface: telnet replies and escaped data.
        with self.lock:
            self.sock.sendall(data)

    def serial_to_socket(self):
        while self.alive:
            try:
                data = self.port.read(self.port.in_waiting or 1)
                if data:
                    self.write(b"".join(self.manager.escape(data)))
            except OSError:
                break
        self.alive = False

    def poll_lines(self):
        while self.alive:
            time.sleep(1)
            self.manager.check_modem_lines()

    def run(self):
        threads = [
            threading.Thread(target=self.serial_to_socket, daemon=True),
            threading.Thread(target=self.poll_lines, daemon=True),
        ]
        for t in threads:
            t.start()
        while self.alive:
            try:
                data = self.sock.recv(1024)
                if not data:
                    break
                self.port.write(b"".join(self.manager.filter(data)))
            except OSError:
                break
        self.alive = False
        for t in threads:
            t.join()


def main():
    device, tcp_port = sys.argv[1], int(sys.argv[2])
    port = serial.serial_for_url(device, do_not_open=True)
    port.timeout = 3
    port.dtr = False
    port.rts = False
    port.open()
    settings = port.get_settings()
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", tcp_port))
    srv.listen(1)
    print(f"listening on 127.0.0.1:{tcp_port}", flush=True)
    while True:
        sock, _ = srv.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        port.rts = True
        port.dtr = True
        try:
            Session(port, sock).run()
        finally:
            sock.close()
            port.dtr = False
            port.rts = False
            port.apply_settings(settings)


if __name__ == "__main__":
    main()
