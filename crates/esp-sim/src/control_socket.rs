//! Strap changes from outside the process: a unix stream socket on which the
//! sim listens for lines such as `en=low io0=high`, so that something that
//! is not linked into this process (a watcher relaying GPIO edges out of a
//! VM, a test script) can drive EN and IO0.
//!
//! Protocol, one line per request (`\n` or `\r\n`):
//!
//! - `en=LEVEL io0=LEVEL`, either key alone, in any order: sets the pins
//!   in one [`StrapPins::set`] (one timestamp, so an EN rising edge sees this
//!   IO0); a missing key keeps that pin's level. LEVEL is `low`/`high`/`0`/`1`.
//!   Answer `ok`.
//! - `get`: answers `en=LEVEL io0=LEVEL`.
//! - Anything else: answers `error: ...` and the connection stays usable.
//!
//! Several clients may be connected; each line is applied as it arrives.

use std::io::{self, Read as _, Write as _};
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileTypeExt as _;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use rustix::event::{EventfdFlags, PollFd, PollFlags, eventfd, poll};

use super::{Level, StrapPins};

/// A line longer than this is not a command; its client is dropped.
const MAX_LINE: usize = 256;
/// More clients than this are turned away (a relay needs one).
const MAX_CLIENTS: usize = 16;

/// What a request line asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Set the pins; `None` keeps a pin as it is.
    Set {
        en: Option<Level>,
        io0: Option<Level>,
    },
    Get,
}

/// Parses one request line (without its line ending).
pub fn parse(line: &str) -> Result<Request, String> {
    let line = line.trim();
    if line == "get" {
        return Ok(Request::Get);
    }
    let (mut en, mut io0) = (None, None);
    for word in line.split_ascii_whitespace() {
        let Some((key, value)) = word.split_once('=') else {
            return Err(format!("'{word}' is not key=level {USAGE}"));
        };
        let level = match value {
            "low" | "0" => Level::Low,
            "high" | "1" => Level::High,
            _ => return Err(format!("'{value}' is not a level {USAGE}")),
        };
        let slot = match key {
            "en" => &mut en,
            "io0" => &mut io0,
            _ => return Err(format!("unknown pin '{key}' {USAGE}")),
        };
        if slot.replace(level).is_some() {
            return Err(format!("'{key}' given twice"));
        }
    }
    if en.is_none() && io0.is_none() {
        return Err(format!("empty request {USAGE}"));
    }
    Ok(Request::Set { en, io0 })
}

const USAGE: &str = "(expected: en=low|high io0=low|high, either alone, or get)";

/// Applies one line to the pins and returns the answer, newline included.
pub fn handle_line(line: &str, pins: &StrapPins) -> String {
    match parse(line) {
        Ok(Request::Get) => {
            let (en, io0) = pins.levels();
            format!("en={} io0={}\n", en.name(), io0.name())
        }
        Ok(Request::Set { en, io0 }) => {
            let (cur_en, cur_io0) = pins.levels();
            pins.set(en.unwrap_or(cur_en), io0.unwrap_or(cur_io0));
            "ok\n".into()
        }
        Err(e) => format!("error: {e}\n"),
    }
}

/// The listening socket and its thread. Dropping it stops the thread and
/// removes the socket file.
pub struct ControlSocket {
    path: PathBuf,
    stop: std::sync::Arc<OwnedFd>,
    thread: Option<JoinHandle<()>>,
}

