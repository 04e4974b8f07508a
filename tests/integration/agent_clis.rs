//! The real agent CLIs — Claude Code and Codex, the versions
//! `tests/agents/install.sh` pins — run the whole pipeline on the local
//! forge against the scripted model API of [`crate::model_server`]: real
//! `Write` and `Bash` / `exec_command` tool calls that edit and commit, and
//! every API fault ending in its class.
//!
//! They are `#[ignore]`d (cargo prints what they need) and run with
//! `--include-ignored` from the directory the script installed into:
//! `HYDRAFLOW_AGENT_CLIS`, else its default (`.ci/run` sets it); there a
//! missing CLI is a failure that says what to run, never a skip. Claude Code refuses to skip permission prompts as root, so as root
//! the worker runs as an unprivileged user made for the purpose
//! ([`TEST_USER`]), as the packaged unit does.

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use hydraflow::store::events::Event;

use crate::model_server::{Action, Fault, ModelServer, Script, Turn};
use crate::util::{Project, labels};

/// The variable naming the install directory of `tests/agents/install.sh`.
pub const CLIS_ENV: &str = "HYDRAFLOW_AGENT_CLIS";
/// The unprivileged user the worker runs as when the tests run as root.
pub const TEST_USER: &str = "hydraflow-agent-test";
/// Longest a pipeline run with real CLIs may take (a hang guard; the agent
/// authentication pause probes after five minutes).
const GUARD: Duration = Duration::from_secs(420);

/// The installed CLIs.
pub struct Clis {
    /// Claude Code's native binary (`@anthropic-ai/claude-code-linux-x64/claude`).
    pub claude: PathBuf,
    /// Codex's native binary (`@openai/codex-linux-x64/vendor/…/bin/codex`).
    pub codex: PathBuf,
}

impl Clis {
    /// The CLIs under `$HYDRAFLOW_AGENT_CLIS`, else under [`DEFAULT_CLIS_DIR`]; a missing
    /// binary fails the test saying what to run.
    pub fn installed() -> Clis {
        let dir = clis_dir();
        let modules = dir.join("node_modules");
        let clis = Clis {
            claude: modules.join("@anthropic-ai/claude-code-linux-x64/claude"),
            codex: modules
                .join("@openai/codex-linux-x64/vendor/x86_64-unknown-linux-musl/bin/codex"),
        };
        for bin in [&clis.claude, &clis.codex] {
            assert!(
                bin.is_file(),
                "{} is missing: run tests/agents/install.sh {} (or set {CLIS_ENV} to where it installed them)",
                bin.display(),
                dir.display()
            );
        }
        clis
    }
}

/// Where `tests/agents/install.sh` installs the CLIs by default.
pub const DEFAULT_CLIS_DIR: &str = "/var/cache/hydraflow-test/agent-clis";

/// `$HYDRAFLOW_AGENT_CLIS`, else [`DEFAULT_CLIS_DIR`].
pub fn clis_dir() -> PathBuf {
    std::env::var_os(CLIS_ENV)
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from(DEFAULT_CLIS_DIR), PathBuf::from)
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The unprivileged test user's uid and gid, made when missing.
pub fn test_user() -> (u32, u32) {
    if nix::unistd::User::from_name(TEST_USER)
        .ok()
        .flatten()
        .is_none()
    {
        let out = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
            ])
            .arg(TEST_USER)
            .output()
            .expect("run useradd");
        // Another test may have made it meanwhile.
        assert!(
            out.status.success() || String::from_utf8_lossy(&out.stderr).contains("already exists"),
            "useradd {TEST_USER}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let user = nix::unistd::User::from_name(TEST_USER)
        .ok()
        .flatten()
        .expect("the test user exists");
    (user.uid.as_raw(), user.gid.as_raw())
}

/// Hand `path` (recursively) to the test user.
pub fn give_to(path: &Path, uid: u32, gid: u32) {
    let out = Command::new("chown")
        .arg("-R")
        .arg(format!("{uid}:{gid}"))
        .arg(path)
        .output()
        .expect("run chown");
    assert!(out.status.success(), "chown {}", path.display());
}

