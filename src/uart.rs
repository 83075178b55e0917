//! The UART backend: the [`Uart`] trait the session drives, and its tty implementation.
//!
//! The device is opened per client (exclusive: TIOCEXCL plus flock) with the configured
//! defaults, so every client starts from the same settings and a device that vanished is
//! simply opened again for the next one.
//!
//! serialport opens and configures the tty; the bytes go through a non-blocking duplicate of
//! its fd that tokio watches for readability only. Watching it for writability too (as
//! tokio-serial does) wakes the server after nearly every write, when the tty hands the bytes
//! on and reports room again: on a 1-byte round trip that was an extra wake-up in most round
//! trips (bench/RESULTS.md). Writability is watched only while a write is blocked.

pub use crate::settings::LineSettings;
use crate::settings::{FlowControl, Parity, StopBits};
use rustix::io::Errno;
use serialport::SerialPort;
use std::future::Future;
use std::io::{self, Write};
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

/// Modem input lines as RFC 2217 reports them (CD, RI, DSR, CTS bits of NOTIFY-MODEMSTATE).
pub type ModemStatus = u8;

/// A future that completes when everything written so far has left the UART.
pub type Drain = Pin<Box<dyn Future<Output = io::Result<()>> + Send>>;

/// What the session needs from a serial device. Setters are called only for real changes.
pub trait Uart: AsyncRead + AsyncWrite + Unpin + Send {
    fn set_baud(&mut self, baud: u32) -> io::Result<()>;
    fn set_data_bits(&mut self, bits: u8) -> io::Result<()>;
    fn set_parity(&mut self, parity: Parity) -> io::Result<()>;
    fn set_stop_bits(&mut self, bits: StopBits) -> io::Result<()>;
    fn set_flow(&mut self, flow: FlowControl) -> io::Result<()>;
    fn set_break(&mut self, on: bool) -> io::Result<()>;
    /// Discards received-but-unread (`input`) and written-but-unsent (`output`) bytes.
    fn purge(&mut self, input: bool, output: bool) -> io::Result<()>;
    /// Waits, off the async threads, until the output queue is empty.
    fn drain(&mut self) -> Drain;
    /// The modem input lines; `Err` when the device has none (a pty, most Pi UARTs).
    fn modem_status(&mut self) -> io::Result<ModemStatus>;
}

/// A tty opened with serialport, its bytes moved through tokio.
pub struct SerialDevice {
    /// The port as opened: line settings, purge, break, modem lines.
    port: serialport::TTYPort,
    /// The fd the bytes go through (non-blocking), registered for readability only.
    io: AsyncFd<OwnedFd>,
    /// Registered for writability while a write is blocked (a tty that is full), else none.
    write_waiter: Option<AsyncFd<OwnedFd>>,
    /// A duplicate of the fd for tcdrain, which blocks: it runs on tokio's blocking pool.
    /// It lives as long as the device because closing any duplicate clears TIOCEXCL on the
    /// tty (serialport does that on drop), which would end the exclusive open early.
    drainer: Arc<Mutex<serialport::TTYPort>>,
}

/// Why a device could not be opened, worded for the log, with the fix.
pub fn describe_open_error(path: &Path, e: &io::Error) -> String {
    let p = path.display();
    match e.kind() {
        io::ErrorKind::NotFound => format!(
            "serial device {p} does not exist: check [serial] device in the config (a USB adapter may be unplugged; on a Raspberry Pi enable the UART with raspi-config)"
        ),
        io::ErrorKind::PermissionDenied => format!(
            "no permission to open serial device {p}: run esp-bridge as a member of the device's group (usually dialout), as the packaged unit does"
        ),
        _ if e.raw_os_error() == Some(rustix::io::Errno::BUSY.raw_os_error())
            || e.kind() == io::ErrorKind::WouldBlock =>
        {
            format!(
                "serial device {p} is in use by another program: find it with `fuser -v {p}` (often a serial console getty or ModemManager) and stop it"
            )
        }
        _ => format!("cannot open serial device {p}: {e}"),
    }
}

