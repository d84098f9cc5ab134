//! The control socket served in this process over a software guest: typed replies, and
//! typed errors for whatever a client sends.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::small_config;
use migration_core::transport::Address;
use migration_core::vm::VmControl;
use vmm_demo::cli::MigrateOptions;
use vmm_demo::commands::server::{ControlState, serve_control};
use vmm_demo::protocol::{
    Done, ErrorClass, MAX_REQUEST_LINE, MigrateRequest, Reply, RunState, ServerLine,
};
use vmm_demo::{Console, ControlClient, GuestKind, Vm};

struct Served {
    vm: Vm,
    state: Arc<ControlState>,
    client: ControlClient,
    _dir: tempfile::TempDir,
}

fn serve() -> Served {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("control.sock");
    let mut vm = Vm::new(&small_config(1), GuestKind::Software, Console::Discard).unwrap();
    let state = ControlState::new();
    serve_control(
        &Address::Unix(sock.clone()),
        vm.handle(),
        Vec::new(),
        state.clone(),
    )
    .unwrap();
    vm.resume().unwrap();
    let client = ControlClient::connect(&sock, Duration::from_secs(10)).unwrap();
    Served {
        vm,
        state,
        client,
        _dir: dir,
    }
}

/// Sends `line` and returns the class of the error it must get.
fn refused(c: &mut ControlClient, line: &str) -> ErrorClass {
    c.send_raw(line).unwrap();
    match c.read_line::<Done>().unwrap() {
        ServerLine::Reply(Reply::Error(e)) => {
            assert!(!e.desc.is_empty());
            e.class
        }
        other => panic!("{line:?} was answered with {other:?}"),
    }
}

#[test]
fn bad_requests_get_typed_errors_and_the_connection_goes_on() {
    let mut s = serve();
    let c = &mut s.client;
    assert_eq!(refused(c, "hello\n"), ErrorClass::Malformed);
    assert_eq!(refused(c, "{\"execute\": 3}\n"), ErrorClass::Malformed);
    assert_eq!(refused(c, "\u{1F600}{}\n"), ErrorClass::Malformed);
    assert_eq!(
        refused(c, "{\"execute\":\"reboot\"}\n"),
        ErrorClass::UnknownCommand
    );
    assert_eq!(
        refused(c, "{\"execute\":\"migrate\",\"arguments\":{\"to\":[]}}\n"),
        ErrorClass::InvalidArguments
    );
    assert_eq!(
        refused(
            c,
            "{\"execute\":\"migrate\",\"arguments\":{\"to\":\"tcp:127.0.0.1:1\",\"bandwith\":1}}\n"
        ),
        ErrorClass::InvalidArguments
    );
    // A destination that does not parse: the migration fails, the guest runs on.
    let e = c
        .migrate(
            MigrateRequest {
                to: "carrier-pigeon:home".into(),
                options: MigrateOptions::default(),
            },
            &mut |_| {},
        )
        .unwrap_err();
    let reply = e.reply().expect("an error reply");
    assert_eq!(reply.class, ErrorClass::MigrationFailed);
    assert_eq!(reply.status, Some(RunState::Running));
    assert!(reply.desc.contains("carrier-pigeon"), "{reply:?}");
    // After all that, the connection still answers, and the guest still runs.
    let st = c.query_status().unwrap();
    assert_eq!(st.state, RunState::Running);
    assert_eq!(st.guest, GuestKind::Software);
    let p = st.passes[0];
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.query_status().unwrap().passes[0] <= p {
        assert!(Instant::now() < deadline, "the guest stopped making passes");
        std::thread::sleep(Duration::from_millis(5));
    }
    c.cancel().unwrap();
    c.quit().unwrap();
    assert!(s.state.quit_requested());
    s.vm.pause().unwrap();
    s.vm.check().unwrap();
}

#[test]
fn bytes_that_are_not_utf8_get_an_error_and_the_connection_closes() {
    use std::io::{Read, Write};
    let s = serve();
    // Invalid UTF-8 needs bytes, not a &str: written on a connection of its own.
    let sock = s._dir.path().join("control.sock");
    let mut raw = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    raw.write_all(b"\xff\xfe{}\n").unwrap();
    let mut answer = String::new();
    raw.read_to_string(&mut answer).unwrap();
    let r: Reply<Done> = serde_json::from_str(answer.trim()).unwrap();
    assert!(
        matches!(&r, Reply::Error(e) if e.class == ErrorClass::Malformed),
        "{r:?}"
    );
}

#[test]
fn an_overlong_line_is_refused_and_the_connection_closes() {
    let mut s = serve();
    let long = format!(
        "{{\"execute\":\"quit\",\"x\":\"{}\"}}\n",
        "a".repeat(MAX_REQUEST_LINE as usize)
    );
    // The server may close while the rest is still being written.
    let _ = s.client.send_raw(&long);
    match s.client.read_line::<Done>().unwrap() {
        ServerLine::Reply(Reply::Error(e)) => assert_eq!(e.class, ErrorClass::Malformed),
        other => panic!("{other:?}"),
    }
    assert!(s.client.read_line::<Done>().is_err(), "still open");
    assert!(!s.state.quit_requested());
}
