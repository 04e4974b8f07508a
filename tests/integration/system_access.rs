//! Who may do what with the package installed, in the booted Debian container (called by
//! `system_deb.rs` once the supervisor runs `demo`): polkit decides by
//! `org.hydraflow.policy` and `50-hydraflow.rules`. A normal user is refused `remove_repo` over
//! TCP (the protocol's refusal) and over the Unix control socket (the kernel's: the socket is
//! 0660 for `hydraflow-admin`), and a HITL correction on the dashboard (403); a member of
//! `hydraflow-admin` and root succeed; the original's client run as root works unchanged;
//! reading for everyone is one rule of the administrator's; polkit not answering is a refusal
//! with that reason; refusals are in the journal with the caller.

use std::time::{Duration, Instant};

use crate::util_container::Container;

/// The original HydraFlow client's exchange, in Perl (the rootfs has no Python): connect with a
/// 1 s timeout, send one line, one `recv(65535)` with a 1 s read timeout, then expect the close.
const ORIGINAL_CLIENT: &str = r#"
use IO::Socket::INET;
my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => 8765, Timeout => 1)
    or die "connect: $!\n";
$s->sockopt(SO_RCVTIMEO, pack('l!l!', 1, 0));
$s->send("$ARGV[0]\n");
my $reply;
defined $s->recv($reply, 65535) or die "recv: $!\n";
my $more;
$s->recv($more, 1);
die "not closed after the reply\n" if length $more;
print $reply;
"#;