/// A project whose stages run a real CLI against `server`.
pub struct CliProject {
    /// The repository and its configuration.
    pub project: Project,
    /// Extra variables of the worker's environment.
    pub env: Vec<(String, String)>,
    /// Run the worker as the unprivileged test user (as root).
    pub as_user: Option<(u32, u32)>,
}

/// Which CLI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cli {
    /// Claude Code.
    Claude,
    /// Codex.
    Codex,
}

impl CliProject {
    /// A project using `cli` with its model API at `server`; `extra` TOML is
    /// appended at the top level. As root, the worker runs as [`TEST_USER`]
    /// when `unprivileged`.
    pub fn new(
        cli: Cli,
        clis: &Clis,
        server: &ModelServer,
        extra: &str,
        unprivileged: bool,
    ) -> CliProject {
        let project = Project::new("", "");
        let tmp = project.fx.tmp.path().to_path_buf();
        let home = tmp.join("home");
        std::fs::create_dir_all(&home).expect("home");
        let bin = match cli {
            Cli::Claude => &clis.claude,
            Cli::Codex => &clis.codex,
        };
        let bin_dir = tmp.join("bin");
        std::fs::create_dir_all(&bin_dir).expect("bin dir");
        let name = match cli {
            Cli::Claude => "claude",
            Cli::Codex => "codex",
        };
        std::os::unix::fs::symlink(bin, bin_dir.join(name)).expect("symlink the CLI");
        let preset = name;
        let config = format!(
            "poll_interval = 1\ndata_poll_interval = 2\nworktree_base = {wt:?}\nagent_timeout = 120\n{extra}\n\
             [agent]\npreset = {preset:?}\n",
            wt = project.fx.layout.worktree_base.display().to_string(),
        );
        std::fs::write(&project.config, config).expect("write config");
        let path = format!("{}:/usr/local/bin:/usr/bin:/bin", bin_dir.display());
        let mut env = vec![
            ("PATH".to_string(), path),
            ("HOME".to_string(), home.display().to_string()),
        ];
        match cli {
            Cli::Claude => {
                env.push(("ANTHROPIC_BASE_URL".into(), server.url.clone()));
                env.push(("ANTHROPIC_API_KEY".into(), "sk-ant-test-key-0001".into()));
                // Each fault reaches the worker at once instead of after minutes of retries.
                env.push(("CLAUDE_CODE_MAX_RETRIES".into(), "0".into()));
                env.push((
                    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC".into(),
                    "1".into(),
                ));
            }
            Cli::Codex => {
                let codex_home = tmp.join("codex-home");
                std::fs::create_dir_all(&codex_home).expect("codex home");
                std::fs::write(
                    codex_home.join("config.toml"),
                    format!(
                        "model = \"gpt-5.1-codex\"\nmodel_provider = \"scripted\"\n\n\
                         [model_providers.scripted]\nname = \"scripted\"\nbase_url = \"{}/v1\"\n\
                         wire_api = \"responses\"\nenv_key = \"OPENAI_API_KEY\"\n\
                         request_max_retries = 0\nstream_max_retries = 0\n",
                        server.url
                    ),
                )
                .expect("codex config");
                env.push(("CODEX_HOME".into(), codex_home.display().to_string()));
                env.push(("OPENAI_API_KEY".into(), "sk-openai-test-key-0001".into()));
            }
        }
        let as_user = (unprivileged && is_root()).then(test_user);
        if let Some((uid, gid)) = as_user {
            give_to(&tmp, uid, gid);
            // The test (root) reads the test user's repository.
            // SAFETY: a process-wide libgit2 option, set before this test opens a repository.
            unsafe {
                git2::opts::set_verify_owner_validation(false).expect("libgit2 option");
            }
        }
        CliProject {
            project,
            env,
            as_user,
        }
    }

