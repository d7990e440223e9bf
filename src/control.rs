//! The `isrctl` ⇄ `isrfsd` protocol: one JSON object per line over the Unix
//! socket `<runtime dir>/isrfsd.sock` (mode 0600; the daemon also checks that
//! the peer runs as its own user). Every message is an [`Envelope`] carrying
//! [`PROTOCOL_VERSION`]; a daemon refuses other versions with a clear error.
//!
//! `isrctl` unlocks the parcel itself and sends the parcel's secrets in
//! [`Request::Resume`] (like ssh-agent, the socket is owner-only); the daemon
//! keeps them in memory only.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Classify, ErrorClass};
use crate::keys::{DedupSecret, ParcelKey, ParcelSecrets};
use crate::parcel::{OpenParcel, ParcelRecord};
use crate::session::{CommitReport, SessionStatus};
use crate::store::{RetrySettings, S3Settings};
use crate::vmm::config::VmmKind;
use crate::vmm::supervise::{SuspendReport, VmStatus};

/// Version of this protocol.
pub const PROTOCOL_VERSION: u32 = 5;
/// Socket file name inside the runtime directory.
pub const SOCKET_NAME: &str = "isrfsd.sock";

/// The control socket of the daemon for `runtime_dir`.
pub fn socket_path(runtime_dir: &Path) -> PathBuf {
    runtime_dir.join(SOCKET_NAME)
}

/// A message with its protocol version.
#[derive(Debug, Serialize, Deserialize)]
pub struct Envelope<T> {
    /// [`PROTOCOL_VERSION`] of the sender.
    pub protocol: u32,
    /// The message.
    pub body: T,
}

/// Parcel secrets on the wire (hex); `Debug` is redacted.
#[derive(Clone, Serialize, Deserialize)]
pub struct WireSecrets {
    parcel_key: String,
    dedup_secret: String,
}

impl std::fmt::Debug for WireSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WireSecrets(<redacted>)")
    }
}

impl Drop for WireSecrets {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.parcel_key.zeroize();
        self.dedup_secret.zeroize();
    }
}

impl WireSecrets {
    /// Encodes secrets for sending.
    pub fn new(secrets: &ParcelSecrets) -> WireSecrets {
        WireSecrets {
            parcel_key: hex::encode(secrets.parcel_key.as_bytes()),
            dedup_secret: hex::encode(secrets.dedup_secret.as_bytes()),
        }
    }

    /// Decodes received secrets.
    pub fn secrets(&self) -> Option<ParcelSecrets> {
        let mut parcel_key = zeroize::Zeroizing::new([0u8; 32]);
        let mut dedup_secret = zeroize::Zeroizing::new([0u8; 32]);
        hex::decode_to_slice(&self.parcel_key, &mut parcel_key[..]).ok()?;
        hex::decode_to_slice(&self.dedup_secret, &mut dedup_secret[..]).ok()?;
        Some(ParcelSecrets {
            parcel_key: ParcelKey::from_bytes(*parcel_key),
            dedup_secret: DedupSecret::from_bytes(*dedup_secret),
        })
    }
}

/// What the daemon needs to open a parcel: its public record and its secrets.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireParcel {
    /// Parcel name.
    pub name: String,
    /// `parcel.toml`.
    pub record: ParcelRecord,
    /// Unlocked secrets.
    pub secrets: WireSecrets,
}

impl WireParcel {
    /// From an unlocked parcel.
    pub fn new(parcel: &OpenParcel) -> WireParcel {
        WireParcel {
            name: parcel.name.clone(),
            record: parcel.record.clone(),
            secrets: WireSecrets::new(&parcel.secrets),
        }
    }

    /// Back to an unlocked parcel.
    pub fn open(&self) -> Option<OpenParcel> {
        Some(OpenParcel {
            name: self.name.clone(),
            id: self.record.id_bytes(&self.name).ok()?,
            record: self.record.clone(),
            secrets: self.secrets.secrets()?,
        })
    }
}

/// Where the parcel's store is, as the client resolved it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireStore {
    /// URL.
    pub url: String,
    /// The read URL (a cache in front of the store), if any.
    #[serde(default)]
    pub read_url: Option<String>,
    /// S3 settings.
    pub s3: S3Settings,
    /// Retry settings.
    pub retry: RetrySettings,
}

/// What the daemon needs to reopen a session it does not have open.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reopen {
    /// The parcel, unlocked.
    pub parcel: WireParcel,
    /// Its store.
    pub store: WireStore,
}

