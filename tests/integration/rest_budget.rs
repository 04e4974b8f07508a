//! Benchmark (BENCHMARKS.md, "GitHub REST requests"): REST requests per
//! merged issue and per idle hour, with token polling and with webhooks.
//! `hydraflow supervisor` (process backend) runs one GitHub repository on
//! the fake GitHub, which counts every request; three issues go through the
//! whole pipeline, then the worker idles. Time is scaled 1:60: agents take
//! 5 s a call (5 min), `data_poll_interval` is 5 s (the default 300 s),
//! `github.fallback_poll_interval` 30 s (the default 1800 s), and the idle
//! hour is 60 s. With webhooks the fake sends a signed delivery after every
//! change, as GitHub does, and the test sends the `issues` delivery of each
//! issue it files.

use std::os::unix::fs::PermissionsExt as _;
use std::process::Stdio;
use std::time::{Duration, Instant};

use super::fake_github::{FakeGithub, Hook, send_delivery};
use super::util::HANG_GUARD;
use super::webhooks::hydraflow;

const SECRET: &str = "benchmark secret";
const ISSUES: u64 = 3;
/// The scale: one test second for this many real seconds.
const SCALE: u64 = 60;
const IDLE: Duration = Duration::from_secs(3600 / SCALE);

const AGENT: &str = r#"#!/bin/sh
stage="$1"; issue="$2"
cat > /dev/null
sleep 5
commit() { git -c user.name=agent -c user.email=agent@example.com commit -q -m "$1"; }
case "$stage" in
  triage) echo '{"ready": true, "reasons": ["clear"], "issue_type": "feature", "clarity_score": 8, "complexity_score": 2, "needs_discovery": false, "already_addressed": false}' ;;
  plan) printf 'PLAN_START\nWrite file-%s.txt.\nSUMMARY: add file-%s.txt\nPLAN_END\n' "$issue" "$issue" ;;
  implement) echo "content for $issue" > "file-$issue.txt"; git add -A && commit "implement #$issue" ;;
  review) printf 'VERDICT: APPROVE\nSUMMARY: looks right\n' ;;
esac
"#;

/// Requests and budgeted requests (not answered 304) in a stretch of the fake's log.
#[derive(Debug, Clone, Copy)]
struct Count {
    all: usize,
    budgeted: usize,
}

fn count(fake: &FakeGithub, from: usize, to: usize) -> Count {
    let s = fake.state();
    let stretch = &s.log[from..to];
    Count {
        all: stretch.len(),
        budgeted: stretch.iter().filter(|l| l.budgeted()).count(),
    }
}

