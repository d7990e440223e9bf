//! A user-space TCP proxy that adds a fixed delay in each direction, for link
//! emulation on kernels without `sch_netem` (see `examples/lib/link.sh`, which
//! runs it inside the link's network namespace).
//!
//! ```sh
//! cargo build --release --example delay_proxy
//! target/release/examples/delay_proxy --listen 10.211.0.2:8333 \
//!     --upstream 127.0.0.1:8333 --delay-ms 10        # +20 ms round trip
//! ```
//!
//! `--delay-ms D` is the ONE-WAY delay: every byte read from either side is
//! written to the other side D ms after it was read, so a request/response
//! exchange sees +2·D ms (an RTT of 20 ms is `--delay-ms 10`). Fractions are
//! allowed (`--delay-ms 0.25`).
//!
//! Per connection there are two pumps (client→upstream, upstream→client). Each
//! pump reads up to 64 KiB, stamps it with `now + D` and queues it; a writer
//! waits for the due time and writes it. The queue is bounded by
//! `--queue-bytes` (per direction and connection, default 4 MiB): when it is
//! full the reader stops reading and TCP backpressure reaches the sender. A
//! single connection can only reach rate R if the queue holds R·D bytes, so the
//! default covers 1 Gbit/s with up to 32 ms one-way (link.sh passes a size
//! computed for its profile). When the reader hits EOF the writer drains the
//! queue and then shuts down its write side (half-close is forwarded, delayed
//! like data). An error on either side tears the whole connection down.
//!
//! The proxy terminates TCP: the kernel completes the client's handshake at
//! once. To charge a new connection its round trip anyway, the first bytes the
//! client sends are not forwarded before accept + 2·D (then take D more), so the
//! first response arrives at about 2·RTT as on a real path; `--no-connect-delay`
//! turns this off. What is NOT emulated: TCP's own behaviour over a long-RTT
//! path (slow start, window growth, loss recovery taking a round trip) — both
//! TCP legs see a short RTT.
//!
//! Timing: tokio's timer has 1 ms granularity, too coarse for a 0.25 ms one-way
//! delay, so the writer sleeps with `tokio::time::sleep_until` until ~2 ms
//! before the due time and then waits on a precise timer thread (a condvar
//! with a deadline heap; futex timeouts are hrtimers) for the rest. Waking up
//! costs ~0.05–0.3 ms on a busy VM (the timer thread, then a tokio worker), so
//! the timer fires early by a lead that every sleep adjusts (by an eighth of
//! how late or early it resumed; at most 1 ms): bytes leave on time on
//! average, give or take the wake-up jitter.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, oneshot};

const USAGE: &str = "usage: delay_proxy --listen ADDR:PORT --upstream ADDR:PORT --delay-ms ONE_WAY_MS \
                     [--queue-bytes N] [--no-connect-delay]";
/// The most one read takes from a socket.
const CHUNK: usize = 64 * 1024;

#[derive(Debug, Clone)]
struct Config {
    listen: SocketAddr,
    upstream: SocketAddr,
    delay: Duration,
    queue_bytes: usize,
    connect_delay: bool,
}

fn parse_args() -> Result<Config, String> {
    let mut listen = None;
    let mut upstream = None;
    let mut delay = None;
    let mut queue_bytes = 4 << 20;
    let mut connect_delay = true;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| format!("{arg} needs a value\n{USAGE}"))
        };
        match arg.as_str() {
            "--listen" => listen = Some(value()?.parse().map_err(|e| format!("--listen: {e}"))?),
            "--upstream" => {
                upstream = Some(value()?.parse().map_err(|e| format!("--upstream: {e}"))?);
            }
            "--delay-ms" => {
                let ms: f64 = value()?.parse().map_err(|e| format!("--delay-ms: {e}"))?;
                if !(0.0..=600_000.0).contains(&ms) {
                    return Err(format!("--delay-ms {ms}: out of range"));
                }
                delay = Some(Duration::from_secs_f64(ms / 1000.0));
            }
            "--queue-bytes" => {
                queue_bytes = value()?
                    .parse()
                    .map_err(|e| format!("--queue-bytes: {e}"))?;
                if !(1..=1 << 30).contains(&queue_bytes) {
                    return Err(format!("--queue-bytes {queue_bytes}: out of range"));
                }
            }
            "--no-connect-delay" => connect_delay = false,
            "-h" | "--help" => return Err(USAGE.to_string()),
            _ => return Err(format!("unknown argument {arg}\n{USAGE}")),
        }
    }
    Ok(Config {
        listen: listen.ok_or(USAGE)?,
        upstream: upstream.ok_or(USAGE)?,
        delay: delay.ok_or(USAGE)?,
        queue_bytes,
        connect_delay,
    })
}

