//! The worker benchmark (`cargo bench --bench worker`): start → `READY=1`,
//! idle memory and CPU, and the pipeline's own time per issue with instant
//! scripted agents, measured on the release-built `hydraflow` binary with the
//! local forge in temp dirs. It prints its figures; BENCHMARKS.md records them.
//!
//! Not a test: nothing here asserts a speed. `-- --quick` shortens the idle
//! window to 10 s and the repetitions, for trying things out.

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail, ensure};
use clap::Parser;
use git2::{Repository, RepositoryInitOptions, Signature};
use hydraflow::store::events::{Event, EventType};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tempfile::TempDir;

/// The binary `cargo bench` built (the bench profile, which inherits `release`, but with the
/// features the dev-dependencies add: tokio's multi-thread scheduler, zbus's server side).
const BENCH_EXE: &str = env!("CARGO_BIN_EXE_hydraflow");
/// Names the binary to measure instead of [`BENCH_EXE`]: the one `cargo build --release`
/// makes, as packaged (`bench/worker.sh` sets it).
const EXE_ENV: &str = "HYDRAFLOW_BENCH_BIN";
/// The binary measured, chosen once in `main`.
static EXE: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn exe() -> &'static str {
    EXE.get().map_or(BENCH_EXE, String::as_str)
}

/// Longest any single worker run may take before the bench gives up (a hang guard).
const HANG_GUARD: Duration = Duration::from_secs(120);

/// `cargo bench --bench worker [-- OPTIONS]`
#[derive(Debug, Parser)]
#[command(about = "HydraFlow worker benchmark")]
struct Args {
    /// Shorter runs for trying things out (10 s idle window, fewer repetitions).
    #[arg(long, env = "HYDRAFLOW_BENCH_QUICK")]
    quick: bool,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
    /// Start → READY repetitions (default 20, 5 with --quick).
    #[arg(long)]
    runs: Option<usize>,
    /// Idle window in seconds (default 60, 10 with --quick).
    #[arg(long)]
    idle_secs: Option<u64>,
    /// Issues in the throughput run.
    #[arg(long, default_value_t = 20)]
    issues: usize,
    /// Only these parts (start, idle, pipeline); default all.
    #[arg(value_name = "PART")]
    parts: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runs = args.runs.unwrap_or(if args.quick { 5 } else { 20 });
    let idle_secs = args.idle_secs.unwrap_or(if args.quick { 10 } else { 60 });
    let want = |p: &str| args.parts.is_empty() || args.parts.iter().any(|x| x == p);
    println!("hydraflow worker benchmark");
    let exe = std::env::var(EXE_ENV).unwrap_or_else(|_| BENCH_EXE.to_owned());
    println!("binary: {exe}");
    if exe == BENCH_EXE {
        println!(
            "note: the bench profile's build has the dev-dependencies' features and not the \
             release link order; bench/worker.sh measures the release binary"
        );
    }
    if exe.contains("/debug/") {
        println!("warning: this is a debug build; run `cargo bench --bench worker`");
    }
    EXE.set(exe).expect("set once");
    machine_facts();
    if want("start") {
        start_to_ready(runs)?;
    }
    if want("idle") {
        idle(Duration::from_secs(idle_secs))?;
    }
    if want("pipeline") {
        let singles = if args.quick { 3 } else { 5 };
        pipeline(args.issues, singles)?;
    }
    Ok(())
}

fn machine_facts() {
    let out = |cmd: &str, args: &[&str]| {
        Command::new(cmd)
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_else(|e| format!("({cmd}: {e})"))
    };
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_default();
    println!("nproc: {}  cpu: {model}", out("nproc", &[]));
    println!("kernel: {}", out("uname", &["-sr"]));
    println!("rustc: {}", out("rustc", &["--version"]));
    println!("loadavg: {}", out("cat", &["/proc/loadavg"]));
    let tmp = std::env::temp_dir();
    println!(
        "temp dir (repositories and data; TMPDIR moves it): {} on {}",
        tmp.display(),
        out("stat", &["-f", "-c", "%T", &tmp.display().to_string()])
    );
}

// ---------------------------------------------------------------- fixture