/// A request to the daemon.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Lock (or reattach) and mount a parcel.
    Resume {
        /// The parcel, unlocked.
        parcel: Box<WireParcel>,
        /// Version to start from (default newest).
        version: Option<u64>,
        /// Mount point.
        mount: PathBuf,
        /// Its store.
        store: WireStore,
        /// Who runs the VM after mounting (default: the session's earlier
        /// choice, else the parcel's `vm.toml`, else nobody).
        #[serde(default)]
        vmm: Option<VmmKind>,
    },
    /// Sessions and their counters (one, or all).
    Status {
        /// Only this parcel.
        parcel: Option<String>,
    },
    /// Fetch every chunk of a session, answering when done.
    Hoard {
        /// Parcel.
        parcel: String,
    },
    /// Unmount, drop local changes, wipe local state, release the lock.
    Discard {
        /// Parcel.
        parcel: String,
    },
    /// Commit a version while the session stays mounted and writable.
    Sync {
        /// Parcel.
        parcel: String,
        /// Message recorded with the version.
        message: String,
    },
    /// Commit a version, unmount, release the lock.
    Checkin {
        /// Parcel.
        parcel: String,
        /// Message recorded with the version.
        message: String,
        /// Also remove the parcel's chunks from the local cache.
        wipe: bool,
        /// Commit as version 1 of this new parcel instead (after the lock was lost).
        save_as: Option<Box<WireParcel>>,
        /// For a session the daemon does not have open (it was restarted):
        /// what it needs to reopen it from the state directory.
        reopen: Option<Box<Reopen>>,
    },
    /// Save the VM's memory into the mount, stop it, then check in as
    /// [`Request::Checkin`] does.
    Suspend {
        /// Parcel.
        parcel: String,
        /// Message recorded with the version.
        message: String,
        /// Also remove the parcel's chunks from the local cache.
        wipe: bool,
        /// For a session the daemon does not have open (see [`Request::Checkin`]).
        reopen: Option<Box<Reopen>>,
    },
    /// Flush every session, unmount, exit (sessions stay resumable; running
    /// VMs are saved into their mounts first).
    Shutdown,
    /// Mount a version read-only at `dir`, without the parcel's lock (a view,
    /// for restoring files; the parcel may be resumed meanwhile).
    Mount {
        /// The parcel, unlocked.
        parcel: Box<WireParcel>,
        /// Version to show (default newest).
        version: Option<u64>,
        /// An existing directory, absolute.
        dir: PathBuf,
        /// Its store.
        store: WireStore,
    },
    /// End the view mounted at `dir`.
    Unmount {
        /// The view's directory, absolute.
        dir: PathBuf,
    },
    /// The read-only views mounted now.
    Views,
    /// The state of every chunk of a session, per file ([`FileChunks`]).
    ChunkMap {
        /// Parcel.
        parcel: String,
    },
}

/// The daemon's answer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    /// Mounted.
    Resumed {
        /// Mount point.
        mount: PathBuf,
        /// True if an existing session was reattached.
        reattached: bool,
        /// The VM started from the mount, if any.
        #[serde(default)]
        vm: Option<Box<VmStatus>>,
        /// Things the user should know (e.g. a `vm.toml` that describes no VM).
        #[serde(default)]
        warnings: Vec<String>,
    },
    /// Session counters.
    Status {
        /// One per session.
        sessions: Vec<ParcelStatus>,
        /// Parcels whose resume is under way and not yet a session (their
        /// session record may already be on disk).
        #[serde(default)]
        resuming: Vec<String>,
    },
    /// Every chunk is local.
    Hoarded {
        /// Chunks in the parcel.
        chunks: u64,
    },
    /// A sync or checkin finished.
    Committed {
        /// What it did.
        report: Box<CommitReport>,
    },
    /// A suspend finished: the VM's memory was saved (unless no VM was running
    /// under isrfsd), then the session was checked in.
    Suspended {
        /// The save, if isrfsd ran the VM.
        saved: Option<Box<SuspendReport>>,
        /// The checkin.
        report: Box<CommitReport>,
    },
    /// A view is mounted.
    Mounted {
        /// Parcel.
        parcel: String,
        /// The version it shows.
        version: u64,
        /// Where.
        dir: PathBuf,
    },
    /// The read-only views, by directory.
    Views {
        /// One per view.
        views: Vec<ViewInfo>,
    },
    /// The chunk states of a session's files.
    ChunkMap {
        /// One per file, in path order.
        files: Vec<FileChunks>,
    },
    /// Done.
    Done,
    /// Failed.
    Error {
        /// What kind of failure (isrctl exits with its code, [`crate::exit::code`]).
        class: ErrorClass,
        /// One-line message.
        message: String,
    },
}

