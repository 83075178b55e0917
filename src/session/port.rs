//! The COM port one client drives: the UART with its line settings and BREAK state, the
//! client's view of DTR/RTS and the control lines they reach, and the modem-state
//! notifications. It applies typed commands and says what to answer; it never touches the
//! client's connection (the session does).

use super::ClientView;
use super::SharedControl;
use crate::control::{ModemOutputs, lock};
use crate::log_limit::limited;
use crate::protocol::{ControlRequest, PortCommand, Reply, Request};
use crate::settings::{
    BAUD_MAX, BAUD_MIN, FlowControl, LineSettings, Parity, StopBits, baud_in_range,
};
use crate::status::StatusHandle;
use crate::uart::{Drained, Uart};
use std::io;

/// One line setting: where it is kept, how the UART applies it, and what it offers.
struct Setting<U, T> {
    name: &'static str,
    offered: &'static str,
    field: fn(&mut LineSettings) -> &mut T,
    apply: fn(&mut U, T) -> io::Result<()>,
}

impl<U: Uart> Setting<U, u8> {
    fn data_size() -> Self {
        Setting {
            name: "data size",
            offered: "5 to 8 bits",
            field: |s| &mut s.data_bits,
            apply: |u, v| u.set_data_bits(v),
        }
    }
}

impl<U: Uart> Setting<U, Parity> {
    fn parity() -> Self {
        Setting {
            name: "parity",
            offered: "1 none, 2 odd, 3 even; no mark or space",
            field: |s| &mut s.parity,
            apply: |u, v| u.set_parity(v),
        }
    }
}

impl<U: Uart> Setting<U, StopBits> {
    fn stop_size() -> Self {
        Setting {
            name: "stop size",
            offered: "1 or 2 stop bits; no 1.5",
            field: |s| &mut s.stop_bits,
            apply: |u, v| u.set_stop_bits(v),
        }
    }
}

/// Baud rate changes per session logged at info level; the rest go to debug.
const BAUD_CHANGES_LOGGED: u64 = 10;

pub struct ComPort<U: Uart> {
    uart: U,
    settings: LineSettings,
    /// The settings the session started with, which it leaves behind.
    configured: LineSettings,
    break_on: bool,
    /// The client's view of its modem-control outputs.
    outputs: ModemOutputs,
    control: SharedControl,
    /// The session's number, for log lines.
    session: u64,
    signature: String,
    status: StatusHandle,
    /// Whether the device has modem input lines (unknown until first asked).
    modem_supported: Option<bool>,
    modem_last: u8,
    modem_mask: u8,
    /// A failure after which the device will not work again until reopened.
    gone: Option<io::Error>,
    /// Baud rate changes applied in this session (only the first few are logged at info).
    baud_changes: u64,
}

impl<U: Uart> ComPort<U> {
    pub fn new(
        uart: U,
        settings: LineSettings,
        control: SharedControl,
        session: u64,
        signature: String,
        status: StatusHandle,
    ) -> Self {
        ComPort {
            uart,
            settings,
            configured: settings,
            break_on: false,
            outputs: ModemOutputs::default(),
            control,
            session,
            signature,
            status,
            modem_supported: None,
            modem_last: 0,
            modem_mask: 0xff,
            gone: None,
            baud_changes: 0,
        }
    }

    /// Puts the port back as the client found it: BREAK off, what is queued sent (bounded),
    /// the configured line settings and flow control. Returns whether queued output had to
    /// be discarded (flow control held it).
    pub async fn restore(&mut self) -> bool {
        if self.break_on {
            self.set_break(false);
        }
        let discarded = matches!(self.uart.drain().await, Ok(Drained::Discarded));
        let c = self.configured;
        self.set_flow(c.flow);
        self.change_baud(c.baud, || {
            format!("session over: back to the configured {} baud", c.baud)
        });
        self.line_setting(Request::Set(c.data_bits), Setting::data_size());
        self.line_setting(Request::Set(c.parity), Setting::parity());
        self.line_setting(Request::Set(c.stop_bits), Setting::stop_size());
        discarded
    }

