//! Who may do what, off systemd, with real local users: the supervisor (run as root, process
//! backend, `authorization = "groups"`) and its dashboard, and the `hydraflow` CLI run as an
//! administrator (a member of `admin_group`), a reader (a member of `read_group`) and another
//! user, over the Unix control socket and over TCP. The users and groups are made with
//! `useradd`/`groupadd` and removed at the end.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// A worker that becomes ready and waits.
const WORKER: &str = r#"#!/bin/sh
systemd-notify --ready --status="serving $2" || exit 70
sleep 100000 &
wait
"#;

/// Run `cmd` and require success.
fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Local users and groups made for one test, removed when dropped.
struct Accounts {
    users: Vec<String>,
    groups: Vec<String>,
}

impl Accounts {
    fn group(&mut self, name: &str) {
        let _ = Command::new("groupdel").arg(name).output();
        run(Command::new("groupadd").arg(name));
        self.groups.push(name.to_owned());
    }

    /// A user with its own primary group, also in `groups`.
    fn user(&mut self, name: &str, groups: &[&str]) {
        let _ = Command::new("userdel").arg(name).output();
        let mut cmd = Command::new("useradd");
        cmd.args(["-M", "-s", "/usr/sbin/nologin"]);
        if !groups.is_empty() {
            cmd.arg("-G").arg(groups.join(","));
        }
        run(cmd.arg(name));
        self.users.push(name.to_owned());
    }
}

impl Drop for Accounts {
    fn drop(&mut self) {
        for user in &self.users {
            let _ = Command::new("userdel").arg(user).output();
        }
        for group in &self.groups {
            let _ = Command::new("groupdel").arg(group).output();
        }
    }
}

/// A running supervisor, killed when dropped.
struct Daemon(std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `hydraflow` with `config`, as `user` (`None`: as this process, root), without the caller's
/// HydraFlow and systemd variables.
fn hydraflow(config: &Path, user: Option<&str>) -> Command {
    let bin = env!("CARGO_BIN_EXE_hydraflow");
    let mut cmd = match user {
        Some(user) => {
            let mut cmd = Command::new("setpriv");
            cmd.arg(format!("--reuid={user}"))
                .arg(format!("--regid={user}"))
                .arg("--init-groups")
                .arg(bin);
            cmd
        }
        None => Command::new(bin),
    };
    cmd.env("HYDRAFLOW_CONFIG", config)
        .env("HOME", "/nonexistent")
        .env_remove("HYDRAFLOW_HOME")
        .env_remove("HF_SUPERVISOR_PORT_FILE")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("JOURNAL_STREAM")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID");
    cmd
}

/// Run the CLI; (success, stdout + stderr).
fn cli(config: &Path, user: Option<&str>, args: &[&str]) -> (bool, String) {
    let out = hydraflow(config, user)
        .args(args)
        .output()
        .expect("run hydraflow");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// One HTTP/1.0 request to `port` on 127.0.0.1 as `user`, over bash's `/dev/tcp`: the status
/// line and the body.
fn http(user: &str, port: u16, method: &str, path: &str) -> (String, String) {
    let script = format!(
        "exec 3<>/dev/tcp/127.0.0.1/{port} && \
         printf '{method} {path} HTTP/1.0\\r\\nHost: localhost\\r\\nContent-Type: application/json\\r\\nContent-Length: 2\\r\\n\\r\\n{{}}' >&3 && cat <&3"
    );
    let out = run(Command::new("setpriv")
        .arg(format!("--reuid={user}"))
        .arg(format!("--regid={user}"))
        .arg("--init-groups")
        .args(["bash", "-c", &script]));
    let response = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP response: {response:?}"));
    (
        head.lines().next().unwrap_or_default().to_owned(),
        body.to_owned(),
    )
}

/// A free loopback port (bound, then released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Poll `f` every 50 ms for at most a minute (a hang guard, not a timing check).
fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "never happened: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What the original's client does: connect, send one line, one read, expect the close.
fn original_client(port: u16, line: &str) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(1)))
        .expect("timeout");
    s.write_all(line.as_bytes()).expect("send");
    let mut buf = vec![0u8; 65535];
    let n = s.read(&mut buf).expect("recv");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
