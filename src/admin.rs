//! The local control socket (`/run/esp-bridge/control.sock`, passed in by esp-bridge.socket):
//! `esp-bridge status` on the Pi asks the running service what each board is doing, and
//! `esp-bridge log [BOARD] [-f]` reads a board's kept output, then follows it. One short
//! request per connection, bounded in size, time and number (a follower in number, and in how
//! long one write to it may take); only local users with access to the socket (root and group
//! dialout, by the unit's `SocketMode=`) reach it.

use crate::error::{Error, Result};
use crate::fanout::Fanout;
use crate::identify::Identity;
use crate::log_limit::limited;
use crate::shutdown::stopping;
use crate::status::StatusBook;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, watch};

/// Where the packaged socket unit puts the control socket.
pub const DEFAULT_PATH: &str = "/run/esp-bridge/control.sock";
/// Requests answered at once; more wait in the listen backlog.
const MAX_REQUESTS: usize = 4;
/// The longest request line.
const MAX_REQUEST: u64 = 256;
/// How long a connection may take to send its request and take the answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// `esp-bridge log -f` readers at once.
const MAX_FOLLOWERS: usize = 4;

/// Binds the control socket at `path` (without systemd): a stale socket file is replaced,
/// anything else at that path is refused.
pub fn bind(path: &Path) -> Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(Error::config(format!(
                "--control-socket {}: something other than a socket is there; give a new path",
                path.display()
            )));
        }
        let _ = std::fs::remove_file(path);
    }
    UnixListener::bind(path).map_err(|e| {
        Error::failure(format!(
            "cannot create the control socket {}: {e}",
            path.display()
        ))
    })
}

/// Answers requests until the supervisor stops.
pub async fn serve(listener: UnixListener, book: StatusBook, mut stop: watch::Receiver<bool>) {
    let permits = Arc::new(Semaphore::new(MAX_REQUESTS));
    let followers = Arc::new(Semaphore::new(MAX_FOLLOWERS));
    loop {
        let permit = tokio::select! {
            () = stopping(&mut stop) => return,
            p = Arc::clone(&permits).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let stream = tokio::select! {
            () = stopping(&mut stop) => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    limited!(warn, "failed control connections", "control socket: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let book = book.clone();
        let followers = Arc::clone(&followers);
        let stop = stop.clone();
        tokio::spawn(async move {
            let answered = tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, &book)).await;
            // An identification goes on after its request's time, bounded by its own.
            if let Ok(Ok(Next::Identify(asked, write))) = answered {
                identify(asked, write).await;
                drop(permit);
                return;
            }
            drop(permit);
            // A follower goes on after its request's time, with a permit of its own.
            if let Ok(Ok(Next::Follow(output, write))) = answered {
                match Arc::clone(&followers).try_acquire_owned() {
                    Ok(permit) => {
                        let mut write = write;
                        let mut stop = stop;
                        crate::console::follow(&output, &mut write, stopping(&mut stop)).await;
                        drop(permit);
                    }
                    Err(_) => {
                        let mut write = write;
                        let text = format!(
                            "error: {MAX_FOLLOWERS} readers already follow; try again later\n"
                        );
                        let _ =
                            tokio::time::timeout(REQUEST_TIMEOUT, write.write_all(text.as_bytes()))
                                .await;
                    }
                }
            }
        });
    }
}

/// What a request asks for.
#[derive(Debug, PartialEq, Eq)]
enum Request<'a> {
    Status,
    /// Identify a board's chip (the only board's, without a name).
    Identify {
        board: Option<&'a str>,
    },
    /// A board's kept output (the only board's, without a name), then its live output if
    /// `follow`.
    Log {
        board: Option<&'a str>,
        follow: bool,
    },
}

fn parse(line: &str) -> std::result::Result<Request<'_>, String> {
    let mut words = line.split_whitespace();
    match (words.next(), words.next(), words.next(), words.next()) {
        (Some("status"), None, ..) => Ok(Request::Status),
        (Some("identify"), board, None, _) => Ok(Request::Identify { board }),
        (Some("log"), Some(how @ ("once" | "follow")), board, None) => Ok(Request::Log {
            board,
            follow: how == "follow",
        }),
        _ => Err(format!(
            "error: unknown request {:?}; this esp-bridge answers: status, log once|follow [BOARD], identify [BOARD]\n",
            line.trim().chars().take(40).collect::<String>()
        )),
    }
}

/// What a connection goes on with after its request was read.
enum Next {
    Done,
    /// Following a board's output.
    Follow(Fanout, OwnedWriteHalf),
    /// Waiting for an identification's result.
    Identify(IdentifyAsked, OwnedWriteHalf),
}

/// An identification asked of a board's bridge: its answer to come.
type IdentifyAsked = tokio::sync::oneshot::Receiver<std::result::Result<Identity, String>>;

/// How long an identification's answer may take to come: the bridge's own bound, and time to
/// put the device back.
const IDENTIFY_ANSWER: Duration =
    Duration::from_secs(crate::identify::IDENTIFY_TIMEOUT.as_secs() + 5);

/// Tells the asker what the identification found.
async fn identify(asked: IdentifyAsked, mut write: OwnedWriteHalf) {
    let text = match tokio::time::timeout(IDENTIFY_ANSWER, asked).await {
        Ok(Ok(Ok(chip))) => format!("{}\n", chip.describe()),
        Ok(Ok(Err(why))) => format!("error: {why}\n"),
        Ok(Err(_)) => "error: the board stopped before the identification finished\n".to_string(),
        Err(_) => "error: the identification took too long\n".to_string(),
    };
    let _ = tokio::time::timeout(REQUEST_TIMEOUT, async {
        write.write_all(text.as_bytes()).await?;
        write.shutdown().await
    })
    .await;
}

