//! Harness for end-to-end tests through the `hydraflow` binary: a real git
//! repository in a temp dir, a configuration with scripted stage agents,
//! and helpers to run the binary and read what it left on disk.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use hydraflow::forge::local::LocalForge;
use hydraflow::forge::{Issue, PullRequest};
use hydraflow::store::events::Event;
use hydraflow::store::state::State;

use crate::git_fixture::{self, Fixture};

/// Longest a worker run may take before the test gives up on it (a hang guard, not a speed check).
pub const HANG_GUARD: Duration = Duration::from_secs(90);

/// A repository, its configuration and its scripted agent.
pub struct Project {
    /// The git fixture (temp dir, checkout, layout).
    pub fx: Fixture,
    /// The global configuration file.
    pub config: PathBuf,
}

impl Project {
    /// A repository with `agent_script` (a `sh` script receiving the stage
    /// and issue number as `$1` and `$2` and the prompt on stdin) as every
    /// stage's agent, plus `extra` TOML appended to the configuration.
    pub fn new(agent_script: &str, extra: &str) -> Project {
        let fx = git_fixture::fixture();
        let agent = fx.tmp.path().join("agent.sh");
        std::fs::write(&agent, agent_script).expect("write agent");
        std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let config = fx.tmp.path().join("hydraflow.toml");
        let text = format!(
            "poll_interval = 1\ndata_poll_interval = 2\nworktree_base = {wt:?}\n{extra}\n[agent]\npreset = \"command\"\ncommand = [{agent:?}, \"{{{{stage}}}}\", \"{{{{issue}}}}\"]\noutput = \"plain\"\n",
            wt = fx.layout.worktree_base.display().to_string(),
            agent = agent.display().to_string(),
        );
        std::fs::write(&config, text).expect("write config");
        Project { fx, config }
    }

    /// The checkout.
    pub fn repo(&self) -> &Path {
        &self.fx.repo_path
    }

    /// `data_root/<slug>` (the default data root: `<repo>/.hydraflow`).
    pub fn data(&self) -> PathBuf {
        self.repo().join(".hydraflow").join("repo")
    }

    /// The binary with a clean environment, `--config` and `--repo` set.
    pub fn hydraflow(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hydraflow"));
        cmd.args(args)
            .arg("--config")
            .arg(&self.config)
            .arg("--repo")
            .arg(self.repo())
            .env_remove("HYDRAFLOW_HOME")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("JOURNAL_STREAM")
            .env_remove("HYDRAFLOW_CONFIG")
            .env("HYDRAFLOW_LOG", "info")
            .current_dir(self.fx.tmp.path());
        for (k, _) in std::env::vars() {
            if k.starts_with("HYDRAFLOW_") && k != "HYDRAFLOW_LOG" {
                cmd.env_remove(k);
            }
        }
        cmd
    }

    /// Run a command to completion (bounded by [`HANG_GUARD`]).
    pub fn run(&self, args: &[&str]) -> Output {
        let child = self
            .hydraflow(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn hydraflow");
        wait_bounded(child)
    }

    /// `hydraflow run --exit-when-idle`, asserting success.
    pub fn run_until_idle(&self) -> Output {
        let out = self.run(&["run", "--exit-when-idle"]);
        assert!(
            out.status.success(),
            "hydraflow run failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// The local forge.
    pub fn forge(&self) -> LocalForge {
        LocalForge::open(
            &hydraflow::layout::Layout {
                slug: hydraflow::layout::Slug::new("repo").expect("slug"),
                data_root: self.repo().join(".hydraflow"),
                worktree_base: self.fx.layout.worktree_base.clone(),
            },
            self.repo(),
        )
        .expect("open forge")
    }

    /// File an issue labelled `hydraflow-find` through the CLI.
    pub fn add_issue(&self, title: &str, body: &str) {
        let out = self.run(&["issue", "add", "--title", title, "--body", body]);
        assert!(
            out.status.success(),
            "issue add failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// One issue by number.
    pub fn issue(&self, n: u64) -> Issue {
        self.forge()
            .all_issues()
            .expect("issues")
            .into_iter()
            .find(|i| i.number == n)
            .expect("issue exists")
    }

    /// Every pull request.
    pub fn pulls(&self) -> Vec<PullRequest> {
        self.forge().all_pull_requests().expect("pulls")
    }

    /// `state.json`, parsed.
    pub fn state(&self) -> State {
        let text = std::fs::read_to_string(self.data().join("state.json")).expect("state.json");
        serde_json::from_str(&text).expect("state.json is valid")
    }

    /// Every record of `events.jsonl`, parsed (each line must parse).
    pub fn events(&self) -> Vec<Event> {
        let text = std::fs::read_to_string(self.data().join("events.jsonl")).expect("events");
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad event line {l}: {e}")))
            .collect()
    }

    /// Subjects of the commits on `main`, newest first.
    pub fn main_subjects(&self) -> Vec<String> {
        git_fixture::subjects(&self.fx.repo(), "refs/heads/main")
    }

    /// Content of `path` on `main`.
    pub fn main_file(&self, path: &str) -> Option<String> {
        git_fixture::file_at(&self.fx.repo(), "main", path)
    }
}

/// Wait for `child`, killing it after [`HANG_GUARD`].
pub fn wait_bounded(child: Child) -> Output {
    wait_draining(child, HANG_GUARD)
}

/// Wait for `child`, reading its piped standard output and error all along
/// (a worker logs a line for every retry: a pipe nobody reads fills up at
/// 64 KiB and blocks its writes, and with them the worker), killing it
/// after `guard` and panicking with what it wrote.
pub fn wait_draining(mut child: Child, guard: Duration) -> Output {
    fn drain(
        pipe: Option<impl std::io::Read + Send + 'static>,
    ) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    }
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break Some(status);
        }
        if started.elapsed() > guard {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = stdout.join().expect("stdout reader");
    let stderr = stderr.join().expect("stderr reader");
    match status {
        Some(status) => Output {
            status,
            stdout,
            stderr,
        },
        None => panic!(
            "hydraflow did not finish within {guard:?}:\n{}",
            String::from_utf8_lossy(&stderr)
        ),
    }
}

/// Poll `cond` every 50 ms until it holds or [`HANG_GUARD`] passes.
pub fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let started = Instant::now();
    while !cond() {
        assert!(
            started.elapsed() < HANG_GUARD,
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Labels as a sorted list of `&str`, for assertions.
pub fn labels(issue: &Issue) -> Vec<&str> {
    let mut v: Vec<&str> = issue.labels.iter().map(String::as_str).collect();
    v.sort_unstable();
    v
}