#[tokio::main]
async fn main() {
    let config = match parse_args() {
        Ok(c) => Arc::new(c),
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let listener = match TcpListener::bind(config.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("delay_proxy: bind {}: {e}", config.listen);
            std::process::exit(1);
        }
    };
    eprintln!(
        "delay_proxy: {} -> {}, one-way delay {:?}, queue {} B per direction",
        config.listen, config.upstream, config.delay, config.queue_bytes
    );
    let timer = Timer::start();
    loop {
        match listener.accept().await {
            Ok((client, _)) => {
                let (config, timer) = (config.clone(), timer.clone());
                tokio::spawn(async move {
                    if let Err(e) = serve(client, &config, &timer).await
                        && !is_disconnect(&e)
                    {
                        eprintln!("delay_proxy: connection: {e}");
                    }
                });
            }
            // e.g. EMFILE: back off instead of spinning.
            Err(e) => {
                eprintln!("delay_proxy: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

fn is_disconnect(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionReset | BrokenPipe | ConnectionAborted | UnexpectedEof
    )
}

async fn serve(client: TcpStream, config: &Config, timer: &Timer) -> std::io::Result<()> {
    let accepted = Instant::now();
    let upstream = TcpStream::connect(config.upstream).await?;
    client.set_nodelay(true)?;
    upstream.set_nodelay(true)?;
    let (client_read, client_write) = client.into_split();
    let (upstream_read, upstream_write) = upstream.into_split();
    let first_send = if config.connect_delay {
        accepted + 2 * config.delay // the handshake's round trip the kernel skipped
    } else {
        accepted
    };
    tokio::try_join!(
        pump(client_read, upstream_write, first_send, config, timer),
        pump(upstream_read, client_write, accepted, config, timer),
    )?;
    Ok(())
}

/// Copies `from` to `to`, each byte `config.delay` after it was read (and not
/// before `not_before + delay`), through a queue of at most `queue_bytes`.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    not_before: Instant,
    config: &Config,
    timer: &Timer,
) -> std::io::Result<()> {
    let chunk = CHUNK.min(config.queue_bytes);
    let room = &Semaphore::new(config.queue_bytes);
    let (queue, mut due) = mpsc::unbounded_channel::<(Instant, BytesMut)>(); // bounded by `room`
    let read = async move {
        loop {
            // Reserve room for a full read first, so the queue never exceeds its bound.
            room.acquire_many(chunk as u32)
                .await
                .expect("never closed")
                .forget();
            let mut buf = BytesMut::with_capacity(chunk);
            let n = from.read_buf(&mut buf).await?;
            room.add_permits(chunk - n);
            if n == 0 {
                return Ok::<_, std::io::Error>(()); // EOF: dropping `queue` ends the writer
            }
            let at = Instant::now().max(not_before) + config.delay;
            if queue.send((at, buf)).is_err() {
                return Ok(());
            }
        }
    };
    let write = async {
        while let Some((at, buf)) = due.recv().await {
            timer.sleep_until(at).await;
            to.write_all(&buf).await?;
            room.add_permits(buf.len());
        }
        to.shutdown().await // forward the half-close once everything before it is out
    };
    tokio::try_join!(read, write)?;
    Ok(())
}

/// Sub-millisecond sleeps: tokio for the bulk, then a thread waiting on a
/// condvar with the earliest deadline (futex timeouts are hrtimers).
#[derive(Clone)]
struct Timer(Arc<TimerShared>);

struct TimerShared {
    heap: Mutex<BinaryHeap<Reverse<Deadline>>>,
    changed: Condvar,
    /// How early to fire, in ns: adjusted after every sleep so that sleepers
    /// resume on time on average.
    lead_ns: AtomicU64,
}

struct Deadline {
    at: Instant,
    wake: oneshot::Sender<()>,
}

impl PartialEq for Deadline {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at
    }
}
impl Eq for Deadline {}
impl PartialOrd for Deadline {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Deadline {
    fn cmp(&self, other: &Self) -> Ordering {
        self.at.cmp(&other.at)
    }
}

impl Timer {
    /// How close to the deadline tokio's 1 ms timer may take us.
    const COARSE_MARGIN: Duration = Duration::from_millis(2);
    /// The most the timer fires early to make up for wake-up latency.
    const MAX_LEAD: Duration = Duration::from_millis(1);

    fn start() -> Self {
        let shared = Arc::new(TimerShared {
            heap: Mutex::new(BinaryHeap::new()),
            changed: Condvar::new(),
            lead_ns: AtomicU64::new(0),
        });
        let thread_shared = shared.clone();
        std::thread::Builder::new()
            .name("delay-timer".into())
            .spawn(move || Self::run(&thread_shared))
            .expect("spawn timer thread");
        Timer(shared)
    }

    fn run(shared: &TimerShared) {
        let mut heap = shared.heap.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            let now = Instant::now();
            while heap.peek().is_some_and(|Reverse(d)| d.at <= now) {
                if let Some(Reverse(d)) = heap.pop() {
                    let _ = d.wake.send(());
                }
            }
            heap = match heap.peek() {
                None => shared
                    .changed
                    .wait(heap)
                    .unwrap_or_else(PoisonError::into_inner),
                Some(Reverse(d)) => {
                    let timeout = d.at - now;
                    shared
                        .changed
                        .wait_timeout(heap, timeout)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
            };
        }
    }

    async fn sleep_until(&self, at: Instant) {
        let now = Instant::now();
        if at <= now {
            return; // overdue (a backlog): nothing to learn from it
        }
        // Fire early by `lead`, an estimate of the wake-up latency (thread
        // wake-up, then the tokio worker's), so that writes happen at `at` on
        // average. If less than `lead` is left, waking would only be later.
        let lead = Duration::from_nanos(self.0.lead_ns.load(Relaxed));
        let fire = at.checked_sub(lead).unwrap_or(now);
        if fire > now {
            if fire - now > 2 * Self::COARSE_MARGIN {
                tokio::time::sleep_until((fire - Self::COARSE_MARGIN).into()).await;
            }
            if fire > Instant::now() {
                let (wake, woken) = oneshot::channel();
                {
                    let mut heap = self.0.heap.lock().unwrap_or_else(PoisonError::into_inner);
                    let earliest = heap.peek().is_none_or(|Reverse(d)| fire < d.at);
                    heap.push(Reverse(Deadline { at: fire, wake }));
                    if earliest {
                        self.0.changed.notify_one();
                    }
                }
                let _ = woken.await;
            }
        }
        // lead += error / 8, error = how late (or, negative, early) we are.
        let now = Instant::now();
        let error = if now >= at {
            (now - at).min(Self::MAX_LEAD).as_nanos() as i64
        } else {
            -((at - now).min(Self::MAX_LEAD).as_nanos() as i64)
        };
        let old = self.0.lead_ns.load(Relaxed) as i64;
        let updated = (old + error / 8).clamp(0, Self::MAX_LEAD.as_nanos() as i64);
        self.0.lead_ns.store(updated as u64, Relaxed);
    }
}