/// The stage agent: answers at once, implement writes a file and commits;
/// each call appends `stage issue start_ns end_ns` (wall clock) to `$BENCH_LOG`.
const AGENT: &str = r#"#!/bin/sh
start=$(date +%s%N)
stage="$1"; issue="$2"
cat > /dev/null
case "$stage" in
  triage) echo '{"ready": true, "reasons": ["clear"], "issue_type": "feature", "clarity_score": 9, "complexity_score": 1, "needs_discovery": false, "already_addressed": false}' ;;
  plan) printf 'PLAN_START\nWrite file-%s.txt.\nSUMMARY: add file-%s.txt\nPLAN_END\n' "$issue" "$issue" ;;
  implement)
    echo "content for $issue" > "file-$issue.txt"
    git add -A && git commit -q -m "implement #$issue"
    ;;
  review) printf 'VERDICT: APPROVE\nSUMMARY: looks right\n' ;;
  *) echo "unexpected stage $stage" >&2; exit 3 ;;
esac
end=$(date +%s%N)
echo "$stage $issue $start $end" >> "$BENCH_LOG"
"#;

/// A fresh repository (`<tmp>/repo`, one commit on `main`), the agent, the
/// configuration (defaults except the agent) and a notify socket.
struct Fixture {
    tmp: TempDir,
    repo: PathBuf,
    config: PathBuf,
    agent_log: PathBuf,
    socket: UnixDatagram,
    socket_path: PathBuf,
}

impl Fixture {
    fn new() -> anyhow::Result<Fixture> {
        let tmp = tempfile::Builder::new().prefix("hf-bench-").tempdir()?;
        let repo = tmp.path().join("repo");
        let mut opts = RepositoryInitOptions::new();
        opts.initial_head("main");
        let git = Repository::init_opts(&repo, &opts)?;
        let mut cfg = git.config()?;
        cfg.set_str("user.name", "Bench")?;
        cfg.set_str("user.email", "bench@example.com")?;
        std::fs::write(repo.join("README.md"), "hello\n")?;
        let mut index = git.index()?;
        index.add_path(Path::new("README.md"))?;
        index.write()?;
        let tree = git.find_tree(index.write_tree()?)?;
        let sig = Signature::now("Bench", "bench@example.com")?;
        git.commit(Some("HEAD"), &sig, &sig, "initial commit", &tree, &[])?;

        let agent = tmp.path().join("agent.sh");
        std::fs::write(&agent, AGENT)?;
        std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o755))?;
        let agent_log = tmp.path().join("agents.log");
        let config = tmp.path().join("hydraflow.toml");
        std::fs::write(
            &config,
            format!(
                "[agent]\npreset = \"command\"\ncommand = [{agent:?}, \"{{{{stage}}}}\", \"{{{{issue}}}}\"]\noutput = \"plain\"\n[agent.env]\nBENCH_LOG = {log:?}\n",
                agent = agent.display().to_string(),
                log = agent_log.display().to_string(),
            ),
        )?;
        let socket_path = tmp.path().join("notify.sock");
        let socket = UnixDatagram::bind(&socket_path)?;
        Ok(Fixture {
            tmp,
            repo,
            config,
            agent_log,
            socket,
            socket_path,
        })
    }

    /// `hydraflow <args> --config … --repo …` with a clean environment and
    /// `NOTIFY_SOCKET` set to this fixture's socket.
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(exe());
        cmd.args(args)
            .arg("--config")
            .arg(&self.config)
            .arg("--repo")
            .arg(&self.repo)
            .env("NOTIFY_SOCKET", &self.socket_path)
            .env_remove("JOURNAL_STREAM")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .current_dir(self.tmp.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for (k, _) in std::env::vars() {
            if k.starts_with("HYDRAFLOW_") {
                cmd.env_remove(k);
            }
        }
        cmd
    }

    fn add_issues(&self, n: usize) -> anyhow::Result<()> {
        for i in 1..=n {
            let title = format!("Add file {i}");
            let status = self
                .command(&["issue", "add", "--title", &title, "--body", "a file"])
                .env_remove("NOTIFY_SOCKET")
                .status()?;
            ensure!(status.success(), "hydraflow issue add failed: {status}");
        }
        Ok(())
    }

    /// Wait for a datagram containing `READY=1`; returns when it arrived.
    fn wait_ready(&self, child: &mut Child) -> anyhow::Result<(Instant, SystemTime)> {
        self.socket
            .set_read_timeout(Some(Duration::from_millis(100)))?;
        let started = Instant::now();
        let mut buf = [0u8; 4096];
        loop {
            match self.socket.recv(&mut buf) {
                Ok(len) => {
                    if String::from_utf8_lossy(&buf[..len])
                        .lines()
                        .any(|l| l == "READY=1")
                    {
                        return Ok((Instant::now(), SystemTime::now()));
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(e.into()),
            }
            if let Some(status) = child.try_wait()? {
                bail!("the worker exited before READY=1: {status}");
            }
            ensure!(
                started.elapsed() < HANG_GUARD,
                "no READY=1 within {HANG_GUARD:?}"
            );
        }
    }

    fn events(&self) -> anyhow::Result<Vec<Event>> {
        let path = self.repo.join(".hydraflow/repo/events.jsonl");
        let text =
            std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
        text.lines()
            .map(|l| serde_json::from_str(l).with_context(|| format!("bad event line {l}")))
            .collect()
    }

    /// The agents' own intervals (wall-clock nanoseconds) by issue.
    fn agent_calls(&self) -> anyhow::Result<Vec<AgentCall>> {
        let text = std::fs::read_to_string(&self.agent_log)
            .with_context(|| format!("read {}", self.agent_log.display()))?;
        text.lines()
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                ensure!(f.len() == 4, "bad agent log line {l:?}");
                Ok(AgentCall {
                    issue: f[1].parse()?,
                    start_ns: f[2].parse()?,
                    end_ns: f[3].parse()?,
                })
            })
            .collect()
    }
}

