//! `isrctl status --watch`: a live view of resumed sessions, refreshed about
//! once a second — fetch rate, time until every chunk is local, the upload
//! backlog, and per file a chunk map (OpenISR's "dirtometer"): one character
//! per group of chunks, `.` zero, `R` only in the store, `F` being fetched,
//! `L` local, `D` changed, `U` changed and waiting for upload. A group shows
//! its most pressing state (`U`, then `D`, `F`, `R`, `L`, `.`): [`cells`],
//! which the web UI draws with too, reduces a map without expanding it.
//!
//! On a terminal the view redraws in place; otherwise (a pipe, a log) it
//! prints one block per interval and no cursor codes; with `--json`, one
//! JSON document per line and interval. It ends with Ctrl-C, when the
//! sessions it shows end, or after `--count` intervals.
//!
//! Uses [`crate::daemon`], [`crate::context`] and [`crate::output`] (see the
//! layering in `main.rs`).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use isr::control::{ControlError, FileChunks, ParcelStatus, Request, Response};
use isr::error::ErrorClass;
use isr::session::SessionError;

use crate::context::CommandContext;
use crate::daemon;
use crate::output;

/// How often the view refreshes.
const INTERVAL: Duration = Duration::from_secs(1);
/// Map width when stdout is not a terminal.
const PLAIN_WIDTH: usize = 64;

/// What the previous refresh saw of a session, for rates.
struct Sample {
    at: Instant,
    fetched_bytes: u64,
    local_chunks: u64,
}

/// `isrctl status --watch [NAME] [--count N]`.
pub fn watch(
    context: &CommandContext,
    name: Option<&str>,
    count: Option<u64>,
) -> anyhow::Result<ExitCode> {
    let terminal = std::io::stdout().is_terminal();
    let mut previous: HashMap<String, Sample> = HashMap::new();
    let mut shown = 0u64;
    loop {
        let Some(socket) = daemon::socket_if_running(context) else {
            return ended(name, shown);
        };
        let request = Request::Status {
            parcel: name.map(str::to_owned),
        };
        let (sessions, resuming) = match isr::control::call(&socket, request) {
            Ok(Response::Status { sessions, resuming }) => (sessions, resuming),
            Ok(other) => anyhow::bail!("isrfsd answered status with {other:?}"),
            Err(ControlError::Daemon {
                class: ErrorClass::NotFound,
                ..
            }) => return ended(name, shown),
            Err(e) => return Err(e.into()),
        };
        if sessions.is_empty() && resuming.is_empty() {
            return ended(name, shown);
        }
        if sessions.is_empty() {
            // Not a session yet: wait for its mount without counting a frame.
            std::thread::sleep(INTERVAL);
            continue;
        }
        let mut frame = String::new();
        let mut documents = Vec::new();
        let now = Instant::now();
        for status in &sessions {
            let parcel = status.session.parcel.clone();
            let files = match isr::control::call(
                &socket,
                Request::ChunkMap {
                    parcel: parcel.clone(),
                },
            ) {
                Ok(Response::ChunkMap { files }) => files,
                // It ended between the two requests.
                _ => continue,
            };
            let rates = rates(status, previous.get(&parcel), now);
            previous.insert(
                parcel,
                Sample {
                    at: now,
                    fetched_bytes: status.session.fetch.fetched_bytes,
                    local_chunks: status.session.chunks_local,
                },
            );
            if context.global.json {
                documents.push(serde_json::json!({
                    "status": status,
                    "fetch_bytes_per_sec": rates.bytes_per_sec,
                    "eta_secs": rates.eta_secs,
                    "files": files,
                }));
            } else {
                let width = if terminal {
                    console::Term::stdout()
                        .size_checked()
                        .map_or(80, |(_, cols)| usize::from(cols))
                } else {
                    PLAIN_WIDTH
                };
                render(&mut frame, status, &rates, &files, width, terminal);
            }
        }
        let mut stdout = std::io::stdout().lock();
        if context.global.json {
            // One document per refresh, one per line (JSON Lines).
            let document = output::document(&serde_json::json!({ "sessions": documents }))?;
            writeln!(stdout, "{}", serde_json::to_string(&document)?)?;
        } else if terminal {
            // Home, clear the screen, draw.
            write!(stdout, "\x1b[H\x1b[2J{frame}")?;
        } else {
            writeln!(stdout, "{frame}")?;
        }
        stdout.flush()?;
        drop(stdout);
        shown += 1;
        if count.is_some_and(|count| shown >= count) {
            return Ok(ExitCode::SUCCESS);
        }
        std::thread::sleep(INTERVAL);
    }
}

