//! End to end through the binary and the fake GitHub: `hydraflow run --forge
//! github --repo owner/name` clones the repository, moves labels, opens and
//! squash-merges pull requests in the fake's bare repository and closes
//! issues; the API requests per issue are counted from the fake's log; an
//! idle poll is answered 304 and costs no budget. Then the bad cases at the
//! pipeline level: a pull request closed by a human mid-review, a bad token
//! at start (clone and poll).

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use hydraflow::store::events::{Event, EventType};
use hydraflow::store::state::State;

use super::fake_github::{FakeGithub, Fault, Logged, OWNER, REPO, TOKEN, key};
use super::util::{HANG_GUARD, wait_bounded};

/// The slug `octo-org/demo` resolves to.
const SLUG: &str = "octo-org-demo";

/// Stage agent of the five-issue scenario: #4 is already satisfied, #5's
/// implementation commits nothing (escalated), #9 (filed later) needs a file a human
/// committed on the server's `main` (only a refreshed base has it). Every
/// implementation records the `GH_TOKEN` it was given.
const AGENT: &str = r#"#!/bin/sh
stage="$1"; issue="$2"
cat > /dev/null
commit() { git -c user.name=agent -c user.email=agent@example.com commit -q -m "$1"; }
case "$stage" in
  triage)
    if [ "$issue" = 2 ] && [ -e "$HYDRAFLOW_TEST_DIR/hold-triage" ]; then
      touch "$HYDRAFLOW_TEST_DIR/triage-started"
      while [ ! -e "$HYDRAFLOW_TEST_DIR/go" ]; do sleep 0.1; done
    fi
    echo '{"ready": true, "reasons": ["clear enough"], "issue_type": "feature", "clarity_score": 8, "complexity_score": 2, "needs_discovery": false, "already_addressed": false}'
    ;;
  plan)
    if [ "$issue" = 4 ]; then
      printf 'ALREADY_SATISFIED_START\nREADME already says hello.\nALREADY_SATISFIED_END\n'
    else
      printf 'PLAN_START\nWrite file-%s.txt.\nSUMMARY: add file-%s.txt\nPLAN_END\n' "$issue" "$issue"
    fi
    ;;
  implement)
    printf '%s' "${GH_TOKEN:-none}" > "$HYDRAFLOW_TEST_DIR/token-$issue"
    if [ "$issue" = 5 ]; then echo "I am not sure what to do"; exit 0; fi
    if [ "$issue" = 9 ]; then
      [ -f NOTES.md ] || { echo "stale base: NOTES.md is missing" >&2; exit 3; }
      echo "more for 9" >> file-1.txt
    else
      echo "content for $issue" > "file-$issue.txt"
    fi
    git add -A && commit "implement #$issue"
    ;;
  review)
    if [ -e "$HYDRAFLOW_TEST_DIR/hold-review" ]; then
      touch "$HYDRAFLOW_TEST_DIR/review-started"
      while [ ! -e "$HYDRAFLOW_TEST_DIR/go" ]; do sleep 0.1; done
    fi
    printf 'VERDICT: APPROVE\nSUMMARY: looks right\n'
    ;;
esac
"#;

/// A temp dir with the configuration, the agent and `HYDRAFLOW_HOME`, and the fake.
struct Gh {
    tmp: tempfile::TempDir,
    config: PathBuf,
    fake: FakeGithub,
}

