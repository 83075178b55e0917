//! A board's output for people to read: what it printed before (its history), then what it
//! prints from now on, as lines stamped with the time they arrived, until the reader leaves
//! or stops reading. `esp-bridge log -f` on the control socket and a board's read-only console
//! port (`console_listen`, for `nc` and `telnet`) both serve it; nothing a reader sends reaches
//! the board.

use crate::fanout::Fanout;
use crate::history::Lines;
use std::future::{Future, poll_fn};
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// How long one write to a reader may take before it is dropped (a reader that stopped).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// The most output turned into lines at once.
const TAKE: usize = 16 * 1024;

/// How long a parting line may take to reach a reader that is being closed.
const FAREWELL_TIMEOUT: Duration = Duration::from_secs(1);

/// Why [`follow`] returned.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended<T> {
    /// `stop` completed with this.
    Stopped(T),
    /// The reader went away, or did not take a write for [`WRITE_TIMEOUT`].
    ReaderGone,
}

/// Writes the board's history (the kept lines), then its output as it comes, to `write`.
pub async fn follow<W, T>(output: &Fanout, write: &mut W, stop: impl Future<Output = T>) -> Ended<T>
where
    W: AsyncWrite + Unpin,
{
    let (kept, sub) = output.subscribe_after_history();
    tokio::pin!(stop);
    let mut text = kept;
    let mut lines = Lines::default();
    let mut chunk = Vec::new();
    loop {
        if !text.is_empty() {
            tokio::select! {
                why = &mut stop => return Ended::Stopped(why),
                sent = send(write, &text) => if !sent { return Ended::ReaderGone },
            }
            text.clear();
        }
        let taken = tokio::select! {
            why = &mut stop => return Ended::Stopped(why),
            taken = poll_fn(|cx| sub.poll_take(cx, &mut chunk, TAKE)) => taken,
        };
        if taken.lost > 0 {
            text.push_str(&format!(
                "[esp-bridge] {} bytes of output lost here: this reader did not keep up\n",
                taken.lost
            ));
        }
        lines.feed(&chunk, SystemTime::now(), &mut text);
        chunk.clear();
    }
}

async fn send<W: AsyncWrite + Unpin>(write: &mut W, text: &str) -> bool {
    matches!(
        tokio::time::timeout(WRITE_TIMEOUT, write.write_all(text.as_bytes())).await,
        Ok(Ok(()))
    )
}

/// Serves one reader of a board's console port: `greeting`, the history, then the live
/// output, until the reader closes, stops reading, or `stop` gives the reason it is closed
/// (said to it in a last line). What the reader sends is read and dropped: only its end
/// matters.
pub async fn serve_reader<S>(
    stream: S,
    greeting: &str,
    output: &Fanout,
    stop: impl Future<Output = String>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut read, mut write) = tokio::io::split(stream);
    let gone = async {
        let mut buf = [0u8; 1024];
        while let Ok(1..) = read.read(&mut buf).await {}
    };
    if !send(&mut write, greeting).await {
        return;
    }
    let ended = tokio::select! {
        () = gone => return,
        ended = follow(output, &mut write, stop) => ended,
    };
    if let Ended::Stopped(why) = ended {
        let _ = tokio::time::timeout(FAREWELL_TIMEOUT, async {
            write
                .write_all(format!("[esp-bridge] {why}; closing.\n").as_bytes())
                .await?;
            write.shutdown().await
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncBufReadExt;

    async fn line(r: &mut (impl tokio::io::AsyncBufRead + Unpin)) -> String {
        let mut s = String::new();
        tokio::time::timeout(Duration::from_secs(5), r.read_line(&mut s))
            .await
            .expect("a line in time")
            .expect("read");
        s
    }

    #[tokio::test]
    async fn a_reader_gets_the_history_then_live_lines_then_the_reason_it_is_closed() {
        let output = Fanout::new(4096);
        output.publish(b"rst:0x1 (POWERON_RESET)\r\nI (30) boot: ");
        let (ours, theirs) = tokio::io::duplex(1 << 16);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let served = {
            let output = output.clone();
            tokio::spawn(async move {
                serve_reader(theirs, "[esp-bridge] board lab1\n", &output, async {
                    let _ = rx.await;
                    "the service stops".to_string()
                })
                .await;
            })
        };
        let mut r = tokio::io::BufReader::new(ours);
        assert_eq!(line(&mut r).await, "[esp-bridge] board lab1\n");
        assert!(line(&mut r).await.ends_with(" rst:0x1 (POWERON_RESET)\n"));
        // The partial line is shown as it stands; its rest comes as a line of its own.
        assert!(line(&mut r).await.ends_with(" I (30) boot: \n"));
        output.publish(b"ESP-IDF v5.3\r\n");
        assert!(line(&mut r).await.ends_with(" ESP-IDF v5.3\n"));
        let _ = tx.send(());
        assert_eq!(
            line(&mut r).await,
            "[esp-bridge] the service stops; closing.\n"
        );
        assert_eq!(line(&mut r).await, "", "then the end of the stream");
        served.await.unwrap();
    }

    #[tokio::test]
    async fn a_reader_that_leaves_ends_it_and_its_input_is_dropped() {
        let output = Fanout::new(0);
        let (ours, theirs) = tokio::io::duplex(1 << 16);
        let served = {
            let output = output.clone();
            tokio::spawn(async move {
                serve_reader(theirs, "hi\n", &output, std::future::pending()).await;
            })
        };
        let (mut r, mut w) = tokio::io::split(ours);
        w.write_all(b"typed at the console\r\n").await.unwrap();
        let mut buf = [0u8; 3];
        r.read_exact(&mut buf).await.unwrap();
        drop((r, w));
        tokio::time::timeout(Duration::from_secs(5), served)
            .await
            .expect("ends when the reader leaves")
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_reader_that_stops_reading_is_dropped_after_the_write_timeout() {
        let output = Fanout::new(0);
        let (_ours, mut theirs) = tokio::io::duplex(64);
        let flood = output.clone();
        let feeder = tokio::spawn(async move {
            loop {
                flood.publish(&[b'x'; 100]);
                flood.publish(b"\n");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        let ended = follow(&output, &mut theirs, std::future::pending::<()>()).await;
        assert_eq!(ended, Ended::ReaderGone);
        feeder.abort();
    }
}
