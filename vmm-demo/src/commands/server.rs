//! The control socket of `vmm-demo run --control`: the server side of
//! [`crate::protocol`].

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use migration_core::transport::{Address, Listener, Stream};
use serde::Serialize;

use crate::error::{Error, chain};
use crate::migration::DiskArg;
use crate::migration::source::{self, ControlRefused, MigrationControl};
use crate::protocol::{
    Done, ErrorClass, ErrorReply, Event, MAX_REQUEST_LINE, MigrateRequest, Reply, Request,
    RunState, ServerLine, StatusReply, classify_bad_request,
};
use crate::report::MigrationReport;
use crate::vm::VmHandle;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// State shared by `run`'s main loop and its control socket.
#[derive(Debug)]
pub struct ControlState {
    state: Mutex<RunState>,
    quit: AtomicBool,
    migration: Mutex<Option<Arc<MigrationControl>>>,
    last_migration: Mutex<Option<MigrationReport>>,
}

impl ControlState {
    /// A VM running, no migration.
    pub fn new() -> Arc<ControlState> {
        Arc::new(ControlState {
            state: Mutex::new(RunState::Running),
            quit: AtomicBool::new(false),
            migration: Mutex::new(None),
            last_migration: Mutex::new(None),
        })
    }

    /// What the run loop is doing now.
    pub fn state(&self) -> RunState {
        lock(&self.state).clone()
    }

    /// Whether `quit` was asked.
    pub fn quit_requested(&self) -> bool {
        self.quit.load(Ordering::SeqCst)
    }

    /// The report of the migration that completed, if one did.
    pub fn last_migration(&self) -> Option<MigrationReport> {
        lock(&self.last_migration).clone()
    }
}

/// Starts serving the control socket at `addr` on a thread, for the VM `vm` with disks
/// `disks`. The listener lives as long as the process.
pub fn serve_control(
    addr: &Address,
    vm: VmHandle,
    disks: Vec<DiskArg>,
    state: Arc<ControlState>,
) -> Result<(), Error> {
    let listener = Listener::bind(addr).map_err(|source| Error::Listen {
        what: "binding the control socket",
        address: addr.to_string(),
        source,
    })?;
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            loop {
                let conn = match listener.accept() {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "control socket: accept failed; no more connections");
                        return;
                    }
                };
                let Stream::Unix(s) = conn else { continue };
                let (vm, disks, state) = (vm.clone(), disks.clone(), state.clone());
                let spawned = std::thread::Builder::new()
                    .name("control-conn".into())
                    .spawn(move || handle_conn(s, &vm, &disks, &state));
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, "control socket: no thread for a connection");
                }
            }
        })
        .map_err(|source| Error::Thread {
            name: "control",
            source,
        })?;
    Ok(())
}

/// Writes one line; false once the client is gone.
fn send<R: Serialize>(w: &mut UnixStream, line: &ServerLine<R>) -> bool {
    let mut s = match serde_json::to_string(line) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "control socket: encoding an answer");
            return false;
        }
    };
    s.push('\n');
    w.write_all(s.as_bytes()).is_ok()
}

fn reply<R: Serialize>(w: &mut UnixStream, r: Result<R, ErrorReply>) -> bool {
    send(
        w,
        &ServerLine::Reply(match r {
            Ok(v) => Reply::Return(v),
            Err(e) => Reply::Error(e),
        }),
    )
}

