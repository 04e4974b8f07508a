//! The Debian package in a booted Debian 12 container (ignored unless asked for: as root, `cargo test -- --include-ignored`):
//! install the built .deb with apt, add a local-forge repository through the supervisor, watch
//! its `hydraflow@<slug>.service` take an issue to a merged commit, the supervisor's dashboard
//! reach it through `hydraflow@<slug>.socket`, then SIGKILL in the middle
//! of a second issue, isolation, `systemd-analyze`, upgrade, remove and purge. The README's Install section does the same
//! steps. The .debs come from `packaging/build.sh` (`.ci/run` builds them first): the lowest
//! version in `$CARGO_TARGET_DIR/debian/` is installed, the highest is the upgrade.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::util_container::{Container, ContainerConfig, require_container_host, step};

/// Where the .debs are bound inside the container.
const DEBS: &str = "/mnt/hydraflow-debs";

/// The instance configuration the administrator writes before `hydraflow repo add` (the
/// supervisor keeps an existing file): the local forge and the scripted demo agent, through
/// [`HELD_AGENT`].
const INSTANCE_CONFIG: &str = r#"repo_path = "/srv/hydraflow/SLUG"
forge = "local"
poll_interval = 2
data_poll_interval = 3

[agent]
preset = "command"
command = ["/usr/local/bin/hydraflow-held-agent", "{{stage}}", "{{issue}}"]
output = "plain"
"#;

/// The demo agent, except that the first implement call for each issue after #1 leaves a
/// marker in the instance's state directory and hangs: the test kills the worker there
/// (step 5). Later calls, the restarted worker's, run the demo agent.
const HELD_AGENT: &str = r#"#!/bin/sh
marker="$HOME/held-$2"
if [ "$1" = implement ] && [ "$2" != 1 ] && [ ! -e "$marker" ]; then
    : >"$marker"
    sleep 600
fi
exec /usr/bin/hydraflow demo-agent --stage "$1" --issue "$2"
"#;

/// The .debs built by packaging/build.sh, lowest version first.
fn built_debs() -> Vec<PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    let dir = target.join("debian");
    let mut debs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("hydraflow_"))
                        && p.extension().is_some_and(|e| e == "deb")
                })
                .collect()
        })
        .unwrap_or_default();
    debs.sort_by(|a, b| {
        let v = |p: &Path| {
            p.file_name()
                .map(|n| {
                    n.to_string_lossy()
                        .split('_')
                        .nth(1)
                        .unwrap_or("")
                        .to_owned()
                })
                .unwrap_or_default()
        };
        let (va, vb) = (v(a), v(b));
        let newer = std::process::Command::new("dpkg")
            .args(["--compare-versions", &va, "gt", &vb])
            .status()
            .is_ok_and(|s| s.success());
        if va == vb {
            std::cmp::Ordering::Equal
        } else if newer {
            std::cmp::Ordering::Greater
        } else {
            std::cmp::Ordering::Less
        }
    });
    assert!(
        debs.len() >= 2,
        "need two .debs of different versions in {} (found {debs:?}): run `packaging/build.sh deb --profile dev \
         --deb-revision 1 --deb-revision 2` first (.ci/run does)",
        dir.display()
    );
    debs
}

/// Run `script` with `sh -c` in the container and require success; returns stdout.
fn sh(c: &Container, script: &str) -> String {
    c.exec_ok(&["sh", "-c", script])
}