async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let started = Instant::now();
    while !cond() {
        assert!(
            started.elapsed() < HANG_GUARD * 3,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One run: (per merged issue, per idle hour).
async fn measure(webhooks: bool) -> (Count, Count, u64) {
    let fake = FakeGithub::start().await;
    fake.state().collaborators.insert("alice".into());
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let agent = dir.join("agent.sh");
    std::fs::write(&agent, AGENT).expect("agent");
    std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::write(dir.join("secret"), SECRET).expect("secret");
    let config = dir.join("supervisor.toml");
    std::fs::write(
        &config,
        format!(
            "repos_dir = {repos:?}\npoll_interval = 1\ndata_poll_interval = 5\nci_poll_interval = 1\n\
             [github]\napi_url = {api:?}\nweb_url = {web:?}\nfallback_poll_interval = 30\n\
             [agent]\npreset = \"command\"\ncommand = [{agent:?}, \"{{{{stage}}}}\", \"{{{{issue}}}}\"]\n\
             output = \"plain\"\n\
             [supervisor]\nlisten = \"127.0.0.1:0\"\nbackend = \"process\"\nstate_dir = {state:?}\n\
             [dashboard]\nlisten = \"127.0.0.1:0\"\n[webhook]\nsecret_file = {secret:?}\n",
            repos = dir.join("repos").display().to_string(),
            api = fake.api_url(),
            web = fake.web_url(),
            agent = agent.display().to_string(),
            state = dir.join("state").display().to_string(),
            secret = dir.join("secret").display().to_string(),
        ),
    )
    .expect("config");
    let mut daemon = hydraflow(&config)
        .arg("supervisor")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("supervisor");
    let port_file = dir.join("state").join("supervisor-port");
    until("the port file", || port_file.exists()).await;
    let out = hydraflow(&config)
        .args(["repo", "add", "octo-org/demo"])
        .output()
        .expect("repo add");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let addr = stdout
        .split("; ")
        .find_map(|f| f.strip_prefix("dashboard: "))
        .and_then(|u| u.strip_prefix("http://"))
        .and_then(|r| r.split('/').next())
        .and_then(|a| a.parse().ok())
        .expect("dashboard address");
    let hook = Hook {
        addr,
        secret: SECRET.into(),
    };
    let listing = |fake: &FakeGithub| {
        fake.state()
            .log
            .iter()
            .any(|l| l.status == 200 && l.path.contains("/issues?"))
    };
    until("the first poll", || listing(&fake)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    if webhooks {
        fake.state().hook = Some(hook.clone());
    }
    let start = fake.state().log.len();
    for n in 1..=ISSUES {
        let number = fake.add_issue(&format!("Add file {n}"), "alice", &["hydraflow-find"]);
        if webhooks {
            send_delivery(hook.clone(), "issues", format!("opened-{number}"), "alice").await;
        }
    }
    until("every issue merged", || {
        let s = fake.state();
        (1..=ISSUES).all(|n| s.issues[&n].state == "closed")
    })
    .await;
    let merged = fake.state().pulls.values().filter(|p| p.merged).count() as u64;
    assert_eq!(merged, ISSUES);
    // The run ends with the first poll after its last change (which
    // catches up with the run's own changes): within data_poll_interval
    // (5 s), or github.fallback_poll_interval (30 s) with webhooks.
    let merged_at = fake.state().log.len();
    until("the first poll after the run", || {
        fake.state().log[merged_at..]
            .iter()
            .filter(|l| l.path.contains("/issues?"))
            .count()
            >= 6
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let end = fake.state().log.len();
    tokio::time::sleep(IDLE).await;
    let idle_end = fake.state().log.len();
    let run = count(&fake, start, end);
    let idle = count(&fake, end, idle_end);
    let deliveries = fake.state().deliveries;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let _ = daemon.wait();
    (
        Count {
            all: run.all / ISSUES as usize,
            budgeted: run.budgeted / ISSUES as usize,
        },
        idle,
        deliveries,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark (about 3 minutes): cargo test --test integration rest_budget -- --ignored --nocapture"]
async fn rest_requests_per_merged_issue_and_per_idle_hour() {
    let (poll_issue, poll_idle, _) = measure(false).await;
    let (hook_issue, hook_idle, deliveries) = measure(true).await;
    println!("REST requests (all / budgeted, i.e. not answered 304), time scaled 1:{SCALE}:");
    println!(
        "  token polling: per merged issue {} / {}; per idle hour {} / {}",
        poll_issue.all, poll_issue.budgeted, poll_idle.all, poll_idle.budgeted
    );
    println!(
        "  webhooks:      per merged issue {} / {}; per idle hour {} / {} ({deliveries} deliveries sent by the fake)",
        hook_issue.all, hook_issue.budgeted, hook_idle.all, hook_idle.budgeted
    );
    assert_eq!(poll_idle.budgeted, 0, "an idle hour costs no budget");
    assert_eq!(hook_idle.budgeted, 0, "an idle hour costs no budget");
    assert!(
        hook_idle.all < poll_idle.all,
        "fewer idle requests with webhooks"
    );
    assert!(
        hook_issue.all < poll_issue.all,
        "fewer requests per issue with webhooks"
    );
}
