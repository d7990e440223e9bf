//! A small synchronous client for QEMU's machine protocol (QMP): JSON lines over
//! a Unix socket.
//!
//! [`Qmp::connect`] reads the greeting and negotiates capabilities
//! (`qmp_capabilities`); [`Qmp::execute`] runs one command and returns its
//! `return` value; asynchronous events that arrive meanwhile are kept, oldest
//! first, for [`Qmp::has_event`], [`Qmp::wait_event`] and [`Qmp::take_events`].
//!
//! Invariants:
//! - Every command carries an increasing `id`; a reply with another `id` (the
//!   late answer to a command that timed out) is skipped, never taken for the
//!   current command's answer.
//! - An event is never lost: whatever reads it keeps it until it is taken.
//! - Every read has a timeout ([`Qmp::set_timeout`]); a silent QEMU is a
//!   [`QmpError::Timeout`], not a hang.
//!
//! Nothing here knows what the commands mean: the QEMU adapter
//! ([`super::qemu`]) uses this for running, saving and loading VMs.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::error::{Classify, ErrorClass};

/// Errors talking to QEMU over QMP.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The QMP socket could not be connected to.
    #[error("cannot connect to QEMU's QMP socket {}: {source}", socket.display())]
    Connect {
        /// The socket.
        socket: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The connected socket could not be set up (timeout, second handle).
    #[error("{what}: {source}")]
    Socket {
        /// What was being done.
        what: &'static str,
        /// Cause.
        source: std::io::Error,
    },
    /// QEMU answered a command with an error.
    #[error("QMP {command}: QEMU says {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// QEMU's error class, e.g. `GenericError`.
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// A command could not be sent.
    #[error("QMP {command}: sending the command: {source} (did QEMU exit?)")]
    Send {
        /// The command.
        command: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The answer could not be read.
    #[error("QMP {command}: reading the answer: {source} (did QEMU exit?)")]
    Read {
        /// The command being run (or `greeting`).
        command: String,
        /// Cause.
        source: std::io::Error,
    },
    /// QEMU closed the connection.
    #[error("QMP {command}: QEMU closed the connection (did it exit?)")]
    Closed {
        /// The command being run (or `greeting`).
        command: String,
    },
    /// QEMU did not answer within the read timeout.
    #[error("QMP {command}: QEMU did not answer in time")]
    Timeout {
        /// The command being run (or `greeting`).
        command: String,
    },
    /// A line QEMU sent is not JSON.
    #[error("QMP {command}: not JSON ({source}): {line:?}")]
    NotJson {
        /// The command being run (or `greeting`).
        command: String,
        /// The line, trimmed.
        line: String,
        /// Cause.
        source: serde_json::Error,
    },
    /// QEMU sent something QMP does not allow here.
    #[error("QMP {command}: {reason}")]
    Protocol {
        /// The command being run (or `greeting`).
        command: String,
        /// What happened.
        reason: String,
    },
    /// [`Qmp::wait_event`] waited in vain.
    #[error("QMP waiting for event {name}: no {name} event within {} ms", waited.as_millis())]
    NoEvent {
        /// The event.
        name: String,
        /// How long it waited.
        waited: Duration,
    },
}

impl QmpError {
    /// Whether QEMU answered (with an error), as opposed to the connection
    /// failing: the command was understood and refused.
    pub fn is_refusal(&self) -> bool {
        matches!(self, QmpError::Command { .. })
    }
}

impl Classify for QmpError {
    fn class(&self) -> ErrorClass {
        match self {
            QmpError::Connect { source, .. } | QmpError::Socket { source, .. }
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                ErrorClass::NotFound
            }
            _ => ErrorClass::Other,
        }
    }
}

fn socket_error(what: &'static str) -> impl FnOnce(std::io::Error) -> QmpError {
    move |source| QmpError::Socket { what, source }
}

/// A QMP connection.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Asynchronous events received so far and not yet taken, oldest first.
    events: VecDeque<Value>,
    /// The `id` of the last command sent (QEMU echoes it in the reply, so a late
    /// reply to a command that timed out is not taken for the next one's).
    last_id: u64,
}

