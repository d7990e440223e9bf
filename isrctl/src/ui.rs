//! `isrctl ui`: a local web page on this machine's sessions and parcels —
//! OpenISR's "dirtometer" in a browser. A live chunk map per file, fetch
//! and upload rates over the last minutes, bytes to go and an ETA, the VM's
//! state and the resume's timeline; the store's parcels with their versions
//! and lock holders; and the actions sync, hoard, suspend, checkin and
//! discard, through the same functions as the commands of those names.
//!
//! The server listens on 127.0.0.1 only, on a free port unless `--port`
//! says otherwise, and answers only requests that carry its random token
//! (128 bits): in the URL it prints (`/?token=…`, which sets a same-site
//! cookie and redirects to `/`), in that cookie, or in an `X-Isr-Token`
//! header. The page is one HTML file, a script and a style sheet embedded
//! in the binary: no CDN, no build chain.
//!
//! Live updates are server-sent events. One task asks isrfsd for its
//! sessions every [`POLL`] and, while a page is open, for their chunk maps;
//! each file's map is reduced to at most [`MAX_CELLS`] cells (each the most
//! pressing state of its group of chunks, as `status --watch` draws it), so
//! what is kept and sent is bounded whatever the number of chunks. Each
//! page's stream sends the whole picture once, then per poll only what
//! changed: a session's counters, the maps of files whose cells changed,
//! and the newest rate sample (docs/decisions.md has the numbers).
//!
//! Uses [`crate::session`], [`crate::checkin`], [`crate::parcels`],
//! [`crate::daemon`], [`crate::context`] and [`crate::output`] (see the
//! layering in `main.rs`).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::Ipv4Addr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use axum::extract::{Request as HttpRequest, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response as HttpResponse};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Args;
use isr::control::{ParcelStatus, Request, Response};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::context::CommandContext;
use crate::watch::{Counts, cells};
use crate::{checkin, context, daemon, output, parcels, session};

/// How often the server asks isrfsd for its sessions.
pub const POLL: Duration = Duration::from_millis(500);
/// The most cells a file's map has on the page.
pub const MAX_CELLS: usize = 4096;
/// Rate samples kept per session: five minutes at one per [`POLL`].
pub const HISTORY: usize = 600;
/// Chunk maps are asked for at most this share of the time: a map of a
/// million chunks costs isrfsd tens of milliseconds, so maps of big parcels
/// refresh less often than every [`POLL`].
const MAP_DUTY: u32 = 10;
/// The name of the cookie that carries the token.
const COOKIE: &str = "isr_ui_token";
/// The header that may carry the token instead.
const TOKEN_HEADER: &str = "x-isr-token";

const INDEX_HTML: &str = include_str!("ui/index.html");
const APP_JS: &str = include_str!("ui/app.js");
const STYLE_CSS: &str = include_str!("ui/style.css");

/// `isrctl ui`.
#[derive(Debug, Args)]
pub struct UiArgs {
    /// Port on 127.0.0.1 to listen on (default: a free one).
    #[arg(long, value_name = "N", default_value_t = 0, hide_default_value = true)]
    port: u16,
    /// Only print the URL: do not open a browser (one is opened with
    /// xdg-open only on a desktop, DISPLAY or WAYLAND_DISPLAY set).
    #[arg(long)]
    no_open: bool,
}

/// What every request handler shares.
struct Shared {
    context: Arc<CommandContext>,
    token: String,
    snapshot: watch::Sender<Arc<Snapshot>>,
}

