//! The control protocol of `vmm-demo run --control unix:PATH`: typed requests, replies and
//! events, shared by the server ([`crate::commands::server`]) and the client
//! ([`crate::client::ControlClient`]).
//!
//! A line-based JSON protocol in the spirit of QMP and Cloud Hypervisor's API socket. Each
//! request is one JSON object on one line, of at most [`MAX_REQUEST_LINE`] bytes; the
//! answer is one line `{"return": ...}` or `{"error": {"class": ..., "desc": ...}}`,
//! preceded for `migrate` by event lines `{"event": ...}`.
//!
//! | request | answer |
//! |---------|--------|
//! | `{"execute":"query-status"}` | `{"return":`[`StatusReply`]`}`: `{"status":"running","guest":"kvm","passes":[..],"paused":false}` |
//! | `{"execute":"migrate","arguments":{"to":"tcp:HOST:PORT", ...options}}` | [`Event`]s, then `{"return":`[`MigrationReport`](crate::report::MigrationReport)`}` or an error whose `status` says where the guest is |
//! | `{"execute":"migrate-cancel"}` | `{"return":{}}`; the running `migrate` then fails with "cancelled"; refused (`wrong-state`) once a post-copy has committed, with why |
//! | `{"execute":"migrate-start-postcopy"}` | `{"return":{}}`; the running hybrid switches to post-copy at its next decision (QEMU's `migrate_start_postcopy`); refused (`wrong-state`) without a migration that allows post-copy, or once it switched |
//! | `{"execute":"migrate-recover","arguments":{"uri":"tcp:HOST:PORT"}}` | `{"return":{}}`; the running post-copy (or hybrid) dials this address from now on: for the urgent channel at the switch and to recover from a broken connection |
//! | `{"execute":"quit"}` | `{"return":{}}`; `run` pauses the guest, checks it and prints its report |
//!
//! `status` is `running`, `migrating`, `migrated` (the destination runs the guest, this VM
//! stays paused), `paused` with a `reason` (a failed migration could not resume the
//! guest here) or `lost` with a `reason` (the destination was lost after a post-copy
//! committed: the guest ran there, this VM's copy is stale and is never resumed). While
//! migrating, `query-status` also says the migration's `phase`. The migrate options are the fields of [`MigrateOptions`], all optional;
//! an unknown one is refused. Events: `{"event":"phase","phase":"bulk-copy"}`,
//! `{"event":"progress",...}`, `{"event":"iteration",...}`,
//! `{"event":"throttle","percent":20}`.
//!
//! A line that is not JSON, not an object with `execute`, or longer than the limit, an
//! unknown command and bad arguments each get an error reply of their own
//! [`ErrorClass`]; the server never panics on what a client sends.

use migration_core::stats::{Phase, ProgressEvent};
use serde::{Deserialize, Serialize};

use crate::cli::MigrateOptions;
use crate::report::{PagesReport, PassReport};
use crate::vm::GuestKind;

/// Longest request line the server reads, newline included; a longer one is refused and
/// the connection closed.
pub const MAX_REQUEST_LINE: u64 = 64 << 10;

/// A request, as `{"execute": NAME, "arguments": {...}}`; a command without arguments
/// may be sent with none, `null` or `{}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "execute", content = "arguments", rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Request {
    /// What the VM is doing.
    QueryStatus,
    /// Migrate the guest.
    Migrate(MigrateRequest),
    /// Cancel the running migration (refused once a post-copy committed).
    MigrateCancel,
    /// Switch the running hybrid migration to post-copy now.
    MigrateStartPostcopy,
    /// Dial this address from now on, to recover the running post-copy.
    MigrateRecover(RecoverRequest),
    /// Stop: pause the guest, check it, report.
    Quit,
}

impl Request {
    /// The names of the commands, as `execute` spells them.
    pub const COMMANDS: [&'static str; 6] = [
        "query-status",
        "migrate",
        "migrate-cancel",
        "migrate-start-postcopy",
        "migrate-recover",
        "quit",
    ];

    /// This request's command name.
    pub fn command(&self) -> &'static str {
        match self {
            Request::QueryStatus => Self::COMMANDS[0],
            Request::Migrate(_) => Self::COMMANDS[1],
            Request::MigrateCancel => Self::COMMANDS[2],
            Request::MigrateStartPostcopy => Self::COMMANDS[3],
            Request::MigrateRecover(_) => Self::COMMANDS[4],
            Request::Quit => Self::COMMANDS[5],
        }
    }
}

