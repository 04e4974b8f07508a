//! The SIGKILL campaign against the real binary: the demo's four issues
//! (three to merge, one already satisfied) on the local forge with the
//! scripted demo agent and one-second polls; `hydraflow run` is killed with
//! SIGKILL at a uniform random instant of a clean run's duration, started
//! again, and run to completion. Every run must end clean: each issue merged
//! once or closed as satisfied, no escalation, no duplicate comment or pull
//! request, no file lost from `main`, no worktree or branch left, the
//! operator's checkout clean, `git fsck` happy, every file HydraFlow wrote
//! readable, and no process of the run left.
//!
//! `HYDRAFLOW_CAMPAIGN_RUNS` sets the number of runs (20 by default, as in
//! `.ci/run`), `HYDRAFLOW_CAMPAIGN_SEED` the random seed (printed), and
//! `HYDRAFLOW_CAMPAIGN_BIN` the binary (the release build for the figure in
//! docs/reliability.md).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hydraflow::forge::local::LocalForge;
use hydraflow::forge::{IssueState, PullRequestState};
use hydraflow::layout::{Layout, Slug};
use hydraflow::store::state::{Outcome, Phase, StateTracker};

use crate::util::{HANG_GUARD, wait_bounded};

/// One run's repository, configuration and data.
struct Run {
    tmp: tempfile::TempDir,
    bin: PathBuf,
}

impl Run {
    fn new(bin: &Path) -> Run {
        let tmp = tempfile::tempdir().expect("temp dir");
        let run = Run {
            tmp,
            bin: bin.to_path_buf(),
        };
        hydraflow::demo::make_repository(&run.repo()).expect("demo repository");
        let config = format!(
            "poll_interval = 1\ndata_poll_interval = 1\nworktree_base = {wt:?}\n\
             [agent]\npreset = \"command\"\n\
             command = [{bin:?}, \"demo-agent\", \"--stage\", \"{{{{stage}}}}\", \"--issue\", \"{{{{issue}}}}\"]\n\
             output = \"plain\"\n",
            wt = run.worktree_base().display().to_string(),
            bin = bin.display().to_string(),
        );
        std::fs::write(run.config(), config).expect("config");
        let forge = run.forge();
        for (title, body) in hydraflow::demo::ISSUES {
            forge
                .create_issue(title, body, &["hydraflow-find".to_owned()])
                .expect("file an issue");
        }
        run
    }

    fn repo(&self) -> PathBuf {
        self.tmp.path().join("demo-repo")
    }

    fn config(&self) -> PathBuf {
        self.tmp.path().join("hydraflow.toml")
    }

    fn worktree_base(&self) -> PathBuf {
        self.tmp.path().join("wt")
    }

    fn layout(&self) -> Layout {
        Layout {
            slug: Slug::new("demo-repo").expect("slug"),
            data_root: self.repo().join(".hydraflow"),
            worktree_base: self.worktree_base(),
        }
    }

    fn forge(&self) -> LocalForge {
        LocalForge::open(&self.layout(), &self.repo()).expect("forge")
    }

    /// `hydraflow run --exit-when-idle` with a clean environment; its output
    /// is appended to `worker.out` in the run's directory.
    fn worker(&self) -> Command {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.tmp.path().join("worker.out"))
            .expect("output file");
        let mut cmd = Command::new(&self.bin);
        cmd.args(["run", "--exit-when-idle", "--config"])
            .arg(self.config())
            .arg("--repo")
            .arg(self.repo())
            .current_dir(self.tmp.path())
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup"))
            .stderr(out)
            .env("HYDRAFLOW_LOG", "info");
        for (k, _) in std::env::vars() {
            if (k.starts_with("HYDRAFLOW_") && k != "HYDRAFLOW_LOG")
                || ["NOTIFY_SOCKET", "JOURNAL_STREAM", "WATCHDOG_USEC"].contains(&k.as_str())
            {
                cmd.env_remove(k);
            }
        }
        cmd
    }

    /// Run the worker to completion.
    fn complete(&self) -> Result<(), String> {
        let out = wait_bounded(self.worker().spawn().expect("spawn hydraflow"));
        if out.status.success() {
            Ok(())
        } else {
            Err(format!("the restarted worker failed: {}", out.status))
        }
    }
}

