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
use std::io;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

/// Modem input lines as RFC 2217 reports them (CD, RI, DSR, CTS bits of NOTIFY-MODEMSTATE).
pub type ModemStatus = u8;

/// What a bounded drain did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// Everything written so far has left the UART.
    Done,
    /// The output did not leave in the time it needs at the current rate (flow control held
    /// it: an XOFF from the device, CTS low) and was discarded.
    Discarded,
}

/// A future that completes when everything written so far has left the UART, or within the
/// time that should take, after discarding what is left.
pub type Drain = Pin<Box<dyn Future<Output = io::Result<Drained>> + Send>>;

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
    /// Waits, off the async threads and bounded, until the output queue is empty.
    fn drain(&mut self) -> Drain;
    /// The modem input lines; `Err` when the device has none (a pty, most Pi UARTs).
    fn modem_status(&mut self) -> io::Result<ModemStatus>;
    /// Every line setting of `s` at once.
    fn set_line(&mut self, s: &LineSettings) -> io::Result<()> {
        self.set_baud(s.baud)?;
        self.set_data_bits(s.data_bits)?;
        self.set_parity(s.parity)?;
        self.set_stop_bits(s.stop_bits)?;
        self.set_flow(s.flow)
    }
}

/// A tty opened with serialport, its bytes moved through tokio.
pub struct SerialDevice {
    /// The port as opened: line settings, purge, break, modem lines.
    port: serialport::TTYPort,
    /// The fd the bytes go through (non-blocking), registered for readability only.
    io: AsyncFd<OwnedFd>,
    /// Registered for writability while a write is blocked (a tty that is full), else none.
    write_waiter: Option<AsyncFd<OwnedFd>>,
    /// A duplicate of the fd for tcdrain, which blocks: it runs on tokio's blocking pool,
    /// and for the tcflush that ends a drain that takes too long. A plain fd: serialport's
    /// own duplicates clear TIOCEXCL when dropped, which would end the exclusive open early.
    aux: Arc<OwnedFd>,
    /// The rate in force, for the time a drain may take.
    baud: u32,
}

/// How long the output queue may take to leave: twice its wire time at `baud` (10 bits a
/// byte, the UART's FIFO included), plus a second.
pub fn drain_budget(queued: usize, baud: u32) -> Duration {
    let bits = (queued as u64).saturating_add(64).saturating_mul(10 * 2);
    Duration::from_secs(1)
        + Duration::from_micros(bits.saturating_mul(1_000_000) / u64::from(baud.max(1)))
}

/// What is at a device path, as far as serving it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DevicePath {
    Missing,
    NoPermission,
    /// Something that is not a character device: "a regular file", "a FIFO", ...
    NotADevice(&'static str),
    /// A character device that is not a terminal (/dev/null, a gpiochip).
    NotATty,
    /// Opening it failed with EBUSY: another program holds it exclusively.
    Busy,
    /// A terminal (serial port) that can be opened.
    Tty,
    Other(String),
}

impl DevicePath {
    /// Looks at `path` without keeping it open. Opening a tty raises DTR and RTS for a moment
    /// (both at once, which an auto-program circuit ignores): used only to explain a failure
    /// and in check-config.
    pub fn inspect(path: &Path) -> DevicePath {
        use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return DevicePath::Missing,
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                return DevicePath::NoPermission;
            }
            Err(e) => return DevicePath::Other(e.to_string()),
        };
        let t = meta.file_type();
        if !t.is_char_device() {
            return DevicePath::NotADevice(if t.is_file() {
                "a regular file"
            } else if t.is_dir() {
                "a directory"
            } else if t.is_fifo() {
                "a FIFO"
            } else if t.is_socket() {
                "a socket"
            } else {
                "not a character device"
            });
        }
        let file = std::fs::File::options()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
            .open(path);
        match file {
            Ok(f) if rustix::termios::isatty(&f) => DevicePath::Tty,
            Ok(_) => DevicePath::NotATty,
            Err(e) if e.raw_os_error() == Some(Errno::BUSY.raw_os_error()) => DevicePath::Busy,
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => DevicePath::NoPermission,
            Err(e) if e.kind() == io::ErrorKind::NotFound => DevicePath::Missing,
            Err(e) => DevicePath::Other(e.to_string()),
        }
    }
}

