//! The local control socket (`/run/esp-bridge/control.sock`, passed in by esp-bridge.socket):
//! `esp-bridge status` on the Pi asks the running service what each board is doing. One short
//! request per connection, bounded in size, time and number; only local users with access to
//! the socket (root and group dialout, by the unit's `SocketMode=`) reach it.

use crate::error::{Error, Result};
use crate::log_limit::limited;
use crate::shutdown::stopping;
use crate::status::StatusBook;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
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
        tokio::spawn(async move {
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, &book)).await;
            drop(permit);
        });
    }
}

async fn answer(stream: UnixStream, book: &StatusBook) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read.take(MAX_REQUEST))
        .read_line(&mut line)
        .await?;
    let reply = match line.trim() {
        "status" => book.report(),
        other => format!(
            "error: unknown request {:?}; this esp-bridge answers: status\n",
            other.chars().take(40).collect::<String>()
        ),
    };
    write.write_all(reply.as_bytes()).await?;
    write.shutdown().await
}

/// `esp-bridge status`: asks the service on `path` and prints its answer.
pub fn status(path: &Path) -> Result {
    use std::io::{Read, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(path).map_err(|e| {
        Error::failure(format!(
            "cannot reach the service at {}: {e}\n  hint: is it installed and enabled? `sudo systemctl enable --now esp-bridge.socket` (without systemd, start it with --control-socket {})",
            path.display(),
            path.display()
        ))
    })?;
    // Socket activation may start the service first.
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    stream
        .write_all(b"status\n")
        .map_err(|e| Error::failure(format!("asking the service failed: {e}")))?;
    let mut reply = String::new();
    stream
        .take(1 << 20)
        .read_to_string(&mut reply)
        .map_err(|e| Error::failure(format!("reading the service's answer failed: {e}")))?;
    print!("{reply}");
    Ok(())
}
