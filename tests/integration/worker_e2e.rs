//! End to end through the binary: five local issues, scripted stage agents,
//! one issue already satisfied, one escalated to HITL and corrected, three
//! merged; and a worker killed mid-implement that resumes without a second
//! pull request.

use std::collections::BTreeMap;

use hydraflow::forge::{IssueState, PullRequestState};
use hydraflow::store::events::EventType;
use hydraflow::store::sessions::SessionStatus;

use crate::util::{Project, labels, wait_bounded, wait_for};

/// The stage agent of the five-issue scenario. Issue 4 is already satisfied;
/// issue 5's first implementation commits nothing (escalated), and the HITL
/// run must see the human's correction.
const AGENT: &str = r#"#!/bin/sh
stage="$1"; issue="$2"
prompt=$(cat)
case "$stage" in
  triage)
    echo "thinking about #$issue"
    echo '{"ready": true, "reasons": ["clear enough"], "issue_type": "feature", "clarity_score": 8, "complexity_score": 2, "needs_discovery": false, "already_addressed": false}'
    ;;
  plan)
    if [ "$issue" = 4 ]; then
      printf 'ALREADY_SATISFIED_START\nREADME.md already says hello.\nALREADY_SATISFIED_END\n'
    else
      printf 'PLAN_START\nWrite file-%s.txt.\nSUMMARY: add file-%s.txt\nPLAN_END\n' "$issue" "$issue"
    fi
    ;;
  implement)
    if [ "$issue" = 5 ]; then echo "I am not sure what to do"; exit 0; fi
    echo "content for $issue" > "file-$issue.txt"
    git add -A && git commit -q -m "implement #$issue"
    ;;
  hitl)
    case "$prompt" in *"use upper case"*) ;; *) echo "correction missing from the prompt" >&2; exit 9;; esac
    echo "CONTENT FOR $issue" > "file-$issue.txt"
    git add -A && git commit -q -m "apply correction to #$issue"
    ;;
  review)
    echo "VERDICT: APPROVE"
    echo "SUMMARY: looks right"
    ;;
esac
"#;