/// `isrctl ui`: serves the page until Ctrl-C or SIGTERM.
pub async fn ui(context: CommandContext, args: UiArgs) -> anyhow::Result<ExitCode> {
    let context = Arc::new(context);
    let token = new_token();
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, args.port))
        .await
        .with_context(|| {
            format!(
                "listening on 127.0.0.1:{}; choose another --port, or leave it out for a free one",
                args.port
            )
        })?;
    let port = listener.local_addr()?.port();
    let url = format!("http://127.0.0.1:{port}/?token={token}");
    let (snapshot, _) = watch::channel(Arc::new(Snapshot::default()));
    let shared = Arc::new(Shared {
        context: context.clone(),
        token,
        snapshot,
    });
    tokio::spawn(poll_forever(shared.clone()));
    if context.global.json {
        let document = output::document(&serde_json::json!({ "url": url }))?;
        println!("{}", serde_json::to_string(&document)?);
    } else {
        println!("{url}");
        output::note("the web UI serves this URL (127.0.0.1 only) until Ctrl-C");
    }
    if !args.no_open {
        open_browser(&url);
    }
    let app = router(shared);
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("catching SIGTERM")?;
    // Open event streams never end by themselves: a signal ends the server
    // at once rather than waiting for the pages to go.
    tokio::select! {
        served = axum::serve(listener, app) => served.context("serving the web UI")?,
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    Ok(ExitCode::SUCCESS)
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/", get(index))
        .route(
            "/app.js",
            get(|| asset("text/javascript; charset=utf-8", APP_JS)),
        )
        .route(
            "/style.css",
            get(|| asset("text/css; charset=utf-8", STYLE_CSS)),
        )
        .route("/events", get(events))
        .route("/api/parcels", get(parcels_listing))
        .route("/api/action", post(action))
        .layer(middleware::from_fn_with_state(
            shared.clone(),
            require_token,
        ))
        .with_state(shared)
}

/// 128 random bits, hex.
fn new_token() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Compares in time independent of where the texts differ.
fn same_token(given: &str, token: &str) -> bool {
    given.len() == token.len()
        && given
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// Where a request carries the token.
#[derive(Debug, PartialEq, Eq)]
enum Given<'a> {
    /// In the URL's query (`?token=`): the cookie is set and the browser
    /// sent on without it.
    Query(&'a str),
    /// In the cookie or the header.
    Kept(&'a str),
    /// Nowhere.
    None,
}

fn given_token<'a>(
    query: Option<&'a str>,
    cookies: &'a [&'a str],
    header: Option<&'a str>,
) -> Given<'a> {
    if let Some(token) = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|pair| pair.strip_prefix("token="))
    {
        return Given::Query(token);
    }
    if let Some(token) = header {
        return Given::Kept(token);
    }
    cookies
        .iter()
        .flat_map(|c| c.split(';'))
        .find_map(|c| c.trim().strip_prefix(COOKIE)?.strip_prefix('='))
        .map_or(Given::None, Given::Kept)
}

/// Refuses (401) a request without the token.
async fn require_token(
    State(shared): State<Arc<Shared>>,
    request: HttpRequest,
    next: Next,
) -> HttpResponse {
    let cookies: Vec<&str> = request
        .headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let header = request
        .headers()
        .get(TOKEN_HEADER)
        .and_then(|v| v.to_str().ok());
    match given_token(request.uri().query(), &cookies, header) {
        Given::Query(token) if same_token(token, &shared.token) => {
            let cookie = format!(
                "{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict",
                shared.token
            );
            let mut response = (StatusCode::SEE_OTHER, [(header::LOCATION, "/")]).into_response();
            if let Ok(cookie) = HeaderValue::from_str(&cookie) {
                response.headers_mut().insert(header::SET_COOKIE, cookie);
            }
            response
        }
        Given::Kept(token) if same_token(token, &shared.token) => next.run(request).await,
        _ => (
            StatusCode::UNAUTHORIZED,
            "isrctl ui: this needs the token of the URL `isrctl ui` printed\n",
        )
            .into_response(),
    }
}

async fn index() -> HttpResponse {
    asset("text/html; charset=utf-8", INDEX_HTML).await
}

async fn asset(content_type: &'static str, body: &'static str) -> HttpResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

// ---- the live picture -------------------------------------------------------