    /// `hydraflow <args>` with the worker's environment (as the test user when set).
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = self.project.hydraflow(args);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        if let Some((uid, gid)) = self.as_user {
            cmd.uid(uid).gid(gid);
        }
        cmd
    }

    /// File an issue through the CLI (as the worker's user).
    pub fn add_issue(&self, title: &str, body: &str) {
        let out = self
            .command(&["issue", "add", "--title", title, "--body", body])
            .output()
            .expect("issue add");
        assert!(out.status.success(), "issue add: {}", stderr(&out));
    }

    /// Start `hydraflow run --exit-when-idle`.
    pub fn spawn(&self) -> Child {
        self.command(&["run", "--exit-when-idle"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn hydraflow run")
    }

    /// Run `hydraflow run --exit-when-idle` to the end.
    pub fn run(&self) -> Output {
        wait(self.spawn())
    }

    /// The events so far (none before the file exists).
    pub fn events(&self) -> Vec<Event> {
        if self.project.data().join("events.jsonl").exists() {
            self.project.events()
        } else {
            Vec::new()
        }
    }
}

/// Wait for the worker to exit (bounded by [`GUARD`]), reading its output
/// all along.
pub fn wait(child: Child) -> Output {
    super::util::wait_draining(child, GUARD)
}

/// Poll `cond` every 100 ms, at most [`GUARD`].
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let started = Instant::now();
    while !cond() {
        assert!(started.elapsed() < GUARD, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The scripted answers of one issue through every stage: triage ready, a
/// plan, an implementation that writes `hello.txt` and commits it (a real
/// `Write`, then `Bash` / `exec_command` running git), an approving review.
pub fn greeting_script() -> Script {
    vec![
        Turn::new(
            "You are triaging issue",
            vec![],
            "{\"ready\": true, \"reasons\": [\"clear\"], \"issue_type\": \"feature\", \"clarity_score\": 9, \"complexity_score\": 1}",
        ),
        Turn::new(
            "You are planning the implementation",
            vec![],
            "PLAN_START\nSUMMARY: Add hello.txt with a greeting.\n1. Write hello.txt.\n2. Commit it.\nPLAN_END",
        ),
        Turn::new(
            "You are implementing issue",
            vec![
                Action::Write("hello.txt".into(), "hello from the agent\n".into()),
                Action::Shell("git add hello.txt && git commit -q -m 'Add hello.txt'".into()),
            ],
            "Implemented: hello.txt is committed.",
        ),
        Turn::new(
            "You are reviewing the pull request",
            vec![],
            "VERDICT: APPROVE\nSUMMARY: hello.txt is what the issue asks for.",
        ),
    ]
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The issue was merged: closed, labelled fixed, its file on `main`.
fn assert_merged(p: &CliProject, out: &Output) {
    let issue = p.project.issue(1);
    assert!(
        labels(&issue).contains(&"hydraflow-fixed"),
        "issue 1 not merged: {:?}\n{}",
        issue.labels,
        stderr(out)
    );
    assert_eq!(
        p.project.main_file("hello.txt").as_deref(),
        Some("hello from the agent\n"),
        "{}",
        stderr(out)
    );
}

fn attempts(p: &CliProject) -> u32 {
    p.project.state().issues.get(&1).map_or(0, |r| r.attempts)
}

fn escalations(p: &CliProject) -> usize {
    p.events()
        .iter()
        .filter(|e| serde_json::to_value(e).is_ok_and(|v| v["type"] == "hitl_escalation"))
        .count()
}

/// Pause events' reasons.
fn pauses(p: &CliProject) -> Vec<String> {
    p.events()
        .iter()
        .filter_map(|e| serde_json::to_value(e).ok())
        .filter(|v| v["data"]["status"] == "paused")
        .map(|v| v["data"]["reason"].as_str().unwrap_or("").to_string())
        .collect()
}

#[test]
#[ignore = "needs the pinned agent CLIs: run tests/agents/install.sh (npm), then cargo test -- --include-ignored (.ci/run does both)"]
fn claude_code_takes_an_issue_to_a_merge() {
    let clis = Clis::installed();
    let server = ModelServer::start(greeting_script());
    let p = CliProject::new(Cli::Claude, &clis, &server, "", true);
    p.add_issue("Add a greeting", "Add hello.txt with a greeting.");
    let out = p.run();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_merged(&p, &out);
    assert_eq!(attempts(&p), 0);
    let requests = server.requests();
    assert!(requests.iter().all(|r| r.api == "anthropic"));
    // Preset-aware models: opus for plan and implement, sonnet for triage and review.
    let models: Vec<&str> = requests.iter().map(|r| r.model.as_str()).collect();
    assert!(models.iter().any(|m| m.contains("opus")), "{models:?}");
    assert!(models.iter().any(|m| m.contains("sonnet")), "{models:?}");
    // Accounting: every call recorded with its cost and tokens; the key never in a transcript.
    let calls = hydraflow::store::sessions::read_calls(&p.project.data().join("agent-calls.jsonl"))
        .expect("agent-calls.jsonl");
    assert!(calls.len() >= 4, "{calls:?}");
    assert!(
        calls
            .iter()
            .all(|c| c.outcome == "success" && c.usage.input_tokens >= 1000)
    );
    assert!(
        calls.iter().all(|c| c.cost_usd.is_some_and(|d| d > 0.0)),
        "{calls:?}"
    );
    assert!(
        calls
            .iter()
            .all(|c| c.resources.cpu_ms.is_some() && c.resources.wall_ms > 0)
    );
    let show = p
        .command(&["issue", "show", "1"])
        .output()
        .expect("issue show");
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(text.contains("cost:"), "{text}");
    for entry in std::fs::read_dir(p.project.data().join("logs"))
        .expect("logs")
        .flatten()
    {
        let body = std::fs::read_to_string(entry.path()).unwrap_or_default();
        assert!(
            !body.contains("sk-ant-test-key-0001"),
            "{} holds the key",
            entry.path().display()
        );
    }
}

#[test]
#[ignore = "needs the pinned agent CLIs: run tests/agents/install.sh (npm), then cargo test -- --include-ignored (.ci/run does both)"]
fn codex_takes_an_issue_to_a_merge() {
    let clis = Clis::installed();
    let server = ModelServer::start(greeting_script());
    let p = CliProject::new(Cli::Codex, &clis, &server, "", true);
    p.add_issue("Add a greeting", "Add hello.txt with a greeting.");
    let out = p.run();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_merged(&p, &out);
    assert_eq!(attempts(&p), 0);
    let requests = server.requests();
    assert!(requests.iter().all(|r| r.api == "openai"));
    // The codex preset passes no Claude model names: Codex uses its configured model.
    assert!(
        requests.iter().all(|r| r.model == "gpt-5.1-codex"),
        "{:?}",
        requests.iter().map(|r| &r.model).collect::<Vec<_>>()
    );
    let calls = hydraflow::store::sessions::read_calls(&p.project.data().join("agent-calls.jsonl"))
        .expect("agent-calls.jsonl");
    assert!(calls.iter().all(|c| c.usage.output_tokens > 0), "{calls:?}");
}

/// 429, 529, 500 and a cut stream, each on the first call of a stage, with
/// Claude Code's retries turned down: no attempt is counted and the issue is merged.
#[test]
#[ignore = "needs the pinned agent CLIs: run tests/agents/install.sh (npm), then cargo test -- --include-ignored (.ci/run does both)"]
fn claude_code_api_faults_are_retried_later() {
    let clis = Clis::installed();
    let server = ModelServer::start(greeting_script());
    let p = CliProject::new(Cli::Claude, &clis, &server, "max_issue_attempts = 1", true);
    p.add_issue("Add a greeting", "Add hello.txt with a greeting.");
    for fault in [
        Fault::Status(429),
        Fault::Status(529),
        Fault::Status(500),
        Fault::Cut,
    ] {
        server.fail_next(1, fault);
    }
    let out = p.run();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_merged(&p, &out);
    assert_eq!(attempts(&p), 0, "{}", stderr(&out));
    assert_eq!(escalations(&p), 0);
    let faulted: Vec<_> = server
        .requests()
        .into_iter()
        .filter_map(|r| r.fault)
        .collect();
    assert_eq!(faulted.len(), 4, "{faulted:?}");
    let calls = hydraflow::store::sessions::read_calls(&p.project.data().join("agent-calls.jsonl"))
        .expect("agent-calls.jsonl");
    assert_eq!(
        calls.iter().filter(|c| c.outcome == "later").count(),
        4,
        "{calls:?}"
    );
}

/// An outage longer than `max_issue_attempts` calls: the issue waits, no
/// escalation, no attempt; merged once the API recovers. By default the
/// outage lasts a dozen calls (each fails as "later", whatever its length);
/// `HYDRAFLOW_TEST_OUTAGE_SECS=600` makes it a real ten-minute outage
/// (docs/reliability.md records that run).
#[test]
#[ignore = "needs the pinned agent CLIs: run tests/agents/install.sh (npm), then cargo test -- --include-ignored (.ci/run does both)"]
fn claude_code_outage_escalates_nothing() {
    let clis = Clis::installed();
    let server = ModelServer::start(greeting_script());
    let p = CliProject::new(Cli::Claude, &clis, &server, "", true);
    p.add_issue("Add a greeting", "Add hello.txt with a greeting.");
    server.set_outage(Some(Fault::Status(529)));
    let child = p.spawn();
    let failed = || {
        server
            .requests()
            .iter()
            .filter(|r| r.fault.is_some())
            .count()
    };
    match std::env::var("HYDRAFLOW_TEST_OUTAGE_SECS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    {
        Some(secs) => {
            std::thread::sleep(std::time::Duration::from_secs(secs));
            println!("outage of {secs} s: {} calls failed", failed());
        }
        None => wait_until("a dozen failed calls", || failed() >= 12),
    }
    server.set_outage(None);
    let out = wait(child);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_merged(&p, &out);
    assert_eq!(attempts(&p), 0);
    assert_eq!(escalations(&p), 0);
}

/// 401: the pipeline pauses (no attempt) and resumes once the key works.
#[test]
#[ignore = "needs the pinned agent CLIs: run tests/agents/install.sh (npm), then cargo test -- --include-ignored (.ci/run does both)"]
fn claude_code_auth_failure_pauses_until_the_key_works() {
    let clis = Clis::installed();
    let server = ModelServer::start(greeting_script());
    server.require_key(Some("sk-ant-the-right-key"));
    let p = CliProject::new(Cli::Claude, &clis, &server, "max_issue_attempts = 1", true);
    p.add_issue("Add a greeting", "Add hello.txt with a greeting.");
    let child = p.spawn();
    wait_until("a pause for authentication", || {
        pauses(&p).iter().any(|r| r.contains("authentication"))
    });
    assert_eq!(attempts(&p), 0);
    // The key is fixed (the API now takes the one the worker has).
    server.require_key(None);
    let out = wait(child);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_merged(&p, &out);
    assert_eq!(attempts(&p), 0);
    assert_eq!(escalations(&p), 0);
}

/// As root, Claude Code refuses `--permission-mode bypassPermissions`: the
/// pipeline pauses saying to run as an unprivileged user, counting no attempt.
#[test]
#[ignore = "needs root and the pinned agent CLIs: as root run tests/agents/install.sh (npm), then cargo test -- --include-ignored (.ci/run does both)"]
fn claude_code_as_root_pauses_with_the_reason() {
    let clis = Clis::installed();
    assert!(
        is_root(),
        "this test checks what happens as root: run it as root"
    );
    let server = ModelServer::start(greeting_script());
    let p = CliProject::new(Cli::Claude, &clis, &server, "max_issue_attempts = 1", false);
    p.add_issue("Add a greeting", "Add hello.txt with a greeting.");
    let mut child = p.spawn();
    wait_until("a pause for running as root", || {
        pauses(&p)
            .iter()
            .any(|r| r.contains("run HydraFlow as an unprivileged user"))
    });
    // Still paused a while later, having counted nothing.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(attempts(&p), 0);
    assert_eq!(escalations(&p), 0);
    let _ = child.kill();
    let _ = child.wait();
}
