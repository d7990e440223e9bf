//! `isrfsd`: the isr daemon that serves resumed parcels as lazy FUSE mounts.
//!
//! The daemon (FUSE mounts, control socket, fetch scheduler, local cache) is
//! issue #3 and is not built yet. Until then this binary only answers `--help`
//! and `--version`, and refuses to run with a message saying so, so that nothing
//! (a systemd unit, a script) mistakes it for a working daemon.

use std::process::ExitCode;

use clap::Parser;

/// isr daemon: serves resumed parcels as lazy FUSE mounts (not built yet: see
/// issue #3; use `isrctl import/export` meanwhile).
#[derive(Debug, Parser)]
#[command(name = "isrfsd", version)]
struct Cli {}

fn main() -> ExitCode {
    let _ = Cli::parse();
    eprintln!(
        "isrfsd: the mount daemon is not part of this build yet (issue #3); \
         `isrctl import`, `export` and `verify` work without it"
    );
    ExitCode::from(1)
}