impl ControlSocket {
    pub fn start(path: &Path, pins: StrapPins) -> io::Result<ControlSocket> {
        // A socket left by an earlier run that died is replaced; any other
        // kind of file is not ours to delete.
        if let Ok(m) = std::fs::symlink_metadata(path) {
            if !m.file_type().is_socket() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!(
                        "{} exists and is not a socket; choose another --control-unix path",
                        path.display()
                    ),
                ));
            }
            std::fs::remove_file(path)?;
        }
        let listener = UnixListener::bind(path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot listen on the unix socket {}: {e}", path.display()),
            )
        })?;
        listener.set_nonblocking(true)?;
        let stop = std::sync::Arc::new(eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?);
        let stop_in_thread = std::sync::Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("esp32-sim-control".into())
            .spawn(move || serve(listener, &stop_in_thread, &pins));
        let thread = match thread {
            Ok(t) => t,
            Err(e) => {
                let _ = std::fs::remove_file(path);
                return Err(e);
            }
        };
        Ok(ControlSocket {
            path: path.to_path_buf(),
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = rustix::io::write(&*self.stop, &1u64.to_ne_bytes());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.file_type().is_socket()) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

struct Client {
    stream: UnixStream,
    buf: Vec<u8>,
}

impl Client {
    /// Reads what is there and answers every complete line. `false` when the
    /// client is gone or misbehaved and should be dropped.
    fn service(&mut self, pins: &StrapPins) -> bool {
        let mut chunk = [0u8; 512];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return false,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return false,
            }
        }
        while let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=end).collect();
            let answer = match std::str::from_utf8(&line) {
                Ok(text) => handle_line(text.trim_end_matches(['\n', '\r']), pins),
                Err(_) => "error: not UTF-8 text\n".into(),
            };
            // Answers are a few bytes; a client that lets 200 KiB of them
            // pile up unread is not a client worth blocking the pins for.
            if self.stream.write_all(answer.as_bytes()).is_err() {
                return false;
            }
        }
        if self.buf.len() > MAX_LINE {
            let _ = self.stream.write_all(b"error: line too long\n");
            return false;
        }
        true
    }
}

fn serve(listener: UnixListener, stop: &OwnedFd, pins: &StrapPins) {
    let mut clients: Vec<Client> = Vec::new();
    loop {
        let (listener_ready, stop_ready, ready): (bool, bool, Vec<bool>) = {
            let mut fds = Vec::with_capacity(clients.len() + 2);
            fds.push(PollFd::new(stop, PollFlags::IN));
            fds.push(PollFd::new(&listener, PollFlags::IN));
            for c in &clients {
                fds.push(PollFd::new(&c.stream, PollFlags::IN));
            }
            match poll(&mut fds, None) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    tracing::warn!("virtual ESP32: control socket poll failed: {e}; closing it");
                    return;
                }
            }
            let any = |f: &PollFd<'_>| !f.revents().is_empty();
            (
                any(&fds[1]),
                any(&fds[0]),
                fds[2..].iter().map(any).collect(),
            )
        };
        if stop_ready {
            return;
        }
        let mut i = 0;
        clients.retain_mut(|c| {
            let keep = !ready[i] || c.service(pins);
            i += 1;
            keep
        });
        if listener_ready {
            while let Ok((stream, _)) = listener.accept() {
                if clients.len() >= MAX_CLIENTS || stream.set_nonblocking(true).is_err() {
                    continue;
                }
                clients.push(Client {
                    stream,
                    buf: Vec::new(),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_one_or_no_pins() {
        use Level::{High, Low};
        assert_eq!(
            parse("en=low io0=high"),
            Ok(Request::Set {
                en: Some(Low),
                io0: Some(High)
            })
        );
        assert_eq!(
            parse("  io0=0   en=1 "),
            Ok(Request::Set {
                en: Some(High),
                io0: Some(Low)
            })
        );
        assert_eq!(
            parse("en=low"),
            Ok(Request::Set {
                en: Some(Low),
                io0: None
            })
        );
        assert_eq!(parse("get"), Ok(Request::Get));
        for bad in [
            "",
            "en",
            "en=up",
            "gpio0=low",
            "en=low en=high",
            "get en=low",
        ] {
            let e = parse(bad).expect_err(bad);
            assert!(!e.is_empty());
        }
        assert!(parse("rst=low").unwrap_err().contains("en=low|high"));
    }
}