impl Qmp {
    /// Connects to QEMU's QMP socket, reads the greeting and enters command mode.
    pub fn connect(socket: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let stream = UnixStream::connect(socket).map_err(|source| QmpError::Connect {
            socket: socket.to_owned(),
            source,
        })?;
        stream
            .set_read_timeout(Some(timeout))
            .map_err(socket_error("QMP socket timeout"))?;
        let writer = stream.try_clone().map_err(socket_error("QMP socket"))?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
            events: VecDeque::new(),
            last_id: 0,
        };
        let greeting = qmp.read_message("greeting")?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol {
                command: "greeting".into(),
                reason: format!("expected the QMP greeting, got {greeting}"),
            });
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    /// Sets how long a command may take to answer.
    pub fn set_timeout(&mut self, timeout: Duration) -> Result<(), QmpError> {
        self.writer
            .set_read_timeout(Some(timeout))
            .map_err(socket_error("QMP socket timeout"))
    }

    fn read_message(&mut self, command: &str) -> Result<Value, QmpError> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err(QmpError::Closed {
                command: command.into(),
            }),
            Ok(_) => serde_json::from_str(&line).map_err(|source| QmpError::NotJson {
                command: command.into(),
                line: line.trim().to_owned(),
                source,
            }),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Err(QmpError::Timeout {
                    command: command.into(),
                })
            }
            Err(source) => Err(QmpError::Read {
                command: command.into(),
                source,
            }),
        }
    }

    /// Runs a command and returns its `return` value. Events that arrive first are
    /// kept (see [`Qmp::take_events`]).
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        self.last_id += 1;
        let id = self.last_id;
        let mut message = json!({ "execute": command, "id": id });
        if let Some(arguments) = arguments {
            message["arguments"] = arguments;
        }
        let mut text = message.to_string();
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .map_err(|source| QmpError::Send {
                command: command.into(),
                source,
            })?;
        loop {
            let reply = self.read_message(command)?;
            if reply.get("event").is_some() {
                self.events.push_back(reply);
                continue;
            }
            if reply.get("id").is_some_and(|reply_id| *reply_id != id) {
                continue; // the late answer to an earlier command
            }
            if let Some(error) = reply.get("error") {
                let text = |key: &str| {
                    error
                        .get(key)
                        .and_then(Value::as_str)
                        .unwrap_or("?")
                        .to_owned()
                };
                return Err(QmpError::Command {
                    command: command.into(),
                    class: text("class"),
                    desc: text("desc"),
                });
            }
            if let Some(value) = reply.get("return") {
                return Ok(value.clone());
            }
            return Err(QmpError::Protocol {
                command: command.into(),
                reason: format!("unexpected reply {reply}"),
            });
        }
    }

    /// Takes the events received so far.
    pub fn take_events(&mut self) -> Vec<Value> {
        self.events.drain(..).collect()
    }

    /// Whether an event named `name` was received (and not yet taken).
    pub fn has_event(&self, name: &str) -> bool {
        self.events.iter().any(|e| e["event"] == name)
    }

    /// Waits up to `limit` for an event named `name` (or takes one already
    /// received), and returns it; events before it stay kept.
    pub fn wait_event(&mut self, name: &str, limit: Duration) -> Result<Value, QmpError> {
        let what = format!("waiting for event {name}");
        let deadline = Instant::now() + limit;
        loop {
            if let Some(at) = self.events.iter().position(|e| e["event"] == name) {
                return Ok(self.events.remove(at).unwrap_or_default());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(QmpError::NoEvent {
                    name: name.to_owned(),
                    waited: limit,
                });
            }
            let previous = self.writer.read_timeout().ok().flatten();
            self.set_timeout(left)?;
            let message = self.read_message(&what);
            self.writer
                .set_read_timeout(previous)
                .map_err(socket_error("QMP socket timeout"))?;
            match message {
                Ok(message) if message.get("event").is_some() => self.events.push_back(message),
                Ok(message) => {
                    return Err(QmpError::Protocol {
                        command: what,
                        reason: format!("unexpected message {message}"),
                    });
                }
                Err(QmpError::Timeout { .. }) => {}
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake QEMU on a Unix socket: sends the greeting, then for each command
    /// line read, the next scripted reply lines (none = stay silent; `None` in the
    /// script = close the connection).
    fn fake_qemu(
        dir: &Path,
        script: Vec<Option<Vec<&'static str>>>,
    ) -> (PathBuf, std::thread::JoinHandle<Vec<Value>>) {
        use std::os::unix::net::UnixListener;
        let socket = dir.join("qmp.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let handle = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut writer = stream.try_clone().unwrap();
            let mut reader = BufReader::new(stream);
            writeln!(
                writer,
                r#"{{"QMP": {{"version": {{"qemu": {{"major": 10, "minor": 0, "micro": 2}}}}, "capabilities": []}}}}"#
            )
            .unwrap();
            let mut received = Vec::new();
            let mut script = script.into_iter();
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap_or(0) > 0 {
                received.push(serde_json::from_str(&line).unwrap());
                line.clear();
                match script.next() {
                    Some(Some(replies)) => {
                        for reply in replies {
                            writeln!(writer, "{reply}").unwrap();
                        }
                    }
                    Some(None) | None => break,
                }
            }
            received
        });
        (socket, handle)
    }

    #[test]
    fn qmp_commands_events_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let (socket, server) = fake_qemu(
            dir.path(),
            vec![
                Some(vec![r#"{"return": {}}"#]),
                Some(vec![
                    r#"{"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}}"#,
                    r#"{"return": {"status": "paused", "running": false}}"#,
                ]),
                Some(vec![
                    r#"{"error": {"class": "GenericError", "desc": "Could not create 'x'"}}"#,
                ]),
                Some(vec![r#"{"return": {}}"#, r#"{"event": "RESUME"}"#]),
                Some(vec!["this is not json"]),
                Some(vec![]),
                Some(vec![
                    r#"{"return": {"status": "late"}, "id": 6}"#,
                    r#"{"return": {"status": "running"}, "id": 7}"#,
                ]),
                None,
            ],
        );
        let mut qmp = Qmp::connect(&socket, Duration::from_secs(5)).unwrap();
        let status = qmp.execute("query-status", None).unwrap();
        assert_eq!(status["status"], "paused");
        assert!(qmp.has_event("STOP"));

        let error = qmp
            .execute("migrate", Some(json!({ "uri": "file:x" })))
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "QMP migrate: QEMU says GenericError: Could not create 'x'"
        );

        qmp.execute("cont", None).unwrap();
        let resume = qmp.wait_event("RESUME", Duration::from_secs(5)).unwrap();
        assert_eq!(resume["event"], "RESUME");
        let events = qmp.take_events();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0]["event"], "STOP");
        assert!(!qmp.has_event("STOP"));

        let error = qmp.execute("query-migrate", None).unwrap_err().to_string();
        assert!(error.starts_with("QMP query-migrate: not JSON"), "{error}");

        qmp.set_timeout(Duration::from_millis(200)).unwrap();
        let error = qmp.execute("query-status", None).unwrap_err().to_string();
        assert_eq!(error, "QMP query-status: QEMU did not answer in time");
        let error = qmp
            .wait_event("SHUTDOWN", Duration::from_millis(100))
            .unwrap_err()
            .to_string();
        assert!(error.contains("no SHUTDOWN event"), "{error}");
        qmp.set_timeout(Duration::from_secs(5)).unwrap();
        let status = qmp.execute("query-status", None).unwrap();
        assert_eq!(status["status"], "running", "the late reply is skipped");

        let error = qmp.execute("quit", None).unwrap_err().to_string();
        assert!(error.contains("closed the connection"), "{error}");

        let received = server.join().unwrap();
        let commands: Vec<&str> = received
            .iter()
            .map(|m| m["execute"].as_str().unwrap())
            .collect();
        assert_eq!(
            commands,
            [
                "qmp_capabilities",
                "query-status",
                "migrate",
                "cont",
                "query-migrate",
                "query-status",
                "query-status",
                "quit"
            ]
        );
        assert_eq!(received[2]["arguments"]["uri"], "file:x");
        assert_eq!(received[6]["id"], 7);
        assert!(received[1].get("arguments").is_none());
    }

    #[test]
    fn connecting_to_something_that_is_not_qemu() {
        let dir = tempfile::tempdir().unwrap();
        let error = Qmp::connect(&dir.path().join("none.sock"), Duration::from_secs(1))
            .unwrap_err()
            .to_string();
        assert!(error.contains("none.sock"), "{error}");

        let socket = dir.path().join("silent.sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            writeln!(stream, r#"{{"hello": 1}}"#).unwrap();
        });
        let error = Qmp::connect(&socket, Duration::from_secs(5))
            .unwrap_err()
            .to_string();
        assert!(error.contains("expected the QMP greeting"), "{error}");
        server.join().unwrap();
    }
}
