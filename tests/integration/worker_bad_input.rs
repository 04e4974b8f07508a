//! Bad input for the worker: broken configuration and checkouts are clear
//! errors; failing, hanging and babbling agents, a dirty worktree and a merge
//! conflict become retries or escalations whose cause is recorded on the
//! issue and in `events.jsonl`, while the other issues keep moving.

use hydraflow::forge::IssueState;
use hydraflow::store::events::EventType;

use crate::util::{Project, labels};

const OK_AGENT: &str = r#"#!/bin/sh
cat > /dev/null
case "$1" in
  triage) echo '{"ready": true, "reasons": []}' ;;
  plan) printf 'PLAN_START\nx\nSUMMARY: x\nPLAN_END\n' ;;
  implement) echo "$2" > "f-$2.txt"; git add -A; git commit -qm "work $2" ;;
  review) printf 'VERDICT: APPROVE\nSUMMARY: ok\n' ;;
esac
"#;

fn stderr_of(p: &Project, args: &[&str]) -> String {
    let out = p.run(args);
    assert!(!out.status.success(), "{args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn configuration_and_checkout_errors_are_clear() {
    let p = Project::new(OK_AGENT, "");
    let good = std::fs::read_to_string(&p.config).unwrap();

    std::fs::write(&p.config, format!("{good}\nmax_workers = 2\n")).unwrap();
    let e = stderr_of(&p, &["run", "--exit-when-idle"]);
    assert!(
        e.contains("hydraflow.toml") && e.contains("line") && e.contains("max_workers"),
        "{e}"
    );

    std::fs::write(
        &p.config,
        good.replace("poll_interval = 1", "poll_interval = \"fast\""),
    )
    .unwrap();
    let e = stderr_of(&p, &["config", "check"]);
    assert!(e.contains("line 1") && e.contains("poll_interval"), "{e}");

    std::fs::write(
        &p.config,
        good.replace("preset = \"command\"", "preset = \"gpt-magic\""),
    )
    .unwrap();
    let e = stderr_of(&p, &["run", "--exit-when-idle"]);
    assert!(e.contains("gpt-magic"), "{e}");

    std::fs::write(&p.config, &good).unwrap();
    let ok = p.run(&["config", "check"]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let shown = p.run(&["config", "show"]);
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(
        shown.contains("poll_interval = 1") && shown.contains("hydraflow.toml"),
        "{shown}"
    );
    assert!(
        shown.contains("agent_timeout = 3600") && shown.contains("# default"),
        "{shown}"
    );

    // A directory that is not a git repository, and one that does not exist.
    let plain = p.fx.tmp.path().join("plain");
    std::fs::create_dir(&plain).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hydraflow"))
        .args(["run", "--exit-when-idle", "--config"])
        .arg(&p.config)
        .arg("--repo")
        .arg(&plain)
        .env_remove("HYDRAFLOW_HOME")
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(e.contains("is not a git repository"), "{e}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hydraflow"))
        .args(["run", "--repo", "/does/not/exist", "--config"])
        .arg(&p.config)
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(e.contains("does not exist"), "{e}");
}

/// Issue 1's implementation always fails, issue 2's triage babbles, issue
/// 3's agent leaves its work uncommitted, issue 4's change conflicts with a
/// commit made on main meanwhile, issue 5 is ordinary.
const MIXED_AGENT: &str = r#"#!/bin/sh
stage="$1"; issue="$2"
cat > /dev/null
case "$stage" in
  triage)
    if [ "$issue" = 2 ]; then echo "I think this is fine? {not json"; exit 0; fi
    echo '{"ready": true, "reasons": []}' ;;
  plan) printf 'PLAN_START\nx\nSUMMARY: x\nPLAN_END\n' ;;
  implement)
    case "$issue" in
      1) echo "compiler exploded" >&2; exit 7 ;;
      3) echo "left for you" > dirty.txt ;;
      4) echo "branch version" > README.md; git add -A; git commit -qm "change README"
         cd "$MAIN_CHECKOUT" && echo "main version" > README.md && git commit -qam "concurrent change on main" ;;
      *) echo "$issue" > "f-$issue.txt"; git add -A; git commit -qm "work $issue" ;;
    esac ;;
  review) printf 'VERDICT: APPROVE\nSUMMARY: ok\n' ;;