    /// Takes on what the client set while it only watched (its line settings, flow control,
    /// DTR and RTS), with no replies: it was answered then.
    pub fn adopt(&mut self, view: &ClientView) {
        let v = view.settings;
        self.set_baud(Request::Set(v.baud));
        self.line_setting(Request::Set(v.data_bits), Setting::data_size());
        self.line_setting(Request::Set(v.parity), Setting::parity());
        self.line_setting(Request::Set(v.stop_bits), Setting::stop_size());
        self.set_flow(v.flow);
        let outputs = ModemOutputs {
            dtr: view.dtr,
            rts: view.rts,
        };
        if outputs != self.outputs {
            self.set_outputs(outputs);
        }
    }

    /// The device, when the session is over.
    pub fn into_uart(self) -> U {
        self.uart
    }

    /// The UART, for the session's reads, writes and drains.
    pub fn uart(&mut self) -> &mut U {
        &mut self.uart
    }

    pub fn baud(&self) -> u32 {
        self.settings.baud
    }

    /// A device failure seen while applying a command, taken once.
    pub fn take_failure(&mut self) -> Option<io::Error> {
        self.gone.take()
    }

    /// Whether bytes written before `cmd` must leave the UART before it is applied: it
    /// changes how bytes are framed on the wire.
    pub fn needs_drain(&self, cmd: &PortCommand) -> bool {
        let s = &self.settings;
        match *cmd {
            PortCommand::BaudRate(Request::Set(b)) => b != s.baud && baud_in_range(b),
            PortCommand::DataSize(Request::Set(d)) => d != s.data_bits,
            PortCommand::Parity(Request::Set(p)) => p != s.parity,
            PortCommand::StopSize(Request::Set(v)) => v != s.stop_bits,
            PortCommand::Control(ControlRequest::Break(true)) => !self.break_on,
            _ => false,
        }
    }

    /// Whether the raw port's baud switch changes the rate (and must wait for a drain).
    pub fn switch_needs_drain(&self, baud: u32) -> bool {
        baud != self.settings.baud && baud_in_range(baud)
    }

    /// Applies one command; returns the answer for the client, if it gets one.
    pub fn apply(&mut self, cmd: PortCommand) -> Option<Reply> {
        Some(match cmd {
            PortCommand::Signature(None) => Reply::Signature(self.signature.as_bytes().to_vec()),
            PortCommand::Signature(Some(text)) => {
                tracing::debug!(
                    session = self.session,
                    "client signature: {}",
                    String::from_utf8_lossy(&text)
                );
                return None;
            }
            PortCommand::BaudRate(r) => Reply::BaudRate(self.set_baud(r)),
            PortCommand::DataSize(r) => Reply::DataSize(self.line_setting(r, Setting::data_size())),
            PortCommand::Parity(r) => Reply::Parity(self.line_setting(r, Setting::parity())),
            PortCommand::StopSize(r) => Reply::StopSize(self.line_setting(r, Setting::stop_size())),
            PortCommand::Control(c) => self.control(c),
            PortCommand::PollLineState => Reply::LineState(0),
            PortCommand::PollModemState => return self.modem_state(true),
            // The session's part: they are about what it sends to the client.
            PortCommand::FlowControlSuspend | PortCommand::FlowControlResume => return None,
            PortCommand::LineStateMask(m) => Reply::LineStateMask(m),
            PortCommand::ModemStateMask(m) => {
                self.modem_mask = m;
                Reply::ModemStateMask(m)
            }
            PortCommand::Purge(Ok(which)) => {
                if let Err(e) = self.uart.purge(which.rx(), which.tx()) {
                    self.failed("purging the device buffers failed", e);
                }
                Reply::Purged(which)
            }
            PortCommand::Purge(Err(other)) => {
                limited!(
                    warn,
                    "unsupported settings asked for by clients",
                    session = self.session,
                    "client asked to purge buffer {other}; only 1 (rx), 2 (tx) and 3 (both) exist"
                );
                return None;
            }
        })
    }