#[test]
fn five_issues_through_the_pipeline() {
    let p = Project::new(AGENT, "");
    for n in 1..=5 {
        let title = if n == 4 {
            "Say hello in the README".to_owned()
        } else {
            format!("Add file {n}")
        };
        p.add_issue(&title, &format!("Please add file-{n}.txt"));
    }

    let first = p.run_until_idle();
    let stderr = String::from_utf8_lossy(&first.stderr);
    assert!(
        stderr.contains("transcripts:"),
        "run prints where the data is:\n{stderr}"
    );

    // Issues 1-3 merged, 4 closed as satisfied, 5 waiting for a human.
    for n in [1, 2, 3] {
        let issue = p.issue(n);
        assert_eq!(issue.state, IssueState::Closed, "#{n}");
        assert_eq!(labels(&issue), vec!["hydraflow-fixed"], "#{n}");
        assert_eq!(
            p.main_file(&format!("file-{n}.txt")).as_deref(),
            Some(&*format!("content for {n}\n"))
        );
    }
    let four = p.issue(4);
    assert_eq!(four.state, IssueState::Closed);
    assert_eq!(labels(&four), vec!["hydraflow-fixed"]);
    let five = p.issue(5);
    assert_eq!(five.state, IssueState::Open);
    assert_eq!(labels(&five), vec!["hydraflow-hitl"]);
    let detail = p.forge().issue_detail(5).expect("issue 5");
    assert!(
        detail.comments.iter().any(|c| c.body.contains("no diff")),
        "the escalation cause is on the issue: {:?}",
        detail.comments
    );
    let state = p.state();
    let hitl = state.issues[&5].hitl().expect("hitl record");
    assert_eq!(hitl.origin, "hydraflow-ready");
    assert!(hitl.cause.contains("no diff"), "{}", hitl.cause);

    let listed = p.run(&["hitl", "list"]);
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed.contains("#5") && listed.contains("no diff"),
        "{listed}"
    );

    // A correction for an issue that is not waiting is refused.
    let refused = p.run(&["hitl", "correct", "2", "nothing to do"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("is not waiting for a human"));

    let correct = p.run(&["hitl", "correct", "5", "use upper case"]);
    assert!(
        correct.status.success(),
        "{}",
        String::from_utf8_lossy(&correct.stderr)
    );
    // The correction is persisted as a spool file until a worker applies it.
    assert_eq!(
        std::fs::read_dir(p.data().join("spool"))
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().is_file())
            .count(),
        1
    );

    p.run_until_idle();
    let five = p.issue(5);
    assert_eq!(five.state, IssueState::Closed);
    assert_eq!(labels(&five), vec!["hydraflow-fixed"]);
    assert_eq!(
        p.main_file("file-5.txt").as_deref(),
        Some("CONTENT FOR 5\n")
    );

    // Exactly one squash commit per merged issue on main.
    let subjects = p.main_subjects();
    for n in [1, 2, 3, 5] {
        let count = subjects
            .iter()
            .filter(|s| s.starts_with(&format!("Fixes #{n}:")))
            .count();
        assert_eq!(count, 1, "#{n} in {subjects:?}");
    }
    assert_eq!(subjects.len(), 5, "{subjects:?}");

    // One pull request per merged issue, all merged.
    let pulls = p.pulls();
    assert_eq!(pulls.len(), 4, "{pulls:?}");
    assert!(pulls.iter().all(|pr| pr.state == PullRequestState::Merged));

    // events.jsonl: the record shape and the story.
    let events = p.events();
    let mut ids: Vec<u64> = events.iter().map(|e| e.id).collect();
    ids.dedup();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "ids increase across sessions"
    );
    assert!(
        events
            .iter()
            .all(|e| e.repo == "repo" && e.data.is_object())
    );
    let count = |kind: EventType| events.iter().filter(|e| e.kind == kind).count();
    assert_eq!(count(EventType::SessionStart), 2);
    assert_eq!(count(EventType::SessionEnd), 2);
    assert_eq!(count(EventType::PrCreated), 4);
    assert_eq!(count(EventType::HitlEscalation), 1);
    assert!(count(EventType::TranscriptLine) > 0);
    let merged: Vec<u64> = events
        .iter()
        .filter(|e| e.kind == EventType::MergeUpdate && e.data["status"] == "merged")
        .filter_map(|e| e.data["issue"].as_u64())
        .collect();
    assert_eq!(merged, vec![1, 2, 3, 5]);
    let escalation = events
        .iter()
        .find(|e| e.kind == EventType::HitlEscalation)
        .unwrap();
    assert_eq!(escalation.data["issue"], 5);
    assert!(
        escalation.data["cause"]
            .as_str()
            .unwrap()
            .contains("no diff")
    );

    // sessions.jsonl: two completed sessions with their counts.
    let sessions =
        hydraflow::store::sessions::SessionLog::read_all(&p.data().join("sessions.jsonl")).unwrap();
    assert_eq!(sessions.len(), 2);
    assert!(
        sessions
            .iter()
            .all(|s| s.status == SessionStatus::Completed && s.ended_at.is_some())
    );
    assert_eq!(
        (sessions[0].issues_succeeded, sessions[0].issues_failed),
        (4, 1)
    );
    assert_eq!(sessions[1].issues_succeeded, 1);

    // Worktrees and agent branches are gone; transcripts were saved.
    let wt = p.fx.layout.worktree_base.join("repo");
    let left: Vec<_> = std::fs::read_dir(&wt)
        .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "worktrees left: {left:?}");
    let repo = p.fx.repo();
    let agent_branches: Vec<String> = repo
        .branches(Some(git2::BranchType::Local))
        .unwrap()
        .filter_map(|b| b.ok()?.0.name().ok().flatten().map(str::to_owned))
        .filter(|n| n.starts_with("agent/"))
        .collect();
    assert!(agent_branches.is_empty(), "{agent_branches:?}");
    for file in [
        "triage-issue-1.txt",
        "plan-issue-1.txt",
        "issue-1.txt",
        "review-pr-1.txt",
        "hitl-issue-5.txt",
    ] {
        assert!(p.data().join("logs").join(file).exists(), "{file}");
    }
    assert!(p.data().join("plans/issue-1.md").exists());
    let state = p.state();
    let outcomes: BTreeMap<u64, String> = state
        .issues
        .iter()
        .map(|(n, r)| (*n, format!("{:?}", r.outcome())))
        .collect();
    assert_eq!(outcomes[&4], "Some(AlreadySatisfied)");
    assert_eq!(outcomes[&5], "Some(Merged)");
    assert!(
        state
            .issues
            .values()
            .all(|r| !r.is_held() && r.hitl().is_none())
    );
}

