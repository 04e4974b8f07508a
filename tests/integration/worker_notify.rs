//! The worker's systemd protocol on a real notify socket (`READY=1` with a
//! `STATUS=` line, `WATCHDOG=1` when `WATCHDOG_USEC` is set, `STOPPING=1`
//! on SIGTERM), and a pause of the pipeline when an agent reports a usage
//! limit.

use std::os::unix::net::UnixDatagram;
use std::process::Stdio;
use std::time::Duration;

use hydraflow::store::events::EventType;

use crate::util::{HANG_GUARD, Project, wait_bounded, wait_for};

const IDLE_AGENT: &str = "#!/bin/sh\ncat > /dev/null\n";

fn receive_until(socket: &UnixDatagram, what: &str, seen: &mut Vec<String>) {
    let started = std::time::Instant::now();
    let mut buf = vec![0u8; 4096];
    while !seen.iter().any(|m| m.contains(what)) {
        assert!(started.elapsed() < HANG_GUARD, "no {what} in {seen:?}");
        if let Ok(n) = socket.recv(&mut buf) {
            seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
}

#[test]
fn ready_status_watchdog_and_stopping() {
    let p = Project::new(IDLE_AGENT, "");
    let socket_path = p.fx.tmp.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let child = p
        .hydraflow(&["run"])
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "1000000")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut seen = Vec::new();
    receive_until(&socket, "READY=1", &mut seen);
    let ready = seen.iter().find(|m| m.contains("READY=1")).unwrap();
    assert!(ready.contains("STATUS=triage 0"), "{ready}");
    // Pings keep coming while the loops beat.
    let pings_before = seen.iter().filter(|m| m.contains("WATCHDOG=1")).count();
    receive_until(&socket, "WATCHDOG=1", &mut seen);
    let mut extra = Vec::new();
    receive_until(&socket, "WATCHDOG=1", &mut extra);
    assert!(
        seen.iter()
            .chain(&extra)
            .filter(|m| m.contains("WATCHDOG=1"))
            .count()
            > pings_before
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    receive_until(&socket, "STOPPING=1", &mut extra);
    let out = wait_bounded(child);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn usage_limit_pauses_the_pipeline_without_counting_attempts() {
    let agent = r#"#!/bin/sh
cat > /dev/null
echo "Claude AI usage limit reached|4102444800" >&2
exit 1
"#;
    let p = Project::new(agent, "");
    p.add_issue("Anything", "body");
    let child = p
        .hydraflow(&["run"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let events_file = p.data().join("events.jsonl");
    wait_for("a pause event", || {
        events_file.exists()
            && p.events()
                .iter()
                .any(|e| e.kind == EventType::OrchestratorStatus && e.data["status"] == "paused")
    });
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let out = wait_bounded(child);
    assert!(out.status.success());
    let pause = p
        .events()
        .into_iter()
        .find(|e| e.kind == EventType::OrchestratorStatus && e.data["status"] == "paused")
        .unwrap();
    assert!(
        pause.data["reason"]
            .as_str()
            .unwrap()
            .contains("usage limit"),
        "{pause:?}"
    );
    // Paused until the reset time (clamped to a day), not retried in a loop.
    assert!(pause.data["seconds"].as_u64().unwrap() >= 3600);
    let state = p.state();
    assert_eq!(state.issues[&1].attempts, 0);
    assert!(state.issues[&1].hitl().is_none());
    let triage_runs = std::fs::read_dir(p.data().join("logs"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("triage-issue-1")
        })
        .count();
    assert!(triage_runs >= 1);
}

/// A notify socket that nobody reads fills up; the worker must drop status
/// updates rather than stall (it used to block in `sendto`).
#[test]
fn an_unread_notify_socket_does_not_stall_the_worker() {
    let agent = r#"#!/bin/sh
cat > /dev/null
case "$1" in
  triage) echo '{"ready": true, "reasons": []}' ;;
  plan) printf 'PLAN_START\nx\nSUMMARY: x\nPLAN_END\n' ;;
  implement) echo "$2" > "f-$2.txt"; git add -A; git commit -qm "work $2" ;;
  review) printf 'VERDICT: APPROVE\nSUMMARY: ok\n' ;;
esac
"#;
    let p = Project::new(agent, "");
    for n in 1..=12 {
        p.add_issue(&format!("Issue {n}"), "body");
    }
    let socket_path = p.fx.tmp.path().join("unread.sock");
    let _socket = UnixDatagram::bind(&socket_path).unwrap();
    let child = p
        .hydraflow(&["run", "--exit-when-idle"])
        .env("NOTIFY_SOCKET", &socket_path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_bounded(child);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for n in 1..=12 {
        assert_eq!(
            p.issue(n).state,
            hydraflow::forge::IssueState::Closed,
            "#{n}"
        );
    }
}