/// Every problem found in a finished run (empty = clean).
fn problems(run: &Run) -> Vec<String> {
    let mut bad = Vec::new();
    let mut check = |ok: bool, what: String| {
        if !ok {
            bad.push(what);
        }
    };
    let forge = run.forge();
    let (issues, pulls) = match (forge.all_issues(), forge.all_pull_requests()) {
        (Ok(i), Ok(p)) => (i, p),
        (Err(e), _) | (_, Err(e)) => return vec![format!("corrupt forge files: {e}")],
    };
    for n in 1..=4u64 {
        let Some(issue) = issues.iter().find(|i| i.number == n) else {
            check(false, format!("#{n} is missing"));
            continue;
        };
        check(
            issue.state == IssueState::Closed,
            format!("#{n} is still open"),
        );
        check(
            issue.labels == ["hydraflow-fixed"],
            format!("#{n} labels {:?}", issue.labels),
        );
        let detail = forge.issue_detail(n).expect("issue detail");
        let bodies: BTreeSet<&str> = detail.comments.iter().map(|c| c.body.as_str()).collect();
        check(
            bodies.len() == detail.comments.len(),
            format!("#{n} has a duplicate comment"),
        );
        check(
            !detail.comments.iter().any(|c| c.body.contains("escalated")),
            format!("#{n} was escalated"),
        );
        let prs: Vec<_> = pulls
            .iter()
            .filter(|p| p.head == format!("agent/issue-{n}"))
            .collect();
        if n == 4 {
            check(
                prs.is_empty(),
                format!("#{n} (satisfied) got a pull request"),
            );
        } else {
            check(
                prs.len() == 1 && prs[0].state == PullRequestState::Merged,
                format!("#{n} pull requests {prs:?}"),
            );
        }
    }
    // main: the initial files untouched, the agents' files, nothing else.
    let repo = git2::Repository::open(run.repo()).expect("repo");
    let main = repo
        .find_reference("refs/heads/main")
        .and_then(|r| r.peel_to_tree())
        .expect("main");
    let files: BTreeSet<String> = main
        .iter()
        .filter_map(|e| e.name().ok().map(str::to_owned))
        .collect();
    let expected: BTreeSet<String> = [
        ".gitignore",
        "README.md",
        "USAGE.md",
        "farewell.sh",
        "greet.sh",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    check(files == expected, format!("main holds {files:?}"));
    let subjects = crate::git_fixture::subjects(&repo, "refs/heads/main");
    for n in 1..=3 {
        let merges = subjects
            .iter()
            .filter(|s| s.starts_with(&format!("Fixes #{n}:")))
            .count();
        check(merges == 1, format!("#{n} merged {merges} times"));
    }
    // Nothing left behind.
    let leftover_branches: Vec<String> = repo
        .branches(Some(git2::BranchType::Local))
        .expect("branches")
        .filter_map(|b| b.ok()?.0.name().ok().flatten().map(str::to_owned))
        .filter(|n| n.starts_with("agent/"))
        .collect();
    check(
        leftover_branches.is_empty(),
        format!("branches left: {leftover_branches:?}"),
    );
    let worktrees_dir = run.layout().worktrees_dir();
    let leftover_dirs: Vec<_> = std::fs::read_dir(&worktrees_dir)
        .map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    check(
        leftover_dirs.is_empty(),
        format!("worktrees left: {leftover_dirs:?}"),
    );
    check(
        repo.worktrees().map(|w| w.is_empty()).unwrap_or(false),
        "worktree registrations left".into(),
    );
    // The operator's checkout is clean, and git finds nothing wrong.
    let status = git(&run.repo(), &["status", "--porcelain"]);
    check(
        status.as_deref() == Ok(""),
        format!("the checkout is not clean: {status:?}"),
    );
    let fsck = git(&run.repo(), &["fsck", "--full", "--no-dangling"]);
    check(fsck.is_ok(), format!("git fsck: {fsck:?}"));
    // Every file HydraFlow wrote is readable, and says the same.
    let layout = run.layout();
    match StateTracker::read_only(&layout.state_file()) {
        Ok(state) => {
            for (n, r) in &state.issues {
                let expected = if *n == 4 {
                    Outcome::AlreadySatisfied
                } else {
                    Outcome::Merged
                };
                check(
                    r.phase == Phase::Done { outcome: expected } && r.journal.is_none(),
                    format!("#{n} record {:?} journal {:?}", r.phase, r.journal),
                );
                check(r.attempts <= 3, format!("#{n} attempts {}", r.attempts));
            }
        }
        Err(e) => check(false, format!("state.json: {e}")),
    }
    if let Ok(text) = std::fs::read_to_string(layout.events_file()) {
        let bad_lines = text
            .lines()
            .filter(|l| serde_json::from_str::<serde_json::Value>(l).is_err())
            .count();
        check(
            bad_lines == 0,
            format!("{bad_lines} corrupt lines in events.jsonl"),
        );
    }
    // No process of the run is left.
    let left = processes_mentioning(run.tmp.path());
    check(left.is_empty(), format!("processes left: {left:?}"));
    bad
}

/// `git <args>` in `dir`: its stdout, or what went wrong.
fn git(dir: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// PIDs whose command line or working directory is under `dir`.
fn processes_mentioning(dir: &Path) -> Vec<u32> {
    let needle = dir.to_string_lossy().into_owned();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != std::process::id())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
                .unwrap_or_default();
            let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap_or_default();
            cmdline.contains(&needle) || cwd.starts_with(dir)
        })
        .collect()
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn sigkill_at_random_instants_always_resumes_cleanly() {
    let runs: usize = env_or("HYDRAFLOW_CAMPAIGN_RUNS", 20);
    let seed: u64 = env_or("HYDRAFLOW_CAMPAIGN_SEED", fastrand::u64(..));
    let bin = std::env::var_os("HYDRAFLOW_CAMPAIGN_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_hydraflow")),
        PathBuf::from,
    );

    // A clean run: how long the pipeline takes, and that it ends clean.
    let clean = Run::new(&bin);
    let started = Instant::now();
    clean.complete().expect("the clean run");
    let duration = started.elapsed();
    let found = problems(&clean);
    assert!(found.is_empty(), "the clean run: {found:?}");

    let mut rng = fastrand::Rng::with_seed(seed);
    let mut failed = Vec::new();
    let mut killed = 0;
    for i in 0..runs {
        let run = Run::new(&bin);
        let at = duration.mul_f64(rng.f64());
        let mut child = run.worker().spawn().expect("spawn hydraflow");
        let spawned = Instant::now();
        while spawned.elapsed() < at && child.try_wait().expect("try_wait").is_none() {
            std::thread::sleep(Duration::from_millis(2));
        }
        if child.try_wait().expect("try_wait").is_none() {
            child.kill().expect("SIGKILL");
            killed += 1;
        }
        child.wait().expect("reap");
        let mut found = match run.complete() {
            Ok(()) => problems(&run),
            Err(e) => vec![e],
        };
        if !found.is_empty() {
            found.insert(0, format!("run {i}, killed after {at:?}"));
            // Keep the run's directory to look at.
            let kept = run.tmp.keep();
            found.push(format!("kept in {}", kept.display()));
            failed.push(found.join("; "));
        }
    }
    println!(
        "SIGKILL campaign: {runs} runs ({killed} killed mid-run, clean run {duration:?}, seed {seed}): {} clean, {} not",
        runs - failed.len(),
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "runs that did not end clean (seed {seed}):\n{}",
        failed.join("\n")
    );
    let _ = HANG_GUARD;
}