/// One resumed parcel as `isrctl status` shows it: its session's counters and
/// the VM the daemon runs from its mount. On the wire the session's fields and
/// `vm` sit side by side in one object.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ParcelStatus {
    /// The session's counters.
    #[serde(flatten)]
    pub session: SessionStatus,
    /// The VM, if the daemon runs one (or is starting it).
    #[serde(default)]
    pub vm: Option<VmStatus>,
    /// Whether the parcel is mounted; false after its mount ended behind
    /// the daemon's back (`isrctl resume` mounts it again).
    pub mounted: bool,
    /// When this daemon was asked to resume it and when its mount went live.
    #[serde(default)]
    pub timeline: ResumeTimeline,
}

/// The steps of a session's resume in this daemon, milliseconds since the
/// Unix epoch (the VM's start and the first fetched chunk are in
/// [`VmStatus::start_seconds`] and [`crate::fetch::FetchStats`]); `None`
/// from a daemon that did not record them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumeTimeline {
    /// The resume request arrived.
    pub requested_ms: Option<u64>,
    /// The mount went live.
    pub mounted_ms: Option<u64>,
}

/// One read-only view (`isrctl mount`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewInfo {
    /// Parcel.
    pub parcel: String,
    /// The version it shows.
    pub version: u64,
    /// Where it is mounted.
    pub dir: PathBuf,
}

/// The chunk states of one file of a session, run-length encoded: `runs`
/// is [`encode_runs`] of one character per chunk, `.` zero, `R` only in the
/// store, `F` being downloaded, `L` in the local cache, `D` changed by this session, `U` changed
/// and waiting for upload (see [`crate::image::Image::chunk_map`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileChunks {
    /// Path in the parcel.
    pub path: String,
    /// Its size in bytes.
    pub size: u64,
    /// The states, run-length encoded (`3L5R`: three local, five remote).
    pub runs: String,
}

/// Run-length encodes a chunk map: each run of one character as its count
/// and the character (`LLLRR` → `3L2R`).
pub fn encode_runs(map: &str) -> String {
    let mut out = String::new();
    let mut chars = map.chars().peekable();
    while let Some(c) = chars.next() {
        let mut count = 1;
        while chars.next_if_eq(&c).is_some() {
            count += 1;
        }
        out.push_str(&format!("{count}{c}"));
    }
    out
}

/// The most chunks a decoded map may have: a manifest's bound on one
/// file's chunks.
const MAX_MAP_CHUNKS: usize = crate::manifest::MAX_CHUNKS_PER_FILE as usize;

/// The runs of [`encode_runs`] text in order, `(count, state)`; an item is
/// `None` where the text is no run (a missing, zero or too big count, a
/// count without a state, a state that is not ASCII). Work is bounded by
/// the text, not by the counts.
pub fn runs(text: &str) -> impl Iterator<Item = Option<(u64, u8)>> + '_ {
    let mut rest = text.as_bytes();
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        let Some(&state) = rest.get(digits) else {
            rest = &[];
            return Some(None);
        };
        let count = std::str::from_utf8(&rest[..digits])
            .ok()
            .and_then(|d| d.parse::<u64>().ok())
            .filter(|&n| n > 0 && state.is_ascii());
        rest = &rest[digits + 1..];
        Some(count.map(|n| (n, state)))
    })
}

/// Undoes [`encode_runs`]; `None` for text it does not produce (or a map
/// longer than a file can be).
pub fn decode_runs(text: &str) -> Option<String> {
    let mut out = String::new();
    for run in runs(text) {
        let (n, state) = run?;
        let n = usize::try_from(n)
            .ok()
            .filter(|&n| out.len() + n <= MAX_MAP_CHUNKS)?;
        out.extend(std::iter::repeat_n(char::from(state), n));
    }
    Some(out)
}

/// Errors talking to the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No daemon answers on the socket.
    #[error("cannot reach isrfsd at {}: {source}", socket.display())]
    Connect {
        /// Socket path.
        socket: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The conversation failed.
    #[error("talking to isrfsd: {0}")]
    Io(#[from] std::io::Error),
    /// The daemon speaks another protocol version.
    #[error(
        "isrfsd speaks control protocol {0}, this isrctl speaks {PROTOCOL_VERSION}: restart isrfsd (`isrctl` starts the matching one)"
    )]
    Version(u32),
    /// The daemon reported an error.
    #[error("{message}")]
    Daemon {
        /// What kind of failure, as the daemon classified it.
        class: ErrorClass,
        /// Its message.
        message: String,
    },
}

impl Classify for ControlError {
    fn class(&self) -> ErrorClass {
        match self {
            ControlError::Daemon { class, .. } => *class,
            _ => ErrorClass::Other,
        }
    }
}