#[derive(Debug, Clone, Copy)]
struct AgentCall {
    issue: u64,
    start_ns: u128,
    end_ns: u128,
}

/// Wait for `child` to exit, killing it after [`HANG_GUARD`].
fn wait_exit(child: &mut Child) -> anyhow::Result<ExitStatus> {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if started.elapsed() > HANG_GUARD {
            let _ = child.kill();
            bail!("the worker did not exit within {HANG_GUARD:?}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn sigterm(child: &Child) -> anyhow::Result<()> {
    let pid = i32::try_from(child.id()).context("pid")?;
    kill(Pid::from_raw(pid), Signal::SIGTERM).context("SIGTERM")
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn summary(name: &str, v: &mut [f64], unit: &str) {
    let med = median(v);
    println!(
        "{name}: median {med:.1} {unit} (min {:.1}, max {:.1}, n = {})",
        v.first().copied().unwrap_or(f64::NAN),
        v.last().copied().unwrap_or(f64::NAN),
        v.len()
    );
}

// ---------------------------------------------------------------- start

/// exec → `READY=1`, and SIGTERM → exit, on a fresh repository each time
/// (one discarded warm-up run first).
fn start_to_ready(runs: usize) -> anyhow::Result<()> {
    println!();
    println!("== start → READY=1 ({runs} runs, fresh repository each, no issues)");
    let mut ready = Vec::new();
    let mut stop = Vec::new();
    for i in 0..=runs {
        let fx = Fixture::new()?;
        let spawned = Instant::now();
        let mut child = fx.command(&["run"]).spawn()?;
        let (at, _) = fx.wait_ready(&mut child)?;
        let took = at - spawned;
        // Let the first poll finish, then stop.
        std::thread::sleep(Duration::from_millis(200));
        let stopping = Instant::now();
        sigterm(&child)?;
        let status = wait_exit(&mut child)?;
        ensure!(status.success(), "worker exited with {status}");
        if i > 0 {
            ready.push(ms(took));
            stop.push(ms(stopping.elapsed()));
        }
    }
    summary("start → READY", &mut ready, "ms");
    summary("SIGTERM → exit", &mut stop, "ms");
    Ok(())
}

// ---------------------------------------------------------------- idle

/// Fields of `/proc/<pid>/status` in kB.
fn status_kb(pid: u32, key: &str) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = text
        .lines()
        .find(|l| l.starts_with(key) && l[key.len()..].starts_with(':'))
        .with_context(|| format!("no {key} in /proc/{pid}/status"))?;
    line[key.len() + 1..]
        .split_whitespace()
        .next()
        .context("empty field")?
        .parse()
        .with_context(|| format!("bad {key} line {line:?}"))
}

/// utime + stime of the whole process (all threads, live and dead), in clock ticks.
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the `(comm)`, which may contain spaces: state is field 3.
    let rest = &text[text.rfind(')').context("bad stat")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 (1-based), i.e. 11 and 12 after state.
    Ok(f[11].parse::<u64>()? + f[12].parse::<u64>()?)
}

/// Sum over live threads of (run time in ns, context switches).
fn threads_sched(pid: u32) -> anyhow::Result<(u64, u64)> {
    let mut run_ns = 0;
    let mut switches = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let dir = task?.path();
        let Ok(sched) = std::fs::read_to_string(dir.join("schedstat")) else {
            continue;
        };
        run_ns += sched
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        if let Ok(status) = std::fs::read_to_string(dir.join("status")) {
            for l in status.lines() {
                if l.starts_with("voluntary_ctxt_switches:")
                    || l.starts_with("nonvoluntary_ctxt_switches:")
                {
                    switches += l
                        .split_whitespace()
                        .nth(1)
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(0);
                }
            }
        }
    }
    Ok((run_ns, switches))
}

fn clock_ticks_per_second() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100)
}

