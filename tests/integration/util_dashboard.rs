//! Harness for the dashboard tests: a running `hydraflow run` worker (local
//! forge) whose API socket is awaited, stopped with SIGTERM when dropped,
//! and small async helpers for its API.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use serde_json::Value;

use crate::util::{HANG_GUARD, Project, wait_for};

/// How long one API call may take before the test fails (a hang guard).
pub const CALL_GUARD: Duration = Duration::from_secs(20);

/// A worker running in the background.
pub struct RunningWorker {
    /// The child process.
    pub child: Option<Child>,
    /// Its API socket.
    pub socket: PathBuf,
}

impl RunningWorker {
    /// Start `hydraflow run` for `p` (slug `slug`, with `env` added) and wait for its socket to answer.
    pub fn start(p: &Project, slug: &str, env: &[(&str, &Path)]) -> RunningWorker {
        let mut cmd = p.hydraflow(&["run"]);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the worker");
        let data_root = env
            .iter()
            .find(|(k, _)| *k == "HYDRAFLOW_HOME")
            .map_or_else(|| p.repo().join(".hydraflow"), |(_, v)| v.to_path_buf());
        let socket = data_root.join(slug).join("dashboard.sock");
        wait_for("the worker API socket", || {
            std::os::unix::net::UnixStream::connect(&socket).is_ok()
        });
        RunningWorker {
            child: Some(child),
            socket,
        }
    }

    /// Kill the worker at once (SIGKILL) and reap it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait for the exit (bounded); returns whether it exited successfully.
    pub fn stop(&mut self) -> bool {
        let Some(mut c) = self.child.take() else {
            return false;
        };
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let started = Instant::now();
        loop {
            if let Some(status) = c.try_wait().expect("try_wait") {
                return status.success();
            }
            if started.elapsed() > HANG_GUARD {
                let _ = c.kill();
                panic!("the worker did not stop after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for RunningWorker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One API call over a worker's Unix socket: status and JSON body.
pub async fn call(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    hydraflow::dashboard::client::json(socket, method, path, body.as_ref(), CALL_GUARD)
        .await
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Poll `cond` every 50 ms (async) until it holds or [`HANG_GUARD`] passes.
pub async fn until<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !cond().await {
        assert!(
            started.elapsed() < HANG_GUARD,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