#[ignore = "needs root: creates local users and groups with useradd and groupadd (run as root with --include-ignored)"]
fn off_systemd_the_uid_and_group_rules_decide_over_both_sockets_and_the_dashboard() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test creates local users: run it as root"
    );
    let tag = std::process::id() % 100_000;
    let (admins, readers) = (format!("hfadm{tag}"), format!("hfrd{tag}"));
    let (admin, reader, other) = (
        format!("hfa{tag}"),
        format!("hfr{tag}"),
        format!("hfo{tag}"),
    );
    let mut accounts = Accounts {
        users: Vec::new(),
        groups: Vec::new(),
    };
    accounts.group(&admins);
    accounts.group(&readers);
    accounts.user(&admin, &[&admins]);
    accounts.user(&reader, &[&readers]);
    accounts.user(&other, &[]);

    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let state = dir.path().join("state");
    let socket = dir.path().join("control.sock");
    let script = dir.path().join("worker.sh");
    std::fs::write(&script, WORKER).expect("worker");
    let dashboard_port = free_port();
    let server_config = format!(
        "repos_dir = {repos:?}\n\
         [supervisor]\nlisten = \"127.0.0.1:0\"\nbackend = \"process\"\nstate_dir = {state:?}\n\
         worker_command = [\"/bin/sh\", {script:?}]\ncontrol_socket = {socket:?}\n\
         authorization = \"groups\"\nadmin_group = {admins:?}\nread_group = {readers:?}\n\
         [dashboard]\nlisten = \"127.0.0.1:{dashboard_port}\"\n",
        repos = dir.path().join("repos").display().to_string(),
        state = state.display().to_string(),
        script = script.display().to_string(),
        socket = socket.display().to_string(),
    );
    let config = dir.path().join("hydraflow.toml");
    std::fs::write(&config, &server_config).expect("config");
    // The same supervisor, reached over TCP only.
    let tcp_config = dir.path().join("tcp.toml");
    std::fs::write(
        &tcp_config,
        server_config.replace(
            &format!("control_socket = {:?}", socket.display().to_string()),
            "control_socket = \"\"",
        ),
    )
    .expect("tcp config");
    let checkout = dir.path().join("acl-demo");
    std::fs::create_dir_all(&checkout).expect("checkout");

    let _daemon = Daemon(
        hydraflow(&config, None)
            .arg("supervisor")
            .spawn()
            .expect("supervisor"),
    );
    let port_file = state.join("supervisor-port");
    let port: u16 = eventually("the port file", || {
        std::fs::read_to_string(&port_file)
            .ok()?
            .trim()
            .parse()
            .ok()
    });
    eventually("the control socket", || socket.exists().then_some(()));
    assert_eq!(
        std::fs::metadata(&socket)
            .expect("socket")
            .permissions()
            .mode()
            & 0o777,
        0o666
    );
    let (ok, text) = cli(
        &config,
        None,
        &["repo", "add", &checkout.display().to_string()],
    );
    assert!(ok, "root adds: {text}");

    for (transport, config) in [("unix", &config), ("tcp", &tcp_config)] {
        // ping is open to every local user.
        for user in [&admin, &reader, &other] {
            let (ok, text) = cli(config, Some(user), &["ping"]);
            assert!(ok && text == "ok\n", "{transport}: {user} ping: {text}");
        }
        // Reading: the administrator and the reader; not the other user.
        for user in [&admin, &reader] {
            let (ok, text) = cli(config, Some(user), &["repo", "list"]);
            assert!(
                ok && text.contains("acl-demo"),
                "{transport}: {user} list: {text}"
            );
        }
        let (ok, text) = cli(config, Some(&other), &["repo", "list"]);
        assert!(!ok, "{transport}: {other} list: {text}");
        assert!(
            text.contains(&format!("permission denied: {other} may not list_repos")),
            "{transport}: {text}"
        );
        // Managing: the reader and the other user are refused and change nothing.
        for user in [&reader, &other] {
            let (ok, text) = cli(config, Some(user), &["repo", "remove", "acl-demo"]);
            assert!(!ok, "{transport}: {user} remove: {text}");
            assert!(
                text.contains(&format!("permission denied: {user} may not remove_repo")),
                "{transport}: {text}"
            );
        }
        let (ok, text) = cli(config, None, &["repo", "status", "acl-demo"]);
        assert!(
            ok && text.contains("active (running)"),
            "still there: {text}"
        );
        // The administrator removes and adds it again; root does too.
        for user in [Some(admin.as_str()), None] {
            let (ok, text) = cli(config, user, &["repo", "remove", "acl-demo"]);
            assert!(ok, "{transport}: {user:?} remove: {text}");
            let (ok, text) = cli(
                config,
                user,
                &["repo", "add", &checkout.display().to_string()],
            );
            assert!(ok, "{transport}: {user:?} add: {text}");
        }
    }

    // The original's client, as root: one line, one read, closed; unchanged bytes.
    assert_eq!(
        original_client(port, "{\"action\":\"ping\"}\n"),
        "{\"status\":\"ok\"}\n"
    );
    let listed: serde_json::Value =
        serde_json::from_str(&original_client(port, "{\"action\":\"list_repos\"}\n"))
            .expect("list_repos reply");
    assert_eq!(listed["status"], "ok", "{listed}");
    assert_eq!(listed["repos"][0]["slug"], "acl-demo", "{listed}");

    // The dashboard: the caller's UID decides on loopback.
    let (status, body) = http(&other, dashboard_port, "GET", "/api/repos");
    assert!(status.contains(" 403 "), "{status}\n{body}");
    let error: serde_json::Value = serde_json::from_str(&body).expect("403 JSON");
    assert_eq!(
        error["error"],
        format!("permission denied: {other} may not GET /api/repos")
    );
    let (status, body) = http(&reader, dashboard_port, "GET", "/api/repos");
    assert!(
        status.contains(" 200 ") && body.contains("acl-demo"),
        "{status}\n{body}"
    );
    let correction = "/repos/acl-demo/api/hitl/1/correct";
    for user in [&reader, &other] {
        let (status, body) = http(user, dashboard_port, "POST", correction);
        assert!(status.contains(" 403 "), "{user}: {status}\n{body}");
        assert!(
            body.contains(&format!(
                "permission denied: {user} may not POST {correction}"
            )),
            "{body}"
        );
    }
    // The administrator gets past the guard to the worker (which, a shell script, serves no
    // API: the proxy says so).
    let (status, body) = http(&admin, dashboard_port, "POST", correction);
    assert!(
        !status.contains(" 403 ") && body.contains("worker acl-demo"),
        "{status}\n{body}"
    );
    drop(accounts);
}