/// Writes one message as a JSON line.
pub fn send<T: Serialize>(stream: &mut impl Write, body: T) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(&Envelope {
        protocol: PROTOCOL_VERSION,
        body,
    })
    .map_err(std::io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    stream.flush()
}

/// The longest request line isrfsd reads: requests carry names, paths and
/// keys, a few KiB.
pub const MAX_REQUEST_BYTES: u64 = 1 << 20;
/// The longest reply line isrctl reads (status of many sessions).
pub const MAX_REPLY_BYTES: u64 = 256 << 20;
/// Control connections isrfsd serves at once; more are answered with an
/// error and closed.
pub const MAX_CONNECTIONS: usize = 64;
/// How long isrfsd waits for the next request on an idle connection.
pub const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Reads one JSON line of at most `limit` bytes; `Ok(None)` at end of stream.
/// A longer line is an `InvalidData` error after reading `limit` bytes of it.
pub fn receive<T: for<'de> Deserialize<'de>>(
    reader: &mut impl BufRead,
    limit: u64,
) -> std::io::Result<Option<Envelope<T>>> {
    let mut line = Vec::new();
    if Read::take(&mut *reader, limit + 1).read_until(b'\n', &mut line)? == 0 {
        return Ok(None);
    }
    if line.len() as u64 > limit {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a control message longer than {limit} bytes"),
        ));
    }
    serde_json::from_slice(&line)
        .map(Some)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Sends one request to the daemon at `socket` and waits for its answer.
pub fn call(socket: &Path, request: Request) -> Result<Response, ControlError> {
    let mut stream = UnixStream::connect(socket).map_err(|source| ControlError::Connect {
        socket: socket.to_owned(),
        source,
    })?;
    send(&mut stream, request)?;
    let mut reader = BufReader::new(stream);
    let reply: Envelope<Response> = receive(&mut reader, MAX_REPLY_BYTES)?.ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "isrfsd closed the connection",
        )
    })?;
    if reply.protocol != PROTOCOL_VERSION {
        return Err(ControlError::Version(reply.protocol));
    }
    match reply.body {
        Response::Error { class, message } => Err(ControlError::Daemon { class, message }),
        other => Ok(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_round_trip_and_stay_redacted() {
        let secrets = ParcelSecrets::generate(None);
        let wire = WireSecrets::new(&secrets);
        assert!(!format!("{wire:?}").contains(&hex::encode(secrets.parcel_key.as_bytes())));
        let json = serde_json::to_string(&wire).unwrap();
        let back: WireSecrets = serde_json::from_str(&json).unwrap();
        assert_eq!(back.secrets().unwrap().parcel_key, secrets.parcel_key);
    }

    #[test]
    fn messages_are_versioned_json_lines() {
        let mut buffer = Vec::new();
        send(&mut buffer, Request::Status { parcel: None }).unwrap();
        assert!(buffer.ends_with(b"\n"));
        let text = String::from_utf8(buffer.clone()).unwrap();
        assert!(
            text.contains(&format!("\"protocol\":{PROTOCOL_VERSION}"))
                && text.contains("\"op\":\"status\""),
            "{text}"
        );
        let back: Envelope<Request> = receive(&mut buffer.as_slice(), MAX_REQUEST_BYTES)
            .unwrap()
            .unwrap();
        assert!(matches!(back.body, Request::Status { parcel: None }));
    }

    #[test]
    fn chunk_maps_run_length_encode_and_decode() {
        assert_eq!(encode_runs("LLLRR.D"), "3L2R1.1D");
        assert_eq!(encode_runs(""), "");
        for map in ["", "U", "LLLRR.D", "RRRRRRRRRRRRLL"] {
            assert_eq!(decode_runs(&encode_runs(map)).as_deref(), Some(map));
        }
        for bad in [
            "L",
            "3",
            "0L",
            "x3",
            "268435456L1R",
            "99999999999999999999L",
        ] {
            assert_eq!(decode_runs(bad), None, "{bad}");
        }
    }

    #[test]
    fn an_error_reply_carries_its_class() {
        let mut buffer = Vec::new();
        let reply = Response::Error {
            class: ErrorClass::Conflict,
            message: "locked".into(),
        };
        send(&mut buffer, reply).unwrap();
        let text = String::from_utf8(buffer.clone()).unwrap();
        assert!(text.contains("\"class\":\"conflict\""), "{text}");
        let back: Envelope<Response> = receive(&mut buffer.as_slice(), MAX_REQUEST_BYTES)
            .unwrap()
            .unwrap();
        let Response::Error { class, .. } = back.body else {
            panic!("not an error reply: {text}");
        };
        assert_eq!(class, ErrorClass::Conflict);
    }
}
