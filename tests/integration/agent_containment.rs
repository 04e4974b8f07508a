//! Containment of agent calls through the `hydraflow` binary: a missing
//! agent program pauses the worker (and `config check` names it); an agent
//! that forks a `setsid` grandchild leaves nothing behind when the worker is
//! SIGKILLed — under the child subreaper off systemd, and in the call's own
//! cgroup when one is delegated (here a scratch cgroup marked with
//! `trusted.delegate`, as systemd marks a `Delegate=yes` unit's; needs root
//! and a writable cgroup v2 tree, else the test says why it skips). The
//! container test (`system_deb.rs`) does the same under the real systemd.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::util::{Project, wait_for};

/// Every stage answers at once, except implement, which starts a `setsid`
/// grandchild, writes both pids and hangs.
const SETSID_AGENT: &str = r#"#!/bin/sh
cat > /dev/null
case "$1" in
  triage) echo '{"ready": true, "reasons": []}' ;;
  plan) printf 'PLAN_START\nx\nSUMMARY: x\nPLAN_END\n' ;;
  implement)
    setsid sh -c 'echo $$ > "$HYDRAFLOW_TEST_DIR/grandchild.pid"; exec sleep 600' &
    echo $$ > "$HYDRAFLOW_TEST_DIR/agent.pid"
    sleep 600 ;;
  review) printf 'VERDICT: APPROVE\nSUMMARY: ok\n' ;;
esac
"#;

/// Whether `pid` is gone (or a zombie).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|state| state == 'Z' || state == 'X'),
    }
}

fn read_pid(path: &Path) -> u32 {
    let mut pid = 0;
    wait_for(&format!("a pid in {}", path.display()), || {
        pid = std::fs::read_to_string(path)
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0);
        pid != 0
    });
    pid
}

fn setsid_project() -> (Project, PathBuf) {
    let dir = tempfile::tempdir().expect("marker dir").keep();
    let p = Project::new(
        SETSID_AGENT,
        &format!(
            "[agent.env]\nHYDRAFLOW_TEST_DIR = {:?}\n",
            dir.display().to_string()
        ),
    );
    p.add_issue("Hang", "The agent hangs with a setsid grandchild.");
    (p, dir)
}

/// SIGKILL the worker while the agent and its setsid grandchild run; both must go.
fn kill_worker_and_check(mut worker: Child, dir: &Path) {
    let agent = read_pid(&dir.join("agent.pid"));
    let grandchild = read_pid(&dir.join("grandchild.pid"));
    assert!(!gone(agent) && !gone(grandchild));
    worker.kill().expect("SIGKILL the worker");
    let _ = worker.wait();
    wait_for("the agent and its setsid grandchild to be gone", || {
        gone(agent) && gone(grandchild)
    });
}