/// Run `script` with `sh -c` in the container; (success, stdout + stderr).
fn sh(c: &Container, script: &str) -> (bool, String) {
    let out = c.exec(&["sh", "-c", script]);
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Run `argv` as `user` (with the user's groups and home) in the container, with `config` as
/// `HYDRAFLOW_CONFIG` when given; (success, stdout + stderr).
fn as_user(c: &Container, user: &str, config: Option<&str>, argv: &[&str]) -> (bool, String) {
    let (reuid, regid, home) = (
        format!("--reuid={user}"),
        format!("--regid={user}"),
        format!("HOME=/home/{user}"),
    );
    let config = config.map(|c| format!("HYDRAFLOW_CONFIG={c}"));
    let mut full = vec!["setpriv", &reuid, &regid, "--init-groups", "env", &home];
    full.extend(config.as_deref());
    full.extend(argv);
    let out = c.exec(&full);
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `hydraflow ARGS` as `user`.
fn cli(c: &Container, user: &str, config: Option<&str>, args: &[&str]) -> (bool, String) {
    let mut argv = vec!["hydraflow"];
    argv.extend(args);
    as_user(c, user, config, &argv)
}

const TCP_ONLY: &str = "/tmp/hydraflow-tcp-only.toml";

/// One request to the dashboard (127.0.0.1:5555) as `user`: the status line and the body.
fn dashboard(c: &Container, user: &str, method: &str, path: &str) -> (String, String) {
    let script = format!(
        "exec 3<>/dev/tcp/127.0.0.1/5555 && printf \"{method} {path} HTTP/1.0\\r\\nHost: localhost\\r\\n\
         Content-Type: application/json\\r\\nContent-Length: 2\\r\\n\\r\\n{{}}\" >&3 && cat <&3"
    );
    let out = c.exec(&[
        "setpriv",
        &format!("--reuid={user}"),
        &format!("--regid={user}"),
        "--init-groups",
        "bash",
        "-c",
        &script,
    ]);
    let response = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP response for {user} {method} {path}: {response:?}"));
    (
        head.lines().next().unwrap_or_default().to_owned(),
        body.to_owned(),
    )
}

/// Retry `check` every 250 ms for at most 20 s (polkit reloads rules in the background).
fn eventually(what: &str, mut check: impl FnMut() -> Result<(), String>) {
    let start = Instant::now();
    loop {
        match check() {
            Ok(()) => return,
            Err(e) if start.elapsed() > Duration::from_secs(20) => {
                panic!("gave up waiting for {what}: {e}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}

fn ok(what: &str) {
    println!("[deb] ok: {what}");
}

/// The access checks; `demo` is registered and running, `/srv/hydraflow/acl` can be made.
pub(crate) fn check_access(c: &Container) {
    let (done, text) = sh(
        c,
        "useradd -m -s /bin/sh alice && useradd -m -s /bin/sh -G hydraflow-admin bob && \
         printf '[supervisor]\\ncontrol_socket = \"\"\\n' > /tmp/hydraflow-tcp-only.toml && \
         chmod 644 /tmp/hydraflow-tcp-only.toml && \
         git init -q /srv/hydraflow/acl && hydraflow repo register /srv/hydraflow/acl --slug acl",
    );
    assert!(done, "setup: {text}");
    let (done, text) = sh(
        c,
        "stat -c '%U %G %a' /run/hydraflow/control.sock && \
         test -f /usr/share/polkit-1/actions/org.hydraflow.policy",
    );
    assert!(
        done && text.trim() == "root hydraflow-admin 660",
        "control socket: {text}"
    );

    // A normal user: the Unix socket refuses the connection (not in hydraflow-admin), so the
    // CLI falls back to TCP, where the supervisor refuses the request.
    let (connected, text) = as_user(
        c,
        "alice",
        None,
        &[
            "perl",
            "-MIO::Socket::UNIX",
            "-e",
            "IO::Socket::UNIX->new(Peer => '/run/hydraflow/control.sock') or die \"$!\\n\"",
        ],
    );
    assert!(
        !connected && text.contains("Permission denied"),
        "alice on the Unix socket: {text}"
    );
    for config in ["/etc/hydraflow/hydraflow.toml", TCP_ONLY] {
        let (removed, text) = cli(c, "alice", Some(config), &["repo", "remove", "acl"]);
        assert!(!removed, "alice removed acl ({config}): {text}");
        assert!(
            text.contains("permission denied: alice may not remove_repo"),
            "alice ({config}): {text}"
        );
        let (listed, text) = cli(c, "alice", Some(config), &["repo", "list"]);
        assert!(
            !listed && text.contains("permission denied: alice may not list_repos"),
            "alice lists ({config}): {text}"
        );
        let (pinged, text) = cli(c, "alice", Some(config), &["ping"]);
        assert!(pinged, "alice pings ({config}): {text}");
    }
    let (status, body) = dashboard(c, "alice", "POST", "/repos/demo/api/hitl/1/correct");
    assert!(
        status.contains(" 403 "),
        "alice's correction: {status}\n{body}"
    );
    assert!(
        body.contains("permission denied: alice may not POST /repos/demo/api/hitl/1/correct"),
        "{body}"
    );
    let (status, body) = dashboard(c, "alice", "GET", "/api/repos");
    assert!(
        status.contains(" 403 "),
        "alice's /api/repos: {status}\n{body}"
    );
    ok(
        "access: alice is refused remove_repo over TCP and the Unix socket, and the dashboard (403)",
    );

    // A member of hydraflow-admin, over the Unix socket (the CLI's first choice) and over TCP.
    let (listed, text) = cli(c, "bob", None, &["repo", "list"]);
    assert!(listed && text.contains("acl"), "bob lists: {text}");
    let (listed, text) = cli(c, "bob", Some(TCP_ONLY), &["repo", "status", "demo"]);
    assert!(
        listed && text.contains("active (running)"),
        "bob over TCP: {text}"
    );
    let (removed, text) = cli(c, "bob", None, &["repo", "remove", "acl"]);
    assert!(removed, "bob removes acl: {text}");
    let (status, body) = dashboard(c, "bob", "GET", "/api/repos");
    assert!(
        status.contains(" 200 "),
        "bob's /api/repos: {status}\n{body}"
    );
    let (status, body) = dashboard(c, "bob", "POST", "/repos/demo/api/hitl/1/correct");
    assert!(
        !status.contains(" 403 "),
        "bob's correction reaches the worker: {status}\n{body}"
    );
    // Root, and the original's client as root: one line, one read, closed.
    let (done, text) = sh(
        c,
        "hydraflow repo register /srv/hydraflow/acl --slug acl && \
         HYDRAFLOW_CONFIG=/tmp/hydraflow-tcp-only.toml hydraflow repo remove acl",
    );
    assert!(done, "root: {text}");
    for (line, expect) in [
        (r#"{"action":"ping"}"#, r#"{"status":"ok"}"#),
        (r#"{"action":"list_repos"}"#, r#""slug":"demo""#),
    ] {
        let out = c.exec(&["perl", "-MSocket", "-e", ORIGINAL_CLIENT, line]);
        let reply = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && reply.ends_with('\n') && reply.contains(expect),
            "the original client as root, {line}: {reply}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    ok("access: bob (hydraflow-admin) and root succeed; the original's client as root works");

    // Reading for everyone: one rule of the administrator's.
    let (done, text) = sh(
        c,
        "printf 'polkit.addRule(function (action, subject) {\\n    if (action.id == \"org.hydraflow.read\") return polkit.Result.YES;\\n});\\n' \
         > /etc/polkit-1/rules.d/49-hydraflow-read.rules",
    );
    assert!(done, "{text}");
    eventually("alice may read", || {
        let (listed, text) = cli(c, "alice", None, &["repo", "list"]);
        if listed && text.contains("demo") {
            Ok(())
        } else {
            Err(text)
        }
    });
    let (removed, text) = cli(c, "alice", None, &["repo", "remove", "demo"]);
    assert!(
        !removed && text.contains("permission denied: alice may not remove_repo"),
        "alice may still not manage: {text}"
    );
    let (done, text) = sh(c, "rm /etc/polkit-1/rules.d/49-hydraflow-read.rules");
    assert!(done, "{text}");
    eventually("alice may not read again", || {
        let (listed, text) = cli(c, "alice", None, &["repo", "list"]);
        if !listed && text.contains("permission denied") {
            Ok(())
        } else {
            Err(text)
        }
    });
    ok("access: a rule in /etc/polkit-1/rules.d lets everyone read, and only read");

    // polkit not answering (stopped with SIGSTOP) is a refusal with that reason.
    let (done, text) = sh(c, "systemctl kill --signal=SIGSTOP polkit.service");
    assert!(done, "{text}");
    let (listed, text) = cli(c, "bob", None, &["repo", "list"]);
    let (done, resumed) = sh(c, "systemctl kill --signal=SIGCONT polkit.service");
    assert!(done, "{resumed}");
    assert!(
        !listed
            && text.contains(
                "permission denied: bob may not list_repos (polkit did not answer within 1 s)"
            ),
        "bob while polkit is stopped: {text}"
    );
    eventually("polkit answers again", || {
        let (listed, text) = cli(c, "bob", None, &["repo", "list"]);
        if listed { Ok(()) } else { Err(text) }
    });
    ok("access: polkit not answering within 1 s is a refusal that says so");

    // Every refusal is in the journal with the caller.
    let (done, journal) = sh(
        c,
        "journalctl --no-pager -o verbose -u hydraflow-supervisor.service",
    );
    assert!(done, "{journal}");
    let (_, uid) = sh(c, "id -u alice");
    for needle in [
        "permission denied: alice may not remove_repo".to_owned(),
        "permission denied: alice may not POST /repos/demo/api/hitl/1/correct".to_owned(),
        format!("\n    UID={}\n", uid.trim()),
        "\n    FROM=127.0.0.1:".to_owned(),
    ] {
        assert!(journal.contains(&needle), "no {needle:?} in the journal");
    }
    ok("access: refusals are logged with the caller's UID and address");
}
