//! The service in-process: `esp_bridge::serve` on `127.0.0.1:0` in front of a real
//! pseudo-terminal, driven by a raw telnet/RFC 2217 client over real TCP (as mini-redis's
//! tests start its server). The middle of the test pyramid: ordering, backpressure, purge,
//! the one-client policy and shutdown fail here, in `cargo test`, before the system tests
//! with real esptool and pyserial run.

use esp_bridge::config::{Config, SecondClient};
use esp_bridge::{Control, ModemOutputs, PortKind, serve};
use rustix::fs::OFlags;
use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};

const IAC: u8 = 255;
const SB: u8 = 250;
const SE: u8 = 240;
const WILL: u8 = 251;
const DO: u8 = 253;
const COM_PORT: u8 = 44;

/// The device: the master side of a pty whose slave the bridge opens.
struct Device {
    master: OwnedFd,
    path: PathBuf,
}

impl Device {
    fn new() -> Device {
        let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY).expect("openpt");
        grantpt(&master).expect("grantpt");
        unlockpt(&master).expect("unlockpt");
        let name = ptsname(&master, Vec::new()).expect("ptsname");
        let path = PathBuf::from(name.to_string_lossy().into_owned());
        let flags = rustix::fs::fcntl_getfl(&master).expect("getfl");
        rustix::fs::fcntl_setfl(&master, flags | OFlags::NONBLOCK).expect("setfl");
        // Raw on the master too: no echo, no line discipline between the test and the bridge.
        let mut t = rustix::termios::tcgetattr(&master).expect("tcgetattr");
        t.make_raw();
        rustix::termios::tcsetattr(&master, rustix::termios::OptionalActions::Now, &t)
            .expect("tcsetattr");
        Device { master, path }
    }

    /// Reads what the bridge wrote until `n` bytes came or `within` passed.
    async fn read(&self, n: usize, within: Duration) -> Vec<u8> {
        let deadline = Instant::now() + within;
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while out.len() < n && Instant::now() < deadline {
            let want = (n - out.len()).min(buf.len());
            match rustix::io::read(&self.master, &mut buf[..want]) {
                Ok(k) if k > 0 => out.extend_from_slice(&buf[..k]),
                _ => tokio::time::sleep(Duration::from_millis(2)).await,
            }
        }
        out
    }

    fn write(&self, bytes: &[u8]) {
        let mut rest = bytes;
        while !rest.is_empty() {
            match rustix::io::write(&self.master, rest) {
                Ok(n) => rest = &rest[n..],
                Err(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    }

    /// The slave's baud rate, as the bridge set it.
    fn baud(&self) -> u32 {
        let t = rustix::termios::tcgetattr(&self.master).expect("tcgetattr");
        t.output_speed()
    }
}

/// A control-line policy that records what the bridge asks of it.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<String>>>);

impl Recorder {
    fn calls(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

impl Control for Recorder {
    fn client_outputs(&mut self, o: ModemOutputs) -> io::Result<()> {
        self.0
            .lock()
            .unwrap()
            .push(format!("dtr={} rts={}", o.dtr, o.rts));
        Ok(())
    }
    fn release(&mut self) -> io::Result<()> {
        self.0.lock().unwrap().push("release".into());
        Ok(())
    }
    fn settled(&self) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(std::future::ready(()))
    }
    fn describe(&self) -> String {
        "recorder".into()
    }
}

/// A running service: its RFC 2217 address, its device, its control recorder, and the way
/// to stop it.
struct Service {
    addr: SocketAddr,
    device: Device,
    control: Recorder,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Service {
    async fn start(configure: impl FnOnce(&mut Config)) -> Service {
        let device = Device::new();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let mut config = Config::default();
        config.boards[0].serial.device = device.path.clone();
        configure(&mut config);
        let control = Recorder::default();
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(serve(
            config,
            vec![(listener, PortKind::Rfc2217)],
            Box::new(control.clone()),
            async {
                let _ = stopped.await;
            },
        ));
        Service {
            addr,
            device,
            control,
            stop: Some(stop),
            task,
        }
    }

    /// Stops the service and waits for it, bounded.
    async fn shut_down(mut self) -> Recorder {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        timeout(Duration::from_secs(10), &mut self.task)
            .await
            .expect("serve returned within 10 s")
            .expect("serve did not panic");
        self.control
    }
}

/// A COM-PORT-OPTION request.
fn com_port(code: u8, value: &[u8]) -> Vec<u8> {
    let mut out = vec![IAC, SB, COM_PORT, code];
    for &b in value {
        out.push(b);
        if b == IAC {
            out.push(IAC);
        }
    }
    out.extend_from_slice(&[IAC, SE]);
    out
}

/// A raw telnet client that has agreed to RFC 2217.
async fn connect(addr: SocketAddr) -> TcpStream {
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(&[IAC, WILL, COM_PORT, IAC, DO, COM_PORT])
        .await
        .expect("negotiate");
    tcp
}

/// Reads from the client's socket until `needle` appears (returns everything read), or
/// fails after `within`.
async fn read_until(tcp: &mut TcpStream, needle: &[u8], within: Duration) -> Vec<u8> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !contains(&got, needle) {
        let left = deadline.saturating_duration_since(Instant::now());
        match timeout(left, tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Err(_) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => panic!("client read failed: {e}"),
        }
    }
    assert!(
        contains(&got, needle),
        "never received {needle:?}; got {:?}",
        String::from_utf8_lossy(&got)
    );
    got
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || hay.windows(needle.len()).any(|w| w == needle)
}

/// The server's reply to SET-BAUDRATE `baud` (code 101).
fn baud_reply(baud: u32) -> Vec<u8> {
    let mut r = vec![IAC, SB, COM_PORT, 101];
    r.extend_from_slice(&baud.to_be_bytes());
    r.extend_from_slice(&[IAC, SE]);
    r
}

#[tokio::test(flavor = "current_thread")]
async fn a_command_waits_for_the_data_before_it_and_the_data_after_it_waits_for_the_command() {
    let service = Service::start(|_| {}).await;
    let client = connect(service.addr).await;
    // More than a pty buffers: until the device reads, the bridge cannot hand it all over, so
    // the baud change behind it must wait, unanswered.
    let before: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let mut request = Vec::new();
    for &b in &before {
        request.push(b);
        if b == IAC {
            request.push(IAC);
        }
    }
    request.extend(com_port(1, &57_600u32.to_be_bytes()));
    request.extend_from_slice(b"after");
    let (mut reader, mut writer) = client.into_split();
    // In its own task: the bridge reads the socket only as fast as the device takes bytes.
    let sender = tokio::spawn(async move {
        writer.write_all(&request).await.expect("send");
        writer
    });

    let early = read_until_quiet(&mut reader, Duration::from_millis(500)).await;
    assert!(
        !contains(&early, &baud_reply(57_600)),
        "the baud change was answered before the data in front of it reached the device"
    );
    assert_eq!(service.device.baud(), 115_200, "rate changed too early");

    let got = service
        .device
        .read(before.len() + 5, Duration::from_secs(10))
        .await;
    assert_eq!(got.len(), before.len() + 5, "bytes lost");
    assert_eq!(&got[..before.len()], &before[..], "data changed on the way");
    assert_eq!(&got[before.len()..], b"after");
    let mut answer = early;
    answer.extend(read_until_quiet(&mut reader, Duration::from_secs(2)).await);
    assert!(
        contains(&answer, &baud_reply(57_600)),
        "no reply to SET-BAUDRATE"
    );
    assert_eq!(service.device.baud(), 57_600);
    drop(sender.await.expect("sender"));
    drop(reader);
    service.shut_down().await;
}

/// Whatever the client receives within `within` (stopping early at end of stream).
async fn read_until_quiet(tcp: &mut (impl AsyncReadExt + Unpin), within: Duration) -> Vec<u8> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match timeout(left, tcp.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => return got,
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn an_unchanged_setting_is_answered_without_touching_the_uart() {
    let service = Service::start(|_| {}).await;
    let mut client = connect(service.addr).await;
    client
        .write_all(&com_port(1, &115_200u32.to_be_bytes()))
        .await
        .unwrap();
    read_until(&mut client, &baud_reply(115_200), Duration::from_secs(5)).await;
    // Query (0) answers the rate in force.
    client.write_all(&com_port(1, &[0, 0, 0, 0])).await.unwrap();
    read_until(&mut client, &baud_reply(115_200), Duration::from_secs(5)).await;
    drop(client);
    service.shut_down().await;
}

#[tokio::test(flavor = "current_thread")]
async fn purge_rx_drops_device_data_the_client_has_not_received() {
    let service = Service::start(|_| {}).await;
    let mut client = connect(service.addr).await;
    // FLOWCONTROL-SUSPEND: the bridge holds device data back from the client.
    client.write_all(&com_port(8, &[])).await.unwrap();
    read_until(
        &mut client,
        &[IAC, SB, COM_PORT, 107],
        Duration::from_secs(5),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    service.device.write(b"stale");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // PURGE-DATA rx, then FLOWCONTROL-RESUME.
    let mut request = com_port(12, &[1]);
    request.extend(com_port(9, &[]));
    client.write_all(&request).await.unwrap();
    let answer = read_until(
        &mut client,
        &[IAC, SB, COM_PORT, 112, 1, IAC, SE],
        Duration::from_secs(5),
    )
    .await;
    service.device.write(b"fresh");
    let mut got = answer;
    got.extend(read_until(&mut client, b"fresh", Duration::from_secs(5)).await);
    assert!(!contains(&got, b"stale"), "purged data reached the client");
    drop(client);
    service.shut_down().await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_second_client_watches_and_is_told_who_writes_when_it_wants_to() {
    let service = Service::start(|c| c.network.claim_wait = Duration::from_secs(1)).await;
    let mut first = connect(service.addr).await;
    first.write_all(b"x").await.unwrap();
    assert_eq!(service.device.read(1, Duration::from_secs(5)).await, b"x");
    let mut second = connect(service.addr).await;
    // It watches: the device's output reaches both.
    tokio::time::sleep(Duration::from_millis(200)).await;
    service.device.write(b"both");
    read_until(&mut first, b"both", Duration::from_secs(5)).await;
    read_until(&mut second, b"both", Duration::from_secs(5)).await;
    // It wants to write: after claim_wait it is told who does, and closed.
    second.write_all(b"z").await.unwrap();
    let text = read_until(&mut second, b"being written by", Duration::from_secs(5)).await;
    let more = read_until_quiet(&mut second, Duration::from_secs(2)).await;
    let said = [text, more].concat();
    assert!(contains(
        &said,
        first.local_addr().unwrap().to_string().as_bytes()
    ));
    // The first client keeps the board; the second one's byte never reached the device.
    first.write_all(b"y").await.unwrap();
    assert_eq!(service.device.read(1, Duration::from_secs(5)).await, b"y");
    drop(first);
    service.shut_down().await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_second_client_takes_over_when_configured_after_the_first_ones_first_seconds() {
    let service = Service::start(|c| c.network.second_client = SecondClient::Replace).await;
    let mut first = connect(service.addr).await;
    first.write_all(b"1").await.unwrap();
    assert_eq!(service.device.read(1, Duration::from_secs(5)).await, b"1");
    let mut second = connect(service.addr).await;
    // A new writer keeps the board for its first 5 seconds.
    tokio::time::sleep(Duration::from_millis(5_200)).await;
    second.write_all(b"2").await.unwrap();
    assert_eq!(service.device.read(1, Duration::from_secs(5)).await, b"2");
    read_until(
        &mut first,
        b"another client writes to this board now",
        Duration::from_secs(5),
    )
    .await;
    drop(second);
    drop(first);
    let control = service.shut_down().await;
    assert!(
        control.calls().iter().filter(|c| *c == "release").count() >= 2,
        "the lines are released after each writer: {:?}",
        control.calls()
    );
}

#[tokio::test(flavor = "current_thread")]
async fn dtr_and_rts_reach_the_control_lines_in_order_and_are_released_at_the_end() {
    let service = Service::start(|_| {}).await;
    let mut client = connect(service.addr).await;
    // DTR and RTS on, as a terminal opens: the client only watches, its view changes and
    // nothing reaches the lines. DTR off then (RTS without DTR: EN low, a reset) claims the
    // board: the lines take its view, then the reset.
    let mut request = com_port(5, &[8]); // DTR on
    request.extend(com_port(5, &[11])); // RTS on
    request.extend(com_port(5, &[9])); // DTR off
    client.write_all(&request).await.unwrap();
    read_until(
        &mut client,
        &[IAC, SB, COM_PORT, 105, 9, IAC, SE],
        Duration::from_secs(5),
    )
    .await;
    drop(client);
    // The session ends when the bridge sees the client gone; the lines are released then.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !service.control.calls().contains(&"release".to_string()) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        service.control.calls(),
        ["dtr=true rts=true", "dtr=false rts=true", "release"]
    );
    service.shut_down().await;
}

#[tokio::test(flavor = "current_thread")]
async fn shutdown_hands_over_the_input_tells_the_client_and_releases_the_lines() {
    let service = Service::start(|_| {}).await;
    let mut client = connect(service.addr).await;
    client.write_all(b"last words").await.unwrap();
    assert_eq!(
        service.device.read(10, Duration::from_secs(5)).await,
        b"last words"
    );
    let Service {
        addr,
        device,
        control,
        stop,
        task,
    } = service;
    let stopping = tokio::spawn(
        Service {
            addr,
            device,
            control: control.clone(),
            stop,
            task,
        }
        .shut_down(),
    );
    read_until(
        &mut client,
        b"service is shutting down",
        Duration::from_secs(5),
    )
    .await;
    let mut rest = Vec::new();
    let closed = timeout(Duration::from_secs(5), client.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the connection was not closed");
    timeout(Duration::from_secs(10), stopping)
        .await
        .expect("stopped in time")
        .expect("no panic");
    assert_eq!(control.calls().last().map(String::as_str), Some("release"));
}
