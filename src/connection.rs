//! One client connection from accept to close: it watches the board ([`crate::watcher`]),
//! writes once its claim is granted (a [`Session`] with the device), and watches again when a
//! takeover hands the board to another client. The device goes back to the board each time
//! the session ends.

use crate::config::SerialConfig;
use crate::fanout::Fanout;
use crate::log_limit::limited;
use crate::session::{
    ClientView, ComPort, EndReason, Framing, Report, Session, SessionInfo, SharedControl, Start,
    StopRequest,
};
use crate::status::{Activity, StatusHandle};
use crate::watcher::{BoardLink, Client, ToBoard, Watched};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// What a connection needs of its board, as configured when it was accepted.
pub struct BoardContext {
    pub serial: SerialConfig,
    pub claim_wait: Duration,
    pub control: SharedControl,
    pub status: StatusHandle,
    pub fanout: Fanout,
    pub to_board: mpsc::Sender<ToBoard>,
}

/// The signature the server gives in RFC 2217.
pub fn signature() -> String {
    format!("esp-bridge {}", env!("CARGO_PKG_VERSION"))
}

/// Serves the connection until it is over; `stop` asks a writer to hand over, or everyone to
/// leave.
pub async fn serve(
    mut client: Client,
    board: BoardContext,
    mut stop: watch::Receiver<Option<StopRequest>>,
) {
    let signature = signature();
    let since = tokio::time::Instant::now();
    loop {
        let link = BoardLink {
            to_board: &board.to_board,
            fanout: &board.fanout,
            claim_wait: board.claim_wait,
            signature: &signature,
        };
        let (uart, input) = match client.watch(link, &mut stop).await {
            Watched::Writes { uart, input } => (uart, input),
            Watched::Gone(reason) => {
                log_watcher_end(&client, &reason, since.elapsed());
                return;
            }
        };
        let settings = board.serial.line_settings();
        limited!(
            info,
            "session starts",
            session = client.id,
            peer = %client.peer,
            baud = settings.baud,
            "client {} writes on the {} port; serving {}",
            client.peer,
            client.kind,
            board.serial.device.display()
        );
        board.status.set(Activity::Serving {
            peer: client.peer,
            port: client.kind.label(),
            baud: settings.baud,
        });
        let mut port = ComPort::new(
            uart,
            settings,
            board.control.clone(),
            client.id,
            signature.clone(),
            board.status.clone(),
        );
        let framing = match client.engine.take() {
            Some(engine) => {
                port.adopt(&client.view);
                Framing::Rfc2217(engine)
            }
            None => {
                // The board's settings as configured now: the device stays open between
                // writers, and a reload may have changed them since it was opened.
                port.adopt(&ClientView::new(settings));
                Framing::esp_raw(
                    settings.baud,
                    board.serial.flash_baud.rate(),
                    port.can_reset(),
                )
            }
        };
        let info = SessionInfo {
            id: client.id,
            peer: client.peer,
            device: board.serial.device.display().to_string(),
        };
        let Client {
            id,
            peer,
            kind,
            tcp,
            engine: _,
            view,
            out,
            heard,
            ignored,
            accepted,
        } = client;
        let session = Session::new(
            info,
            tcp,
            port,
            framing,
            board.fanout.clone(),
            heard.clone(),
        );
        let (report, parts) = session.run(Start { out, input }, stop.clone()).await;
        log_report(id, peer, &report);
        let _ = board
            .to_board
            .send(ToBoard::Returned {
                id,
                uart: parts.uart,
            })
            .await;
        if !matches!(report.reason, EndReason::Stopped(StopRequest::HandOver)) {
            return;
        }
        heard.set_leaving(false);
        client = Client {
            id,
            peer,
            kind,
            tcp: parts.tcp,
            engine: match parts.framing {
                Framing::Rfc2217(engine) => Some(engine),
                Framing::EspRaw(_) => None,
            },
            view,
            out: parts.out,
            heard,
            ignored,
            accepted,
        };
    }
}

fn log_watcher_end(client: &Client, reason: &EndReason, after: Duration) {
    let secs = after.as_secs_f64();
    match reason {
        EndReason::ClientClosed | EndReason::Stopped(_) => limited!(
            info,
            "watchers leave",
            session = client.id,
            peer = %client.peer,
            "client {} stopped watching ({reason}) after {secs:.1} s",
            client.peer
        ),
        _ => limited!(
            warn,
            "watchers leave",
            session = client.id,
            peer = %client.peer,
            "client {} closed while watching: {reason} (after {secs:.1} s)",
            client.peer
        ),
    }
}

fn log_report(id: u64, peer: SocketAddr, r: &Report) {
    let secs = r.duration.as_secs_f64();
    let summary = format!(
        "session with {peer} ended ({}) after {secs:.1} s: {} bytes to the device, {} bytes to the client, last baud {}",
        r.reason, r.to_device, r.to_client, r.final_baud
    );
    let mut ignored = if r.ignored_input > 0 {
        format!("; {} malformed requests ignored", r.ignored_input)
    } else {
        String::new()
    };
    if r.discarded > 0 {
        ignored.push_str(&format!(
            "; output to the device discarded {} time(s): flow control held it",
            r.discarded
        ));
    }
    match r.reason {
        EndReason::DeviceGone(_) | EndReason::ClientError(_) | EndReason::TelnetStalled => {
            limited!(warn, "session ends", session = id, peer = %peer, bytes_to_device = r.to_device, bytes_to_client = r.to_client, duration_s = secs, "{summary}{ignored}")
        }
        _ => {
            limited!(info, "session ends", session = id, peer = %peer, bytes_to_device = r.to_device, bytes_to_client = r.to_client, duration_s = secs, "{summary}{ignored}")
        }
    }
}