/// A warning when `device` (as configured) resolves to `target`, the Raspberry Pi 5's debug
/// connector UART: there `/dev/serial0` is not the UART on GPIO14/15 (that is ttyAMA0).
pub fn debug_uart_hint(device: &Path, target: &Path) -> Option<String> {
    (target == Path::new("/dev/ttyAMA10")).then(|| {
        format!(
            "serial device {} is {}, the Raspberry Pi 5's debug connector, not GPIO14 (TXD) / GPIO15 (RXD): if the ESP board is wired to those pins, set device = \"/dev/ttyAMA0\" in the config (esp-bridge setup-pi enables that UART)",
            device.display(),
            target.display()
        )
    })
}

fn to_io(e: serialport::Error) -> io::Error {
    io::Error::from(e)
}

impl SerialDevice {
    /// Opens `path` exclusively with the given settings.
    pub fn open(path: &Path, s: &LineSettings) -> io::Result<Self> {
        let name = path.to_string_lossy();
        let port = serialport::new(name, s.baud)
            .data_bits(data_bits(s.data_bits))
            .parity(parity(s.parity))
            .stop_bits(stop_bits(s.stop_bits))
            .flow_control(flow(s.flow))
            .exclusive(true)
            .open_native()
            .map_err(to_io)?;
        // Bytes that arrived while no client had the port open are stale: a real UART that
        // nobody holds open drops them, and a client expects to see only what comes now.
        port.clear(serialport::ClearBuffer::Input).map_err(to_io)?;
        let drainer = port.try_clone_native().map_err(to_io)?;
        let raw = port.try_clone_native().map_err(to_io)?.into_raw_fd();
        // SAFETY: `into_raw_fd` hands over an open fd that nothing else owns or closes.
        let io = unsafe { OwnedFd::from_raw_fd(raw) };
        // Shared by every duplicate (one open file description); tcdrain and the ioctls are
        // unaffected by it.
        let flags = rustix::fs::fcntl_getfl(&io)?;
        rustix::fs::fcntl_setfl(&io, flags | rustix::fs::OFlags::NONBLOCK)?;
        Ok(SerialDevice {
            port,
            io: watch(io, Interest::READABLE)?,
            write_waiter: None,
            drainer: Arc::new(Mutex::new(drainer)),
        })
    }
}

fn data_bits(n: u8) -> serialport::DataBits {
    match n {
        5 => serialport::DataBits::Five,
        6 => serialport::DataBits::Six,
        7 => serialport::DataBits::Seven,
        _ => serialport::DataBits::Eight,
    }
}

fn parity(p: Parity) -> serialport::Parity {
    match p {
        Parity::None => serialport::Parity::None,
        Parity::Odd => serialport::Parity::Odd,
        Parity::Even => serialport::Parity::Even,
    }
}

fn stop_bits(s: StopBits) -> serialport::StopBits {
    match s {
        StopBits::One => serialport::StopBits::One,
        StopBits::Two => serialport::StopBits::Two,
    }
}

fn flow(f: FlowControl) -> serialport::FlowControl {
    match f {
        FlowControl::None => serialport::FlowControl::None,
        FlowControl::Software => serialport::FlowControl::Software,
        FlowControl::Hardware => serialport::FlowControl::Hardware,
    }
}