esac
"#;

#[test]
fn failing_agents_dirty_worktrees_and_conflicts() {
    let p = Project::new(
        MIXED_AGENT,
        "max_issue_attempts = 2\n[escalation]\nmerge_conflict_fixes = 1\n",
    );
    let mut config = std::fs::read_to_string(&p.config).unwrap();
    config.push_str(&format!(
        "[agent.env]\nMAIN_CHECKOUT = {:?}\n",
        p.repo().display().to_string()
    ));
    std::fs::write(&p.config, config).unwrap();
    for n in 1..=5 {
        p.add_issue(&format!("Issue {n}"), "body");
    }
    p.run_until_idle();

    let state = p.state();
    let cause = |n: u64| {
        state.issues[&n]
            .hitl()
            .unwrap_or_else(|| panic!("#{n} escalated: {:?}", state.issues[&n]))
            .cause
            .clone()
    };
    assert!(
        cause(1).contains("exited with code 7") && cause(1).contains("compiler exploded"),
        "{}",
        cause(1)
    );
    assert!(
        cause(2).contains("triage answer is not valid"),
        "{}",
        cause(2)
    );
    assert!(cause(4).contains("conflict"), "{}", cause(4));
    for n in [1, 2, 4] {
        assert_eq!(labels(&p.issue(n)), vec!["hydraflow-hitl"], "#{n}");
        let detail = p.forge().issue_detail(n).unwrap();
        assert!(
            detail.comments.iter().any(|c| c.body.contains("escalated")),
            "#{n}"
        );
    }
    assert_eq!(state.issues[&1].hitl().unwrap().origin, "hydraflow-ready");
    assert_eq!(state.issues[&2].hitl().unwrap().origin, "hydraflow-find");
    assert_eq!(state.issues[&4].hitl().unwrap().origin, "hydraflow-review");

    // The others kept moving: the dirty worktree was salvaged and merged.
    for n in [3, 5] {
        assert_eq!(p.issue(n).state, IssueState::Closed, "#{n}");
    }
    assert_eq!(p.main_file("dirty.txt").as_deref(), Some("left for you\n"));
    assert_eq!(p.main_file("f-5.txt").as_deref(), Some("5\n"));
    // The conflicting change did not land.
    assert_eq!(p.main_file("README.md").as_deref(), Some("main version\n"));

    let events = p.events();
    let escalated: Vec<u64> = events
        .iter()
        .filter(|e| e.kind == EventType::HitlEscalation)
        .filter_map(|e| e.data["issue"].as_u64())
        .collect();
    assert_eq!(escalated.len(), 3, "{escalated:?}");
    for n in [1, 2, 4] {
        assert!(escalated.contains(&n));
    }
    assert!(events.iter().any(|e| {
        e.kind == EventType::Error
            && e.data["issue"] == 1
            && e.data["message"]
                .as_str()
                .unwrap_or("")
                .contains("exited with code 7")
    }));
}

#[test]
fn a_hanging_agent_is_killed_and_escalated() {
    let agent = r#"#!/bin/sh
cat > /dev/null
case "$1" in
  triage) sleep 300 & sleep 300 ;;
esac
"#;
    let p = Project::new(agent, "agent_timeout = 1\nmax_issue_attempts = 1\n");
    p.add_issue("Hang", "forever");
    p.run_until_idle();
    let state = p.state();
    let hitl = state.issues[&1].hitl().expect("escalated");
    assert!(hitl.cause.contains("timed out"), "{}", hitl.cause);
    assert_eq!(labels(&p.issue(1)), vec!["hydraflow-hitl"]);
}
