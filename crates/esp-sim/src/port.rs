//! The wire between the virtual chip's UART and the host program, in one of
//! two forms:
//!
//! - [`Pty`]: a pseudo-terminal the sim owns; the host program opens its
//!   slave. termios tells the chip which rate the host is set to.
//! - [`UnixPort`]: a unix stream socket the sim connects to, such as a VM's
//!   serial port (qemu `-chardev socket,path=P,server=on,wait=off`, guest
//!   `/dev/ttyS1`). Nothing carries the host's termios across it, so the
//!   chip cannot see the host's rate; see [`Port::host_baud`].

use std::io::{self, Read as _, Write as _};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec, poll};

use super::pty::{self, Pty, Ready};

/// How often a lost socket is tried again (qemu restarting, or gone for good).
const RECONNECT_EVERY: Duration = Duration::from_millis(250);

pub enum Port {
    Pty(Pty),
    Unix(UnixPort),
}

impl Port {
    /// The rate the host side is set to, when the transport can tell.
    ///
    /// `None` over a socket: the guest's UART rate stays inside qemu, so the
    /// chip assumes the host is at whatever rate the chip expects. Rate
    /// mismatches can then not be simulated, but pacing still is, at the
    /// chip's rate (which the host follows when it is well behaved).
    pub fn host_baud(&self) -> Option<u32> {
        match self {
            Port::Pty(p) => p.host_baud().ok(),
            Port::Unix(_) => None,
        }
    }

    /// Reads what the host sent; `Ok(0)` when nothing is there.
    pub fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Port::Pty(p) => p.read(buf),
            Port::Unix(u) => Ok(u.read(buf)),
        }
    }

    /// Writes toward the host; `Ok(0)` when the host is not taking more yet.
    pub fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Port::Pty(p) => p.write(buf),
            Port::Unix(u) => Ok(u.write(buf)),
        }
    }

    /// Waits until the port is readable (if `want_read`) or writable (if
    /// `want_write`), `wake` fires, or `timeout` passes.
    pub fn wait(
        &mut self,
        wake: &impl AsFd,
        want_read: bool,
        want_write: bool,
        timeout: Option<Duration>,
    ) -> io::Result<Ready> {
        match self {
            Port::Pty(p) => pty::wait(p.master(), wake, want_read, want_write, timeout),
            Port::Unix(u) => u.wait(wake, want_read, want_write, timeout),
        }
    }

    /// For log messages: "pty" or "socket PATH".
    pub fn describe(&self) -> String {
        match self {
            Port::Pty(_) => "pty".into(),
            Port::Unix(u) => format!("socket {}", u.path.display()),
        }
    }
}

/// A unix stream socket to the host side, reconnected when the peer goes.
///
/// While it is not connected the chip's line is unplugged: its output is
/// lost, as a real UART's is with nothing on the other end, and nothing
/// arrives.
pub struct UnixPort {
    path: PathBuf,
    stream: Option<UnixStream>,
    next_try: Instant,
}