/// Answers one request; a log request that follows and an identification return what the
/// connection goes on with.
async fn answer(stream: UnixStream, book: &StatusBook) -> std::io::Result<Next> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read.take(MAX_REQUEST))
        .read_line(&mut line)
        .await?;
    let (reply, follow) = match parse(&line) {
        Ok(Request::Status) => (book.report(), None),
        Ok(Request::Identify { board }) => {
            let sent = match book.identify(board) {
                Ok(bridge) => {
                    let (ask, asked) = tokio::sync::oneshot::channel();
                    match bridge.try_send(ask) {
                        Ok(()) => Ok(asked),
                        Err(_) => Err(
                            "the board is busy with other identifications; try again in a moment"
                                .to_string(),
                        ),
                    }
                }
                Err(why) => Err(why),
            };
            match sent {
                Ok(asked) => return Ok(Next::Identify(asked, write)),
                Err(why) => (format!("error: {why}\n"), None),
            }
        }
        // A follower gets the history from `console::follow`, with nothing missed between.
        Ok(Request::Log { board, follow }) => match book.output(board) {
            Ok(output) if follow => (String::new(), Some(output)),
            Ok(output) => (output.history(), None),
            Err(why) => (format!("error: {why}\n"), None),
        },
        Err(why) => (why, None),
    };
    write.write_all(reply.as_bytes()).await?;
    if let Some(output) = follow {
        return Ok(Next::Follow(output, write));
    }
    write.shutdown().await?;
    Ok(Next::Done)
}

/// Connects to the service's control socket.
fn connect(path: &Path) -> Result<std::os::unix::net::UnixStream> {
    std::os::unix::net::UnixStream::connect(path).map_err(|e| {
        Error::failure(format!(
            "cannot reach the service at {}: {e}\n  hint: is it installed and enabled? `sudo systemctl enable --now esp-bridge.socket` (without systemd, start it with --control-socket {})",
            path.display(),
            path.display()
        ))
    })
}

/// Sends one request to the service on `path` and returns its whole answer.
fn ask(path: &Path, request: &str, within: Duration) -> Result<String> {
    use std::io::{Read, Write};
    let mut stream = connect(path)?;
    let _ = stream.set_read_timeout(Some(within));
    stream
        .write_all(request.as_bytes())
        .map_err(|e| Error::failure(format!("asking the service failed: {e}")))?;
    let mut reply = String::new();
    stream
        .take(1 << 20)
        .read_to_string(&mut reply)
        .map_err(|e| Error::failure(format!("reading the service's answer failed: {e}")))?;
    Ok(reply)
}

/// `esp-bridge status`: asks the service on `path` and prints its answer.
pub fn status(path: &Path) -> Result {
    // Socket activation may start the service first.
    print!("{}", ask(path, "status\n", Duration::from_secs(10))?);
    Ok(())
}

/// `esp-bridge identify [BOARD]`: has the service read the board's chip and prints it.
pub fn identify_board(path: &Path, board: Option<&str>) -> Result {
    let reply = ask(
        path,
        &format!("identify {}\n", board.unwrap_or("")),
        IDENTIFY_ANSWER + Duration::from_secs(10),
    )?;
    match reply.strip_prefix("error: ") {
        Some(why) => Err(Error::failure(why.trim_end().to_string())),
        None if reply.is_empty() => Err(Error::failure("the service gave no answer")),
        None => {
            print!("{reply}");
            Ok(())
        }
    }
}

/// `esp-bridge log [BOARD] [-f]`: prints the board's kept output, then (with `follow`) what
/// it prints from now on, until interrupted.
pub fn log(path: &Path, board: Option<&str>, follow: bool) -> Result {
    use std::io::{BufRead, Write};
    let mut stream = connect(path)?;
    let request = format!(
        "log {} {}\n",
        if follow { "follow" } else { "once" },
        board.unwrap_or("")
    );
    stream
        .write_all(request.as_bytes())
        .map_err(|e| Error::failure(format!("asking the service failed: {e}")))?;
    if !follow {
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    }
    let mut reader = std::io::BufReader::new(stream);
    let mut out = std::io::stdout().lock();
    let mut line = String::new();
    loop {
        line.clear();
        let n = reader
            .read_line(&mut line)
            .map_err(|e| Error::failure(format!("reading the service's answer failed: {e}")))?;
        if n == 0 {
            return Ok(());
        }
        if let Some(why) = line.strip_prefix("error: ") {
            return Err(Error::failure(why.trim_end().to_string()));
        }
        if out
            .write_all(line.as_bytes())
            .and_then(|()| out.flush())
            .is_err()
        {
            // The reader of our output went away (a pipe into head).
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_parsed_strictly() {
        assert_eq!(parse("status\n"), Ok(Request::Status));
        assert_eq!(
            parse("log once \n"),
            Ok(Request::Log {
                board: None,
                follow: false
            })
        );
        assert_eq!(
            parse("log follow lab1\n"),
            Ok(Request::Log {
                board: Some("lab1"),
                follow: true
            })
        );
        for bad in ["", "log", "log lab1", "log once a b", "status now", "statu"] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