/// The implement agent commits, leaves a marker with its pid, and hangs the
/// first time; later runs finish at once.
const CRASH_AGENT: &str = r#"#!/bin/sh
stage="$1"; issue="$2"
cat > /dev/null
marker="$HYDRAFLOW_TEST_DIR/implement-started"
case "$stage" in
  triage) echo '{"ready": true, "reasons": [], "already_addressed": false}' ;;
  plan) printf 'PLAN_START\nwork\nSUMMARY: work\nPLAN_END\n' ;;
  implement)
    if [ ! -e "$marker" ]; then
      echo first > first.txt
      git add -A && git commit -q -m "first half"
      echo half-done > uncommitted.txt
      echo $$ > "$marker"
      sleep 60
    fi
    echo second > second.txt
    git add -A && git commit -q -m "second half"
    ;;
  review) printf 'VERDICT: APPROVE\nSUMMARY: ok\n' ;;
esac
"#;

/// A project with [`CRASH_AGENT`] and one issue, and a worker started on it
/// and caught with its implement agent hanging: (project, worker, marker file
/// holding the agent's pid).
fn worker_hanging_in_implement() -> (Project, std::process::Child, std::path::PathBuf) {
    let p = Project::new(CRASH_AGENT, "");
    let dir = p.fx.tmp.path().to_owned();
    // The agent environment comes from the config, so the marker dir goes there.
    let mut config = std::fs::read_to_string(&p.config).unwrap();
    config.push_str(&format!(
        "[agent.env]\nHYDRAFLOW_TEST_DIR = {:?}\n",
        dir.display().to_string()
    ));
    std::fs::write(&p.config, config).unwrap();
    p.add_issue("Do the work", "two halves");

    let child = p
        .hydraflow(&["run"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let marker = dir.join("implement-started");
    wait_for("the implement agent to start", || {
        marker.exists() && !std::fs::read_to_string(&marker).unwrap().trim().is_empty()
    });
    (p, child, marker)
}

#[test]
fn sigkill_mid_implement_resumes_exactly_once() {
    let (p, child, marker) = worker_hanging_in_implement();
    let worker_pid = child.id() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(worker_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let out = wait_bounded(child);
    assert!(!out.status.success(), "killed");
    // The agent's process group dies with the worker (parent-death signal); make sure.
    let agent_pid: i32 = std::fs::read_to_string(&marker)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    wait_for("the orphaned agent to die", || {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(agent_pid), None).is_err()
    });
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(agent_pid),
        nix::sys::signal::Signal::SIGKILL,
    );

    // state.json is valid after the kill and remembers the claim.
    let state = p.state();
    assert!(state.issues[&1].is_claimed());

    p.run_until_idle();
    let issue = p.issue(1);
    assert_eq!(issue.state, IssueState::Closed);
    assert_eq!(labels(&issue), vec!["hydraflow-fixed"]);
    assert_eq!(p.pulls().len(), 1, "one pull request, not two");
    let subjects = p.main_subjects();
    assert_eq!(
        subjects
            .iter()
            .filter(|s| s.starts_with("Fixes #1:"))
            .count(),
        1,
        "{subjects:?}"
    );
    // No commit was lost: the first half, the uncommitted file and the second half all landed.
    assert_eq!(p.main_file("first.txt").as_deref(), Some("first\n"));
    assert_eq!(
        p.main_file("uncommitted.txt").as_deref(),
        Some("half-done\n")
    );
    assert_eq!(p.main_file("second.txt").as_deref(), Some("second\n"));
}

/// SIGTERM mid-implement: the worker checkpoints the issue and exits well
/// within 10 s; the next start resumes it.
#[test]
fn sigterm_checkpoints_and_resumes() {
    let (p, child, marker) = worker_hanging_in_implement();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let out = wait_bounded(child);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let state = p.state();
    assert_eq!(
        state.issues[&1].phase,
        hydraflow::store::state::Phase::Claimed {
            stage: hydraflow::agent::Stage::Implement
        }
    );
    // The agent was stopped with its process group.
    let agent_pid: i32 = std::fs::read_to_string(&marker)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    wait_for("the agent to be gone", || {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(agent_pid), None).is_err()
    });

    p.run_until_idle();
    assert_eq!(p.issue(1).state, IssueState::Closed);
    assert_eq!(p.pulls().len(), 1);
    assert_eq!(
        p.main_file("uncommitted.txt").as_deref(),
        Some("half-done\n")
    );
}

