//! The worker under socket activation, as `hydraflow@.socket` starts it: the real `hydraflow run`
//! gets a listening Unix socket as fd 3 with `LISTEN_FDS=1`, `LISTEN_PID` its own pid and
//! `LISTEN_FDNAMES` (sd_listen_fds_with_names(3)). Named `dashboard`, the worker serves its API
//! there, binds no socket of its own and leaves the socket file in place when it stops (it is
//! the socket unit's); under another name it closes it and binds its own as without activation.

use std::os::fd::AsFd as _;
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Command, Stdio};

use http::{Method, StatusCode};
use hydraflow::dashboard::client;

use crate::util::{HANG_GUARD, Project, wait_bounded};

const IDLE_AGENT: &str = "#!/bin/sh\ncat > /dev/null\n";

/// `cmd` (the harness's `hydraflow …` command) run through `sh`, so that `LISTEN_PID` is the
/// worker's own pid (`exec` keeps it), with `listener` as fd 3 and `LISTEN_FDNAMES=name`.
fn activated(cmd: &Command, listener: &UnixListener, name: &str) -> std::process::Child {
    let mut sh = Command::new("sh");
    sh.arg("-c")
        .arg("LISTEN_PID=$$ exec \"$0\" \"$@\"")
        .arg(cmd.get_program())
        .args(cmd.get_args());
    if let Some(dir) = cmd.get_current_dir() {
        sh.current_dir(dir);
    }
    for (key, value) in cmd.get_envs() {
        match value {
            Some(v) => sh.env(key, v),
            None => sh.env_remove(key),
        };
    }
    sh.env("LISTEN_FDS", "1")
        .env("LISTEN_FDNAMES", name)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // Far from 3, so the move below cannot clobber it; close-on-exec, so only fd 3 is passed.
    let high = nix::fcntl::fcntl(listener.as_fd(), nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(100))
        .expect("dup");
    // SAFETY: the closure only calls dup2(2), which is async-signal-safe, on a descriptor the
    // parent keeps open until the child has started.
    unsafe {
        sh.pre_exec(move || {
            if nix::libc::dup2(high, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = sh.spawn().expect("spawn hydraflow");
    nix::unistd::close(high).expect("close");
    child
}

/// `GET /healthz` on `socket`, waiting for the worker to accept (the kernel queues the
/// connection meanwhile, as with systemd).
fn healthz(socket: &Path) -> serde_json::Value {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (status, body) = rt
        .block_on(client::json(
            socket,
            Method::GET,
            "/healthz",
            None,
            HANG_GUARD,
        ))
        .unwrap_or_else(|e| panic!("GET /healthz on {}: {e}", socket.display()));
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

/// Start a worker given a socket named `name`; `used` says whether it must serve on it.
fn check(name: &str, used: bool) {
    let p = Project::new(IDLE_AGENT, "");
    let passed = p.fx.tmp.path().join("activation.sock");
    let own = p.data().join(hydraflow::dashboard::SOCKET_NAME);
    let listener = UnixListener::bind(&passed).expect("bind");
    let child = activated(&p.hydraflow(&["run"]), &listener, name);
    // The worker holds the only copy now: if it dies, connecting fails rather than hangs.
    drop(listener);

    let served_on = if used { &passed } else { &own };
    if !used {
        crate::util::wait_for("the worker's own socket", || own.exists());
    }
    let health = healthz(served_on);
    assert_eq!(health["status"], "ok", "{name}: {health}");
    assert_eq!(own.exists(), !used, "{name}: the worker's own socket");

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid")),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let out = wait_bounded(child);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{name}: {stderr}");
    let said = if used {
        "worker API on the socket passed by socket activation"
    } else {
        "closing a socket passed by socket activation"
    };
    assert!(stderr.contains(said), "{name}: {stderr}");
    assert!(
        passed.exists(),
        "{name}: the passed socket's file is left to its socket unit"
    );
    assert!(!own.exists(), "{name}: the worker removes its own socket");
}

#[test]
fn the_socket_named_dashboard_serves_the_worker_api() {
    check("dashboard", true);
}

#[test]
fn a_socket_with_another_name_is_not_used() {
    check("other", false);
}
