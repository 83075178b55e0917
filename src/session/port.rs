//! The COM port one client drives: the UART with its line settings and BREAK state, the
//! client's view of DTR/RTS and the control lines they reach, and the modem-state
//! notifications. It applies typed commands and says what to answer; it never touches the
//! client's connection (the session does).

use super::SharedControl;
use crate::control::ModemOutputs;
use crate::protocol::{ControlRequest, PortCommand, Reply, Request};
use crate::settings::{FlowControl, LineSettings};
use crate::status::StatusHandle;
use crate::uart::Uart;
use std::io;

/// Baud rate changes per session logged at info level; the rest go to debug.
const BAUD_CHANGES_LOGGED: u64 = 10;

pub struct ComPort<U: Uart> {
    uart: U,
    settings: LineSettings,
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
            PortCommand::BaudRate(Request::Set(b)) => b != s.baud,
            PortCommand::DataSize(Request::Set(d)) => d != s.data_bits,
            PortCommand::Parity(Request::Set(p)) => p != s.parity,
            PortCommand::StopSize(Request::Set(v)) => v != s.stop_bits,
            PortCommand::Control(ControlRequest::Break(true)) => !self.break_on,
            _ => false,
        }
    }

    /// Whether the raw port's baud switch changes the rate (and must wait for a drain).
    pub fn switch_needs_drain(&self, baud: u32) -> bool {
        baud != self.settings.baud
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
            PortCommand::DataSize(r) => Reply::DataSize(self.set_data_size(r)),
            PortCommand::Parity(r) => Reply::Parity(self.set_parity(r)),
            PortCommand::StopSize(r) => Reply::StopSize(self.set_stop_size(r)),
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
                tracing::warn!(
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
            tracing::info!(session = id, baud, "{what}");
        } else if self.baud_changes == BAUD_CHANGES_LOGGED + 1 {
            tracing::info!(
                session = id,
                baud,
                "{what}; further baud rate changes of this session are logged at debug level"
            );
        } else {
            tracing::debug!(session = id, baud, "{what}");
        }
    }

    fn set_data_size(&mut self, r: Request<u8>) -> u8 {
        match r {
            Request::Set(bits) if bits != self.settings.data_bits => {
                match self.uart.set_data_bits(bits) {
                    Ok(()) => self.settings.data_bits = bits,
                    Err(e) => self.failed("the device refused the data size", e),
                }
            }
            Request::Unsupported(bits) => tracing::warn!(
                session = self.session,
                "client asked for {bits} data bits; only 5 to 8 exist"
            ),
            _ => {}
        }
        self.settings.data_bits
    }

    fn set_parity(&mut self, r: Request<crate::settings::Parity>) -> crate::settings::Parity {
        match r {
            Request::Set(parity) if parity != self.settings.parity => {
                match self.uart.set_parity(parity) {
                    Ok(()) => self.settings.parity = parity,
                    Err(e) => self.failed("the device refused the parity", e),
                }
            }
            Request::Unsupported(p) => tracing::warn!(
                session = self.session,
                "client asked for parity {p} (mark/space or unknown), which Linux UARTs do not offer"
            ),
            _ => {}
        }
        self.settings.parity
    }

    fn set_stop_size(
        &mut self,
        r: Request<crate::settings::StopBits>,
    ) -> crate::settings::StopBits {
        match r {
            Request::Set(stop) if stop != self.settings.stop_bits => {
                match self.uart.set_stop_bits(stop) {
                    Ok(()) => self.settings.stop_bits = stop,
                    Err(e) => self.failed("the device refused the stop bits", e),
                }
            }
            Request::Unsupported(3) => tracing::warn!(
                session = self.session,
                "client asked for 1.5 stop bits, which Linux UARTs do not offer"
            ),
            _ => {}
        }
        self.settings.stop_bits
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
        tracing::warn!(
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
        let result = self
            .control
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .client_outputs(wanted);
        match result {
            // The client's view is acknowledged even when nothing physical changed: what the
            // pins do is the control policy's business.
            Ok(()) => self.outputs = wanted,
            Err(e) => tracing::error!(
                session = self.session,
                "driving the control lines failed: {e}"
            ),
        }
    }

    /// The raw port's esptool client: put the chip into its bootloader.
    pub fn enter_bootloader(&mut self) {
        let result = self
            .control
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .enter_bootloader();
        match result {
            Ok(()) => tracing::info!(
                session = self.session,
                "raw port: esptool is syncing; putting the chip into its bootloader"
            ),
            Err(e) => tracing::warn!(session = self.session, "raw port: {e}"),
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
        tracing::warn!(session = self.session, "{what}: {e}");
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