/// The repository's quality command: its first run fails (one attempt, the
/// implementation runs again), the second passes and the issue merges. It
/// runs with the base environment only (no secret of the worker's leaks in),
/// and a process it leaves in the background is killed with its group.
#[test]
fn the_quality_command_gates_the_pull_request_and_is_contained() {
    let agent = r#"#!/bin/sh
cat > /dev/null
case "$1" in
  triage) echo '{"ready": true, "reasons": []}' ;;
  plan) printf 'PLAN_START\nx\nSUMMARY: x\nPLAN_END\n' ;;
  implement) echo "$2" > "f-$2.txt"; git add -A; git diff --cached --quiet || git commit -qm "work $2" ;;
  review) printf 'VERDICT: APPROVE\nSUMMARY: ok\n' ;;
esac
"#;
    let marks = tempfile::tempdir().expect("marks");
    let dir = marks.path().display().to_string();
    let quality = format!(
        "env > {dir}/env; sleep 300 & echo $! > {dir}/sleeper; \
         if [ -e {dir}/second ]; then test -f f-1.txt; else touch {dir}/second; echo 'lint: 1 problem' >&2; exit 1; fi"
    );
    let p = Project::new(agent, &format!("quality_command = {quality:?}\n"));
    p.add_issue("Add a file", "please");
    let out = p
        .hydraflow(&["run", "--exit-when-idle"])
        .env("SECRET_TOKEN", "do-not-leak")
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(p.issue(1).state, IssueState::Closed);
    assert_eq!(p.main_file("f-1.txt").as_deref(), Some("1\n"));
    let state = p.state();
    assert_eq!(
        state.issues[&1].attempts, 1,
        "the failed run counted one attempt"
    );
    let errors: Vec<String> = p
        .events()
        .into_iter()
        .filter(|e| e.kind == EventType::Error)
        .map(|e| e.data["message"].as_str().unwrap_or("").to_owned())
        .collect();
    assert!(
        errors.iter().any(|m| m.contains("lint: 1 problem")),
        "the command's own output is the cause: {errors:?}"
    );
    let env = std::fs::read_to_string(marks.path().join("env")).expect("env");
    assert!(env.contains("PATH="), "{env}");
    assert!(
        !env.contains("SECRET_TOKEN"),
        "the worker's secrets stay out: {env}"
    );
    let sleeper: i32 = std::fs::read_to_string(marks.path().join("sleeper"))
        .expect("sleeper")
        .trim()
        .parse()
        .expect("pid");
    wait_for("the background sleeper to be killed", || {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(sleeper), None).is_err()
    });
}