impl Uart for SerialDevice {
    fn set_baud(&mut self, baud: u32) -> io::Result<()> {
        self.port.set_baud_rate(baud).map_err(to_io)
    }
    fn set_data_bits(&mut self, bits: u8) -> io::Result<()> {
        self.port.set_data_bits(data_bits(bits)).map_err(to_io)
    }
    fn set_parity(&mut self, p: Parity) -> io::Result<()> {
        self.port.set_parity(parity(p)).map_err(to_io)
    }
    fn set_stop_bits(&mut self, bits: StopBits) -> io::Result<()> {
        self.port.set_stop_bits(stop_bits(bits)).map_err(to_io)
    }
    fn set_flow(&mut self, f: FlowControl) -> io::Result<()> {
        self.port.set_flow_control(flow(f)).map_err(to_io)
    }
    fn set_break(&mut self, on: bool) -> io::Result<()> {
        if on {
            self.port.set_break().map_err(to_io)
        } else {
            self.port.clear_break().map_err(to_io)
        }
    }
    fn purge(&mut self, input: bool, output: bool) -> io::Result<()> {
        let which = match (input, output) {
            (true, true) => serialport::ClearBuffer::All,
            (true, false) => serialport::ClearBuffer::Input,
            (false, true) => serialport::ClearBuffer::Output,
            (false, false) => return Ok(()),
        };
        self.port.clear(which).map_err(to_io)
    }
    fn drain(&mut self) -> Drain {
        let drainer = Arc::clone(&self.drainer);
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let mut port = drainer
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                // TTYPort's flush is tcdrain(): it returns when the output queue is empty.
                port.flush()
            })
            .await
            .map_err(io::Error::other)?
        })
    }
    fn modem_status(&mut self) -> io::Result<ModemStatus> {
        use crate::protocol::rfc2217::modem;
        let mut bits = 0;
        if self.port.read_carrier_detect().map_err(to_io)? {
            bits |= modem::CD;
        }
        if self.port.read_ring_indicator().map_err(to_io)? {
            bits |= modem::RI;
        }
        if self.port.read_data_set_ready().map_err(to_io)? {
            bits |= modem::DSR;
        }
        if self.port.read_clear_to_send().map_err(to_io)? {
            bits |= modem::CTS;
        }
        Ok(bits)
    }
}

/// Registers an fd with tokio's reactor for the given readiness.
fn watch(fd: OwnedFd, interest: Interest) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd is a valid open fd that only its owner closes, and its `as_raw_fd`
    // never changes; the AsyncFd owns it from here on, so it stays open while registered.
    Ok(unsafe { AsyncFd::register_with_interest(fd, interest) }?)
}

impl AsyncRead for SerialDevice {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.io.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match rustix::io::read(guard.get_inner(), &mut *unfilled) {
                Ok(n) => {
                    // Less than asked for: the tty had no more. Forget the readiness now
                    // instead of finding out with a read that fails with EAGAIN (an event
                    // that arrived meanwhile is kept: tokio compares its tick).
                    if n < unfilled.len() {
                        guard.clear_ready();
                    }
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(Errno::AGAIN) => guard.clear_ready(),
                Err(Errno::INTR) => {}
                Err(e) => return Poll::Ready(Err(e.into())),
            }
        }
    }
}

impl AsyncWrite for SerialDevice {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        loop {
            match rustix::io::write(this.io.get_ref(), buf) {
                Ok(n) => {
                    this.write_waiter = None;
                    return Poll::Ready(Ok(n));
                }
                Err(Errno::AGAIN) => {
                    let waiter = match &mut this.write_waiter {
                        Some(waiter) => waiter,
                        None => {
                            // A duplicate, so that its registration can come and go without
                            // touching the read side's; epoll reports a tty that became
                            // writable in between at once.
                            let dup = rustix::io::dup(this.io.get_ref())?;
                            this.write_waiter.insert(watch(dup, Interest::WRITABLE)?)
                        }
                    };
                    ready!(waiter.poll_write_ready(cx))?.clear_ready();
                }
                Err(Errno::INTR) => {}
                Err(e) => return Poll::Ready(Err(e.into())),
            }
        }
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Draining is done explicitly through `drain`, off the async threads.
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pi_5_debug_uart_is_named_with_the_fix() {
        let hint = debug_uart_hint(Path::new("/dev/serial0"), Path::new("/dev/ttyAMA10"));
        let hint = hint.expect("a warning for ttyAMA10");
        assert!(hint.contains("/dev/serial0 is /dev/ttyAMA10"), "{hint}");
        assert!(hint.contains("device = \"/dev/ttyAMA0\""), "{hint}");
        for target in ["/dev/ttyAMA0", "/dev/ttyS0", "/dev/ttyUSB0", "/dev/pts/3"] {
            assert_eq!(
                debug_uart_hint(Path::new("/dev/serial0"), Path::new(target)),
                None
            );
        }
    }
}
