//! The pseudo-terminal the virtual chip sits behind: the master side is the
//! chip's UART, the slave side (`/dev/pts/N`) is what a host program opens as
//! its serial port.
//!
//! The sim keeps its own slave descriptor open for its whole life, so the
//! master never reads EIO when the bridge closes and reopens the port, and so
//! the slave's termios (its baud rate in particular) survive in between. On
//! Linux `tcgetattr` on the master reports the slave's settings, which is how
//! the chip learns which rate the host's "UART" is set to.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::fs::{Mode, OFlags};
use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
use rustix::termios::{OptionalActions, tcgetattr, tcsetattr};

pub struct Pty {
    master: OwnedFd,
    /// Held open for the reasons above; never read or written.
    _slave: OwnedFd,
    slave_path: PathBuf,
}

impl Pty {
    /// Opens a new pty pair, with the slave raw (8N1, no echo, no line
    /// editing or CR/LF translation) at `baud`.
    pub fn open(baud: u32) -> io::Result<Pty> {
        let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)?;
        grantpt(&master)?;
        unlockpt(&master)?;
        let name = ptsname(&master, Vec::new())?;
        let slave_path = PathBuf::from(name.to_string_lossy().into_owned());
        let slave = rustix::fs::open(
            &slave_path,
            OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let mut t = tcgetattr(&slave)?;
        t.make_raw();
        t.set_speed(baud)?;
        tcsetattr(&slave, OptionalActions::Now, &t)?;
        // The chip's side never blocks: a host that stops reading must not
        // be able to wedge the simulator thread.
        let flags = rustix::fs::fcntl_getfl(&master)?;
        rustix::fs::fcntl_setfl(&master, flags | OFlags::NONBLOCK)?;
        Ok(Pty {
            master,
            _slave: slave,
            slave_path,
        })
    }

    pub fn slave_path(&self) -> &Path {
        &self.slave_path
    }

    pub fn master(&self) -> &OwnedFd {
        &self.master
    }

    /// The rate the slave is set to right now, in both directions.
    ///
    /// Only the output speed counts: a UART has one baud generator, and
    /// serial drivers ignore a separate input speed. On a pty it can differ
    /// by accident: glibc's `tcsetattr` keeps the CIBAUD bits of `c_cflag`,
    /// so a host program that sets "both" speeds through it (pyserial does)
    /// leaves the input speed of whoever configured the slave before.
    pub fn host_baud(&self) -> io::Result<u32> {
        Ok(tcgetattr(&self.master)?.output_speed())
    }

    /// Reads what the host wrote; `Ok(0)` when nothing is there.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match rustix::io::read(&self.master, buf) {
            Ok(n) => Ok(n),
            Err(rustix::io::Errno::AGAIN) | Err(rustix::io::Errno::INTR) => Ok(0),
            Err(e) => Err(e.into()),
        }
    }

    /// Writes toward the host; `Ok(0)` when its input queue is full.
    pub fn write(&self, buf: &[u8]) -> io::Result<usize> {
        match rustix::io::write(&self.master, buf) {
            Ok(n) => Ok(n),
            Err(rustix::io::Errno::AGAIN) | Err(rustix::io::Errno::INTR) => Ok(0),
            Err(e) => Err(e.into()),
        }
    }
}

/// Readiness of the master and of the wake-up descriptor after [`wait`].
#[derive(Debug, Default, Clone, Copy)]
pub struct Ready {
    pub readable: bool,
    pub writable: bool,
    pub woken: bool,
}

/// Waits until the master is readable (if `want_read`) or writable (if
/// `want_write`), the wake descriptor fires, or `timeout` passes.
pub fn wait(
    master: &impl AsFd,
    wake: &impl AsFd,
    want_read: bool,
    want_write: bool,
    timeout: Option<Duration>,
) -> io::Result<Ready> {
    let mut flags = PollFlags::empty();
    if want_read {
        flags |= PollFlags::IN;
    }
    if want_write {
        flags |= PollFlags::OUT;
    }
    let mut fds = [PollFd::new(master, flags), PollFd::new(wake, PollFlags::IN)];
    let ts = timeout.map(|d| Timespec {
        tv_sec: d.as_secs().min(i64::MAX as u64) as i64,
        tv_nsec: i64::from(d.subsec_nanos()),
    });
    match poll(&mut fds, ts.as_ref()) {
        Ok(_) => {}
        Err(rustix::io::Errno::INTR) => return Ok(Ready::default()),
        Err(e) => return Err(e.into()),
    }
    let m = fds[0].revents();
    Ok(Ready {
        readable: m.intersects(PollFlags::IN | PollFlags::HUP | PollFlags::ERR),
        writable: m.contains(PollFlags::OUT),
        woken: fds[1].revents().contains(PollFlags::IN),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::termios::tcgetattr;

    #[test]
    fn slave_is_raw_at_the_requested_rate_and_master_sees_its_speed() {
        let pty = Pty::open(115_200).unwrap();
        assert!(pty.slave_path().starts_with("/dev/pts"));
        assert_eq!(pty.host_baud().unwrap(), 115_200);
        // A host changing the slave's rate is visible from the master.
        let host = rustix::fs::open(
            pty.slave_path(),
            OFlags::RDWR | OFlags::NOCTTY,
            Mode::empty(),
        )
        .unwrap();
        let mut t = tcgetattr(&host).unwrap();
        t.set_speed(921_600).unwrap();
        tcsetattr(&host, OptionalActions::Now, &t).unwrap();
        assert_eq!(pty.host_baud().unwrap(), 921_600);
        // Data flows both ways, untranslated.
        rustix::io::write(&host, b"\r\n\xC0").unwrap();
        let mut buf = [0u8; 8];
        let r = wait(
            pty.master(),
            pty.master(),
            true,
            false,
            Some(Duration::from_secs(1)),
        )
        .unwrap();
        assert!(r.readable);
        assert_eq!(pty.read(&mut buf).unwrap(), 3);
        assert_eq!(&buf[..3], b"\r\n\xC0");
        assert_eq!(pty.write(b"ok\n").unwrap(), 3);
        let mut back = [0u8; 8];
        assert_eq!(rustix::io::read(&host, &mut back[..]).unwrap(), 3);
        assert_eq!(&back[..3], b"ok\n");
        // Closing the host side leaves the master usable.
        drop(host);
        assert_eq!(pty.read(&mut buf).unwrap(), 0);
    }
}