/// The arguments of `migrate-recover`: the destination's new address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecoverRequest {
    /// `tcp:HOST:PORT` or `unix:PATH`.
    pub uri: String,
}

impl<'de> Deserialize<'de> for Request {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Raw {
            execute: String,
            #[serde(default)]
            arguments: Option<serde_json::Value>,
        }
        let raw = Raw::deserialize(d)?;
        let no_arguments = match &raw.arguments {
            None | Some(serde_json::Value::Null) => true,
            Some(serde_json::Value::Object(o)) => o.is_empty(),
            Some(_) => false,
        };
        let plain = |r: Request| {
            if no_arguments {
                Ok(r)
            } else {
                Err(D::Error::custom(format!(
                    "{} takes no arguments",
                    raw.execute
                )))
            }
        };
        match raw.execute.as_str() {
            "query-status" => plain(Request::QueryStatus),
            "migrate-cancel" => plain(Request::MigrateCancel),
            "migrate-start-postcopy" => plain(Request::MigrateStartPostcopy),
            "migrate-recover" => {
                let a = raw
                    .arguments
                    .ok_or_else(|| D::Error::missing_field("arguments"))?;
                RecoverRequest::deserialize(a)
                    .map(Request::MigrateRecover)
                    .map_err(D::Error::custom)
            }
            "quit" => plain(Request::Quit),
            "migrate" => {
                let a = raw
                    .arguments
                    .ok_or_else(|| D::Error::missing_field("arguments"))?;
                MigrateRequest::deserialize(a)
                    .map(Request::Migrate)
                    .map_err(D::Error::custom)
            }
            other => Err(D::Error::unknown_variant(other, &Self::COMMANDS)),
        }
    }
}

/// The arguments of `migrate`: where to, and how. An argument that is not one of these
/// is refused (a misspelt option would otherwise be silently left at its default).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawMigrateRequest")]
pub struct MigrateRequest {
    /// The destination, `tcp:HOST:PORT` or `unix:PATH`.
    pub to: String,
    /// How to migrate.
    #[serde(flatten)]
    pub options: MigrateOptions,
}

/// [`MigrateRequest`] as it arrives, with whatever it holds beyond the known arguments.
#[derive(Deserialize)]
struct RawMigrateRequest {
    to: String,
    #[serde(flatten)]
    options: MigrateOptions,
    // Flattened after `options`: gets only the keys `options` did not take.
    #[serde(flatten)]
    unknown: std::collections::BTreeMap<String, serde::de::IgnoredAny>,
}

impl TryFrom<RawMigrateRequest> for MigrateRequest {
    type Error = String;

    fn try_from(r: RawMigrateRequest) -> Result<Self, String> {
        if !r.unknown.is_empty() {
            let names: Vec<&str> = r.unknown.keys().map(String::as_str).collect();
            return Err(format!("unknown argument(s) {}", names.join(", ")));
        }
        Ok(MigrateRequest {
            to: r.to,
            options: r.options,
        })
    }
}

/// What the run loop is doing, as the control socket sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "lowercase")]
#[non_exhaustive]
pub enum RunState {
    /// The guest runs here.
    Running,
    /// A migration is in progress.
    Migrating,
    /// The guest runs on a destination; this VM stays paused.
    Migrated,
    /// The guest is paused here and nothing will resume it: a migration failed and
    /// resuming the guest afterwards failed too.
    Paused {
        /// Why.
        reason: String,
    },
    /// The guest is lost: a post-copy committed (the guest ran on the destination from
    /// then on) and the destination was lost. This VM's copy is stale; resuming it would
    /// roll the guest back, so it stays paused.
    Lost {
        /// Why.
        reason: String,
    },
}

impl std::fmt::Display for RunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunState::Running => f.write_str("running"),
            RunState::Migrating => f.write_str("migrating"),
            RunState::Migrated => f.write_str("migrated"),
            RunState::Paused { reason } => write!(f, "paused ({reason})"),
            RunState::Lost { reason } => write!(f, "lost ({reason})"),
        }
    }
}

/// The answer to `query-status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReply {
    /// What the run loop is doing.
    #[serde(flatten)]
    pub state: RunState,
    /// Which vCPUs run the guest.
    pub guest: GuestKind,
    /// Each vCPU's pass counter.
    pub passes: Vec<u64>,
    /// Every vCPU is parked right now (also briefly during a migration's stop-and-copy,
    /// and for good once a post-copy committed).
    pub paused: bool,
    /// The running migration's phase (`bulk-copy`, `postcopy`, `postcopy-paused`, ...).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::names::phase_opt"
    )]
    pub phase: Option<Phase>,
}