fn handle_conn(s: UnixStream, vm: &VmHandle, disks: &[DiskArg], state: &ControlState) {
    let Ok(mut w) = s.try_clone() else { return };
    let mut r = BufReader::new(s);
    let mut line = String::new();
    loop {
        line.clear();
        // Requests are small: a longer line is refused rather than buffered.
        match (&mut r).take(MAX_REQUEST_LINE).read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) => {
                // Not UTF-8, or the connection failed: answer if it still can.
                reply::<Done>(
                    &mut w,
                    Err(ErrorReply::new(
                        ErrorClass::Malformed,
                        format!("reading the request: {e}"),
                    )),
                );
                return;
            }
        }
        if !line.ends_with('\n') {
            reply::<Done>(
                &mut w,
                Err(ErrorReply::new(
                    ErrorClass::Malformed,
                    format!("request line longer than {MAX_REQUEST_LINE} bytes or unterminated"),
                )),
            );
            return;
        }
        if line.trim().is_empty() {
            continue;
        }
        let ok = match serde_json::from_str::<Request>(&line) {
            Err(e) => reply::<Done>(&mut w, Err(classify_bad_request(&line, &e))),
            Ok(Request::QueryStatus) => reply(
                &mut w,
                Ok(StatusReply {
                    state: state.state(),
                    guest: vm.kind(),
                    passes: vm.passes(),
                    paused: vm.is_paused(),
                    phase: lock(&state.migration).as_ref().map(|m| m.phase()),
                }),
            ),
            Ok(Request::Quit) => {
                state.quit.store(true, Ordering::SeqCst);
                reply(&mut w, Ok(Done {}))
            }
            Ok(Request::MigrateCancel) => {
                let r = on_migration(state, |m| m.cancel(), true);
                reply(&mut w, r)
            }
            Ok(Request::MigrateStartPostcopy) => {
                let r = on_migration(state, |m| m.start_postcopy(), false);
                reply(&mut w, r)
            }
            Ok(Request::MigrateRecover(r)) => {
                let r = on_migration(state, |m| m.recover_at(&r.uri), false);
                reply(&mut w, r)
            }
            Ok(Request::Migrate(m)) => {
                let r = migrate(&mut w, vm, disks, state, m);
                reply(&mut w, r)
            }
        };
        if !ok {
            return;
        }
    }
}

/// Runs `f` on the running migration; without one, `Done` if `idle_ok` (a cancel with
/// nothing to cancel), a `wrong-state` error otherwise.
fn on_migration(
    state: &ControlState,
    f: impl FnOnce(&MigrationControl) -> Result<(), ControlRefused>,
    idle_ok: bool,
) -> Result<Done, ErrorReply> {
    let m = lock(&state.migration).clone();
    match m {
        Some(m) => f(&m)
            .map(|()| Done {})
            .map_err(|e| ErrorReply::new(ErrorClass::WrongState, e.to_string())),
        None if idle_ok => Ok(Done {}),
        None => Err(ErrorReply::new(
            ErrorClass::WrongState,
            format!("no migration is running: the VM is {}", state.state()),
        )),
    }
}

fn migrate(
    w: &mut UnixStream,
    vm: &VmHandle,
    disks: &[DiskArg],
    state: &ControlState,
    m: MigrateRequest,
) -> Result<MigrationReport, ErrorReply> {
    // A destination or options that do not parse fail the migration before it starts:
    // the guest runs on.
    let ctl = MigrationControl::new(&m.to, &m.options).map_err(|e| ErrorReply {
        class: ErrorClass::MigrationFailed,
        desc: chain(&e),
        status: Some(state.state()),
        failed_phase: Some(migration_core::stats::Phase::Setup.to_string()),
    })?;
    let ctl = Arc::new(ctl);
    {
        let mut st = lock(&state.state);
        if *st != RunState::Running || state.quit_requested() {
            return Err(ErrorReply::new(
                ErrorClass::WrongState,
                format!("cannot migrate: the VM is {st}"),
            ));
        }
        *st = RunState::Migrating;
    }
    *lock(&state.migration) = Some(ctl.clone());
    let mut events_ok = true;
    let r = source::migrate_vm(vm, disks, &ctl, &m.options, &mut |e: &Event| {
        // A client that went away stops getting events; the migration goes on.
        if events_ok {
            events_ok = send(w, &ServerLine::<MigrationReport>::Event(e.clone()));
        }
    });
    *lock(&state.migration) = None;
    let mut st = lock(&state.state);
    match r {
        Ok(rep) => {
            *st = RunState::Migrated;
            *lock(&state.last_migration) = Some(rep.clone());
            Ok(rep)
        }
        Err(e) => {
            *st = match (e.guest_lost(), e.guest_left_paused()) {
                (Some(reason), _) => {
                    tracing::error!(%reason, "the guest is lost");
                    RunState::Lost { reason }
                }
                (None, Some(reason)) => {
                    tracing::error!(%reason, "the guest is left paused");
                    RunState::Paused { reason }
                }
                (None, None) => RunState::Running,
            };
            Err(ErrorReply {
                class: ErrorClass::MigrationFailed,
                desc: chain(&e),
                status: Some(st.clone()),
                failed_phase: Some(e.failed_phase()),
            })
        }
    }
}