/// What the page shows of this machine's sessions at one poll.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Snapshot {
    /// Whether isrfsd answered.
    daemon_running: bool,
    /// Why the poll failed, if it did.
    error: Option<String>,
    /// Parcels being resumed, not yet sessions.
    resuming: Vec<String>,
    /// The sessions, by parcel.
    sessions: BTreeMap<String, SessionView>,
}

/// One session as the page draws it.
#[derive(Debug, Clone, Serialize)]
struct SessionView {
    /// The session's counters as `isrctl status --json` shows them.
    status: ParcelStatus,
    /// Chunks per state over all files (a chunk used twice counts twice).
    counts: Counts,
    /// Per file, its map in cells.
    files: Vec<FileView>,
    /// Stored bytes still to fetch (estimated from the mean stored chunk so far).
    bytes_to_go: Option<u64>,
    /// Seconds until fully local at the recent fetch rate.
    eta_secs: Option<u64>,
    /// The resume's steps, as this server saw them.
    timeline: Timeline,
    /// Rate samples, oldest first: `[unix seconds, fetch B/s, upload B/s]`.
    history: VecDeque<Sample>,
}

type Sample = (f64, u64, u64);

/// A file's chunk map reduced to at most [`MAX_CELLS`] cells.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
struct FileView {
    path: String,
    size: u64,
    /// Chunks in the file.
    chunks: u64,
    /// Chunks per cell.
    group: u64,
    /// One state character per cell (`.` zero, `R` remote, `F` fetching,
    /// `L` local, `D` changed, `U` uploading).
    cells: String,
}

/// When each step of a session's resume happened, milliseconds since the
/// Unix epoch, as isrfsd recorded them; `None` when it has not (yet).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
struct Timeline {
    requested: Option<u64>,
    mounted: Option<u64>,
    /// The mount plus the VM's start time, once it runs.
    vm_running: Option<u64>,
    /// The first chunk fetched.
    first_progress: Option<u64>,
}

fn timeline(status: &ParcelStatus) -> Timeline {
    let vm_running = status.vm.as_ref().and_then(|vm| {
        let running = matches!(
            vm.state,
            isr::vmm::supervise::VmState::Running | isr::vmm::supervise::VmState::Saved
        );
        let mounted = status.timeline.mounted_ms?;
        running.then(|| mounted + (vm.start_seconds * 1000.0) as u64)
    });
    Timeline {
        requested: status.timeline.requested_ms,
        mounted: status.timeline.mounted_ms,
        vm_running,
        first_progress: status.session.fetch.first_fetch_ms,
    }
}

/// What the poller remembers of a session between polls: its rates.
#[derive(Default)]
struct Tracked {
    history: VecDeque<Sample>,
    last: Option<(SystemTime, u64, u64)>,
}

/// Asks isrfsd every [`POLL`] and publishes what it said.
async fn poll_forever(shared: Arc<Shared>) {
    let mut tracked: HashMap<String, Tracked> = HashMap::new();
    let mut next_maps = std::time::Instant::now();
    loop {
        let maps = shared.snapshot.receiver_count() > 0 && std::time::Instant::now() >= next_maps;
        let context = shared.context.clone();
        let polled = tokio::task::spawn_blocking(move || poll_once(&context, maps)).await;
        let now = SystemTime::now();
        let mut snapshot = Snapshot::default();
        match polled {
            Ok(Ok((running, sessions, resuming, map_cost))) => {
                if maps {
                    next_maps = std::time::Instant::now() + (map_cost * MAP_DUTY).max(POLL);
                }
                snapshot.daemon_running = running;
                tracked
                    .retain(|parcel, _| sessions.iter().any(|(s, _)| &s.session.parcel == parcel));
                for (status, files) in sessions {
                    let parcel = status.session.parcel.clone();
                    let entry = tracked.entry(parcel.clone()).or_default();
                    snapshot
                        .sessions
                        .insert(parcel, view(entry, status, files, now));
                }
                snapshot.resuming = resuming;
            }
            Ok(Err(e)) => snapshot.error = Some(output::one_line(&e)),
            Err(e) => snapshot.error = Some(format!("polling isrfsd: {e}")),
        }
        // Keep the previous maps when this poll did not ask for them.
        let previous = shared.snapshot.borrow().clone();
        for (parcel, session) in &mut snapshot.sessions {
            if session.files.is_empty()
                && let Some(old) = previous.sessions.get(parcel)
            {
                session.files = old.files.clone();
                session.counts = old.counts;
            }
        }
        shared.snapshot.send_replace(Arc::new(snapshot));
        tokio::time::sleep(POLL).await;
    }
}