    fn set_baud(&mut self, r: Request<u32>) -> u32 {
        if let Request::Set(baud) = r {
            let old = self.settings.baud;
            self.change_baud(baud, || format!("baud rate changed from {old} to {baud}"));
        }
        self.settings.baud
    }

    /// The raw port's baud switch: like SET-BAUDRATE, without a reply.
    pub fn switch_baud(&mut self, baud: u32) {
        self.change_baud(baud, || {
            format!("raw port: the chip switched to {baud} baud; so does the UART")
        });
    }

    fn change_baud(&mut self, baud: u32, what: impl FnOnce() -> String) {
        if baud == self.settings.baud {
            return;
        }
        if !baud_in_range(baud) {
            limited!(
                warn,
                "baud rates out of range",
                session = self.session,
                "client asked for {baud} baud, outside {BAUD_MIN} to {BAUD_MAX}: the UART stays at {}",
                self.settings.baud
            );
            return;
        }
        match self.uart.set_baud(baud) {
            Ok(()) => {
                self.log_baud_change(baud, what());
                self.settings.baud = baud;
                self.status.set_baud(baud);
            }
            Err(e) => {
                let keep = self.settings.baud;
                self.failed(
                    &format!("the device refused baud rate {baud}; keeping {keep}"),
                    e,
                );
            }
        }
    }

    /// Logs a baud rate change: the first few of a session at info (esptool makes two or
    /// three), then a notice, then at debug, so that a client alternating SET-BAUDRATE values
    /// in a loop cannot write a line per command into the journal. The closing line of the
    /// session still says the last rate.
    fn log_baud_change(&mut self, baud: u32, what: String) {
        self.baud_changes += 1;
        let id = self.session;
        if self.baud_changes <= BAUD_CHANGES_LOGGED {
            limited!(info, "baud rate changes", session = id, baud, "{what}");
        } else if self.baud_changes == BAUD_CHANGES_LOGGED + 1 {
            limited!(
                info,
                "baud rate changes",
                session = id,
                baud,
                "{what}; further baud rate changes of this session are logged at debug level"
            );
        } else {
            tracing::debug!(session = id, baud, "{what}");
        }
    }

    /// Applies a requested line setting when it differs from the one in force; returns the
    /// one in force, which is the answer.
    fn line_setting<T: Copy + PartialEq>(&mut self, r: Request<T>, s: Setting<U, T>) -> T {
        match r {
            Request::Set(v) if v != *(s.field)(&mut self.settings) => {
                match (s.apply)(&mut self.uart, v) {
                    Ok(()) => *(s.field)(&mut self.settings) = v,
                    Err(e) => self.failed(&format!("the device refused the {}", s.name), e),
                }
            }
            Request::Unsupported(v) => limited!(
                warn,
                "unsupported settings asked for by clients",
                session = self.session,
                "client asked for {} {v}, which Linux UARTs do not offer ({})",
                s.name,
                s.offered
            ),
            _ => {}
        }
        *(s.field)(&mut self.settings)
    }

    fn control(&mut self, c: ControlRequest) -> Reply {
        match c {
            ControlRequest::QueryFlow => Reply::Flow(self.settings.flow),
            ControlRequest::SetFlow(flow) => Reply::Flow(self.set_flow(flow)),
            ControlRequest::QueryBreak => Reply::Break(self.break_on),
            ControlRequest::Break(on) => Reply::Break(self.set_break(on)),
            ControlRequest::QueryDtr => Reply::Dtr(self.outputs.dtr),
            ControlRequest::QueryRts => Reply::Rts(self.outputs.rts),
            ControlRequest::Dtr(on) => {
                self.set_outputs(ModemOutputs {
                    dtr: on,
                    ..self.outputs
                });
                Reply::Dtr(on)
            }
            ControlRequest::Rts(on) => {
                self.set_outputs(ModemOutputs {
                    rts: on,
                    ..self.outputs
                });
                Reply::Rts(on)
            }
            ControlRequest::QueryInboundFlow => Reply::InboundFlowNone,
            ControlRequest::SetInboundFlow(v) => {
                if v != crate::protocol::rfc2217::control::FLOW_IN_NONE {
                    self.unsupported_control(v);
                }
                Reply::InboundFlowNone
            }
            ControlRequest::Unsupported(v) => {
                self.unsupported_control(v);
                Reply::Flow(self.settings.flow)
            }
        }
    }