/// RSS after READY and a settling pause, then CPU over `window` with nothing to do.
fn idle(window: Duration) -> anyhow::Result<()> {
    const SETTLE: Duration = Duration::from_secs(5);
    println!();
    println!(
        "== idle (no issues, default configuration): RSS {} s after READY, CPU over {} s",
        SETTLE.as_secs(),
        window.as_secs()
    );
    let fx = Fixture::new()?;
    let mut child = fx.command(&["run"]).spawn()?;
    fx.wait_ready(&mut child)?;
    std::thread::sleep(SETTLE);
    let pid = child.id();
    let report_mem = |when: &str| -> anyhow::Result<()> {
        println!(
            "{when}: VmRSS {:.2} MiB (anon {:.2}, file {:.2}), VmHWM {:.2} MiB, {} threads",
            status_kb(pid, "VmRSS")? as f64 / 1024.0,
            status_kb(pid, "RssAnon")? as f64 / 1024.0,
            status_kb(pid, "RssFile")? as f64 / 1024.0,
            status_kb(pid, "VmHWM")? as f64 / 1024.0,
            status_kb(pid, "Threads")?,
        );
        Ok(())
    };
    report_mem("after settling")?;
    let hz = clock_ticks_per_second();
    let t0 = Instant::now();
    let ticks0 = cpu_ticks(pid)?;
    let (ns0, sw0) = threads_sched(pid)?;
    std::thread::sleep(window);
    let ticks1 = cpu_ticks(pid)?;
    let (ns1, sw1) = threads_sched(pid)?;
    let secs = t0.elapsed().as_secs_f64();
    report_mem(&format!("after {secs:.0} s idle"))?;
    let cpu_s = (ticks1 - ticks0) as f64 / hz as f64;
    println!(
        "idle CPU (utime+stime, {hz} Hz ticks): {:.3} s over {secs:.1} s = {:.4} % of one core",
        cpu_s,
        cpu_s / secs * 100.0
    );
    let run_s = ns1.saturating_sub(ns0) as f64 / 1e9;
    println!(
        "idle CPU (schedstat, live threads, ns): {:.4} s = {:.4} % of one core; {:.2} context switches/s",
        run_s,
        run_s / secs * 100.0,
        sw1.saturating_sub(sw0) as f64 / secs
    );
    sigterm(&child)?;
    wait_exit(&mut child)?;
    Ok(())
}

// ---------------------------------------------------------------- pipeline

/// When each issue finished (its review stage ended with the merge and the
/// issue closed), from `events.jsonl`, in wall-clock nanoseconds.
fn finished(events: &[Event]) -> Vec<(u64, u128)> {
    events
        .iter()
        .filter(|e| {
            e.kind == EventType::WorkerUpdate
                && e.data["stage"] == "review"
                && e.data["status"] == "finished"
        })
        .filter_map(|e| {
            let n = e.data["issue"].as_u64()?;
            let ns = u128::try_from(e.timestamp.timestamp_nanos_opt()?).ok()?;
            Some((n, ns))
        })
        .collect()
}