/// Whether isrfsd answered, its sessions with their maps (if asked for),
/// the parcels being resumed, and how long the maps took.
type Polled = (
    bool,
    Vec<(ParcelStatus, Vec<isr::control::FileChunks>)>,
    Vec<String>,
    Duration,
);

/// One status call, and a chunk-map call per session when `maps`.
fn poll_once(context: &CommandContext, maps: bool) -> anyhow::Result<Polled> {
    let Some(socket) = daemon::socket_if_running(context) else {
        return Ok((false, Vec::new(), Vec::new(), Duration::ZERO));
    };
    let (sessions, resuming) = match isr::control::call(&socket, Request::Status { parcel: None })?
    {
        Response::Status { sessions, resuming } => (sessions, resuming),
        other => anyhow::bail!("isrfsd answered status with {other:?}"),
    };
    let mut out = Vec::new();
    let started = std::time::Instant::now();
    for status in sessions {
        let files = if maps {
            let request = Request::ChunkMap {
                parcel: status.session.parcel.clone(),
            };
            match isr::control::call(&socket, request) {
                Ok(Response::ChunkMap { files }) => files,
                _ => Vec::new(), // it ended between the two calls
            }
        } else {
            Vec::new()
        };
        out.push((status, files));
    }
    Ok((true, out, resuming, started.elapsed()))
}

fn view(
    tracked: &mut Tracked,
    status: ParcelStatus,
    files: Vec<isr::control::FileChunks>,
    now: SystemTime,
) -> SessionView {
    let s = &status.session;
    let (fetched, uploaded) = (s.fetch.fetched_bytes, s.uploaded_bytes);
    if let Some((at, last_fetched, last_uploaded)) = tracked.last {
        let seconds = now
            .duration_since(at)
            .unwrap_or_default()
            .as_secs_f64()
            .max(0.001);
        let t = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let rate = |now: u64, then: u64| (now.saturating_sub(then) as f64 / seconds) as u64;
        if tracked.history.len() == HISTORY {
            tracked.history.pop_front();
        }
        tracked.history.push_back((
            t,
            rate(fetched, last_fetched),
            rate(uploaded, last_uploaded),
        ));
    }
    tracked.last = Some((now, fetched, uploaded));
    let remaining = s.chunks_total.saturating_sub(s.chunks_local);
    let bytes_to_go = match (remaining, s.fetch.fetched_chunks) {
        (0, _) => Some(0),
        (_, 0) => None,
        (remaining, chunks) => Some(remaining.saturating_mul(fetched / chunks)),
    };
    // The mean fetch rate over the last ten seconds.
    let recent: Vec<u64> = tracked
        .history
        .iter()
        .rev()
        .take((10.0 / POLL.as_secs_f64()) as usize)
        .map(|&(_, f, _)| f)
        .collect();
    let mean = recent.iter().sum::<u64>() / (recent.len() as u64).max(1);
    let eta_secs = match bytes_to_go {
        Some(0) => Some(0),
        Some(bytes) if mean > 0 => Some(bytes.div_ceil(mean)),
        _ => None,
    };
    let mut counts = Counts::default();
    let mut views = Vec::new();
    for file in files {
        let Some((chunks, group, cells, file_counts)) = cells(&file.runs, MAX_CELLS) else {
            continue;
        };
        counts += file_counts;
        views.push(FileView {
            path: isr::error::printable(&file.path),
            size: file.size,
            chunks,
            group,
            cells,
        });
    }
    SessionView {
        counts,
        files: views,
        bytes_to_go,
        eta_secs,
        timeline: timeline(&status),
        history: tracked.history.clone(),
        status,
    }
}

