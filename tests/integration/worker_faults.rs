//! Faults of the worker's own disk, through the binary with the local forge:
//! the data directory fills up (a small tmpfs) and is then freed, or becomes
//! read-only for 10 s. Neither is the agent's fault: no attempt is counted,
//! nothing is escalated, the pipeline pauses with the reason and resumes by
//! itself, and every issue is merged once the disk takes writes again.
//! Both need root (a tmpfs mount; `chattr +i`, which even root cannot write
//! through).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hydraflow::forge::IssueState;
use hydraflow::forge::local::LocalForge;
use hydraflow::layout::{Layout, Slug};
use hydraflow::store::events::{Event, EventType};
use hydraflow::store::state::StateTracker;

use crate::util::{Project, wait_bounded, wait_for};

/// Two issues, each agent stage slow enough that the fault meets work in flight.
const AGENT: &str = r#"#!/bin/sh
stage="$1"; issue="$2"
cat > /dev/null
sleep 0.5
case "$stage" in
  triage) echo '{"ready": true, "reasons": ["ok"], "issue_type": "feature", "clarity_score": 8, "complexity_score": 2, "needs_discovery": false, "already_addressed": false}' ;;
  plan) printf 'PLAN_START\nWrite file-%s.txt.\nSUMMARY: add it\nPLAN_END\n' "$issue" ;;
  implement)
    echo "content $issue" > "file-$issue.txt"
    git add -A && git diff --cached --quiet || git commit -q -m "implement #$issue" ;;
  review) echo "VERDICT: APPROVE"; echo "SUMMARY: fine" ;;
esac
"#;

/// A project whose data directory is `home/repo` (HYDRAFLOW_HOME=home).
struct Faulty {
    p: Project,
    home: PathBuf,
}

impl Faulty {
    fn new() -> Faulty {
        let p = Project::new(AGENT, "");
        let home = p.fx.tmp.path().join("home");
        std::fs::create_dir_all(&home).expect("home");
        Faulty { p, home }
    }

    fn data(&self) -> PathBuf {
        self.home.join("repo")
    }

    fn hydraflow(&self, args: &[&str]) -> Command {
        let mut cmd = self.p.hydraflow(args);
        cmd.env("HYDRAFLOW_HOME", &self.home);
        cmd
    }

    fn forge(&self) -> LocalForge {
        let layout = Layout {
            slug: Slug::new("repo").expect("slug"),
            data_root: self.home.clone(),
            worktree_base: self.p.fx.layout.worktree_base.clone(),
        };
        LocalForge::open(&layout, self.p.repo()).expect("forge")
    }

    fn add_issues(&self) {
        for n in 1..=2 {
            let out = self
                .hydraflow(&[
                    "issue",
                    "add",
                    "--title",
                    &format!("Add file {n}"),
                    "--body",
                    "please",
                ])
                .output()
                .expect("issue add");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    fn events(&self) -> Vec<Event> {
        std::fs::read_to_string(self.data().join("events.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Start the worker, wait until its first agent runs, apply `fault`
    /// for `length`, undo it with `heal`, and run to the end; then check
    /// the outcome.
    fn run_through(&self, fault: impl FnOnce(&Path), length: Duration, heal: impl FnOnce(&Path)) {
        self.add_issues();
        let worker = self
            .hydraflow(&["run", "--exit-when-idle"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the worker");
        wait_for("the first agent to run", || {
            self.events()
                .iter()
                .any(|e| e.kind == EventType::AgentActivity)
        });
        fault(&self.home);
        let faulted = Instant::now();
        std::thread::sleep(length);
        heal(&self.home);
        println!("fault lasted {:?}", faulted.elapsed());
        let out = wait_bounded(worker);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");

        for n in 1..=2 {
            let issue = self
                .forge()
                .all_issues()
                .expect("issues")
                .into_iter()
                .find(|i| i.number == n)
                .expect("issue");
            assert_eq!(issue.state, IssueState::Closed, "#{n}: {stderr}");
            assert_eq!(issue.labels, vec!["hydraflow-fixed"], "#{n}");
            assert_eq!(
                crate::git_fixture::file_at(&self.p.fx.repo(), "main", &format!("file-{n}.txt"))
                    .as_deref(),
                Some(format!("content {n}\n").as_str())
            );
        }
        let state = StateTracker::read_only(&self.data().join("state.json")).expect("state");
        for (n, r) in &state.issues {
            assert_eq!(r.attempts, 0, "#{n}: no attempt counted ({r:?})");
            assert!(r.hitl().is_none(), "#{n}: not escalated");
        }
        let events = self.events();
        assert!(
            !events.iter().any(|e| e.kind == EventType::HitlEscalation),
            "no escalation"
        );
        assert!(
            stderr.contains("pipeline paused") && stderr.contains("data directory"),
            "the pause and its reason are logged:\n{stderr}"
        );
        assert!(
            stderr.contains("pipeline resumed"),
            "it resumed by itself:\n{stderr}"
        );
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("run");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every directory under `dir`, `dir` first.
fn directories(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        if let Ok(entries) = std::fs::read_dir(&out[i]) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    out.push(e.path());
                }
            }
        }
        i += 1;
    }
    out
}

#[test]
#[ignore = "needs root: mounts a tmpfs for the data directory (run as root with --include-ignored)"]
fn a_full_data_directory_pauses_and_resumes_without_counting_attempts() {
    let f = Faulty::new();
    run(Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16m", "hydraflow-test"])
        .arg(&f.home));
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(f.home.clone());
    let filler = |home: &Path| {
        use std::io::Write as _;
        let mut file = std::fs::File::create(home.join("filler")).expect("filler");
        let block = vec![0u8; 64 * 1024];
        while file.write_all(&block).is_ok() {}
        let _ = file.sync_all();
    };
    f.run_through(filler, Duration::from_secs(10), |home| {
        std::fs::remove_file(home.join("filler")).expect("free the disk")
    });
}

#[test]
#[ignore = "needs root: makes the data directory immutable with chattr +i (run as root with --include-ignored)"]
fn a_read_only_data_directory_pauses_and_resumes_without_counting_attempts() {
    let f = Faulty::new();
    let chattr = |flag: &str, home: &Path| {
        let dirs = directories(home);
        run(Command::new("chattr").arg(flag).args(&dirs));
    };
    struct Thaw(PathBuf);
    impl Drop for Thaw {
        fn drop(&mut self) {
            let _ = Command::new("chattr")
                .arg("-i")
                .args(directories(&self.0))
                .status();
        }
    }
    let _thaw = Thaw(f.home.clone());
    f.run_through(
        |home| chattr("+i", home),
        Duration::from_secs(10),
        |home| chattr("-i", home),
    );
}