/// Why a device could not be opened, worded for the log, with the fix. serialport reports a
/// device held by another program (EBUSY, or its lock) as "no device", and a regular file as
/// "Not a typewriter": the path is looked at again to name the real cause.
pub fn describe_open_error(path: &Path, e: &io::Error) -> String {
    let p = path.display();
    match DevicePath::inspect(path) {
        DevicePath::Missing => format!(
            "serial device {p} does not exist: check [serial] device in the config (a USB adapter may be unplugged; on a Raspberry Pi enable the UART with raspi-config)"
        ),
        DevicePath::NoPermission => format!(
            "no permission to open serial device {p}: run esp-bridge as a member of the device's group (usually dialout), as the packaged unit does"
        ),
        DevicePath::NotADevice(what) => format!(
            "{p} is {what}, not a serial device: set [serial] device to the board's serial port (e.g. /dev/serial0, /dev/ttyUSB0 or a /dev/serial/by-path/ name)"
        ),
        DevicePath::NotATty => format!(
            "{p} is a device but not a serial port (a terminal): set [serial] device to the board's serial port (e.g. /dev/serial0, /dev/ttyUSB0)"
        ),
        DevicePath::Busy => in_use(path),
        // It opens for us now, yet serialport could not: its exclusive lock was taken (flock)
        // by another program, or the device was busy a moment ago.
        DevicePath::Tty if e.kind() == io::ErrorKind::NotFound => in_use(path),
        DevicePath::Tty | DevicePath::Other(_) => format!("cannot open serial device {p}: {e}"),
    }
}

fn in_use(path: &Path) -> String {
    let p = path.display();
    format!(
        "serial device {p} is in use by another program: find it with `fuser -v {p}` (often a serial console getty, ModemManager, or another esp-bridge) and stop it"
    )
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
        let raw = port.try_clone_native().map_err(to_io)?.into_raw_fd();
        // SAFETY: `into_raw_fd` hands over an open fd that nothing else owns or closes.
        let io = unsafe { OwnedFd::from_raw_fd(raw) };
        let aux = rustix::io::dup(&io)?;
        // Shared by every duplicate (one open file description); tcdrain and the ioctls are
        // unaffected by it.
        let flags = rustix::fs::fcntl_getfl(&io)?;
        rustix::fs::fcntl_setfl(&io, flags | rustix::fs::OFlags::NONBLOCK)?;
        Ok(SerialDevice {
            port,
            io: watch(io, Interest::READABLE)?,
            write_waiter: None,
            aux: Arc::new(aux),
            baud: s.baud,
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
        self.port.set_baud_rate(baud).map_err(to_io)?;
        self.baud = baud;
        Ok(())
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
        let aux = Arc::clone(&self.aux);
        let queued = self.port.bytes_to_write().map_or(4096, |n| n as usize);
        let within = drain_budget(queued, self.baud);
        let waiting = Arc::clone(&aux);
        Box::pin(bounded_drain(
            move || Ok(rustix::termios::tcdrain(&*waiting)?),
            within,
            // Discarding the queue also ends the tcdrain still waiting for it.
            move || {
                Ok(rustix::termios::tcflush(
                    &*aux,
                    rustix::termios::QueueSelector::OFlush,
                )?)
            },
        ))
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

/// Runs the blocking `drain` on the blocking pool for at most `within`; past that, `discard`
/// empties the queue (which also lets the blocked call return) and the drain counts as
/// [`Drained::Discarded`].
async fn bounded_drain(
    drain: impl FnOnce() -> io::Result<()> + Send + 'static,
    within: Duration,
    discard: impl FnOnce() -> io::Result<()>,
) -> io::Result<Drained> {
    match tokio::time::timeout(within, tokio::task::spawn_blocking(drain)).await {
        Ok(joined) => {
            joined.map_err(io::Error::other)??;
            Ok(Drained::Done)
        }
        Err(_) => {
            discard()?;
            Ok(Drained::Discarded)
        }
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

    #[tokio::test(flavor = "current_thread")]
    async fn a_drain_that_does_not_finish_in_time_discards_the_output() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let released = Arc::new(AtomicBool::new(false));
        let (hung, flushed) = (Arc::clone(&released), Arc::clone(&released));
        let started = std::time::Instant::now();
        let outcome = bounded_drain(
            // A tcdrain that only returns once the queue is flushed (CTS low, XOFF).
            move || {
                while !hung.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Ok(())
            },
            Duration::from_millis(200),
            move || {
                flushed.store(true, Ordering::SeqCst);
                Ok(())
            },
        )
        .await
        .unwrap();
        assert_eq!(outcome, Drained::Discarded);
        assert!(released.load(Ordering::SeqCst), "the queue was flushed");
        assert!(started.elapsed() < Duration::from_secs(2));
        let done = bounded_drain(|| Ok(()), Duration::from_secs(5), || Ok(())).await;
        assert_eq!(done.unwrap(), Drained::Done);
    }

    #[test]
    fn the_drain_budget_is_twice_the_wire_time_plus_a_second() {
        assert_eq!(
            drain_budget(0, 115_200),
            Duration::from_secs(1) + Duration::from_micros(11_111)
        );
        // 4 KiB at 300 baud: 137 s on the wire; the budget covers it twice.
        assert!(drain_budget(4096, 300) > Duration::from_secs(274));
        // No overflow on absurd inputs.
        assert!(drain_budget(usize::MAX, 1) > Duration::from_secs(1));
    }

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