/// The first event of a page's stream: everything.
fn full_event(snapshot: &Snapshot) -> serde_json::Value {
    serde_json::json!({ "kind": "full", "state": snapshot })
}

/// What changed from `old` to `new`, or `None` if nothing did: sessions new
/// or with other files whole; for the others their counters, the maps of
/// the files whose cells changed, and the newest rate sample.
fn update_event(old: &Snapshot, new: &Snapshot) -> Option<serde_json::Value> {
    let mut sessions = serde_json::Map::new();
    for (parcel, session) in &new.sessions {
        let Some(before) = old.sessions.get(parcel) else {
            sessions.insert(parcel.clone(), serde_json::json!({ "whole": session }));
            continue;
        };
        let same_files = before.files.len() == session.files.len()
            && before
                .files
                .iter()
                .zip(&session.files)
                .all(|(a, b)| a.path == b.path);
        if !same_files {
            sessions.insert(parcel.clone(), serde_json::json!({ "whole": session }));
            continue;
        }
        let changed: Vec<serde_json::Value> = session
            .files
            .iter()
            .enumerate()
            .filter(|(i, f)| before.files[*i] != **f)
            .map(|(i, f)| serde_json::json!({ "index": i, "file": f }))
            .collect();
        sessions.insert(
            parcel.clone(),
            serde_json::json!({
                "status": session.status,
                "counts": session.counts,
                "bytes_to_go": session.bytes_to_go,
                "eta_secs": session.eta_secs,
                "timeline": session.timeline,
                "sample": session.history.back(),
                "files": changed,
            }),
        );
    }
    if sessions.is_empty()
        && old.sessions.is_empty()
        && old.daemon_running == new.daemon_running
        && old.error == new.error
        && old.resuming == new.resuming
    {
        return None;
    }
    let removed: Vec<&String> = old
        .sessions
        .keys()
        .filter(|p| !new.sessions.contains_key(*p))
        .collect();
    Some(serde_json::json!({
        "kind": "update",
        "daemon_running": new.daemon_running,
        "error": new.error,
        "resuming": new.resuming,
        "sessions": sessions,
        "removed": removed,
    }))
}

/// `GET /events`: the live picture as server-sent events.
async fn events(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let mut receiver = shared.snapshot.subscribe();
    let first = receiver.borrow_and_update().clone();
    let stream = futures::stream::unfold(
        (receiver, first, true),
        |(mut receiver, previous, first)| async move {
            if first {
                let event = Event::default().data(full_event(&previous).to_string());
                return Some((
                    Ok::<_, std::convert::Infallible>(event),
                    (receiver, previous, false),
                ));
            }
            loop {
                receiver.changed().await.ok()?;
                let next = receiver.borrow_and_update().clone();
                if let Some(update) = update_event(&previous, &next) {
                    let event = Event::default().data(update.to_string());
                    return Some((Ok(event), (receiver, next, false)));
                }
            }
        },
    );
    Sse::new(stream).keep_alive(KeepAlive::default())
}

// ---- parcels and actions ----------------------------------------------------

/// `GET /api/parcels`: the store's parcels, each with its versions when the
/// credentials given to `isrctl ui` open it.
async fn parcels_listing(State(shared): State<Arc<Shared>>) -> Json<serde_json::Value> {
    let context = shared.context.clone();
    let handle = tokio::runtime::Handle::current();
    let answer = tokio::task::spawn_blocking(move || handle.block_on(list_parcels(&context)))
        .await
        .map_err(anyhow::Error::from)
        .and_then(|r| r);
    Json(answer.unwrap_or_else(|e| error_document(&e)))
}