    fn unsupported_control(&self, value: u8) {
        limited!(
            warn,
            "unsupported settings asked for by clients",
            session = self.session,
            "client asked for SET-CONTROL {value}, which this server does not support; answering with the current flow control"
        );
    }

    fn set_flow(&mut self, flow: FlowControl) -> FlowControl {
        if flow != self.settings.flow {
            match self.uart.set_flow(flow) {
                Ok(()) => self.settings.flow = flow,
                Err(e) => self.failed("the device refused the flow control", e),
            }
        }
        self.settings.flow
    }

    fn set_break(&mut self, on: bool) -> bool {
        if on != self.break_on {
            match self.uart.set_break(on) {
                Ok(()) => self.break_on = on,
                Err(e) => self.failed("setting BREAK failed", e),
            }
        }
        self.break_on
    }

    fn set_outputs(&mut self, wanted: ModemOutputs) {
        let result = lock(&self.control).client_outputs(wanted);
        match result {
            // The client's view is acknowledged even when nothing physical changed: what the
            // pins do is the control policy's business.
            Ok(()) => self.outputs = wanted,
            Err(e) => limited!(
                error,
                "failed line changes",
                session = self.session,
                "driving the control lines failed: {e}"
            ),
        }
    }

    /// The raw port's esptool client: put the chip into its bootloader.
    /// Whether the chip can be put into its bootloader from here.
    pub fn can_reset(&self) -> bool {
        lock(&self.control).can_reset()
    }

    pub fn enter_bootloader(&mut self) {
        let result = lock(&self.control).enter_bootloader();
        match result {
            Ok(()) => limited!(
                info,
                "bootloader entries",
                session = self.session,
                "raw port: esptool is syncing; putting the chip into its bootloader"
            ),
            Err(e) => limited!(
                warn,
                "failed bootloader entries",
                session = self.session,
                "raw port: {e}"
            ),
        }
    }

    /// Whether modem-state notifications can ever change (the device has modem lines, or it
    /// was not asked yet).
    pub fn modem_lines_known_absent(&self) -> bool {
        self.modem_supported == Some(false)
    }

    /// NOTIFY-MODEMSTATE when forced (a poll, the start of RFC 2217) or when a masked line
    /// changed. Devices without modem lines report all lines low, once.
    pub fn modem_state(&mut self, force: bool) -> Option<Reply> {
        let now = if self.modem_supported == Some(false) {
            0
        } else {
            match self.uart.modem_status() {
                Ok(bits) => {
                    self.modem_supported = Some(true);
                    bits
                }
                Err(_) => {
                    self.modem_supported = Some(false);
                    0
                }
            }
        };
        let changed = (now ^ self.modem_last) & 0xf0;
        if !force && changed & self.modem_mask == 0 {
            return None;
        }
        // The low nibble reports which lines changed since the last notification.
        let value = (now | (changed >> 4)) & self.modem_mask;
        self.modem_last = now;
        Some(Reply::ModemState(value))
    }

    /// Logs a device failure; remembers it when the device will not work again.
    pub fn failed(&mut self, what: &str, e: io::Error) {
        limited!(
            warn,
            "device failures",
            session = self.session,
            "{what}: {e}"
        );
        if is_gone(&e) {
            self.gone = Some(e);
        }
    }
}