/// The watch ends when what it shows is gone: an error if it never showed
/// anything of a named parcel, otherwise a note.
fn ended(name: Option<&str>, shown: u64) -> anyhow::Result<ExitCode> {
    match (name, shown) {
        (Some(name), 0) => Err(SessionError::NotResumed(name.to_owned()).into()),
        (None, 0) => {
            println!("no resumed parcels (`isrctl resume NAME` mounts one)");
            Ok(ExitCode::SUCCESS)
        }
        _ => {
            eprintln!("isrctl: no longer resumed here; the watch ends");
            Ok(ExitCode::SUCCESS)
        }
    }
}

struct Rates {
    /// Stored bytes fetched per second since the last refresh.
    bytes_per_sec: Option<u64>,
    /// Seconds until every chunk is local at the current pace.
    eta_secs: Option<u64>,
}

fn rates(status: &ParcelStatus, previous: Option<&Sample>, now: Instant) -> Rates {
    let s = &status.session;
    let remaining = s.chunks_total.saturating_sub(s.chunks_local);
    let Some(previous) = previous else {
        return Rates {
            bytes_per_sec: None,
            eta_secs: (remaining == 0).then_some(0),
        };
    };
    let seconds = now.duration_since(previous.at).as_secs_f64().max(0.001);
    let bytes = s.fetch.fetched_bytes.saturating_sub(previous.fetched_bytes);
    let chunks = s.chunks_local.saturating_sub(previous.local_chunks);
    let eta = if remaining == 0 {
        Some(0)
    } else if chunks > 0 {
        Some((remaining as f64 / (chunks as f64 / seconds)).ceil() as u64)
    } else {
        None
    };
    Rates {
        bytes_per_sec: Some((bytes as f64 / seconds) as u64),
        eta_secs: eta,
    }
}

/// Chunks per state of a chunk map.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    pub zero: u64,
    pub remote: u64,
    pub fetching: u64,
    pub local: u64,
    pub changed: u64,
    pub uploading: u64,
}

impl std::ops::AddAssign for Counts {
    fn add_assign(&mut self, other: Counts) {
        self.zero += other.zero;
        self.remote += other.remote;
        self.fetching += other.fetching;
        self.local += other.local;
        self.changed += other.changed;
        self.uploading += other.uploading;
    }
}

/// How urgent a state is when a group of chunks shows one cell.
fn rank(state: u8) -> u8 {
    match state {
        b'U' => 5,
        b'D' => 4,
        b'F' => 3,
        b'R' => 2,
        b'L' => 1,
        _ => 0,
    }
}

/// A file's run-length map reduced to at most `max_cells` cells, each the
/// most pressing state of its group of chunks, and its chunks per state;
/// `None` for text that is no map. Work and memory are bounded by the runs
/// and `max_cells`, not by the number of chunks.
pub fn cells(text: &str, max_cells: usize) -> Option<(u64, u64, String, Counts)> {
    let mut counts = Counts::default();
    let mut total = 0u64;
    for run in isr::control::runs(text) {
        let (n, state) = run?;
        total = total.checked_add(n)?;
        let count = match state {
            b'.' => &mut counts.zero,
            b'R' => &mut counts.remote,
            b'F' => &mut counts.fetching,
            b'L' => &mut counts.local,
            b'D' => &mut counts.changed,
            b'U' => &mut counts.uploading,
            _ => return None,
        };
        *count += n;
    }
    let group = total.div_ceil(max_cells.max(1) as u64).max(1);
    let mut out = vec![b'.'; total.div_ceil(group) as usize];
    let mut at = 0u64;
    for run in isr::control::runs(text) {
        let (n, state) = run?;
        for cell in &mut out[(at / group) as usize..=((at + n - 1) / group) as usize] {
            if rank(state) > rank(*cell) {
                *cell = state;
            }
        }
        at += n;
    }
    Some((total, group, String::from_utf8(out).ok()?, counts))
}