async fn list_parcels(context: &CommandContext) -> anyhow::Result<serde_json::Value> {
    let store = context.store()?;
    context.require_store().await?;
    let credentials = context.given_credentials()?;
    let mut out = Vec::new();
    for listing in parcels::parcel_listings(&store).await? {
        let versions = if credentials.is_empty() {
            Err(anyhow::anyhow!(
                "no passphrase or key file was given to `isrctl ui` (it never prompts), so it cannot read versions; start it with ISR_PASSPHRASE_FILE, --passphrase-file or --key-file"
            ))
        } else {
            match isr::parcel::open(&store, &listing.name, &credentials).await {
                Ok(parcel) => parcels::version_listings(&store, &parcel).await,
                Err(e) => Err(e.into()),
            }
        };
        let mut value = serde_json::to_value(&listing)?;
        match versions {
            Ok(versions) => value["history"] = serde_json::to_value(versions)?,
            Err(e) => value["history_error"] = error_document(&e)["error"].take(),
        }
        out.push(value);
    }
    output::document(&serde_json::json!({ "parcels": out }))
}

/// The `--json` error document of `error`: class, exit code, message, hint.
fn error_document(error: &anyhow::Error) -> serde_json::Value {
    output::error_document(context::error_class(error), &output::one_line(error))
}

/// `POST /api/action`'s body.
#[derive(Debug, Deserialize)]
struct ActionRequest {
    action: String,
    parcel: String,
    #[serde(default)]
    message: String,
}

/// `POST /api/action`: runs sync, hoard, suspend, checkin or discard as the
/// command of that name does; the answer is `{"result": …}` or the error
/// document a command prints with `--json`.
async fn action(
    State(shared): State<Arc<Shared>>,
    Json(request): Json<ActionRequest>,
) -> Json<serde_json::Value> {
    let context = shared.context.clone();
    let handle = tokio::runtime::Handle::current();
    let answer =
        tokio::task::spawn_blocking(move || handle.block_on(run_action(&context, &request)))
            .await
            .map_err(anyhow::Error::from)
            .and_then(|r| r);
    Json(match answer {
        Ok(result) => serde_json::json!({ "schema": 1, "result": result }),
        Err(e) => error_document(&e),
    })
}

async fn run_action(
    context: &CommandContext,
    request: &ActionRequest,
) -> anyhow::Result<serde_json::Value> {
    let name = request.parcel.as_str();
    let message = request.message.as_str();
    Ok(match request.action.as_str() {
        "sync" => serde_json::to_value(checkin::sync_parcel(context, name, message).await?)?,
        "checkin" => serde_json::to_value(
            checkin::checkin_parcel(context, name, message, false, None, None).await?,
        )?,
        "suspend" => {
            let (saved, report) = checkin::suspend_parcel(context, name, message, false).await?;
            serde_json::json!({ "saved": saved, "checkin": report })
        }
        "hoard" => serde_json::json!({ "chunks": session::hoard_parcel(context, name)? }),
        "discard" => {
            serde_json::json!({ "lock_released": session::discard_session(context, name).await? })
        }
        other => {
            return Err(context::InvalidArgument(format!(
                "no action {other:?}; the web UI knows sync, hoard, suspend, checkin and discard"
            ))
            .into());
        }
    })
}