/// The answer to a command that returns nothing: `{}`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Done {}

/// What kind of failure an error reply reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum ErrorClass {
    /// Not a request: not JSON, not an object with `execute`, longer than
    /// [`MAX_REQUEST_LINE`] or not ended by a newline.
    Malformed,
    /// `execute` names no command of [`Request::COMMANDS`].
    UnknownCommand,
    /// The command's arguments are missing, of the wrong type or unknown.
    InvalidArguments,
    /// The VM or its migration is not in a state where the command can run (a second
    /// `migrate`, a cancel after a post-copy committed).
    WrongState,
    /// The migration failed; `status` says where the guest is.
    MigrationFailed,
}

/// An error reply: `{"error": {"class": ..., "desc": ..., "status": ...}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{desc}")]
pub struct ErrorReply {
    /// What kind of failure.
    pub class: ErrorClass,
    /// What failed, for a human, with its causes.
    pub desc: String,
    /// For a failed migration, the VM's state after it: `running` again, or `paused`
    /// with the reason.
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub status: Option<RunState>,
    /// For a failed migration, the phase it failed in (`storage-mirror`, `bulk-copy`,
    /// ...: see `MigrateError::failed_phase`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_phase: Option<String>,
}

impl ErrorReply {
    /// An error reply without a status.
    pub fn new(class: ErrorClass, desc: impl Into<String>) -> ErrorReply {
        ErrorReply {
            class,
            desc: desc.into(),
            status: None,
            failed_phase: None,
        }
    }
}

/// One answer line: the command's value, or an error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reply<R> {
    /// The command succeeded.
    Return(R),
    /// It failed.
    Error(ErrorReply),
}

/// What a migration reports while it runs, one line each.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Event {
    /// The migration entered a phase.
    Phase {
        /// The phase (`bulk-copy`, `iterating`, ...).
        #[serde(with = "crate::names::phase")]
        phase: Phase,
    },
    /// Periodic progress.
    Progress {
        /// Bytes written to the connection so far.
        bytes_on_wire: u64,
        /// Pages sent so far, all passes together.
        pages_sent: u64,
        /// Pages still to send in this pass.
        pages_remaining: u64,
        /// Pages of guest RAM.
        pages_total: u64,
        /// Bandwidth estimate, bytes/s.
        bandwidth_bps: f64,
        /// Dirty-rate estimate, bytes/s.
        dirty_rate_bps: f64,
    },
    /// A pass over RAM ended.
    Iteration(PassReport),
    /// Auto-converge changed the throttle.
    Throttle {
        /// The new throttle, %.
        percent: u8,
    },
    /// A post-copy page fault was served.
    PageFault {
        /// Global page index.
        page: u64,
        /// Fault to page in place, µs.
        latency_us: u64,
    },
    /// The storage mirror of a disk, before the RAM migration (about every 100 ms).
    Mirror {
        /// The disk.
        disk: String,
        /// Its size.
        bytes_total: u64,
        /// Bytes sent as data so far.
        bytes_copied: u64,
        /// Bytes dirty now (to copy, or copy again).
        dirty_bytes: u64,
        /// Copy rate over the last window, bytes/s.
        copy_rate_bps: f64,
        /// The guest's dirty rate over the last window, bytes/s.
        dirty_rate_bps: f64,
        /// Whether write-blocking is in force.
        write_blocking: bool,
    },
}

impl From<&ProgressEvent> for Event {
    fn from(e: &ProgressEvent) -> Event {
        match e {
            ProgressEvent::Phase(p) => Event::Phase { phase: *p },
            &ProgressEvent::Progress {
                bytes_on_wire,
                pages_sent,
                pages_remaining,
                pages_total,
                bandwidth_bps,
                dirty_rate_bps,
            } => Event::Progress {
                bytes_on_wire,
                pages_sent,
                pages_remaining,
                pages_total,
                bandwidth_bps,
                dirty_rate_bps,
            },
            ProgressEvent::IterationDone(i) => Event::Iteration(PassReport {
                iteration: i.iteration,
                pages: PagesReport::from(i.pages),
                bytes: i.bytes_on_wire,
                ms: i.duration.as_secs_f64() * 1e3,
                dirty_after: i.dirty_pages_after,
                dirty_rate_bps: i.dirty_rate_bps,
                bandwidth_bps: i.bandwidth_bps,
                throttle_pct: i.throttle_pct,
            }),
            &ProgressEvent::Throttle { percent } => Event::Throttle { percent },
            ProgressEvent::PageFault { page, latency } => Event::PageFault {
                page: *page,
                latency_us: u64::try_from(latency.as_micros()).unwrap_or(u64::MAX),
            },
        }
    }
}