impl UnixPort {
    /// Connects now; an error names the path and what is expected there.
    pub fn connect(path: &Path) -> io::Result<UnixPort> {
        let stream = open(path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot connect to the unix socket {}: {e} (it should be a listening \
                     stream socket, such as qemu's -chardev socket,path={},server=on,wait=off)",
                    path.display(),
                    path.display()
                ),
            )
        })?;
        Ok(UnixPort {
            path: path.to_path_buf(),
            stream: Some(stream),
            next_try: Instant::now(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    #[cfg(test)]
    pub fn is_connected(&self) -> bool {
        self.stream.is_some()
    }

    fn lost(&mut self, why: &str) {
        if self.stream.take().is_some() {
            tracing::warn!(
                "virtual ESP32: {} {why}; the chip's UART is unplugged until it can reconnect",
                self.path.display()
            );
        }
        self.next_try = Instant::now() + RECONNECT_EVERY;
    }

    fn try_reconnect(&mut self) {
        if self.stream.is_some() || Instant::now() < self.next_try {
            return;
        }
        match open(&self.path) {
            Ok(s) => {
                tracing::info!("virtual ESP32: reconnected to {}", self.path.display());
                self.stream = Some(s);
            }
            Err(_) => self.next_try = Instant::now() + RECONNECT_EVERY,
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> usize {
        let Some(s) = self.stream.as_mut() else {
            return 0;
        };
        match s.read(buf) {
            Ok(0) => {
                self.lost("closed the connection");
                0
            }
            Ok(n) => n,
            Err(e) if would_block(&e) => 0,
            Err(e) => {
                self.lost(&format!("failed: {e}"));
                0
            }
        }
    }

    fn write(&mut self, buf: &[u8]) -> usize {
        let Some(s) = self.stream.as_mut() else {
            // Nobody on the line: the bytes are sent into nothing.
            return buf.len();
        };
        match s.write(buf) {
            Ok(n) => n,
            Err(e) if would_block(&e) => 0,
            Err(e) => {
                self.lost(&format!("failed: {e}"));
                buf.len()
            }
        }
    }

    fn wait(
        &mut self,
        wake: &impl AsFd,
        want_read: bool,
        want_write: bool,
        timeout: Option<Duration>,
    ) -> io::Result<Ready> {
        self.try_reconnect();
        if let Some(s) = &self.stream {
            return pty::wait(s, wake, want_read, want_write, timeout);
        }
        if want_write {
            // Output has nowhere to wait for: let it drain into nothing now.
            return Ok(Ready {
                writable: true,
                ..Ready::default()
            });
        }
        // Only the wake-up can end this early; wake again in time to retry.
        let until_retry = self.next_try.saturating_duration_since(Instant::now());
        let d = timeout.map_or(until_retry, |t| t.min(until_retry));
        let ts = Timespec {
            tv_sec: d.as_secs().min(i64::MAX as u64) as i64,
            tv_nsec: i64::from(d.subsec_nanos()),
        };
        let mut fds = [PollFd::new(wake, PollFlags::IN)];
        match poll(&mut fds, Some(&ts)) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => return Ok(Ready::default()),
            Err(e) => return Err(e.into()),
        }
        Ok(Ready {
            woken: fds[0].revents().contains(PollFlags::IN),
            ..Ready::default()
        })
    }
}

fn open(path: &Path) -> io::Result<UnixStream> {
    let s = UnixStream::connect(path)?;
    // The chip thread never blocks on its UART (see chip.rs).
    s.set_nonblocking(true)?;
    Ok(s)
}

fn would_block(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    fn temp_socket(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("esp-sim-port-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("s")
    }

    #[test]
    fn connect_error_names_the_path_and_the_fix() {
        let path = temp_socket("missing");
        let Err(e) = UnixPort::connect(&path) else {
            panic!("connected to nothing");
        };
        let msg = e.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("server=on"), "{msg}");
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[test]
    fn data_flows_and_a_lost_peer_is_reconnected() {
        let path = temp_socket("reconnect");
        let listener = UnixListener::bind(&path).unwrap();
        let mut port = Port::Unix(UnixPort::connect(&path).unwrap());
        assert_eq!(port.host_baud(), None);
        let (mut peer, _) = listener.accept().unwrap();
        peer.write_all(b"\xC0abc").unwrap();
        let wake = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).unwrap();
        let r = port
            .wait(&wake, true, false, Some(Duration::from_secs(1)))
            .unwrap();
        assert!(r.readable);
        let mut buf = [0u8; 8];
        assert_eq!(port.read(&mut buf).unwrap(), 4);
        assert_eq!(&buf[..4], b"\xC0abc");
        assert_eq!(port.write(b"ok").unwrap(), 2);
        let mut back = [0u8; 2];
        peer.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"ok");

        // The peer goes: EOF unplugs the line, output vanishes, then the
        // port comes back by itself once someone listens again.
        drop(peer);
        let r = port
            .wait(&wake, true, false, Some(Duration::from_secs(1)))
            .unwrap();
        assert!(r.readable);
        assert_eq!(port.read(&mut buf).unwrap(), 0);
        let Port::Unix(u) = &port else { unreachable!() };
        assert!(!u.is_connected());
        assert_eq!(port.write(b"lost").unwrap(), 4);
        let r = port.wait(&wake, false, true, None).unwrap();
        assert!(r.writable, "output drains into nothing while unplugged");
        let t = Instant::now();
        let mut peer = loop {
            let _ = port.wait(&wake, true, false, Some(Duration::from_millis(50)));
            listener.set_nonblocking(true).unwrap();
            if let Ok((p, _)) = listener.accept() {
                break p;
            }
            assert!(t.elapsed() < Duration::from_secs(2), "never reconnected");
        };
        peer.set_nonblocking(false).unwrap();
        assert_eq!(port.write(b"back").unwrap(), 4);
        let mut back = [0u8; 4];
        peer.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"back");
        assert_eq!(port.describe(), format!("socket {}", path.display()));
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }
}