/// Errors after which the device will not work again until reopened (unplugged, hung up).
fn is_gone(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(code) if code == rustix::io::Errno::IO.raw_os_error()
        || code == rustix::io::Errno::NODEV.raw_os_error()
        || code == rustix::io::Errno::NXIO.raw_os_error()
        || code == rustix::io::Errno::BADF.raw_os_error())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::NoControl;
    use crate::status::{BoardStatus, StatusBook};
    use crate::uart::{Drain, ModemStatus};
    use std::pin::Pin;
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll};
    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

    /// A UART that records what is asked of it: a pty cannot show BREAK, so this seam can.
    #[derive(Default)]
    struct Recording(Arc<Mutex<Vec<String>>>);

    impl Recording {
        fn note(&self, what: String) -> io::Result<()> {
            self.0.lock().unwrap().push(what);
            Ok(())
        }
    }

    impl AsyncRead for Recording {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    impl AsyncWrite for Recording {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl Uart for Recording {
        fn set_baud(&mut self, baud: u32) -> io::Result<()> {
            self.note(format!("baud {baud}"))
        }
        fn set_data_bits(&mut self, bits: u8) -> io::Result<()> {
            self.note(format!("data bits {bits}"))
        }
        fn set_parity(&mut self, parity: Parity) -> io::Result<()> {
            self.note(format!("parity {parity}"))
        }
        fn set_stop_bits(&mut self, bits: StopBits) -> io::Result<()> {
            self.note(format!("stop bits {}", bits.count()))
        }
        fn set_flow(&mut self, flow: FlowControl) -> io::Result<()> {
            self.note(format!("flow {flow}"))
        }
        fn set_break(&mut self, on: bool) -> io::Result<()> {
            self.note(format!("break {on}"))
        }
        fn purge(&mut self, input: bool, output: bool) -> io::Result<()> {
            self.note(format!("purge {input} {output}"))
        }
        fn drain(&mut self) -> Drain {
            let _ = self.note("drain".into());
            Box::pin(std::future::ready(Ok(Drained::Done)))
        }
        fn modem_status(&mut self) -> io::Result<ModemStatus> {
            Err(io::Error::other("none"))
        }
    }

    fn port(uart: Recording) -> ComPort<Recording> {
        let configured = LineSettings {
            baud: 115_200,
            data_bits: 8,
            parity: Parity::None,
            stop_bits: StopBits::One,
            flow: FlowControl::None,
        };
        let status = StatusBook::new().add(BoardStatus::new("test", vec![], String::new(), None));
        ComPort::new(
            uart,
            configured,
            Arc::new(Mutex::new(Box::new(NoControl))),
            1,
            "test".into(),
            status,
        )
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_session_ends_with_break_off_and_the_configured_settings_back() {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let mut p = port(Recording(Arc::clone(&calls)));
        p.apply(PortCommand::Control(ControlRequest::Break(true)));
        p.apply(PortCommand::Control(ControlRequest::SetFlow(
            FlowControl::Hardware,
        )));
        p.apply(PortCommand::BaudRate(Request::Set(921_600)));
        p.apply(PortCommand::DataSize(Request::Set(7)));
        p.apply(PortCommand::Parity(Request::Set(Parity::Even)));
        p.apply(PortCommand::StopSize(Request::Set(StopBits::Two)));
        calls.lock().unwrap().clear();
        assert!(!p.restore().await, "nothing was discarded");
        assert_eq!(
            *calls.lock().unwrap(),
            [
                "break false",
                "drain",
                "flow none",
                "baud 115200",
                "data bits 8",
                "parity none",
                "stop bits 1"
            ]
        );
        // A port left as configured is not touched again.
        calls.lock().unwrap().clear();
        p.restore().await;
        assert_eq!(*calls.lock().unwrap(), ["drain"]);
    }

    #[test]
    fn rates_outside_the_range_are_never_set_and_the_reply_says_the_rate_in_force() {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let mut p = port(Recording(Arc::clone(&calls)));
        for absurd in [1, 49, 20_000_001, u32::MAX] {
            assert_eq!(
                p.apply(PortCommand::BaudRate(Request::Set(absurd))),
                Some(Reply::BaudRate(115_200))
            );
            assert!(!p.needs_drain(&PortCommand::BaudRate(Request::Set(absurd))));
            p.switch_baud(absurd);
        }
        assert!(
            calls.lock().unwrap().is_empty(),
            "{:?}",
            calls.lock().unwrap()
        );
        assert_eq!(
            p.apply(PortCommand::BaudRate(Request::Set(50))),
            Some(Reply::BaudRate(50))
        );
    }
}