impl Gh {
    async fn new(allow_token: bool) -> Gh {
        let fake = FakeGithub::start().await;
        fake.state().collaborators.insert("alice".into());
        let tmp = tempfile::tempdir().expect("tempdir");
        let agent = tmp.path().join("agent.sh");
        std::fs::write(&agent, AGENT).expect("write agent");
        std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let config = tmp.path().join("hydraflow.toml");
        let text = format!(
            "poll_interval = 1\ndata_poll_interval = 1\nci_poll_interval = 1\n\
             [github]\napi_url = {api:?}\nweb_url = {web:?}\nmax_retry_wait = 5\n\
             [agent]\npreset = \"command\"\ncommand = [{agent:?}, \"{{{{stage}}}}\", \"{{{{issue}}}}\"]\n\
             output = \"plain\"\nallow_token = {allow_token}\n\
             [agent.env]\nHYDRAFLOW_TEST_DIR = {dir:?}\n",
            api = fake.api_url(),
            web = fake.web_url(),
            agent = agent.display().to_string(),
            dir = tmp.path().display().to_string(),
        );
        std::fs::write(&config, text).expect("write config");
        Gh { tmp, config, fake }
    }

    fn dir(&self) -> &Path {
        self.tmp.path()
    }

    /// `data_root/<slug>`.
    fn data(&self) -> PathBuf {
        self.dir().join("home").join(SLUG)
    }

    /// Where `run --repo owner/name` clones the repository.
    fn checkout(&self) -> PathBuf {
        self.data().join("checkout")
    }

    /// `hydraflow <args> --config … --forge github --repo octo-org/demo`
    /// with `token` in `HYDRAFLOW_GH_TOKEN` and no other token or systemd variable.
    fn command(&self, token: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hydraflow"));
        cmd.args(args)
            .args(["--forge", "github", "--repo", &format!("{OWNER}/{REPO}")])
            .arg("--config")
            .arg(&self.config)
            .current_dir(self.dir());
        for (k, _) in std::env::vars() {
            if k.starts_with("HYDRAFLOW_")
                || k.starts_with("WATCHDOG_")
                || [
                    "GH_TOKEN",
                    "GITHUB_TOKEN",
                    "CREDENTIALS_DIRECTORY",
                    "NOTIFY_SOCKET",
                    "JOURNAL_STREAM",
                ]
                .contains(&k.as_str())
            {
                cmd.env_remove(k);
            }
        }
        cmd.env("HYDRAFLOW_HOME", self.dir().join("home"))
            .env("HYDRAFLOW_GH_TOKEN", token)
            .env("HYDRAFLOW_LOG", "info");
        cmd
    }

    fn spawn(&self, token: &str, args: &[&str], notify: Option<&Path>) -> Child {
        let mut cmd = self.command(token, args);
        if let Some(socket) = notify {
            cmd.env("NOTIFY_SOCKET", socket);
        }
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn hydraflow")
    }