#[test]
fn setsid_grandchild_dies_with_the_worker_off_systemd() {
    let (p, dir) = setsid_project();
    let worker = p
        .hydraflow(&["run"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the worker");
    kill_worker_and_check(worker, &dir);
    let log = std::fs::read_to_string(p.data().join("logs/hydraflow.log")).unwrap_or_default();
    assert!(
        log.contains("subreaper mode") || log.contains("cgroup mode"),
        "{log}"
    );
}

#[test]
fn a_missing_agent_program_fails_config_check_and_pauses() {
    let p = Project::new("", "");
    let config = std::fs::read_to_string(&p.config).expect("config");
    // The claude preset, with a PATH where no claude is.
    let empty = p.fx.tmp.path().join("empty-bin");
    std::fs::create_dir_all(&empty).expect("dir");
    let config = config.replace(
        "[agent]\npreset = \"command\"",
        &format!(
            "max_issue_attempts = 1\n[agent]\npreset = \"claude\"\nenv = {{ PATH = {:?} }}",
            empty.display().to_string()
        ),
    );
    std::fs::write(&p.config, config).expect("write config");
    let out = p.run(&["config", "check"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "config check passed");
    assert!(
        err.contains("agent program \"claude\" not found on the agents' PATH"),
        "{err}"
    );
    p.add_issue("Anything", "Needs an agent.");
    let mut worker = p
        .hydraflow(&["run"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the worker");
    let paused = || {
        std::fs::read_to_string(p.data().join("events.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("\"paused\""))
            .count()
    };
    // Paused (the probe is a minute away): never an attempt, never an escalation.
    wait_for("a pause for the missing program", || paused() >= 1);
    std::thread::sleep(std::time::Duration::from_secs(2));
    let _ = worker.kill();
    let _ = worker.wait();
    let events = std::fs::read_to_string(p.data().join("events.jsonl")).expect("events");
    assert!(
        events.contains("agent program \\\"claude\\\" cannot be run"),
        "{events}"
    );
    assert!(!events.contains("hitl_escalation"), "{events}");
    assert_eq!(p.state().issues.get(&1).map_or(0, |r| r.attempts), 0);
}

/// A scratch cgroup v2 directory marked delegated, removed (with what is
/// left in it) on drop.
struct ScratchCgroup(PathBuf);

impl ScratchCgroup {
    /// A new delegated directory under this host's cgroup v2 tree; fails saying what is
    /// missing (root, a cgroup v2 tree, `trusted.delegate`): a test asked to run never skips.
    fn make() -> ScratchCgroup {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test makes a delegated cgroup and must run as root"
        );
        let base = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
            .iter()
            .map(PathBuf::from)
            .find(|b| b.join("cgroup.procs").exists() && b.join("cgroup.subtree_control").exists())
            .expect("no cgroup v2 tree is mounted at /sys/fs/cgroup: this test needs one");
        let dir = base.join(format!("hydraflow-test-delegated-{}", std::process::id()));
        std::fs::create_dir(&dir)
            .unwrap_or_else(|e| panic!("cannot create the cgroup {}: {e}", dir.display()));
        let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).expect("path");
        // SAFETY: NUL-terminated strings and a one-byte value that outlive the call.
        let set = unsafe {
            nix::libc::setxattr(
                path.as_ptr(),
                c"trusted.delegate".as_ptr(),
                b"1".as_ptr().cast(),
                1,
                0,
            )
        };
        if set != 0 {
            let err = std::io::Error::last_os_error();
            let _ = std::fs::remove_dir(&dir);
            panic!("cannot set trusted.delegate on {}: {err}", dir.display());
        }
        ScratchCgroup(dir)
    }
}

impl Drop for ScratchCgroup {
    fn drop(&mut self) {
        fn remove(dir: &Path) {
            let _ = std::fs::write(dir.join("cgroup.kill"), "1");
            if let Ok(entries) = std::fs::read_dir(dir) {
                for e in entries.flatten() {
                    if e.path().is_dir() {
                        remove(&e.path());
                    }
                }
            }
            for _ in 0..100 {
                if std::fs::remove_dir(dir).is_ok() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        remove(&self.0);
    }
}

#[test]
#[ignore = "needs root and a cgroup v2 tree it can delegate: run as root with cargo test -- --include-ignored (.ci/run does)"]
fn setsid_grandchild_dies_with_the_worker_in_a_delegated_cgroup() {
    let cg = ScratchCgroup::make();
    let (p, dir) = setsid_project();
    let config = std::fs::read_to_string(&p.config).expect("config");
    std::fs::write(
        &p.config,
        config.replace(
            "[agent]\n",
            "[agent]\nmemory_max = 536870912\ntasks_max = 256\n",
        ),
    )
    .expect("config");
    let cmd = p.hydraflow(&["run"]);
    let program = cmd.get_program().to_owned();
    let args: Vec<_> = cmd.get_args().map(ToOwned::to_owned).collect();
    // The worker starts inside the delegated cgroup, as systemd would start it.
    let mut sh = Command::new("sh");
    sh.arg("-c")
        .arg(format!(
            "echo $$ > '{}/cgroup.procs' && exec \"$0\" \"$@\"",
            cg.0.display()
        ))
        .arg(program)
        .args(args)
        .current_dir(p.fx.tmp.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => sh.env(k, v),
            None => sh.env_remove(k),
        };
    }
    let worker = sh.spawn().expect("spawn the worker in the cgroup");
    let grandchild = read_pid(&dir.join("grandchild.pid"));
    let call = cg.0.join("agent-1-implement");
    let procs = std::fs::read_to_string(call.join("cgroup.procs")).expect("the call's cgroup");
    assert!(
        procs.lines().any(|l| l.trim() == grandchild.to_string()),
        "the setsid grandchild {grandchild} is not in {}: {procs}",
        call.display()
    );
    let worker_procs = std::fs::read_to_string(cg.0.join("worker/cgroup.procs")).expect("worker/");
    assert!(
        worker_procs
            .lines()
            .any(|l| l.trim() == worker.id().to_string()),
        "the worker is not in worker/: {worker_procs}"
    );
    let controllers = std::fs::read_to_string(cg.0.join("cgroup.controllers")).unwrap_or_default();
    if controllers.split_whitespace().any(|c| c == "memory") {
        assert_eq!(
            std::fs::read_to_string(call.join("memory.max"))
                .expect("memory.max")
                .trim(),
            "536870912"
        );
    }
    kill_worker_and_check(worker, &dir);
    let log = std::fs::read_to_string(p.data().join("logs/hydraflow.log")).unwrap_or_default();
    assert!(log.contains("cgroup mode"), "{log}");
    if !controllers.split_whitespace().any(|c| c == "memory") {
        // Said at start: which limit is not applied, and why.
        assert!(
            log.contains("agent.memory_max = 536870912 is not applied: the memory controller is not available"),
            "{log}"
        );
    }
}

/// Today's cost already past `agent.daily_budget_usd`: the worker pauses
/// with the budget as the reason and runs no agent. (That the pause ends at
/// the next UTC midnight is checked with an injected clock in
/// `store::sessions`.)
#[test]
fn a_spent_daily_budget_pauses_the_pipeline() {
    let dir = tempfile::tempdir().expect("marker dir");
    let marker = dir.path().join("ran");
    let p = Project::new(
        &format!(
            "#!/bin/sh\ntouch {:?}\necho '{{\"ready\": true}}'\n",
            marker.display().to_string()
        ),
        "",
    );
    let config = std::fs::read_to_string(&p.config).expect("config");
    std::fs::write(
        &p.config,
        config.replace("[agent]\n", "[agent]\ndaily_budget_usd = 0.5\n"),
    )
    .expect("config");
    p.add_issue("Anything", "Costs money.");
    let now = chrono::Utc::now();
    let spent = serde_json::json!({
        "at": now.to_rfc3339(), "day": now.format("%Y-%m-%d").to_string(), "issue": 7,
        "stage": "implement", "program": "claude", "outcome": "success", "cost_usd": 0.75
    });
    std::fs::create_dir_all(p.data()).expect("data dir");
    std::fs::write(p.data().join("agent-calls.jsonl"), format!("{spent}\n")).expect("ledger");
    let mut worker = p
        .hydraflow(&["run"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the worker");
    wait_for("a pause for the daily budget", || {
        std::fs::read_to_string(p.data().join("events.jsonl"))
            .unwrap_or_default()
            .contains("agent.daily_budget_usd (0.50 USD) is spent for today")
    });
    let _ = worker.kill();
    let _ = worker.wait();
    assert!(
        !marker.exists(),
        "an agent ran although the budget was spent"
    );
}

/// Where the memory controller is delegated, an agent that allocates past
/// `agent.memory_max` is killed by the kernel and the attempt's recorded
/// cause says so. On a host without it (this project's CI mounts its
/// controllers on cgroup v1, the "hybrid" layout) it checks instead that the
/// worker says at start it cannot apply the limit, and why; what the worker
/// writes to the files is unit-tested in `agent::contain`.
#[test]
#[ignore = "needs root and a cgroup v2 tree it can delegate: run as root with cargo test -- --include-ignored (.ci/run does)"]
fn an_agent_past_memory_max_is_killed_by_the_kernel() {
    let cg = ScratchCgroup::make();
    let parent = cg.0.parent().expect("parent").to_path_buf();
    let _ = std::fs::write(parent.join("cgroup.subtree_control"), "+memory");
    let controllers = std::fs::read_to_string(cg.0.join("cgroup.controllers")).unwrap_or_default();
    let memory = controllers.split_whitespace().any(|c| c == "memory");
    if !memory {
        println!(
            "the memory controller is not available in {} (cgroup.controllers: {:?}): checking that the worker says it cannot apply agent.memory_max, and why",
            cg.0.display(),
            controllers.trim()
        );
    }
    let agent = r#"#!/bin/sh
cat > /dev/null
case "$1" in
  triage) echo '{"ready": true, "reasons": []}' ;;
  plan) printf 'PLAN_START\nx\nSUMMARY: x\nPLAN_END\n' ;;
  implement) x=$(head -c 400000000 /dev/zero | tr '\0' a); echo "${#x}" ;;
esac
"#;
    let p = Project::new(agent, "max_issue_attempts = 1");
    let config = std::fs::read_to_string(&p.config).expect("config");
    std::fs::write(
        &p.config,
        config.replace("[agent]\n", "[agent]\nmemory_max = 67108864\n"),
    )
    .expect("config");
    p.add_issue("Allocate", "Too much memory.");
    let cmd = p.hydraflow(&["run"]);
    let mut sh = Command::new("sh");
    sh.arg("-c")
        .arg(format!(
            "echo $$ > '{}/cgroup.procs' && exec \"$0\" \"$@\"",
            cg.0.display()
        ))
        .arg(cmd.get_program())
        .args(cmd.get_args())
        .current_dir(p.fx.tmp.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => sh.env(k, v),
            None => sh.env_remove(k),
        };
    }
    let mut worker = sh.spawn().expect("spawn the worker in the cgroup");
    if !memory {
        wait_for("the worker to say it cannot apply the memory limit", || {
            std::fs::read_to_string(p.data().join("logs/hydraflow.log"))
                .unwrap_or_default()
                .contains("agent.memory_max = 67108864 is not applied: the memory controller is not available")
        });
        let _ = worker.kill();
        let _ = worker.wait();
        return;
    }
    wait_for("the OOM kill recorded as the cause", || {
        std::fs::read_to_string(p.data().join("events.jsonl"))
            .unwrap_or_default()
            .contains("the agent was killed by the kernel: its cgroup went past agent.memory_max (67108864 bytes)")
    });
    let _ = worker.kill();
    let _ = worker.wait();
}

/// `cgroup.kill` ends a whole call's cgroup at once — a process and the
/// `setsid` grandchild it started — and the cgroup is removed (what a call's
/// end, timeout or drop does in cgroup mode; `cgroup.kill` works in any
/// cgroup v2 hierarchy, the controller-less hybrid one included).
#[test]
#[ignore = "needs root and a cgroup v2 tree it can delegate: run as root with cargo test -- --include-ignored (.ci/run does)"]
fn cgroup_kill_ends_a_call_whole() {
    let cg = ScratchCgroup::make();
    let call = cg.0.join("agent-9-implement");
    std::fs::create_dir(&call).expect("the call's cgroup");
    let dir = tempfile::tempdir().expect("dir");
    let script = format!(
        "echo $$ > '{}/cgroup.procs' || exit 1; setsid sh -c 'echo $$ > {gc}; exec sleep 600' & echo $$ > {me}; exec sleep 600",
        call.display(),
        gc = dir.path().join("gc.pid").display(),
        me = dir.path().join("me.pid").display(),
    );
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(script)
        .spawn()
        .expect("spawn");
    let me = read_pid(&dir.path().join("me.pid"));
    let gc = read_pid(&dir.path().join("gc.pid"));
    let procs = std::fs::read_to_string(call.join("cgroup.procs")).expect("procs");
    assert!(procs.contains(&gc.to_string()), "{procs}");
    hydraflow::agent::contain::kill_and_remove(&call).expect("kill and remove");
    let _ = child.wait();
    wait_for("both processes gone", || gone(me) && gone(gc));
    assert!(!call.exists(), "{} is left", call.display());
}