/// A line the server writes: an event or the answer. What the client reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ServerLine<R> {
    /// An event of a running `migrate`.
    Event(Event),
    /// The answer.
    Reply(Reply<R>),
}

/// A request that does not parse, classified for its error reply.
pub fn classify_bad_request(line: &str, e: &serde_json::Error) -> ErrorReply {
    #[derive(Deserialize)]
    struct Named {
        execute: String,
    }
    match serde_json::from_str::<Named>(line) {
        Err(_) => ErrorReply::new(
            ErrorClass::Malformed,
            format!("not a request (one JSON object with \"execute\" per line): {e}"),
        ),
        Ok(n) if !Request::COMMANDS.contains(&n.execute.as_str()) => ErrorReply::new(
            ErrorClass::UnknownCommand,
            format!(
                "unknown command {:?} (expected one of {})",
                n.execute,
                Request::COMMANDS.join(", ")
            ),
        ),
        Ok(n) => ErrorReply::new(
            ErrorClass::InvalidArguments,
            format!("{} arguments: {e}", n.execute),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::MigrationReport;
    use serde_json::json;

    fn parse(line: &str) -> Result<Request, ErrorReply> {
        serde_json::from_str(line).map_err(|e| classify_bad_request(line, &e))
    }

    #[test]
    fn requests_have_the_documented_shape() {
        assert_eq!(
            parse(r#"{"execute":"quit","arguments":{}}"#).unwrap(),
            Request::Quit
        );
        for (r, j) in [
            (Request::QueryStatus, json!({"execute": "query-status"})),
            (Request::MigrateCancel, json!({"execute": "migrate-cancel"})),
            (Request::Quit, json!({"execute": "quit"})),
        ] {
            assert_eq!(serde_json::to_value(&r).unwrap(), j);
            assert_eq!(parse(&j.to_string()).unwrap(), r);
            assert!(Request::COMMANDS.contains(&r.command()));
        }
        let m = Request::Migrate(MigrateRequest {
            to: "tcp:h:1".into(),
            options: MigrateOptions {
                bandwidth: Some(5),
                ..MigrateOptions::default()
            },
        });
        let j = serde_json::to_value(&m).unwrap();
        assert_eq!(j["execute"], "migrate");
        assert_eq!(j["arguments"]["to"], "tcp:h:1");
        assert_eq!(j["arguments"]["bandwidth"], 5);
        assert_eq!(parse(&j.to_string()).unwrap(), m);
        let short = r#"{"execute":"migrate","arguments":{"to":"unix:/x","cancel_at":"bulk-copy"}}"#;
        match parse(short).unwrap() {
            Request::Migrate(m) => {
                assert_eq!(m.to, "unix:/x");
                assert_eq!(m.options.cancel_at, Some(Phase::BulkCopy));
                assert_eq!(m.options.downtime_limit_ms, 300);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(m.command(), "migrate");
    }

    proptest::proptest! {
        #[test]
        fn no_line_makes_the_request_parser_panic(line in proptest::prelude::any::<String>()) {
            let _ = parse(&line);
        }

        #[test]
        fn no_json_object_makes_the_request_parser_panic(
            execute in "(migrate|quit|query-status|[a-z-]{0,12})",
            key in "[a-z_]{0,20}",
            value in "(null|true|-1|1e400|\\[\\]|\\{\\}|\"[a-z:0-9.]{0,12}\")",
        ) {
            let line = format!(r#"{{"execute":"{execute}","arguments":{{"to":"tcp:h:1","{key}":{value}}}}}"#);
            let _ = parse(&line);
        }
    }

    #[test]
    fn bad_requests_are_classified() {
        let class = |l: &str| parse(l).unwrap_err().class;
        assert_eq!(class("not json"), ErrorClass::Malformed);
        assert_eq!(class("[1,2]"), ErrorClass::Malformed);
        assert_eq!(class(r#"{"exec":"quit"}"#), ErrorClass::Malformed);
        assert_eq!(class(r#"{"execute":"reboot"}"#), ErrorClass::UnknownCommand);
        let e = parse(r#"{"execute":"reboot"}"#).unwrap_err();
        assert!(
            e.desc.contains("\"reboot\"") && e.desc.contains("query-status"),
            "{e}"
        );
        assert_eq!(
            class(r#"{"execute":"migrate"}"#),
            ErrorClass::InvalidArguments
        );
        assert_eq!(
            class(r#"{"execute":"quit","arguments":{"now":true}}"#),
            ErrorClass::InvalidArguments
        );
        assert_eq!(
            class(r#"{"execute":"quit","extra":1}"#),
            ErrorClass::InvalidArguments
        );
        assert_eq!(
            class(r#"{"execute":"migrate","arguments":{"to":5}}"#),
            ErrorClass::InvalidArguments
        );
        assert_eq!(
            class(r#"{"execute":"migrate","arguments":{"to":"tcp:h:1","bandwith":3}}"#),
            ErrorClass::InvalidArguments
        );
        assert_eq!(
            class(r#"{"execute":"migrate","arguments":{"to":"tcp:h:1","cancel_at":"later"}}"#),
            ErrorClass::InvalidArguments
        );
        assert_eq!(
            class(r#"{"execute":"migrate","arguments":{"to":"tcp:h:1","downtime_limit_ms":-1}}"#),
            ErrorClass::InvalidArguments
        );
    }

    #[test]
    fn replies_and_events_read_back_as_what_was_sent() {
        let status = StatusReply {
            state: RunState::Paused {
                reason: "resume failed".into(),
            },
            guest: GuestKind::Software,
            passes: vec![3, 4],
            paused: true,
            phase: None,
        };
        let line =
            serde_json::to_string(&ServerLine::Reply(Reply::Return(status.clone()))).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["return"]["status"], "paused");
        assert_eq!(v["return"]["reason"], "resume failed");
        assert_eq!(
            serde_json::from_str::<ServerLine<StatusReply>>(&line).unwrap(),
            ServerLine::Reply(Reply::Return(status))
        );
        let running = serde_json::to_value(StatusReply {
            state: RunState::Running,
            guest: GuestKind::Kvm,
            passes: vec![],
            paused: false,
            phase: None,
        })
        .unwrap();
        assert_eq!(
            running,
            json!({"status": "running", "guest": "kvm", "passes": [], "paused": false})
        );

        let err = ErrorReply {
            class: ErrorClass::MigrationFailed,
            desc: "cancelled".into(),
            status: Some(RunState::Running),
            failed_phase: None,
        };
        let line =
            serde_json::to_string(&ServerLine::<Done>::Reply(Reply::Error(err.clone()))).unwrap();
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&line).unwrap(),
            json!({"error": {"class": "migration-failed", "desc": "cancelled", "status": "running"}})
        );
        assert_eq!(
            serde_json::from_str::<ServerLine<Done>>(&line).unwrap(),
            ServerLine::Reply(Reply::Error(err))
        );
        assert_eq!(
            serde_json::to_string(&Reply::Return(Done {})).unwrap(),
            r#"{"return":{}}"#
        );

        for e in [
            Event::Phase {
                phase: Phase::StopAndCopy,
            },
            Event::Throttle { percent: 20 },
            Event::Progress {
                bytes_on_wire: 1,
                pages_sent: 2,
                pages_remaining: 3,
                pages_total: 4,
                bandwidth_bps: 5.0,
                dirty_rate_bps: 6.0,
            },
            Event::Iteration(PassReport {
                iteration: 1,
                pages: PagesReport::default(),
                bytes: 7,
                ms: 1.5,
                dirty_after: 8,
                dirty_rate_bps: 9.0,
                bandwidth_bps: 10.0,
                throttle_pct: 0,
            }),
        ] {
            let line =
                serde_json::to_string(&ServerLine::<MigrationReport>::Event(e.clone())).unwrap();
            assert_eq!(
                serde_json::from_str::<ServerLine<MigrationReport>>(&line).unwrap(),
                ServerLine::Event(e)
            );
        }
        let phase = serde_json::to_value(Event::Phase {
            phase: Phase::BulkCopy,
        })
        .unwrap();
        assert_eq!(phase, json!({"event": "phase", "phase": "bulk-copy"}));
    }
}
