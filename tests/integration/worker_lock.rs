//! One worker per data directory: a second `hydraflow run` on the same
//! checkout exits at once naming the first's PID and the lock file, while
//! the commands that only read or spool keep working; the lock goes with
//! the first worker.

use std::process::Stdio;

use crate::util::{Project, wait_bounded, wait_for};

const AGENT: &str = "#!/bin/sh\ncat > /dev/null\n";

#[test]
fn a_second_worker_on_one_checkout_refuses_with_the_holders_pid() {
    let p = Project::new(AGENT, "");
    let first = p
        .hydraflow(&["run"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the first worker");
    let pid = first.id();
    let lock = p.data().join("worker.lock");
    wait_for("the first worker to hold the lock", || {
        std::fs::read_to_string(&lock).is_ok_and(|t| t.trim() == pid.to_string())
    });

    let second = p.run(&["run", "--exit-when-idle"]);
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("another worker (PID {pid}) already runs"))
            && err.contains(&lock.display().to_string())
            && err.contains("stop that worker first"),
        "{err}"
    );

    // What only reads or spools does not need the lock.
    for args in [
        &["issue", "add", "--title", "Later", "--label", "not-a-stage"][..],
        &["issue", "list"],
        &["hitl", "list"],
        &["config", "show"],
        &["check", "list", "main"],
    ] {
        let out = p.run(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let out = wait_bounded(first);
    assert!(
        out.status.success(),
        "the first worker: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Its lock went with it: a third worker starts.
    p.run_until_idle();
}