/// Length of the union of intervals, clipped to `[from, to]`.
fn union_ns(calls: &[AgentCall], from: u128, to: u128) -> u128 {
    let mut iv: Vec<(u128, u128)> = calls
        .iter()
        .map(|c| (c.start_ns.max(from), c.end_ns.min(to)))
        .filter(|(a, b)| a < b)
        .collect();
    iv.sort_unstable();
    let mut total = 0;
    let mut cur: Option<(u128, u128)> = None;
    for (a, b) in iv {
        match cur {
            Some((s, e)) if a <= e => cur = Some((s, e.max(b))),
            Some((s, e)) => {
                total += e - s;
                cur = Some((a, b));
            }
            None => cur = Some((a, b)),
        }
    }
    if let Some((s, e)) = cur {
        total += e - s;
    }
    total
}

fn unix_ns(t: SystemTime) -> anyhow::Result<u128> {
    Ok(t.duration_since(UNIX_EPOCH)?.as_nanos())
}

/// One `hydraflow run --exit-when-idle` over `n` fresh issues.
struct PipelineRun {
    /// exec → exit of the process.
    process: Duration,
    /// READY → the last issue finished.
    span_ns: u128,
    /// Time at least one agent was running, within that span.
    agents_union_ns: u128,
    /// Sum of all agent calls.
    agents_sum_ns: u128,
    calls: usize,
}

fn run_pipeline(n: usize) -> anyhow::Result<PipelineRun> {
    let fx = Fixture::new()?;
    fx.add_issues(n)?;
    let spawned = Instant::now();
    let mut child = fx.command(&["run", "--exit-when-idle"]).spawn()?;
    let (_, ready_wall) = fx.wait_ready(&mut child)?;
    let status = wait_exit(&mut child)?;
    let process = spawned.elapsed();
    ensure!(status.success(), "worker exited with {status}");
    let done = finished(&fx.events()?);
    if done.len() != n {
        let count = done.len();
        let kept = fx.tmp.keep();
        bail!("{count} of {n} issues finished; see {}", kept.display());
    }
    let calls = fx.agent_calls()?;
    ensure!(
        calls.len() == 4 * n,
        "{} agent calls for {n} issues",
        calls.len()
    );
    ensure!(calls.iter().all(|c| c.issue >= 1 && c.issue <= n as u64));
    // Event timestamps are truncated to milliseconds.
    let ready_ns = unix_ns(ready_wall)?;
    let last = done.iter().map(|(_, t)| *t).max().unwrap_or(ready_ns);
    let last = last + 1_000_000;
    Ok(PipelineRun {
        process,
        span_ns: last.saturating_sub(ready_ns),
        agents_union_ns: union_ns(&calls, ready_ns, last),
        agents_sum_ns: calls.iter().map(|c| c.end_ns - c.start_ns).sum(),
        calls: calls.len(),
    })
}

fn pipeline(issues: usize, singles: usize) -> anyhow::Result<()> {
    println!();
    println!(
        "== pipeline: local forge, instant scripted agents (sh), default limits (1 per stage)"
    );
    let nsms = |ns: u128| ns as f64 / 1e6;

    let mut latency = Vec::new();
    let mut overhead = Vec::new();
    let mut agents = Vec::new();
    for _ in 0..singles {
        let r = run_pipeline(1)?;
        latency.push(nsms(r.span_ns));
        agents.push(nsms(r.agents_sum_ns));
        overhead.push(nsms(r.span_ns.saturating_sub(r.agents_sum_ns)));
    }
    println!("one issue alone, READY → finished (4 stages, merged, closed):");
    summary("  latency", &mut latency, "ms");
    summary("  its 4 agents' own time", &mut agents, "ms");
    summary("  pipeline overhead per issue", &mut overhead, "ms");

    let r = run_pipeline(issues)?;
    let span = nsms(r.span_ns);
    let union = nsms(r.agents_union_ns);
    println!("{issues} issues in one run ({} agent calls):", r.calls);
    println!(
        "  process exec → exit: {:.0} ms (includes start and the 0.5 s idle check)",
        ms(r.process)
    );
    println!(
        "  READY → last issue finished: {span:.0} ms = {:.1} ms per issue",
        span / issues as f64
    );
    println!(
        "  agents' own time: {:.0} ms summed, {union:.0} ms with at least one agent running",
        nsms(r.agents_sum_ns)
    );
    println!(
        "  pipeline overhead per issue, (span − time any agent ran) / {issues}: {:.1} ms",
        (span - union) / issues as f64
    );
    std::io::stdout().flush()?;
    Ok(())
}