/// Opens `url` with xdg-open on a desktop; says so when it does not.
fn open_browser(url: &str) {
    let desktop = ["DISPLAY", "WAYLAND_DISPLAY"]
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|v| !v.is_empty()));
    let xdg_open = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("xdg-open"))
            .find(|p| p.is_file())
    });
    match (desktop, xdg_open) {
        (true, Some(program)) => {
            let spawned = std::process::Command::new(program)
                .arg(url)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn();
            if let Err(e) = spawned {
                output::note(&format!(
                    "could not run xdg-open ({e}); open the URL yourself"
                ));
            }
        }
        _ => output::note(
            "no desktop here (DISPLAY, WAYLAND_DISPLAY, xdg-open): open the URL in a browser",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_million_chunks_make_a_bounded_map() {
        // 1,000,000 chunks: mostly remote, one changed chunk, a zero tail.
        let text = "400000R1D399999L200000.";
        let (chunks, group, cells, counts) = cells(text, MAX_CELLS).unwrap();
        assert_eq!(chunks, 1_000_000);
        assert!(cells.len() <= MAX_CELLS, "{} cells", cells.len());
        assert_eq!(group, 1_000_000u64.div_ceil(MAX_CELLS as u64));
        // The group holding the changed chunk shows it.
        assert_eq!(cells.as_bytes()[(400_000 / group) as usize], b'D');
        assert_eq!(cells.matches('D').count(), 1);
        assert!(cells.ends_with('.'));
        assert_eq!(
            counts,
            Counts {
                zero: 200_000,
                remote: 400_000,
                local: 399_999,
                changed: 1,
                ..Counts::default()
            }
        );
    }

    #[test]
    fn the_token_is_required_and_compared_whole() {
        let token = new_token();
        assert_eq!(token.len(), 32);
        assert_ne!(token, new_token());
        assert!(same_token(&token, &token));
        assert!(!same_token(&token[..31], &token));
        assert!(!same_token("", &token));
        let other = format!("{}0", &token[..31]);
        assert!(token.ends_with('0') || !same_token(&other, &token));
    }

    #[test]
    fn the_token_is_found_in_query_header_or_cookie() {
        assert_eq!(
            given_token(Some("a=1&token=abc"), &[], None),
            Given::Query("abc")
        );
        assert_eq!(given_token(None, &[], Some("abc")), Given::Kept("abc"));
        assert_eq!(
            given_token(None, &["x=1; isr_ui_token=abc"], None),
            Given::Kept("abc")
        );
        assert_eq!(given_token(None, &["isr_ui_tokenx=abc"], None), Given::None);
        assert_eq!(given_token(Some("a=1"), &[], None), Given::None);
    }

    #[test]
    fn updates_send_only_what_changed() {
        let file = |cells: &str| FileView {
            path: "disk.img".into(),
            size: 1,
            chunks: cells.len() as u64,
            group: 1,
            cells: cells.into(),
        };
        let mut old = Snapshot::default();
        let status: ParcelStatus = serde_json::from_value(serde_json::json!({
            "parcel": "p", "base_version": 1, "mount": "/m", "chunks_total": 2,
            "chunks_local": 0, "dirty_bytes": 0, "dirty_chunks": 0, "uploaded_chunks": 0,
            "pending_chunks": 0, "pending_bytes": 0, "uploaded_bytes": 0, "trickle_rate": 0,
            "committed_version": null,
            "fetch": {"fetched_chunks": 0, "fetched_bytes": 0, "in_flight": 0, "queued": 0,
                      "retries": 0, "failures": 0, "verify_failures": 0, "cache_hits": 0},
            "mounted": true
        }))
        .unwrap();
        let session = SessionView {
            status,
            counts: Counts::default(),
            files: vec![file("RR"), file("LL")],
            bytes_to_go: None,
            eta_secs: None,
            timeline: Timeline::default(),
            history: VecDeque::new(),
        };
        old.sessions.insert("p".into(), session.clone());
        let mut new = old.clone();
        new.sessions.get_mut("p").unwrap().files[0] = file("LR");
        let update = update_event(&old, &new).unwrap();
        let files = update["sessions"]["p"]["files"].as_array().unwrap();
        assert_eq!(files.len(), 1);
        assert_eq!(files[0]["index"], 0);
        assert_eq!(files[0]["file"]["cells"], "LR");
        let update = update_event(&new, &Snapshot::default()).unwrap();
        assert_eq!(update["removed"][0], "p");
    }
}
