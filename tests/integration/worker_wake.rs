//! The local forge wakes an idle worker: an issue filed while `hydraflow
//! run` waits (with a five-minute `data_poll_interval`) is picked up at once,
//! because the worker watches the forge's `issues/` directory.

use std::process::Stdio;
use std::time::{Duration, Instant};

use hydraflow::store::events::{Event, EventType};

use crate::util::{Project, wait_for};

const AGENT: &str = r#"#!/bin/sh
cat > /dev/null
case "$1" in
  triage) echo '{"ready": false, "reasons": ["say more"]}' ;;
esac
"#;

fn events(p: &Project) -> Vec<Event> {
    std::fs::read_to_string(p.data().join("events.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[test]
fn an_issue_filed_while_idle_is_triaged_within_two_seconds() {
    let p = Project::new(AGENT, "");
    let config = std::fs::read_to_string(&p.config)
        .unwrap()
        .replace("data_poll_interval = 2", "data_poll_interval = 300")
        .replace("poll_interval = 1", "poll_interval = 30");
    std::fs::write(&p.config, config).unwrap();
    let mut worker = p
        .hydraflow(&["run"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the worker");
    // Idle: the first poll is done and found nothing.
    wait_for("the first poll", || {
        events(&p).iter().any(|e| e.kind == EventType::QueueUpdate)
    });
    std::thread::sleep(Duration::from_millis(500));
    let filed = Instant::now();
    p.add_issue("Add a file", "please");
    wait_for("triage to start", || {
        events(&p).iter().any(|e| {
            e.kind == EventType::WorkerUpdate
                && e.data["status"] == "started"
                && e.data["stage"] == "triage"
        })
    });
    let took = filed.elapsed();
    let _ = worker.kill();
    let _ = worker.wait();
    println!("triage started {took:?} after the issue was filed");
    assert!(took <= Duration::from_secs(2), "{took:?}");
}