/// Run `script` every 500 ms until it succeeds (at most `limit`); returns its last stdout.
fn wait_sh(c: &Container, what: &str, limit: Duration, script: &str) -> String {
    let start = Instant::now();
    loop {
        let out = c.exec(&["sh", "-c", script]);
        if out.status.success() {
            return String::from_utf8_lossy(&out.stdout).into_owned();
        }
        if start.elapsed() > limit {
            let status = c.exec(&["sh", "-c", "systemctl --no-pager status 'hydraflow*' ; journalctl --no-pager -n 80 -u 'hydraflow*'; \
                 ls -la /var/lib/private/hydraflow/*/ /var/lib/private/hydraflow/*/logs; \
                 tail -n 20 /var/lib/private/hydraflow/*/sessions.jsonl"]);
            panic!(
                "gave up waiting for {what} after {limit:?}: {}{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&status.stdout)
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A unit property (`systemctl show -P`).
fn prop(c: &Container, unit: &str, name: &str) -> String {
    sh(c, &format!("systemctl show -P {name} {unit}"))
        .trim()
        .to_owned()
}

/// `GET path` on the supervisor's dashboard (127.0.0.1:5555) from inside the container, over
/// bash's `/dev/tcp` (the rootfs has no curl): the status line and the body.
fn dashboard_get(c: &Container, path: &str) -> (String, String) {
    let script = format!(
        "exec 3<>/dev/tcp/127.0.0.1/5555 && \
         printf 'GET {path} HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n' >&3 && cat <&3"
    );
    let response = c.exec_ok(&["bash", "-c", &script]);
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP response for {path}: {response:?}"));
    let status = head.lines().next().unwrap_or_default().to_owned();
    (status, body.to_owned())
}

/// The supervisor's dashboard reaches the worker of `slug` through its activation socket:
/// `/repos/<slug>/healthz` is the worker's health and `/api/repos` shows it up, on
/// `/run/hydraflow-dashboard/<slug>.sock` owned by `hydraflow`, mode 0600.
fn check_dashboard_reaches(c: &Container, slug: &str) {
    let socket = format!("/run/hydraflow-dashboard/{slug}.sock");
    assert_eq!(
        prop(c, &format!("hydraflow@{slug}.socket"), "ActiveState"),
        "active"
    );
    assert_eq!(
        sh(c, &format!("stat -c '%U %G %a' {socket}")).trim(),
        "hydraflow hydraflow 600"
    );
    let (status, body) = dashboard_get(c, &format!("/repos/{slug}/healthz"));
    assert!(
        status.contains(" 200 "),
        "/repos/{slug}/healthz: {status}\n{body}"
    );
    let health: serde_json::Value = serde_json::from_str(&body).expect("health JSON");
    assert_eq!(health["status"], "ok", "{health}");
    let (status, body) = dashboard_get(c, "/api/repos");
    assert!(status.contains(" 200 "), "/api/repos: {status}\n{body}");
    let repos: serde_json::Value = serde_json::from_str(&body).expect("/api/repos JSON");
    let row = repos["repos"]
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["slug"] == slug))
        .unwrap_or_else(|| panic!("no {slug} in /api/repos: {repos}"));
    assert_eq!(row["socket"], socket.as_str(), "{row}");
    assert_eq!(row["worker"]["up"], true, "{row}");
    // Root and the supervisor's user may connect; anyone else may not (perl-base has
    // IO::Socket::UNIX).
    let connect = |user: &str, group: &str| {
        c.exec(&[
            "setpriv",
            &format!("--reuid={user}"),
            &format!("--regid={group}"),
            "--clear-groups",
            "perl",
            "-MIO::Socket::UNIX",
            "-e",
            &format!("IO::Socket::UNIX->new(Peer => '{socket}') or die \"$!\\n\""),
        ])
    };
    for (user, group, allowed) in [
        ("root", "root", true),
        ("hydraflow", "hydraflow", true),
        ("nobody", "nogroup", false),
    ] {
        let out = connect(user, group);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.success(),
            allowed,
            "{user} connecting to {socket}: {stderr}"
        );
        if !allowed {
            assert!(stderr.contains("Permission denied"), "{user}: {stderr}");
        }
    }
}

/// Print a step's result.
fn ok(what: &str) {
    println!("[deb] ok: {what}");
}

/// Make a git repository with one commit at /srv/hydraflow/<slug> and its instance file.
fn make_repository(c: &Container, slug: &str) {
    sh(
        c,
        &format!(
            "set -e; d=/srv/hydraflow/{slug}; git init -q -b main $d; \
             printf '# {slug}\\n' > $d/README.md; printf '.hydraflow/\\n' > $d/.gitignore; \
             git -C $d add -A; \
             git -C $d -c user.name=Admin -c user.email=admin@example.invalid commit -q -m 'Initial commit'"
        ),
    );
    c.write_file(
        &format!("/etc/hydraflow/repos/{slug}.toml"),
        &INSTANCE_CONFIG.replace("SLUG", slug),
        0o644,
    );
}

/// Commits on main of an instance's checkout (git as root needs safe.directory).
fn main_log(c: &Container, slug: &str) -> String {
    sh(
        c,
        &format!("git -c safe.directory='*' -C /srv/hydraflow/{slug} log --format=%s main"),
    )
}

/// The exposure score `systemd-analyze security` prints for `unit`.
pub(crate) fn security_score(c: &Container, unit: &str) -> f64 {
    let out = sh(
        c,
        &format!("systemd-analyze security --no-pager {unit} 2>&1"),
    );
    let line = out
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no score for {unit}: {out}"));
    let score = line
        .split(':')
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the score in {line:?}"));
    println!("[deb] {unit}: {}", line.trim());
    score
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and a booted Debian 12 container: as root run tests/system/prepare-host.sh, then cargo test -- --include-ignored (.ci/run does both)"]
async fn debian_package_in_a_booted_container() {
    require_container_host();
    let debs = built_debs();
    let (first, upgrade) = (&debs[0], &debs[debs.len() - 1]);
    let deb_dir = first.parent().expect("deb dir").to_path_buf();
    let inside = |p: &Path| format!("{DEBS}/{}", p.file_name().expect("name").to_string_lossy());
    let mut c = Container::boot(&ContainerConfig {
        files: vec![(
            "/usr/local/bin/hydraflow-held-agent".into(),
            HELD_AGENT.into(),
            0o755,
        )],
        bind_ro: vec![(deb_dir, DEBS.into())],
        bind: Vec::new(),
    });

    // 1. Install with apt: the supervisor runs.
    step(&format!("apt-get install {}", inside(first)));
    sh(
        &c,
        &format!(
            "DEBIAN_FRONTEND=noninteractive apt-get install -y -q {}",
            inside(first)
        ),
    );
    wait_sh(
        &c,
        "hydraflow-supervisor.service active",
        Duration::from_secs(30),
        "systemctl is-active hydraflow-supervisor.service",
    );
    assert_eq!(
        prop(&c, "hydraflow-supervisor.socket", "ActiveState"),
        "active"
    );
    assert!(sh(&c, "id hydraflow").contains("hydraflow"));
    let page = sh(&c, "MANPAGER=cat man hydraflow");
    assert!(page.contains("hydraflow"), "man hydraflow: {page}");
    sh(
        &c,
        "man -w hydraflow.toml && man -w hydraflow@.service && man -w hydraflow-supervisor",
    );
    sh(&c, "test -f /etc/hydraflow/hydraflow.toml");
    // Socket activation: with the service stopped, a client's connection starts it again.
    sh(
        &c,
        "systemctl stop hydraflow-supervisor.service 2>/dev/null && \
         ! systemctl is-active -q hydraflow-supervisor.service && \
         hydraflow ping && systemctl is-active -q hydraflow-supervisor.service",
    );
    ok(
        "1. hydraflow-supervisor.service active after apt install, started again by its socket; \
         `man hydraflow` works",
    );

    // Lint, measured in the container: verify prints nothing on stderr.
    for unit in [
        "hydraflow@test.service",
        "hydraflow@test.socket",
        "hydraflow-supervisor.service",
        "hydraflow-supervisor.socket",
        "hydraflow.target",
    ] {
        let out = c.exec(&["systemd-analyze", "verify", unit]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stderr.trim().is_empty(),
            "systemd-analyze verify {unit}: {stderr}"
        );
    }
    ok("systemd-analyze verify is silent for every unit");

    // 2. Add a local-forge repository through the supervisor.
    make_repository(&c, "demo");
    sh(&c, "hydraflow config check --instance demo");
    sh(&c, "hydraflow repo add /srv/hydraflow/demo --slug demo");
    wait_sh(
        &c,
        "hydraflow@demo.service active",
        Duration::from_secs(30),
        "systemctl is-active hydraflow@demo.service",
    );
    let status = wait_sh(
        &c,
        "a STATUS line",
        Duration::from_secs(30),
        "systemctl show -P StatusText hydraflow@demo.service | grep .",
    );
    let shown = sh(
        &c,
        "systemctl --no-pager status hydraflow@demo.service || true",
    );
    assert!(shown.contains("Status: \""), "{shown}");
    ok(&format!(
        "2. hydraflow@demo.service active, READY reached, STATUS: {}",
        status.trim()
    ));
    check_dashboard_reaches(&c, "demo");
    ok(
        "2b. the supervisor's dashboard proxies /repos/demo/healthz to the worker through \
         /run/hydraflow-dashboard/demo.sock (hydraflow, 0600; nobody cannot connect)",
    );

    // 3. File an issue; the worker takes it to a merged commit.
    sh(
        &c,
        "hydraflow issue add --instance demo \
         --title 'Add a greeting script' \
         --body 'Add greet.sh that prints a friendly greeting.' >/dev/null",
    );
    // Filed as root, the issue belongs to the instance's user: nothing there is root's.
    let root_owned = sh(&c, "find /var/lib/private/hydraflow/demo -user root");
    assert_eq!(root_owned.trim(), "", "root-owned files after `issue add`");
    wait_sh(
        &c,
        "greet.sh merged on main",
        Duration::from_secs(120),
        "git -c safe.directory='*' -C /srv/hydraflow/demo cat-file -e main:greet.sh",
    );
    let log = main_log(&c, "demo");
    ok(&format!(
        "3. issue #1 merged: main is now {:?}",
        log.lines().collect::<Vec<_>>()
    ));

    // 4. The journal entries of the instance carry its fields.
    let journal = sh(
        &c,
        "journalctl --no-pager -o verbose -u 'hydraflow@*' HYDRAFLOW_INSTANCE=demo",
    );
    for field in [
        "REPO_SLUG=demo",
        "ISSUE=1",
        "STAGE=",
        "_SYSTEMD_UNIT=hydraflow@demo.service",
    ] {
        assert!(
            journal.contains(field),
            "no {field} in the journal:\n{journal}"
        );
    }
    // The worker's own entries go under the unit's SyslogIdentifier= too.
    let tagged = sh(
        &c,
        "journalctl --no-pager -o verbose -t hydraflow@demo REPO_SLUG=demo",
    );
    assert!(
        tagged.contains("ISSUE=1"),
        "journalctl -t hydraflow@demo finds no structured entry:\n{tagged}"
    );
    ok(
        "4. journalctl -u 'hydraflow@*' HYDRAFLOW_INSTANCE=demo shows REPO_SLUG, ISSUE, STAGE; \
         -t hydraflow@demo finds them too",
    );

    // 5. SIGKILL in the middle of the second issue's implement stage: systemd restarts the
    // worker, which finishes the issue from its state with one merge and one pull request.
    // (Issues and pull requests share one numbering, so it is not #2.)
    let added = sh(
        &c,
        "hydraflow issue add --instance demo \
         --title 'Add a farewell script' --body 'Add farewell.sh that says goodbye.'",
    );
    let second: u64 = added
        .trim()
        .strip_prefix("created issue #")
        .and_then(|rest| rest.split(':').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no issue number in {added:?}"));
    wait_sh(
        &c,
        &format!("issue #{second}'s agent to hang in implement"),
        Duration::from_secs(120),
        &format!("test -e /var/lib/private/hydraflow/demo/held-{second}"),
    );
    let pid = prop(&c, "hydraflow@demo.service", "MainPID");
    let restarts = prop(&c, "hydraflow@demo.service", "NRestarts");
    sh(
        &c,
        "systemctl kill --signal=SIGKILL --kill-whom=main hydraflow@demo.service",
    );
    wait_sh(
        &c,
        "the restarted worker",
        Duration::from_secs(60),
        &format!(
            "[ \"$(systemctl show -P NRestarts hydraflow@demo.service)\" != {restarts} ] && \
             [ \"$(systemctl show -P MainPID hydraflow@demo.service)\" != {pid} ] && \
             systemctl show -P StatusText hydraflow@demo.service | grep -q . && \
             systemctl is-active hydraflow@demo.service"
        ),
    );
    wait_sh(
        &c,
        "farewell.sh merged on main",
        Duration::from_secs(120),
        "git -c safe.directory='*' -C /srv/hydraflow/demo cat-file -e main:farewell.sh",
    );
    // Give the restarted worker a few poll rounds to (wrongly) redo something.
    std::thread::sleep(Duration::from_secs(8));
    let log = main_log(&c, "demo");
    for n in [1, second] {
        let merges = log
            .lines()
            .filter(|l| l.starts_with(&format!("Fixes #{n}:")))
            .count();
        assert_eq!(merges, 1, "issue #{n} merged {merges} times: {log}");
        let shown = sh(
            &c,
            &format!("hydraflow issue show --instance demo {n} --json"),
        );
        let shown: serde_json::Value = serde_json::from_str(&shown).expect("issue show --json");
        let pulls = shown["pull_requests"].as_array().map(Vec::len);
        assert_eq!(pulls, Some(1), "pull requests of issue #{n}: {shown}");
    }
    sh(&c, "test -s /var/lib/private/hydraflow/demo/state.json");
    ok(&format!(
        "5. SIGKILL during implement of #{second}: restarted by systemd, one merge and one pull request \
         per issue, main is now {:?}",
        log.lines().collect::<Vec<_>>()
    ));

    // 6. A second instance cannot read the first's state, nor the first the second's.
    make_repository(&c, "other");
    sh(&c, "hydraflow repo add /srv/hydraflow/other --slug other");
    wait_sh(
        &c,
        "hydraflow@other.service active",
        Duration::from_secs(30),
        "systemctl is-active hydraflow@other.service",
    );
    for (me, them) in [("demo", "other"), ("other", "demo")] {
        let pid = prop(&c, &format!("hydraflow@{me}.service"), "MainPID");
        let uid = sh(&c, &format!("stat -c %u /var/lib/private/hydraflow/{me}"))
            .trim()
            .to_owned();
        let them_uid = sh(&c, &format!("stat -c %u /var/lib/private/hydraflow/{them}"))
            .trim()
            .to_owned();
        assert_ne!(uid, them_uid, "{me} and {them} share a user");
        // Its own dynamic user, not the supervisor's static one.
        assert_eq!(
            prop(&c, &format!("hydraflow@{me}.service"), "User"),
            format!("hf-{me}")
        );
        assert_ne!(
            uid,
            sh(&c, "id -u hydraflow").trim(),
            "{me} runs as hydraflow"
        );
        for path in [
            format!("/var/lib/hydraflow/{them}/state.json"),
            format!("/var/lib/private/hydraflow/{them}"),
            format!("/srv/hydraflow/{them}/.git/HEAD"),
        ] {
            // As the instance's user, inside the instance's own mount namespace.
            let out = c.exec(&[
                "nsenter",
                "-t",
                &pid,
                "-m",
                "setpriv",
                &format!("--reuid={uid}"),
                &format!("--regid={uid}"),
                "--clear-groups",
                "cat",
                &path,
            ]);
            assert!(!out.status.success(), "{me} could read {path}");
        }
        // And its own state is readable to it.
        c.exec_ok(&[
            "nsenter",
            "-t",
            &pid,
            "-m",
            "setpriv",
            &format!("--reuid={uid}"),
            &format!("--regid={uid}"),
            "--clear-groups",
            "cat",
            &format!("/var/lib/hydraflow/{me}/state.json"),
        ]);
    }
    ok("6. demo and other run as users hf-demo and hf-other and cannot read each other's state");

    // 7. Exposure scores, measured in the container.
    let worker = security_score(&c, "hydraflow@demo.service");
    let supervisor = security_score(&c, "hydraflow-supervisor.service");
    assert!(worker <= 2.5, "hydraflow@demo.service scores {worker}");
    assert!(
        supervisor <= 2.0,
        "hydraflow-supervisor.service scores {supervisor}"
    );
    ok(&format!(
        "7. systemd-analyze security: worker {worker}, supervisor {supervisor}"
    ));

    // 7b. Removing a repository stops its worker and its socket: nothing listens there any
    // more, so no dashboard request can start the removed worker again.
    sh(&c, "hydraflow repo remove other");
    assert_eq!(
        prop(&c, "hydraflow@other.service", "ActiveState"),
        "inactive"
    );
    assert_eq!(
        prop(&c, "hydraflow@other.socket", "ActiveState"),
        "inactive"
    );
    sh(&c, "test ! -e /run/hydraflow-dashboard/other.sock");
    let (status, _) = dashboard_get(&c, "/repos/other/healthz");
    assert!(status.contains(" 404 "), "/repos/other/healthz: {status}");
    assert_eq!(
        prop(&c, "hydraflow@other.service", "ActiveState"),
        "inactive"
    );
    ok("7b. repo remove other: hydraflow@other.service and .socket inactive, socket file gone");

    // 8. Upgrade: instances restarted with their state; remove: stopped, state kept; purge.
    let before: Vec<String> = ["demo"]
        .iter()
        .map(|s| prop(&c, &format!("hydraflow@{s}.service"), "MainPID"))
        .collect();
    step(&format!("apt-get install {}", inside(upgrade)));
    sh(
        &c,
        &format!(
            "DEBIAN_FRONTEND=noninteractive apt-get install -y -q {}",
            inside(upgrade)
        ),
    );
    let version = sh(&c, "dpkg-query -W -f '${Version}' hydraflow");
    for (slug, old) in ["demo"].iter().zip(&before) {
        wait_sh(
            &c,
            &format!("hydraflow@{slug}.service restarted"),
            Duration::from_secs(60),
            &format!(
                "systemctl is-active hydraflow@{slug}.service && \
                 [ \"$(systemctl show -P MainPID hydraflow@{slug}.service)\" != {old} ]"
            ),
        );
    }
    assert_eq!(main_log(&c, "demo"), log, "the upgrade changed main");
    sh(&c, "test -s /var/lib/private/hydraflow/demo/state.json");
    check_dashboard_reaches(&c, "demo");
    ok(&format!(
        "8a. upgraded to {version}: instances restarted, state intact, dashboard reaches demo"
    ));

    sh(
        &c,
        "DEBIAN_FRONTEND=noninteractive apt-get remove -y -q hydraflow",
    );
    for unit in [
        "hydraflow@demo.service",
        "hydraflow@demo.socket",
        "hydraflow@other.service",
        "hydraflow-supervisor.service",
    ] {
        let state = c.exec(&["systemctl", "is-active", unit]);
        let state = String::from_utf8_lossy(&state.stdout).trim().to_owned();
        assert!(
            state == "inactive" || state == "failed" || state == "unknown",
            "{unit} is {state} after apt remove"
        );
    }
    sh(
        &c,
        "test -d /var/lib/hydraflow && test -s /var/lib/private/hydraflow/demo/state.json",
    );
    ok("8b. apt remove: instances stopped, /var/lib/hydraflow kept");

    sh(
        &c,
        "DEBIAN_FRONTEND=noninteractive apt-get purge -y -q hydraflow",
    );
    sh(
        &c,
        "test ! -e /etc/hydraflow && test -s /var/lib/private/hydraflow/demo/state.json",
    );
    ok("8c. apt purge: /etc/hydraflow gone, repository state kept");

    c.power_off().await;
}