    /// `hydraflow run --forge github --repo octo-org/demo --exit-when-idle`, asserting success.
    async fn run_until_idle(&self) -> Output {
        let child = self.spawn(TOKEN, &["run", "--exit-when-idle"], None);
        let out = finish(child).await;
        assert!(
            out.status.success(),
            "hydraflow run failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn events(&self) -> Vec<Event> {
        let text = std::fs::read_to_string(self.data().join("events.jsonl")).expect("events");
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad event line {l}: {e}")))
            .collect()
    }

    fn state(&self) -> State {
        let text = std::fs::read_to_string(self.data().join("state.json")).expect("state.json");
        serde_json::from_str(&text).expect("state.json is valid")
    }

    /// Sorted labels and state of issue `n` in the fake.
    fn issue(&self, n: u64) -> (Vec<String>, String) {
        let s = self.fake.state();
        let i = &s.issues[&n];
        let mut labels = i.labels.clone();
        labels.sort();
        (labels, i.state.clone())
    }

    fn comments(&self, n: u64) -> Vec<String> {
        self.fake.state().issues[&n]
            .comments
            .iter()
            .map(|(_, b)| b.clone())
            .collect()
    }

    /// Content of `path` on the bare repository's `main`.
    fn main_file(&self, path: &str) -> Option<String> {
        let repo = git2::Repository::open_bare(&self.fake.bare).expect("bare");
        let tree = repo
            .find_reference("refs/heads/main")
            .and_then(|r| r.peel_to_tree())
            .expect("main");
        let entry = tree.get_path(Path::new(path)).ok()?;
        let blob = repo.find_blob(entry.id()).ok()?;
        Some(String::from_utf8_lossy(blob.content()).into_owned())
    }

    /// Subjects of the commits on the bare repository's `main`, newest first.
    fn main_subjects(&self) -> Vec<String> {
        let repo = git2::Repository::open_bare(&self.fake.bare).expect("bare");
        crate::git_fixture::subjects(&repo, "refs/heads/main")
    }
}

/// Wait for the child without blocking the fake's runtime.
async fn finish(child: Child) -> Output {
    tokio::task::spawn_blocking(move || wait_bounded(child))
        .await
        .expect("wait task")
}

/// Poll `cond` every 50 ms until it holds or [`HANG_GUARD`] passes.
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let started = Instant::now();
    while !cond() {
        assert!(
            started.elapsed() < HANG_GUARD,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn sigterm(child: &Child) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
}

fn labels(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// The number after `issue-` in `s` (`agent/issue-3`, `agent%2Fissue-3&base=main`).
fn issue_in(s: &str) -> Option<u64> {
    let digits: String = s
        .split("issue-")
        .nth(1)?
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// The issue a request works on, `None` for shared requests (listings,
/// labels, collaborators). `pulls` maps pull request numbers to their
/// issue and head SHA.
fn issue_of(l: &Logged, pulls: &BTreeMap<u64, (u64, String)>) -> Option<u64> {
    let rest = l
        .path
        .strip_prefix(&format!("/api/v3/repos/{OWNER}/{REPO}/"))?;
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let segments: Vec<&str> = path.split('/').collect();
    match segments.as_slice() {
        ["issues", n, ..] => n.parse().ok(),
        ["pulls", n, ..] => pulls.get(&n.parse().ok()?).map(|p| p.0),
        ["pulls"] if l.method == "GET" => issue_in(query),
        ["pulls"] => issue_in(l.body.as_ref()?.get("head")?.as_str()?),
        ["commits", sha, ..] => pulls.values().find(|p| p.1 == *sha).map(|p| p.0),
        ["git", "refs", "heads", ..] => issue_in(path),
        _ => None,
    }
}

/// Requests and budgeted requests (not 304) per issue; key 0 holds the shared ones.
fn requests_per_issue(
    log: &[Logged],
    pulls: &BTreeMap<u64, (u64, String)>,
) -> BTreeMap<u64, (usize, usize)> {
    let mut out: BTreeMap<u64, (usize, usize)> = BTreeMap::new();
    for l in log {
        let e = out.entry(issue_of(l, pulls).unwrap_or(0)).or_default();
        e.0 += 1;
        e.1 += usize::from(l.budgeted());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_issues_through_github() {
    let gh = Gh::new(true).await;
    for n in 1..=5u64 {
        let title = if n == 4 {
            "Say hello in the README".to_owned()
        } else {
            format!("Add file {n}")
        };
        assert_eq!(gh.fake.add_issue(&title, "alice", &["hydraflow-find"]), n);
    }

    let out = gh.run_until_idle().await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cloning http://"), "{stderr}");

    // Labels moved, pull requests merged, issues closed.
    for n in [1, 2, 3] {
        assert_eq!(
            gh.issue(n),
            (labels(&["hydraflow-fixed"]), "closed".into()),
            "#{n}"
        );
        assert_eq!(
            gh.main_file(&format!("file-{n}.txt")).as_deref(),
            Some(&*format!("content for {n}\n"))
        );
    }
    assert_eq!(gh.issue(4), (labels(&["hydraflow-fixed"]), "closed".into()));
    assert!(
        gh.comments(4)
            .iter()
            .any(|c| c.contains("already satisfied"))
    );
    assert_eq!(gh.issue(5), (labels(&["hydraflow-hitl"]), "open".into()));
    assert!(
        gh.comments(5).iter().any(|c| c.contains("no diff")),
        "the escalation cause is on the issue: {:?}",
        gh.comments(5)
    );
    let hitl = gh.state().issues[&5].hitl().cloned().expect("hitl record");
    assert!(hitl.cause.contains("no diff"), "{}", hitl.cause);

    // One pull request per merged issue, merged by a squash commit, its branch deleted.
    let pulls: BTreeMap<u64, (u64, String)> = gh
        .fake
        .state()
        .pulls
        .iter()
        .map(|(n, p)| {
            (
                *n,
                (issue_in(&p.head).expect("agent branch"), p.head_sha.clone()),
            )
        })
        .collect();
    {
        let s = gh.fake.state();
        assert_eq!(s.pulls.len(), 3, "{:?}", s.pulls);
        assert!(s.pulls.values().all(|p| p.merged && p.state == "closed"));
        assert_eq!(s.reviews.len(), 3);
        assert!(s.reviews.iter().all(|r| r.1 == "APPROVE"));
    }
    let subjects = gh.main_subjects();
    for n in [1, 2, 3] {
        let count = subjects
            .iter()
            .filter(|s| s.starts_with(&format!("Fixes #{n}: Add file {n} (#")))
            .count();
        assert_eq!(count, 1, "#{n} in {subjects:?}");
    }
    assert_eq!(subjects.len(), 4, "{subjects:?}");
    let bare = git2::Repository::open_bare(&gh.fake.bare).expect("bare");
    let branches: Vec<String> = bare
        .branches(None)
        .expect("branches")
        .filter_map(|b| b.ok()?.0.name().ok().flatten().map(str::to_owned))
        .collect();
    assert_eq!(branches, ["main"], "merged branches are deleted");

    // The agents got the token (allow_token); it is nowhere on disk.
    for n in [1, 2, 3, 5] {
        assert_eq!(
            std::fs::read_to_string(gh.dir().join(format!("token-{n}"))).expect("token file"),
            TOKEN
        );
    }
    for file in [
        gh.checkout().join(".git").join("config"),
        gh.data().join("events.jsonl"),
        gh.data().join("state.json"),
        gh.data().join("logs").join("hydraflow.log"),
    ] {
        let text = std::fs::read_to_string(&file).expect("readable");
        assert!(
            !text.contains(TOKEN),
            "the token leaked into {}",
            file.display()
        );
    }

    // The budget after each poll is published.
    let events = gh.events();
    let polled: Vec<&Event> = events
        .iter()
        .filter(|e| e.kind == EventType::OrchestratorStatus && e.data["status"] == "polled")
        .collect();
    assert!(!polled.is_empty());
    assert!(
        polled
            .iter()
            .all(|e| e.data["api_limit"] == 5000 && e.data["api_remaining"].as_u64() < Some(5000))
    );
    let merged: Vec<u64> = events
        .iter()
        .filter(|e| e.kind == EventType::MergeUpdate && e.data["status"] == "merged")
        .filter_map(|e| e.data["issue"].as_u64())
        .collect();
    assert_eq!(merged, vec![1, 2, 3]);

    // Requests per issue.
    let log = gh.fake.state().log.clone();
    let per_issue = requests_per_issue(&log, &pulls);
    let spent: usize = per_issue.values().map(|c| c.1).sum();
    println!("GitHub API requests of the five-issue run (requests / budgeted):");
    for (n, (all, budgeted)) in &per_issue {
        let what = match n {
            0 => "shared (listings, labels, collaborators)".to_owned(),
            n => format!("issue #{n}"),
        };
        println!("  {what}: {all} / {budgeted}");
    }
    println!(
        "  total budget spent: {spent}; per merged issue (3 merged, all requests): {:.1}",
        spent as f64 / 3.0
    );
    for n in [1, 2, 3] {
        let (_, budgeted) = per_issue[&n];
        assert!(
            budgeted <= 25,
            "#{n} cost {budgeted} budgeted requests: {per_issue:?}"
        );
    }
    for n in 1..=5 {
        assert!(per_issue.contains_key(&n), "#{n}: {per_issue:?}");
    }
    let writes = |n: u64| {
        log.iter()
            .filter(|l| l.method != "GET" && issue_of(l, &pulls) == Some(n))
            .count()
    };
    // Claim 1, three swaps of 2, plan comment 1, pull request 1, review 1,
    // merge 1, branch deletion 1, fixed swap 2, release 1, close 1.
    for n in [1, 2, 3] {
        assert_eq!(writes(n), 16, "#{n}");
    }

    // A human commits on the server; a new issue needs that commit: the
    // implement stage must start from the refreshed base.
    crate::git_fixture::commit_on_bare_main(&gh.fake.bare, "NOTES.md", "notes\n");
    assert_eq!(
        gh.fake
            .add_issue("Extend file 1", "alice", &["hydraflow-find"]),
        9
    );
    let child = gh.spawn(TOKEN, &["run"], None);
    wait_until("#9 to be merged", || gh.issue(9).1 == "closed").await;
    assert_eq!(
        gh.main_file("file-1.txt").as_deref(),
        Some("content for 1\nmore for 9\n")
    );
    assert_eq!(gh.issue(9), (labels(&["hydraflow-fixed"]), "closed".into()));

    // Idle: once every poll is answered 304, no budget is spent.
    let listings = |gh: &Gh| {
        gh.fake
            .state()
            .log
            .iter()
            .filter(|l| l.method == "GET" && l.path.contains("/issues?"))
            .count()
    };
    let after_merge = listings(&gh);
    wait_until("two polls after the merge", || {
        listings(&gh) >= after_merge + 12
    })
    .await;
    let (remaining, mark) = {
        let s = gh.fake.state();
        (s.remaining, s.log.len())
    };
    wait_until("two idle polls", || listings(&gh) >= after_merge + 24).await;
    sigterm(&child);
    let out = finish(child).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = gh.fake.state();
    let idle = &s.log[mark..];
    assert!(idle.len() >= 6, "{idle:?}");
    assert!(
        idle.iter()
            .all(|l| l.status == 304 && l.path.contains("/issues?")),
        "idle polls are conditional listings answered 304: {idle:?}"
    );
    assert_eq!(s.remaining, remaining, "an idle poll costs no budget");
    println!(
        "idle: {} listings answered 304, budget spent 0 ({} polls)",
        idle.len(),
        idle.len() / 6
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_request_closed_by_a_human_mid_review_is_escalated() {
    let gh = Gh::new(false).await;
    std::fs::write(gh.dir().join("hold-review"), "").expect("hold");
    assert_eq!(
        gh.fake
            .add_issue("Add file 1", "alice", &["hydraflow-find"]),
        1
    );
    let child = gh.spawn(TOKEN, &["run", "--exit-when-idle"], None);
    let started = gh.dir().join("review-started");
    wait_until("the review agent to start", || started.exists()).await;
    // A human closes the pull request while the review agent works.
    for pull in gh.fake.state().pulls.values_mut() {
        pull.state = "closed".into();
    }
    std::fs::write(gh.dir().join("go"), "").expect("go");
    let out = finish(child).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let cause = "pull request #2 was closed without merging";
    assert_eq!(gh.issue(1), (labels(&["hydraflow-hitl"]), "open".into()));
    assert!(
        gh.comments(1).iter().any(|c| c.contains(cause)),
        "{:?}",
        gh.comments(1)
    );
    let hitl = gh.state().issues[&1].hitl().cloned().expect("hitl record");
    assert_eq!(hitl.cause, cause);
    assert_eq!(hitl.origin, "hydraflow-review");
    let events = gh.events();
    let escalation = events
        .iter()
        .find(|e| e.kind == EventType::HitlEscalation)
        .expect("escalation event");
    assert_eq!(escalation.data["cause"], cause);
    assert_eq!(gh.main_file("file-1.txt"), None, "nothing was merged");
    // agent.allow_token is off: the agent got no token.
    assert_eq!(
        std::fs::read_to_string(gh.dir().join("token-1")).expect("token file"),
        "none"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_rate_limits_and_a_deleted_issue_do_not_stop_the_pipeline() {
    let gh = Gh::new(false).await;
    std::fs::write(gh.dir().join("hold-triage"), "").expect("hold");
    assert_eq!(
        gh.fake
            .add_issue("Add file 1", "alice", &["hydraflow-find"]),
        1
    );
    assert_eq!(
        gh.fake
            .add_issue("Add file 2", "alice", &["hydraflow-find"]),
        2
    );
    // A 500 then success, and a secondary rate limit with a short Retry-After.
    gh.fake
        .fault(&key("GET", "/issues/{number}"), Fault::ServerError);
    gh.fake.fault(
        &key("POST", "/pulls"),
        Fault::SecondaryLimit { retry_after: 1 },
    );
    let child = gh.spawn(TOKEN, &["run", "--exit-when-idle"], None);
    let started = gh.dir().join("triage-started");
    wait_until("the triage of #2 to start", || started.exists()).await;
    // Someone deletes #2 while it is being triaged.
    gh.fake.state().issues.remove(&2);
    std::fs::write(gh.dir().join("go"), "").expect("go");
    let out = finish(child).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    assert_eq!(gh.issue(1), (labels(&["hydraflow-fixed"]), "closed".into()));
    assert_eq!(
        gh.main_file("file-1.txt").as_deref(),
        Some("content for 1\n")
    );
    let s = gh.fake.state();
    assert!(s.faults.is_empty(), "both faults were met");
    let status = |path: &str, method: &str| -> Vec<u16> {
        s.log
            .iter()
            .filter(|l| l.method == method && l.path.ends_with(path))
            .map(|l| l.status)
            .collect()
    };
    assert_eq!(
        status("/pulls", "POST"),
        [403, 201],
        "retried after Retry-After"
    );
    assert!(
        s.log.iter().any(|l| l.status == 500),
        "the 500 was answered"
    );
    drop(s);
    let events = gh.events();
    assert!(
        !events
            .iter()
            .any(|e| e.kind == EventType::Error && e.data.get("loop").is_some()),
        "no loop crashed"
    );
    assert!(
        !events.iter().any(|e| e.kind == EventType::HitlEscalation),
        "nothing needed a human"
    );
    let state = gh.state();
    assert!(
        !state.issues[&2].is_claimed(),
        "the deleted issue was let go"
    );
}

/// Receive `STATUS=` lines on `socket` until one contains every word of `wanted`.
async fn status_containing(socket: &tokio::net::UnixDatagram, wanted: &[&str]) -> String {
    let mut buf = vec![0u8; 8192];
    loop {
        let n = tokio::time::timeout(HANG_GUARD, socket.recv(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no STATUS= with {wanted:?}"))
            .expect("recv");
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        if let Some(status) = text
            .lines()
            .find_map(|l| l.strip_prefix("STATUS="))
            .filter(|s| wanted.iter().all(|w| s.contains(w)))
        {
            return status.to_owned();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_token_waits_with_a_clear_status_and_never_spins() {
    let gh = Gh::new(false).await;
    assert_eq!(
        gh.fake
            .add_issue("Add file 1", "alice", &["hydraflow-find"]),
        1
    );
    let socket_path = gh.dir().join("notify");
    let socket = tokio::net::UnixDatagram::bind(&socket_path).expect("bind");

    // No checkout yet: the clone is refused; the worker says so and waits.
    let child = gh.spawn("ghp_wrong", &["run"], Some(&socket_path));
    let status = status_containing(&socket, &["cannot clone", "authentication failed"]).await;
    assert!(status.starts_with("waiting 60s to retry"), "{status}");
    assert!(!status.contains("ghp_wrong"), "{status}");
    sigterm(&child);
    let out = finish(child).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!gh.checkout().exists(), "a refused clone leaves nothing");
    let git_requests = gh.fake.count("GET /git");
    assert!(git_requests >= 1, "the clone was tried");

    // With a checkout: the first poll is refused and the pipeline pauses.
    git2::Repository::clone(gh.fake.bare.to_str().expect("utf-8"), gh.checkout()).expect("clone");
    let mut child = gh.spawn("ghp_wrong", &["run"], Some(&socket_path));
    let status = status_containing(&socket, &["paused", "forge authentication failed"]).await;
    assert!(status.contains("401 Bad credentials"), "{status}");
    let seen = gh.fake.state().log.len();
    assert!(
        gh.fake.state().log.iter().all(|l| l.status == 401),
        "every request was refused"
    );
    // Several poll intervals later the paused worker has sent nothing more.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        gh.fake.state().log.len(),
        seen,
        "a paused worker does not spin"
    );
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "the worker keeps running while paused"
    );
    sigterm(&child);
    let out = finish(child).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pause = gh
        .events()
        .into_iter()
        .find(|e| e.kind == EventType::OrchestratorStatus && e.data["status"] == "paused")
        .expect("a pause event");
    assert_eq!(pause.data["seconds"], 60);
    assert!(
        pause.data["reason"]
            .as_str()
            .is_some_and(|r| r.contains("forge authentication failed")),
        "{pause:?}"
    );
    let log = std::fs::read_to_string(gh.data().join("logs").join("hydraflow.log")).expect("log");
    assert!(log.contains("pipeline paused"), "{log}");
    assert!(!log.contains("ghp_wrong"), "the token is never logged");
    assert_eq!(gh.issue(1), (labels(&["hydraflow-find"]), "open".into()));
}

/// GitHub answers 502 to everything for 30 s while two issues are in the
/// pipeline: waiting out an outage counts no attempt and escalates nothing,
/// and both issues are merged once it is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_30_second_forge_outage_counts_no_attempt() {
    let gh = Gh::new(false).await;
    for n in 1..=2 {
        assert_eq!(
            gh.fake
                .add_issue(&format!("Add file {n}"), "alice", &["hydraflow-find"]),
            n
        );
    }
    std::fs::write(gh.dir().join("hold-review"), "").expect("hold");
    let child = gh.spawn(TOKEN, &["run", "--exit-when-idle"], None);
    // The outage starts while #1 is being reviewed and #2 is on its way.
    let started = gh.dir().join("review-started");
    wait_until("the review of #1 to start", || started.exists()).await;
    gh.fake.outage(Duration::from_secs(30));
    let outage = Instant::now();
    std::fs::write(gh.dir().join("go"), "").expect("go");
    let out = finish(child).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        outage.elapsed() >= Duration::from_secs(30),
        "the run outlasted the outage"
    );
    for n in 1..=2 {
        assert_eq!(gh.issue(n), (labels(&["hydraflow-fixed"]), "closed".into()));
        assert_eq!(
            gh.main_file(&format!("file-{n}.txt")),
            Some(format!("content for {n}\n"))
        );
    }
    let s = gh.fake.state();
    assert!(
        s.log.iter().filter(|l| l.status == 502).count() > 1,
        "the outage was met"
    );
    drop(s);
    let state = gh.state();
    for (n, r) in &state.issues {
        assert_eq!(r.attempts, 0, "#{n}: no attempt counted");
        assert!(r.hitl().is_none(), "#{n}: not escalated");
    }
    let events = gh.events();
    assert!(!events.iter().any(|e| e.kind == EventType::HitlEscalation));
    assert!(
        events
            .iter()
            .any(|e| e.kind == EventType::Error && e.data["class"] == "later"),
        "the failures were classified as passing"
    );
}
