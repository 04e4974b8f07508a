//! CI on the local forge end to end: the implementing agent reports a
//! running check for its commit with `hydraflow check set` as an operator's
//! CI script would, the review stage waits for it, and once the test reports
//! success the pull request is merged.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Stdio;
use std::time::{Duration, Instant};

use hydraflow::forge::IssueState;
use hydraflow::store::events::{Event, EventType};

use crate::util::{Project, wait_bounded, wait_for};

const AGENT: &str = r#"#!/bin/sh
cat > /dev/null
case "$1" in
  triage) echo '{"ready": true, "reasons": []}' ;;
  plan) printf 'PLAN_START\nx\nSUMMARY: x\nPLAN_END\n' ;;
  implement)
    echo "$2" > "f-$2.txt"; git add -A; git commit -qm "work $2"
    "$HF_BIN" check set --config "$HF_CONFIG" --repo "$MAIN_CHECKOUT" "$(git rev-parse HEAD)" ci in_progress > /dev/null ;;
  review) printf 'VERDICT: APPROVE\nSUMMARY: ok\n' ;;
esac
"#;

/// The `ci_check` events written so far (complete lines only).
fn ci_checks(p: &Project) -> Vec<Event> {
    let text = std::fs::read_to_string(p.data().join("events.jsonl")).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<Event>(l).ok())
        .filter(|e| e.kind == EventType::CiCheck)
        .collect()
}

#[test]
fn review_waits_for_a_check_reported_from_the_command_line() {
    let p = Project::new(AGENT, "ci_poll_interval = 1\n");
    let mut config = std::fs::read_to_string(&p.config).unwrap();
    config.push_str(&format!(
        "[agent.env]\nHF_BIN = {:?}\nHF_CONFIG = {:?}\nMAIN_CHECKOUT = {:?}\n",
        env!("CARGO_BIN_EXE_hydraflow"),
        p.config.display().to_string(),
        p.repo().display().to_string()
    ));
    std::fs::write(&p.config, config).unwrap();
    p.add_issue("Add a file", "body");
    let worker = p
        .hydraflow(&["run", "--exit-when-idle"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the worker");

    wait_for("the review to see the running check", || {
        ci_checks(&p).iter().any(|e| e.data["state"] == "pending")
    });
    let sha = ci_checks(&p)[0].data["sha"].as_str().unwrap().to_owned();
    assert_eq!(
        p.issue(1).state,
        IssueState::Open,
        "not merged while CI runs"
    );
    let out = p.run(&["check", "set", &sha, "ci", "success"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = wait_bounded(worker);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(p.issue(1).state, IssueState::Closed);
    assert_eq!(p.main_file("f-1.txt").as_deref(), Some("1\n"));
    let states: Vec<String> = ci_checks(&p)
        .iter()
        .map(|e| e.data["state"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        states.last().map(String::as_str),
        Some("success"),
        "{states:?}"
    );
    assert!(
        states.iter().all(|s| s == "pending" || s == "success"),
        "{states:?}"
    );
}

/// Waiting for CI is a state, not a sleeping task: with one review permit,
/// two pull requests whose CI takes 60 s each both wait at once, and both
/// are merged about 60 s after the first CI started, not 120 s.
#[test]
fn two_slow_ci_runs_wait_side_by_side_with_one_reviewer() {
    const CI: Duration = Duration::from_secs(60);
    let p = Project::new(
        AGENT,
        "ci_poll_interval = 1\nci_check_timeout = 600\n[limits]\nmax_reviewers = 1\n",
    );
    let mut config = std::fs::read_to_string(&p.config).unwrap();
    config.push_str(&format!(
        "[agent.env]\nHF_BIN = {:?}\nHF_CONFIG = {:?}\nMAIN_CHECKOUT = {:?}\n",
        env!("CARGO_BIN_EXE_hydraflow"),
        p.config.display().to_string(),
        p.repo().display().to_string()
    ));
    std::fs::write(&p.config, config).unwrap();
    p.add_issue("Add file 1", "body");
    p.add_issue("Add file 2", "body");
    let worker = p
        .hydraflow(&["run", "--exit-when-idle"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the worker");

    // The CI system: each head's check finishes 60 s after review first saw it running.
    let mut first_seen: BTreeMap<String, Instant> = BTreeMap::new();
    let mut finished: BTreeSet<String> = BTreeSet::new();
    let mut both_waiting = false;
    wait_for("both checks to finish", || {
        for e in ci_checks(&p) {
            if e.data["state"] == "pending" {
                let sha = e.data["sha"].as_str().unwrap().to_owned();
                first_seen.entry(sha).or_insert_with(Instant::now);
            }
        }
        let waiting = first_seen
            .keys()
            .filter(|sha| !finished.contains(*sha))
            .count();
        both_waiting |= waiting == 2;
        for (sha, seen) in &first_seen {
            if seen.elapsed() >= CI && finished.insert(sha.clone()) {
                let out = p.run(&["check", "set", sha, "ci", "success"]);
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        finished.len() == 2
    });
    let out = wait_bounded(worker);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let first_ci = *first_seen.values().min().unwrap();
    let took = first_ci.elapsed();
    println!(
        "two pull requests with 60 s of CI each, one reviewer: both merged {took:?} after the first CI started"
    );
    assert!(
        both_waiting,
        "the second pull request was reviewed while the first one's CI ran"
    );
    for n in 1..=2 {
        assert_eq!(p.issue(n).state, IssueState::Closed, "#{n} merged");
    }
    // Serial waiting would take at least 2 × 60 s.
    assert!(took < 2 * CI - Duration::from_secs(15), "{took:?}");
}