fn render(
    frame: &mut String,
    status: &ParcelStatus,
    rates: &Rates,
    files: &[FileChunks],
    width: usize,
    terminal: bool,
) {
    let s = &status.session;
    let percent = (s.chunks_local * 100)
        .checked_div(s.chunks_total)
        .unwrap_or(100);
    let _ = writeln!(
        frame,
        "{} (version {}) at {}",
        isr::error::printable(&s.parcel),
        s.base_version,
        s.mount.display()
    );
    let rate = rates
        .bytes_per_sec
        .map_or("-".into(), |r| format!("{}/s", output::bytes(r)));
    let eta = match rates.eta_secs {
        Some(0) => "fully local".to_owned(),
        Some(secs) => format!("fully local in about {secs} s"),
        None => "not fetching".to_owned(),
    };
    let _ = writeln!(
        frame,
        "  local {}/{} chunks ({percent}%), fetching {rate}, {eta}",
        s.chunks_local, s.chunks_total
    );
    if s.manifest_segments_loaded < s.manifest_segments {
        let _ = writeln!(
            frame,
            "  manifest {}/{} segments loaded (the counts cover those)",
            s.manifest_segments_loaded, s.manifest_segments
        );
    }
    let _ = writeln!(
        frame,
        "  upload backlog {} ({} chunks), {} chunks uploaded, {} written not yet sealed",
        output::bytes(s.pending_bytes),
        s.pending_chunks,
        s.uploaded_chunks,
        output::bytes(s.dirty_bytes)
    );
    let names: Vec<String> = files
        .iter()
        .map(|f| isr::error::printable(&f.path))
        .collect();
    let name_width = names.iter().map(|n| n.chars().count()).max().unwrap_or(0);
    let map_width = if terminal {
        width.saturating_sub(name_width + 6).max(8)
    } else {
        width
    };
    for (file, name) in files.iter().zip(&names) {
        let map = cells(&file.runs, map_width).map(|(_, _, cells, _)| cells);
        let _ = writeln!(
            frame,
            "  {name:<name_width$}  [{}]",
            map.unwrap_or_default()
        );
    }
    let _ = writeln!(
        frame,
        "  map: . zero  R in the store only  F fetching  L local  D changed  U changed, waiting for upload"
    );
}

#[cfg(test)]
mod tests {
    use super::cells;

    #[test]
    fn groups_show_their_most_pressing_state() {
        assert_eq!(cells("2L2R", 4).unwrap().2, "LLRR");
        assert_eq!(cells("2L2R2L2.", 4).unwrap().2, "LRL.");
        assert_eq!(cells("1L1R1D1U1.", 2).unwrap().2, "DU");
        assert_eq!(cells("1R1L", 1).unwrap().2, "R");
        assert_eq!(cells("", 10).unwrap().2, "");
        // Alternating states at a million chunks: every cell is remote.
        let text = "1L1R".repeat(500_000);
        let (chunks, _, cells_, _) = cells(&text, 4096).unwrap();
        assert_eq!(chunks, 1_000_000);
        assert!(cells_.len() <= 4096 && cells_.bytes().all(|c| c == b'R'));
        for bad in ["L", "3", "0L", "3x", "18446744073709551615L1R"] {
            assert!(cells(bad, 8).is_none(), "{bad}");
        }
    }
}
