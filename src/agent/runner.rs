//! Runs one agent call: builds the command line from the stage's preset or
//! argv template, spawns it in its own process group with a clean
//! environment, streams stdout line by line through the format's parser,
//! kills the whole group on timeout, and saves the transcript.
//!
//! # Presets
//! The stage's [`StageAgent`] settings override [`AgentConfig`]'s.
//! - `claude`: `claude -p {{prompt}} --output-format stream-json --verbose
//!   [--model M] [--permission-mode bypassPermissions] [extra_args…]`, read as
//!   [`OutputFormat::ClaudeStreamJson`]. Triage and plan run in the
//!   repository's own checkout and get no permission flag: in `-p` mode
//!   Claude's default mode denies every tool that would ask for approval
//!   (edits, most shell commands), so they can read but not write. Implement,
//!   review (which also runs the fix rounds) and HITL run in the issue's
//!   worktree and must edit, test and commit unattended, so they get
//!   `--permission-mode bypassPermissions`; the service's sandbox is the
//!   boundary. `extra_args` (e.g. `--allowedTools`, `--max-turns`) are
//!   appended.
//! - `codex`: `codex exec --json [--model M] --sandbox read-only|danger-full-access
//!   [extra_args…] {{prompt}}`, read as [`OutputFormat::CodexJson`], with the same
//!   read-only / write split (Codex's `workspace-write` sandbox would refuse
//!   the commit: a worktree's git directory lies outside it).
//! - `command`: the stage's `command` argv template, else `agent.command`,
//!   plus `extra_args`; its output format is the stage's `output`, else
//!   `agent.output`, else `plain`. A stage's `output` also overrides a preset's.
//!
//! Placeholders inside arguments: `{{prompt}}`, `{{prompt_file}}` (the prompt
//! written to `<transcript stem>.prompt.md` next to the transcript),
//! `{{model}}` (empty when unset), `{{stage}}`, `{{issue}}`, `{{cwd}}`: the one
//! template syntax ([`crate::template`]), also the prompts'. Substitution is
//! one pass, so braces inside the prompt are never expanded. The old
//! single-brace form (`{stage}`) is a configuration error that says so. Without `{{prompt}}`
//! or `{{prompt_file}}` the prompt goes to stdin. A prompt larger than
//! [`MAX_ARG_PROMPT`] bytes does not fit in one argument (Linux caps an
//! argument at 128 KiB): every argument containing `{{prompt}}` is then dropped
//! and the prompt goes to stdin, which both presets read when no prompt
//! argument is given. Templates should therefore keep `{{prompt}}` a whole
//! argument of its own, or use `{{prompt_file}}`.
//!
//! # Files
//! The transcript ([`super::AgentOutcome::transcript`]) is written atomically
//! to the call's `transcript_path`, its directory created. For the JSON
//! formats the raw stdout is also saved, line by line as it arrives, to
//! `<stem>.jsonl` next to it, for debugging; plain output is the transcript
//! itself and is not saved twice.
//!
//! # Processes
//! The child runs with exactly the call's environment ([`agent_env`]), in its
//! own process group, contained as [`Containment`] decided (its own cgroup,
//! or under the `hydraflow agent-shim` subreaper; see [`super::contain`]).
//! On timeout the group gets SIGTERM, then SIGKILL after [`KILL_GRACE`]
//! (and the call's cgroup is killed whole). When the agent exits but
//! something it started keeps its stdout open for longer than
//! [`KILL_GRACE`], the group is terminated the same way (not a timeout).
//! Whatever is left when `run` returns, or when its future is dropped
//! (worker shutdown), is killed: the cgroup with `cgroup.kill`, the shim's
//! descendants by the shim (it is sent SIGTERM), else the group with SIGKILL.
//!
//! # Secrets
//! Values given to [`ProcessRunner::with_secrets`] (the model API keys and
//! the GitHub token) are replaced by `[redacted]` in every stdout and stderr
//! line before it is displayed, parsed, logged or written to a transcript.
//!
//! # Accounting
//! Each finished call is recorded through the runner's
//! [`crate::store::sessions::CallLedger`], when it has one: wall and CPU
//! time, memory peak, tokens and cost (`agent-calls.jsonl` and the session's
//! totals in `sessions.jsonl`).

use std::collections::BTreeMap;
use std::future::Future;
use std::io::{self, Read as _};
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::process::{Child, ChildStderr, ChildStdin, ChildStdout};
use tokio::time::{Instant, sleep_until};

use super::contain::{CallScope, Containment, Resources};
use super::parse::{DisplayLine, StreamParser};
use super::shim::ShimReport;
use super::{AgentCall, AgentError, AgentOutcome, OutputFormat, Stage};
use crate::config::{AgentConfig, StageAgent};
use crate::store::sessions::{CallLedger, CallRecord};

/// Largest prompt, in bytes, passed as an argument; larger ones go to stdin.
pub const MAX_ARG_PROMPT: usize = 100 * 1024;
/// Bytes of stderr kept in [`AgentOutcome::stderr_tail`].
pub const STDERR_TAIL: usize = 8 * 1024;
/// Longest stdout or stderr line read whole, in bytes; the rest of a longer
/// line is discarded (it then shows as junk).
pub const MAX_LINE: usize = 16 * 1024 * 1024;
/// Time between SIGTERM and SIGKILL, and how long stragglers may keep the
/// agent's stdout open after it exited.
pub const KILL_GRACE: Duration = Duration::from_secs(2);

/// Receives each display line as the agent produces it.
pub type LineSink<'a> = &'a (dyn Fn(&DisplayLine) + Send + Sync);

/// Runs agent calls. [`ProcessRunner`] runs real processes; tests use it with
/// small scripts standing in for an LLM CLI.
#[async_trait]
pub trait AgentRunner: Send + Sync {
    /// Run `call` to completion (or timeout), feeding display lines to `on_line`.
    ///
    /// # Errors
    /// [`AgentError::Spawn`] when the program cannot start; a non-zero exit,
    /// a timeout or junk output is an `Ok` outcome describing it.
    async fn run(
        &self,
        call: &AgentCall,
        on_line: LineSink<'_>,
    ) -> Result<AgentOutcome, AgentError>;

    /// Run the repository's quality command (`sh -c command`, e.g. `make
    /// quality`) in `cwd` with the base environment ([`base_env`]), in its
    /// own process group, killed whole after `timeout` and when done.
    ///
    /// # Errors
    /// [`AgentError::Spawn`] when `sh` cannot start; a failing or timed-out
    /// command is an `Ok` outcome describing it.
    async fn run_quality(
        &self,
        command: &str,
        cwd: &Path,
        timeout: Duration,
    ) -> Result<QualityOutcome, AgentError> {
        run_quality(command, cwd, timeout).await
    }
}

/// How the quality command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QualityOutcome {
    /// It exited 0.
    Passed,
    /// It failed: its exit status and the last lines of its output.
    Failed {
        /// `exit status: 2`, `signal: 9 (SIGKILL)`, …
        status: String,
        /// Its stderr then stdout, last lines.
        output: String,
    },
    /// It ran past the timeout and was killed with its process group.
    TimedOut,
}

/// The environment of commands HydraFlow runs that are not agents (the
/// quality command): the worker's variables of [`PASS_NAMES`] and the `LC_`
/// and `XDG_` prefixes; no model keys, tokens or systemd variables.
pub fn base_env() -> Vec<(String, String)> {
    process_env()
        .into_iter()
        .filter(|(k, _)| {
            PASS_NAMES.contains(&k.as_str()) || k.starts_with("LC_") || k.starts_with("XDG_")
        })
        .collect()
}

async fn run_quality(
    command: &str,
    cwd: &Path,
    timeout: Duration,
) -> Result<QualityOutcome, AgentError> {
    let env = base_env();
    let mut spec = crate::child::Spec::new("sh".as_ref(), &env, cwd);
    spec.args = vec!["-c".as_ref(), command.as_ref()];
    let mut child = crate::child::spawn(spec).map_err(|source| AgentError::Spawn {
        program: "sh".into(),
        cause: source,
    })?;
    let group = child
        .id()
        .and_then(|p| i32::try_from(p).ok())
        .map(Pid::from_raw);
    let read = |pipe: Option<Box<dyn tokio::io::AsyncRead + Unpin + Send>>| async move {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = tokio::io::AsyncReadExt::read_to_end(&mut pipe, &mut bytes).await;
        }
        bytes
    };
    let stdout =
        tokio::spawn(read(child.stdout.take().map(|p| {
            Box::new(p) as Box<dyn tokio::io::AsyncRead + Unpin + Send>
        })));
    let stderr =
        tokio::spawn(read(child.stderr.take().map(|p| {
            Box::new(p) as Box<dyn tokio::io::AsyncRead + Unpin + Send>
        })));
    // The shell's own exit ends the command: what it left running in its
    // group (holding the pipes open) is killed, so the output can be read.
    let status = tokio::time::timeout(timeout, child.wait()).await;
    if let Some(group) = group {
        let _ = killpg(group, Signal::SIGKILL);
    }
    let status = match status {
        Err(_) => {
            let _ = child.wait().await;
            return Ok(QualityOutcome::TimedOut);
        }
        Ok(status) => status.map_err(AgentError::Io)?,
    };
    let out = std::process::Output {
        status,
        stdout: stdout.await.unwrap_or_default(),
        stderr: stderr.await.unwrap_or_default(),
    };
    if out.status.success() {
        return Ok(QualityOutcome::Passed);
    }
    Ok(QualityOutcome::Failed {
        status: out.status.to_string(),
        output: String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout),
    })
}

/// What the pipeline knows when it asks for an agent call.
#[derive(Debug, Clone)]
pub struct CallRequest {
    /// The stage.
    pub stage: Stage,
    /// Issue or pull request number.
    pub issue: u64,
    /// The rendered prompt.
    pub prompt: String,
    /// Working directory (checkout or worktree).
    pub cwd: PathBuf,
    /// Where the transcript goes.
    pub transcript_path: PathBuf,
    /// The timeout.
    pub timeout: Duration,
    /// Extra environment variables (e.g. `GH_TOKEN` when allowed).
    pub extra_env: Vec<(String, String)>,
}

/// The token agents get as `GH_TOKEN` (`agent.allow_token`), asked for as
/// each call starts: a GitHub App's installation token changes hourly.
#[async_trait]
pub trait TokenSource: Send + Sync + std::fmt::Debug {
    /// The token, or why there is none now.
    async fn token(&self) -> Result<String, String>;
}

/// Runs agents as child processes.
#[derive(Debug, Clone, Default)]
pub struct ProcessRunner {
    containment: Arc<Containment>,
    ledger: Option<Arc<CallLedger>>,
    secrets: Arc<Vec<String>>,
    token: Option<Arc<dyn TokenSource>>,
}

impl ProcessRunner {
    /// A runner containing its calls as `containment` says.
    pub fn new(containment: Containment) -> Self {
        ProcessRunner {
            containment: Arc::new(containment),
            ..ProcessRunner::default()
        }
    }

    /// Record every finished call in `ledger`.
    #[must_use]
    pub fn with_ledger(mut self, ledger: CallLedger) -> Self {
        self.ledger = Some(Arc::new(ledger));
        self
    }

    /// Redact these values (of 8 bytes or more) from everything the agent prints.
    #[must_use]
    pub fn with_secrets(mut self, secrets: Vec<String>) -> Self {
        self.secrets = Arc::new(secrets.into_iter().filter(|s| s.len() >= 8).collect());
        self
    }

    /// Give each call `GH_TOKEN` from `source` (also redacted from what the agent prints).
    #[must_use]
    pub fn with_token_source(mut self, source: Arc<dyn TokenSource>) -> Self {
        self.token = Some(source);
        self
    }

    /// How calls are contained.
    pub fn containment(&self) -> &Containment {
        &self.containment
    }
}

#[async_trait]
impl AgentRunner for ProcessRunner {
    async fn run(
        &self,
        call: &AgentCall,
        on_line: LineSink<'_>,
    ) -> Result<AgentOutcome, AgentError> {
        let outcome = match &self.token {
            None => run_process(self, call, on_line).await?,
            Some(source) => {
                let (mut call, mut runner) = (call.clone(), self.clone());
                match source.token().await {
                    Ok(token) => {
                        call.env.retain(|(k, _)| k != "GH_TOKEN");
                        call.env.push(("GH_TOKEN".to_owned(), token.clone()));
                        let mut secrets = self.secrets.to_vec();
                        secrets.push(token);
                        runner.secrets = Arc::new(secrets);
                    }
                    Err(why) => {
                        tracing::warn!(issue = call.issue, stage = %call.stage, "the agent runs without GH_TOKEN: {why}");
                    }
                }
                run_process(&runner, &call, on_line).await?
            }
        };
        if let Some(ledger) = &self.ledger {
            let record = CallRecord::of(call, &outcome, chrono::Utc::now());
            if let Err(e) = ledger.record(&record) {
                tracing::warn!(error = %e, issue = call.issue, stage = %call.stage, "cannot record the agent call's accounting");
            }
        }
        Ok(outcome)
    }
}

/// `line` with every secret replaced by `[redacted]`.
fn redact(secrets: &[String], line: String) -> String {
    if secrets.iter().any(|s| line.contains(s.as_str())) {
        let mut out = line;
        for s in secrets {
            out = out.replace(s.as_str(), "[redacted]");
        }
        out
    } else {
        line
    }
}

/// Ends what is left of a call when dropped: nothing of an agent outlives
/// its call, even when the call's future is dropped. With a shim the shim is
/// asked to end its descendants (SIGTERM); without one the group gets SIGKILL.
/// The call's cgroup, if any, is killed whole and removed.
struct GroupGuard {
    pgid: Option<Pid>,
    shim: bool,
    scope: Option<CallScope>,
}

impl GroupGuard {
    fn signal(&self, signal: Signal) {
        if let Some(pgid) = self.pgid {
            // ESRCH (the group is gone) is the expected outcome, not an error.
            let _ = killpg(pgid, signal);
        }
        if signal == Signal::SIGKILL
            && let Some(scope) = &self.scope
        {
            scope.kill();
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if self.shim {
            if let Some(pid) = self.pgid {
                let _ = nix::sys::signal::kill(pid, Signal::SIGTERM);
            }
        } else {
            self.signal(Signal::SIGKILL);
        }
    }
}

/// Find `program` as execvp(3) would: a name with a slash as it is, else
/// the first executable file of that name in `path` (the call's `PATH`).
pub fn find_program(program: &str, path: Option<&str>) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        let p = PathBuf::from(program);
        return executable(&p).then_some(p);
    }
    std::env::split_paths(path.unwrap_or("/usr/local/bin:/usr/bin:/bin"))
        .map(|dir| dir.join(program))
        .find(|p| executable(p))
}

/// What has finished so far.
#[derive(Default)]
struct Progress {
    status: Option<ExitStatus>,
    io: Option<io::Result<()>>,
}

impl Progress {
    fn done(&self) -> bool {
        self.status.is_some() && self.io.is_some()
    }
}

/// Wait for the child and its I/O until both are done or `until` passes.
/// With `straggler_grace`, stop [`KILL_GRACE`] after the child exited even
/// when its output is still open.
async fn drive<F>(
    child: &mut Child,
    mut io: Pin<&mut F>,
    progress: &mut Progress,
    mut until: Instant,
    straggler_grace: bool,
) -> io::Result<()>
where
    F: Future<Output = io::Result<()>>,
{
    while !progress.done() {
        tokio::select! {
            r = &mut io, if progress.io.is_none() => progress.io = Some(r),
            s = child.wait(), if progress.status.is_none() => {
                progress.status = Some(s?);
                if straggler_grace {
                    until = until.min(Instant::now() + KILL_GRACE);
                }
            }
            () = sleep_until(until) => break,
        }
    }
    Ok(())
}

async fn run_process(
    runner: &ProcessRunner,
    call: &AgentCall,
    on_line: LineSink<'_>,
) -> Result<AgentOutcome, AgentError> {
    let (program, args) = call.argv.split_first().ok_or_else(|| {
        AgentError::Config(format!(
            "stage {}: the agent command line is empty",
            call.stage
        ))
    })?;
    let containment = &runner.containment;
    let shim = containment.shim().map(Path::to_path_buf);
    if shim.is_some() {
        let path = call
            .env
            .iter()
            .find(|(k, _)| k == "PATH")
            .map(|(_, v)| v.as_str());
        if find_program(program, path).is_none() {
            return Err(AgentError::Spawn {
                program: program.clone(),
                cause: io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("not found on PATH {}", path.unwrap_or("(unset)")),
                ),
            });
        }
    }
    let scope = containment
        .prepare(call.issue, call.stage)
        .map_err(AgentError::Io)?;
    let report = match &shim {
        Some(_) => Some(
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| {
                AgentError::Io(io::Error::other(format!(
                    "cannot make the agent-shim report pipe: {e}"
                )))
            })?,
        ),
        None => None,
    };
    let parent = std::process::id().to_string();
    let (exe, mut argv): (&std::ffi::OsStr, Vec<&std::ffi::OsStr>) = match &shim {
        Some(shim) => (
            shim.as_os_str(),
            vec![
                "agent-shim".as_ref(),
                "--parent".as_ref(),
                parent.as_ref(),
                "--".as_ref(),
                program.as_ref(),
            ],
        ),
        None => (program.as_ref(), Vec::new()),
    };
    argv.extend(args.iter().map(std::ffi::OsStr::new));
    let spec = crate::child::Spec {
        program: exe,
        arg0: shim.as_ref().map(|_| "hydraflow"),
        args: argv,
        env: &call.env,
        cwd: &call.cwd,
        stdio: [
            if call.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            },
            Stdio::piped(),
            Stdio::piped(),
        ],
        // The guard below ends the call; a shim must get SIGTERM to end its
        // descendants, not a SIGKILL that would orphan them.
        kill_on_drop: shim.is_none(),
        // The agent runs in its call's cgroup from its first instruction.
        cgroup_procs: scope.procs_fd(),
        pass_fd: report
            .as_ref()
            .map(|(_, w)| (w.as_raw_fd(), super::shim::REPORT_FD)),
    };
    let mut child = crate::child::spawn(spec).map_err(|source| AgentError::Spawn {
        program: program.clone(),
        cause: source,
    })?;
    let report_read: Option<OwnedFd> = report.map(|(r, w)| {
        drop(w);
        r
    });
    let guard = GroupGuard {
        pgid: child
            .id()
            .and_then(|pid| i32::try_from(pid).ok())
            .map(Pid::from_raw),
        shim: shim.is_some(),
        scope: Some(scope),
    };
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let stdin = child.stdin.take();
    let raw = open_raw_log(call).await;
    let secrets = runner.secrets.as_slice();

    let mut parser = StreamParser::new(call.output);
    let mut errors = StderrState::default();
    let deadline = Instant::now() + call.timeout;
    let mut progress = Progress::default();
    let mut timed_out = false;
    {
        let io = async {
            let (out, err, ()) = tokio::join!(
                read_stdout(stdout, &mut parser, raw, on_line, secrets),
                read_stderr(stderr, &mut errors, secrets),
                write_stdin(stdin, call.stdin.as_deref()),
            );
            out.and(err)
        };
        tokio::pin!(io);
        drive(&mut child, io.as_mut(), &mut progress, deadline, true).await?;
        if !progress.done() {
            timed_out = progress.status.is_none();
            guard.signal(Signal::SIGTERM);
            let until = Instant::now() + KILL_GRACE;
            drive(&mut child, io.as_mut(), &mut progress, until, false).await?;
            if !progress.done() {
                guard.signal(Signal::SIGKILL);
                let until = Instant::now() + KILL_GRACE;
                drive(&mut child, io.as_mut(), &mut progress, until, false).await?;
            }
        }
    }
    let mut guard = guard;
    let scope = guard.scope.take();
    if progress.status.is_some() && guard.shim {
        // The shim has exited, after ending every descendant.
        guard.pgid = None;
    }
    drop(guard);
    let shim_report = report_read.and_then(read_report);
    if let Some(r) = &shim_report
        && let Some(message) = &r.spawn_error
    {
        let source = match r.spawn_errno {
            Some(errno) => io::Error::from_raw_os_error(errno),
            None => io::Error::other(message.clone()),
        };
        return Err(AgentError::Spawn {
            program: program.clone(),
            cause: source,
        });
    }
    let reported = shim_report.map(|r| Resources {
        cpu_ms: Some(r.cpu_ms),
        memory_peak_bytes: (r.max_rss_bytes > 0).then_some(r.max_rss_bytes),
        ..Resources::default()
    });
    let resources = match scope {
        Some(scope) => tokio::task::spawn_blocking(move || scope.finish(reported))
            .await
            .unwrap_or_default(),
        None => reported.unwrap_or_default(),
    };
    if let Some(Err(e)) = progress.io {
        return Err(AgentError::Io(e));
    }

    let summary = parser.finish();
    write_file_atomic(&call.transcript_path, summary.transcript.as_bytes())?;
    let status = progress.status.filter(|_| !timed_out);
    Ok(AgentOutcome {
        exit_code: status.and_then(|s| s.code()),
        signal: status.and_then(|s| s.signal()),
        timed_out,
        timeout: call.timeout,
        transcript: summary.transcript,
        is_error: summary.is_error,
        signals: summary.signals,
        stderr_tail: errors.tail,
        usage: summary.usage,
        cost_usd: summary.cost_usd,
        model: summary.model,
        resources,
    })
}

/// The shim's report: one JSON line, complete once the shim has exited.
fn read_report(fd: OwnedFd) -> Option<ShimReport> {
    let mut text = String::new();
    std::fs::File::from(fd).read_to_string(&mut text).ok()?;
    serde_json::from_str(text.trim()).ok()
}

/// `<transcript stem><suffix>` next to the transcript.
fn sibling(transcript: &Path, suffix: &str) -> PathBuf {
    let stem = transcript
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "agent".to_string());
    transcript.with_file_name(format!("{stem}{suffix}"))
}

/// The raw stdout log for the JSON formats; `None` (with a warning) when it
/// cannot be created, which does not stop the run.
async fn open_raw_log(call: &AgentCall) -> Option<BufWriter<tokio::fs::File>> {
    if call.output == OutputFormat::Plain {
        return None;
    }
    let path = sibling(&call.transcript_path, ".jsonl");
    if let Some(dir) = path.parent() {
        let _ = tokio::fs::create_dir_all(dir).await;
    }
    match tokio::fs::File::create(&path).await {
        Ok(f) => Some(BufWriter::new(f)),
        Err(e) => {
            tracing::warn!("cannot create raw agent log {}: {e}", path.display());
            None
        }
    }
}

/// Read one line (through `\n`) into `buf`, keeping at most `cap` bytes of
/// it. Returns the number of bytes consumed; 0 at end of input.
async fn read_line_capped<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    cap: usize,
) -> io::Result<usize> {
    let mut consumed = 0;
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(consumed);
        }
        let (take, end) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (available.len(), false),
        };
        let room = cap.saturating_sub(buf.len());
        buf.extend_from_slice(&available[..take.min(room)]);
        reader.consume(take);
        consumed += take;
        if end {
            return Ok(consumed);
        }
    }
}

/// A line's text: lossy UTF-8, without the line ending.
fn line_text(buf: &[u8]) -> String {
    String::from_utf8_lossy(buf)
        .trim_end_matches(['\n', '\r'])
        .to_string()
}

async fn read_stdout(
    stdout: Option<ChildStdout>,
    parser: &mut StreamParser,
    mut raw: Option<BufWriter<tokio::fs::File>>,
    on_line: LineSink<'_>,
    secrets: &[String],
) -> io::Result<()> {
    let Some(stdout) = stdout else {
        return Ok(());
    };
    let mut reader = BufReader::new(stdout);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        if read_line_capped(&mut reader, &mut buf, MAX_LINE).await? == 0 {
            break;
        }
        let line = redact(secrets, line_text(&buf));
        if let Some(w) = raw.as_mut() {
            let written = async {
                w.write_all(line.as_bytes()).await?;
                w.write_all(b"\n").await
            };
            if let Err(e) = written.await {
                tracing::warn!("cannot write raw agent log: {e}");
                raw = None;
            }
        }
        for display in parser.feed(&line) {
            on_line(&display);
        }
    }
    if let Some(mut w) = raw
        && let Err(e) = w.flush().await
    {
        tracing::warn!("cannot write raw agent log: {e}");
    }
    Ok(())
}

/// Stderr as it is read: its tail.
#[derive(Default)]
struct StderrState {
    tail: String,
}

impl StderrState {
    fn push(&mut self, line: &str) {
        self.tail.push_str(line);
        self.tail.push('\n');
        if self.tail.len() > STDERR_TAIL {
            let mut cut = self.tail.len() - STDERR_TAIL;
            while !self.tail.is_char_boundary(cut) {
                cut += 1;
            }
            self.tail.drain(..cut);
        }
    }
}

async fn read_stderr(
    stderr: Option<ChildStderr>,
    state: &mut StderrState,
    secrets: &[String],
) -> io::Result<()> {
    let Some(stderr) = stderr else {
        return Ok(());
    };
    let mut reader = BufReader::new(stderr);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        if read_line_capped(&mut reader, &mut buf, MAX_LINE).await? == 0 {
            return Ok(());
        }
        state.push(&redact(secrets, line_text(&buf)));
    }
}

/// Write the prompt and close stdin. An agent that exits without reading
/// all of it (a broken pipe) is not an error here; its exit status says more.
async fn write_stdin(stdin: Option<ChildStdin>, text: Option<&str>) {
    if let (Some(mut stdin), Some(text)) = (stdin, text) {
        let _ = stdin.write_all(text.as_bytes()).await;
        let _ = stdin.shutdown().await;
    }
}

/// Write `bytes` to `path` atomically (temp file in the same directory,
/// then rename), creating the directory.
fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<(), AgentError> {
    let context = |e: io::Error| {
        AgentError::Io(io::Error::new(
            e.kind(),
            format!("cannot write {}: {e}", path.display()),
        ))
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(context)?;
    crate::store::atomic::write_atomic(path, bytes).map_err(context)
}

/// Which agent preset a stage uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Preset {
    Claude,
    Codex,
    Command,
}

/// A stage's settings, resolved but not yet filled in.
#[derive(Debug, Clone)]
struct Resolved {
    template: Vec<String>,
    output: OutputFormat,
    /// The model: the stage's, else the preset's default.
    model: Option<String>,
}

/// The `claude` preset's model for a stage without one: `opus` to plan,
/// implement and apply corrections, `sonnet` to triage and review (docs/design/agents.md).
fn claude_default_model(stage: Stage) -> &'static str {
    match stage {
        Stage::Plan | Stage::Implement | Stage::Hitl => "opus",
        Stage::Triage | Stage::Review => "sonnet",
    }
}

fn stage_agent(config: &AgentConfig, stage: Stage) -> &StageAgent {
    match stage {
        Stage::Triage => &config.triage,
        Stage::Plan => &config.plan,
        Stage::Implement => &config.implement,
        Stage::Review => &config.review,
        Stage::Hitl => &config.hitl,
    }
}

/// Parse an output format name (`plain`, `claude-stream-json`, `codex-json`).
fn parse_output(name: &str, stage: Stage) -> Result<OutputFormat, AgentError> {
    match name {
        "plain" => Ok(OutputFormat::Plain),
        "claude-stream-json" => Ok(OutputFormat::ClaudeStreamJson),
        "codex-json" => Ok(OutputFormat::CodexJson),
        other => Err(AgentError::Config(format!(
            "agent output format {other:?} for stage {stage} is not known: \
             use plain, claude-stream-json or codex-json"
        ))),
    }
}

/// Stages that change files: they run in the issue's worktree.
fn writes(stage: Stage) -> bool {
    matches!(stage, Stage::Implement | Stage::Review | Stage::Hitl)
}

fn resolve(config: &AgentConfig, stage: Stage) -> Result<Resolved, AgentError> {
    let sa = stage_agent(config, stage);
    let preset_name = sa.preset.as_deref().unwrap_or(&config.preset);
    let preset = match preset_name {
        "claude" => Preset::Claude,
        "codex" => Preset::Codex,
        "command" => Preset::Command,
        other => {
            return Err(AgentError::Config(format!(
                "agent preset {other:?} for stage {stage} is not known: \
                 use claude, codex or command"
            )));
        }
    };
    let stage_output = sa
        .output
        .as_deref()
        .map(|o| parse_output(o, stage))
        .transpose()?;
    let global_output = config
        .output
        .as_deref()
        .map(|o| parse_output(o, stage))
        .transpose()?;
    let model = sa
        .model
        .clone()
        .or_else(|| (preset == Preset::Claude).then(|| claude_default_model(stage).to_string()));
    let model_args: Vec<String> = if model.is_some() {
        vec!["--model".into(), "{{model}}".into()]
    } else {
        Vec::new()
    };
    let s = |v: &[&str]| v.iter().map(|a| (*a).to_string()).collect::<Vec<_>>();
    let (template, default_output) = match preset {
        Preset::Claude => {
            let mut t = s(&[
                "claude",
                "-p",
                "{{prompt}}",
                "--output-format",
                "stream-json",
                "--verbose",
            ]);
            t.extend(model_args);
            if writes(stage) {
                t.extend(s(&["--permission-mode", "bypassPermissions"]));
            }
            t.extend(sa.extra_args.iter().cloned());
            (t, OutputFormat::ClaudeStreamJson)
        }
        Preset::Codex => {
            let mut t = s(&["codex", "exec", "--json"]);
            t.extend(model_args);
            let sandbox = if writes(stage) {
                "danger-full-access"
            } else {
                "read-only"
            };
            t.extend(s(&["--sandbox", sandbox]));
            t.extend(sa.extra_args.iter().cloned());
            t.push("{{prompt}}".into());
            (t, OutputFormat::CodexJson)
        }
        Preset::Command => {
            let command = sa.command.as_ref().unwrap_or(&config.command);
            if command.is_empty() {
                return Err(AgentError::Config(format!(
                    "stage {stage} uses the command preset but no command is set: \
                     set agent.command or agent.{stage}.command"
                )));
            }
            let mut t = command.clone();
            t.extend(sa.extra_args.iter().cloned());
            (t, global_output.unwrap_or(OutputFormat::Plain))
        }
    };
    if template[0].trim().is_empty() {
        return Err(AgentError::Config(format!(
            "the agent command for stage {stage} has an empty program name"
        )));
    }
    for arg in &template {
        if let [name, ..] = crate::template::single_brace_names(arg, PLACEHOLDERS)[..] {
            return Err(AgentError::Config(format!(
                "the agent command for stage {stage} has the argument {arg:?}: placeholders are written {{{{{name}}}}}, not {{{name}}}"
            )));
        }
    }
    Ok(Resolved {
        template,
        output: stage_output.unwrap_or(default_output),
        model,
    })
}

/// Replace `{name}` placeholders in `arg` in one pass; unknown names stay.
fn substitute(arg: &str, vars: &[(&str, &str)]) -> String {
    crate::template::fill(arg, |name| {
        vars.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| (*v).to_owned())
    })
}

/// The names an agent command line may use, written `{{name}}`.
pub const PLACEHOLDERS: &[&str] = &["prompt", "prompt_file", "model", "stage", "issue", "cwd"];

/// Variables of the worker's environment every agent gets, by exact name.
pub const PASS_NAMES: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "LANG",
    "LANGUAGE",
    "TZ",
    "TERM",
    "TMPDIR",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "NODE_EXTRA_CA_CERTS",
    "HYDRAFLOW_HOME",
    "CLAUDE_CONFIG_DIR",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "all_proxy",
];

/// …and by prefix: the model APIs' and agent CLIs' own settings and
/// credentials, locale and XDG directories.
pub const PASS_PREFIXES: &[&str] = &[
    "ANTHROPIC_",
    "CLAUDE_CODE_",
    "OPENAI_",
    "CODEX_",
    "LC_",
    "XDG_",
];

/// Variables an agent CLI sets for the commands it runs, which would make a
/// nested agent believe it runs inside another one: never passed.
pub const SESSION_VARS: &[&str] = &[
    "CLAUDECODE",
    "CLAUDE_CODE_ENTRYPOINT",
    "CLAUDE_CODE_SSE_PORT",
    "CLAUDE_CODE_SESSION_ID",
    "CODEX_SANDBOX",
    "CODEX_SANDBOX_NETWORK_DISABLED",
    "CODEX_THREAD_ID",
];

/// Whether `name` passes from the worker's environment to an agent: the
/// built-in allow-list ([`PASS_NAMES`], [`PASS_PREFIXES`]) and
/// `agent.pass_env` (names, or prefixes ending in `*`), except
/// [`SESSION_VARS`]. Everything else — git's `GIT_*`, systemd's
/// `NOTIFY_SOCKET`, `LISTEN_*`, `CREDENTIALS_DIRECTORY`, tokens such as
/// `GH_TOKEN` — stays with the worker.
pub fn passes(name: &str, pass_env: &[String]) -> bool {
    if SESSION_VARS.contains(&name) {
        return false;
    }
    PASS_NAMES.contains(&name)
        || PASS_PREFIXES.iter().any(|p| name.starts_with(p))
        || pass_env.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => name == p,
        })
}

/// The complete environment of an agent: the variables of `parent` that
/// [`passes`] lets through, then `config.env`, then `extra_env` (the
/// credentials, `GH_TOKEN` when allowed; later entries win), then
/// `HYDRAFLOW_STAGE` and `HYDRAFLOW_ISSUE`. Sorted by name.
pub fn agent_env(
    parent: impl IntoIterator<Item = (String, String)>,
    config: &AgentConfig,
    stage: Stage,
    issue: u64,
    extra_env: &[(String, String)],
) -> Vec<(String, String)> {
    let mut env: BTreeMap<String, String> = parent
        .into_iter()
        .filter(|(k, _)| passes(k, &config.pass_env))
        .collect();
    env.extend(config.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    env.extend(extra_env.iter().cloned());
    env.insert("HYDRAFLOW_STAGE".into(), stage.as_str().into());
    env.insert("HYDRAFLOW_ISSUE".into(), issue.to_string());
    env.into_iter().collect()
}

/// The agents' optional systemd credentials and the variable each is handed
/// to the agent as: `anthropic-api-key` → `ANTHROPIC_API_KEY`,
/// `openai-api-key` → `OPENAI_API_KEY`, `claude-oauth-token` →
/// `CLAUDE_CODE_OAUTH_TOKEN`.
pub const AGENT_CREDENTIALS: &[(&str, &str)] = &[
    ("anthropic-api-key", "ANTHROPIC_API_KEY"),
    ("openai-api-key", "OPENAI_API_KEY"),
    ("claude-oauth-token", "CLAUDE_CODE_OAUTH_TOKEN"),
];

/// The agent credentials present in `$CREDENTIALS_DIRECTORY`, as the
/// variables the CLIs read (see [`AGENT_CREDENTIALS`]). Empty off systemd.
pub fn credential_env() -> Vec<(String, String)> {
    AGENT_CREDENTIALS
        .iter()
        .filter_map(|(name, var)| {
            crate::systemd::read_credential(name).map(|v| ((*var).to_string(), v))
        })
        .collect()
}

/// Each stage's agent program and where it was found on the agents' `PATH`
/// (`agent.env.PATH`, else this process's), for `hydraflow config check`.
///
/// # Errors
/// [`AgentError::Config`] as [`validate`].
pub fn stage_programs(
    config: &AgentConfig,
) -> Result<Vec<(Stage, String, Option<PathBuf>)>, AgentError> {
    let path = config
        .env
        .get("PATH")
        .cloned()
        .or_else(|| std::env::var("PATH").ok());
    let mut out = Vec::new();
    for stage in Stage::ALL {
        let resolved = resolve(config, stage)?;
        let program = resolved.template[0].clone();
        let found = find_program(&program, path.as_deref());
        out.push((stage, program, found));
    }
    Ok(out)
}

/// This process's environment, skipping variables that are not valid UTF-8.
fn process_env() -> Vec<(String, String)> {
    std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect()
}

/// Resolve the stage's preset or template into a runnable call.
///
/// # Errors
/// [`AgentError::Config`] for an unknown preset or output format, or a
/// `command` preset with no command.
pub fn build_call(config: &AgentConfig, request: CallRequest) -> Result<AgentCall, AgentError> {
    build_call_with_env(config, request, process_env())
}

/// [`build_call`] with the parent environment given instead of taken from
/// this process (for tests, and callers that keep their own environment).
///
/// # Errors
/// As [`build_call`]; [`AgentError::Io`] when the template uses
/// `{{prompt_file}}` and the prompt file cannot be written.
pub fn build_call_with_env(
    config: &AgentConfig,
    request: CallRequest,
    parent_env: impl IntoIterator<Item = (String, String)>,
) -> Result<AgentCall, AgentError> {
    let stage = request.stage;
    let resolved = resolve(config, stage)?;
    let model = resolved.model.clone().unwrap_or_default();
    let uses_prompt = resolved.template.iter().any(|a| a.contains("{{prompt}}"));
    let uses_file = resolved
        .template
        .iter()
        .any(|a| a.contains("{{prompt_file}}"));
    let too_large = request.prompt.len() > MAX_ARG_PROMPT;

    let prompt_file = sibling(&request.transcript_path, ".prompt.md");
    if uses_file {
        write_file_atomic(&prompt_file, request.prompt.as_bytes())?;
    }
    let issue = request.issue.to_string();
    let cwd = request.cwd.to_string_lossy().into_owned();
    let prompt_file_s = prompt_file.to_string_lossy().into_owned();
    let vars = [
        ("prompt", request.prompt.as_str()),
        ("prompt_file", prompt_file_s.as_str()),
        ("model", model.as_str()),
        ("stage", stage.as_str()),
        ("issue", issue.as_str()),
        ("cwd", cwd.as_str()),
    ];
    let argv: Vec<String> = resolved
        .template
        .iter()
        .filter(|a| !(too_large && a.contains("{{prompt}}")))
        .map(|a| substitute(a, &vars))
        .collect();
    let to_stdin = (uses_prompt && too_large) || (!uses_prompt && !uses_file);
    let env = agent_env(parent_env, config, stage, request.issue, &request.extra_env);
    Ok(AgentCall {
        stage,
        issue: request.issue,
        argv,
        stdin: to_stdin.then_some(request.prompt),
        cwd: request.cwd,
        env,
        output: resolved.output,
        timeout: request.timeout,
        transcript_path: request.transcript_path,
    })
}

/// Check every stage's agent settings without running anything (for
/// `hydraflow config check` and worker start-up).
///
/// # Errors
/// [`AgentError::Config`] naming the stage and the problem.
pub fn validate(config: &AgentConfig) -> Result<(), AgentError> {
    for stage in Stage::ALL {
        resolve(config, stage)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(stage: Stage, prompt: &str, dir: &Path) -> CallRequest {
        CallRequest {
            stage,
            issue: 7,
            prompt: prompt.into(),
            cwd: dir.to_path_buf(),
            transcript_path: dir.join("logs/issue-7.txt"),
            timeout: Duration::from_secs(60),
            extra_env: vec![("GH_TOKEN".into(), "granted".into())],
        }
    }

    fn env_of(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect()
    }

    #[test]
    fn agent_env_cleans_the_parent() {
        let parent = env_of(&[
            ("PATH", "/usr/bin"),
            ("HOME", "/home/h"),
            ("GIT_DIR", "/repo/.git"),
            ("GIT_INDEX_FILE", "/repo/.git/index"),
            ("CLAUDECODE", "1"),
            ("CLAUDE_CODE_ENTRYPOINT", "cli"),
            ("CODEX_SANDBOX", "seatbelt"),
            ("CODEX_HOME", "/home/h/.codex"),
            ("NOTIFY_SOCKET", "/run/systemd/notify"),
            ("WATCHDOG_USEC", "1000"),
            ("LISTEN_FDS", "1"),
            ("JOURNAL_STREAM", "8:1"),
            ("INVOCATION_ID", "abc"),
            ("CREDENTIALS_DIRECTORY", "/run/credentials/x"),
            ("HYDRAFLOW_GH_TOKEN", "secret"),
            ("GH_TOKEN", "secret"),
            ("GITHUB_TOKEN", "secret"),
            ("HYDRAFLOW_STAGE", "old"),
            ("ANTHROPIC_API_KEY", "key"),
            ("GITHUB_ACTIONS", "true"),
            ("CLAUDE_CODE_MAX_RETRIES", "0"),
            ("CLAUDE_CODE_USE_BEDROCK", "1"),
            ("OPENAI_BASE_URL", "http://127.0.0.1:1/v1"),
            ("HTTPS_PROXY", "http://proxy:3128"),
            ("LC_ALL", "C.UTF-8"),
            ("AWS_REGION", "eu-west-1"),
        ]);
        let mut config = AgentConfig {
            pass_env: vec!["AWS_*".into()],
            ..AgentConfig::default()
        };
        config.env.insert("RUST_LOG".into(), "debug".into());
        config.env.insert("PATH".into(), "/opt/bin".into());
        let extra = env_of(&[("GH_TOKEN", "granted"), ("RUST_LOG", "info")]);
        let env = agent_env(parent, &config, Stage::Plan, 12, &extra);
        assert_eq!(
            env,
            env_of(&[
                ("ANTHROPIC_API_KEY", "key"),
                ("AWS_REGION", "eu-west-1"),
                ("CLAUDE_CODE_MAX_RETRIES", "0"),
                ("CLAUDE_CODE_USE_BEDROCK", "1"),
                ("CODEX_HOME", "/home/h/.codex"),
                ("GH_TOKEN", "granted"),
                ("HOME", "/home/h"),
                ("HTTPS_PROXY", "http://proxy:3128"),
                ("HYDRAFLOW_ISSUE", "12"),
                ("HYDRAFLOW_STAGE", "plan"),
                ("LC_ALL", "C.UTF-8"),
                ("OPENAI_BASE_URL", "http://127.0.0.1:1/v1"),
                ("PATH", "/opt/bin"),
                ("RUST_LOG", "info"),
            ])
        );
    }

    fn argv(
        config: &AgentConfig,
        stage: Stage,
        prompt: &str,
    ) -> (Vec<String>, Option<String>, OutputFormat) {
        let dir = std::env::temp_dir();
        let call = build_call_with_env(config, request(stage, prompt, &dir), Vec::new())
            .unwrap_or_else(|e| panic!("{stage}: {e}"));
        (call.argv, call.stdin, call.output)
    }

    fn strs(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_string()).collect()
    }

    #[test]
    fn presets() {
        let mut config = AgentConfig::default();
        config.review.extra_args = strs(&["--max-turns", "30"]);
        let check = |config: &AgentConfig, stage, want: &[&str], format| {
            assert_eq!(
                argv(config, stage, "do {model} it"),
                (strs(want), None, format),
                "{stage}"
            );
        };
        let claude = OutputFormat::ClaudeStreamJson;
        check(
            &config,
            Stage::Triage,
            &[
                "claude",
                "-p",
                "do {model} it",
                "--output-format",
                "stream-json",
                "--verbose",
                "--model",
                "sonnet",
            ],
            claude,
        );
        check(
            &config,
            Stage::Implement,
            &[
                "claude",
                "-p",
                "do {model} it",
                "--output-format",
                "stream-json",
                "--verbose",
                "--model",
                "opus",
                "--permission-mode",
                "bypassPermissions",
            ],
            claude,
        );
        check(
            &config,
            Stage::Review,
            &[
                "claude",
                "-p",
                "do {model} it",
                "--output-format",
                "stream-json",
                "--verbose",
                "--model",
                "sonnet",
                "--permission-mode",
                "bypassPermissions",
                "--max-turns",
                "30",
            ],
            claude,
        );
        config.preset = "codex".into();
        config.plan.model = Some("gpt-5".into());
        let codex = OutputFormat::CodexJson;
        check(
            &config,
            Stage::Plan,
            &[
                "codex",
                "exec",
                "--json",
                "--model",
                "gpt-5",
                "--sandbox",
                "read-only",
                "do {model} it",
            ],
            codex,
        );
        check(
            &config,
            Stage::Hitl,
            &[
                "codex",
                "exec",
                "--json",
                "--sandbox",
                "danger-full-access",
                "do {model} it",
            ],
            codex,
        );
        // A stage's preset and output override the global ones.
        config.triage.preset = Some("command".into());
        config.triage.command = Some(strs(&[
            "agent",
            "--stage={{stage}}",
            "--issue",
            "{{issue}}",
            "--model={{model}}",
            "{{prompt}}",
            "{{unknown}}",
        ]));
        config.triage.output = Some("codex-json".into());
        check(
            &config,
            Stage::Triage,
            &[
                "agent",
                "--stage=triage",
                "--issue",
                "7",
                "--model=",
                "do {model} it",
                "{{unknown}}",
            ],
            codex,
        );
    }

    #[test]
    fn command_preset_prompt_delivery() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let mut config = AgentConfig {
            preset: "command".into(),
            ..AgentConfig::default()
        };
        // No prompt placeholder: stdin; the global output applies.
        config.command = strs(&["my-agent", "--cwd", "{{cwd}}"]);
        config.output = Some("claude-stream-json".into());
        let call = build_call_with_env(
            &config,
            request(Stage::Plan, "hello", dir.path()),
            Vec::new(),
        )?;
        assert_eq!(
            call.argv,
            vec![
                "my-agent".to_string(),
                "--cwd".into(),
                dir.path().display().to_string()
            ]
        );
        assert_eq!(call.stdin.as_deref(), Some("hello"));
        assert_eq!(call.output, OutputFormat::ClaudeStreamJson);
        // {{prompt_file}}: written next to the transcript.
        config.command = strs(&["my-agent", "--file={{prompt_file}}"]);
        let call = build_call_with_env(
            &config,
            request(Stage::Plan, "hello", dir.path()),
            Vec::new(),
        )?;
        let file = dir.path().join("logs/issue-7.prompt.md");
        assert_eq!(
            call.argv,
            vec!["my-agent".to_string(), format!("--file={}", file.display())]
        );
        assert_eq!(call.stdin, None);
        assert_eq!(std::fs::read_to_string(&file)?, "hello");
        // A prompt too large for an argument goes to stdin and its argument is dropped.
        config.command = strs(&["my-agent", "-p", "{{prompt}}", "--x"]);
        let big = "x".repeat(MAX_ARG_PROMPT + 1);
        let call =
            build_call_with_env(&config, request(Stage::Plan, &big, dir.path()), Vec::new())?;
        assert_eq!(call.argv, strs(&["my-agent", "-p", "--x"]));
        assert_eq!(call.stdin.map(|s| s.len()), Some(MAX_ARG_PROMPT + 1));
        let call = build_call_with_env(
            &config,
            request(Stage::Plan, "small", dir.path()),
            Vec::new(),
        )?;
        assert_eq!(call.argv, strs(&["my-agent", "-p", "small", "--x"]));
        assert_eq!(
            call.env
                .iter()
                .find(|(k, _)| k == "HYDRAFLOW_STAGE")
                .map(|(_, v)| v.as_str()),
            Some("plan")
        );
        Ok(())
    }

    #[test]
    fn config_errors_name_the_stage() {
        let check = |config: AgentConfig, want: &str| {
            let err = validate(&config)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains(want), "{err:?} lacks {want:?}");
            let dir = std::env::temp_dir();
            let built = build_call_with_env(&config, request(Stage::Triage, "p", &dir), Vec::new());
            assert!(matches!(built, Err(AgentError::Config(_))));
        };
        check(
            AgentConfig {
                preset: "gemini".into(),
                ..AgentConfig::default()
            },
            "agent preset \"gemini\" for stage triage is not known",
        );
        check(
            AgentConfig {
                preset: "command".into(),
                ..AgentConfig::default()
            },
            "stage triage uses the command preset but no command is set",
        );
        let mut c = AgentConfig::default();
        c.triage.output = Some("xml".into());
        check(
            c,
            "agent output format \"xml\" for stage triage is not known",
        );
        let mut c = AgentConfig {
            preset: "command".into(),
            command: strs(&["", "x"]),
            ..AgentConfig::default()
        };
        c.triage.command = None;
        check(c, "empty program name");
        assert!(validate(&AgentConfig::default()).is_ok());
        let mut c = AgentConfig {
            preset: "codex".into(),
            ..AgentConfig::default()
        };
        c.hitl.preset = Some("nope".into());
        let err = validate(&c)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("for stage hitl"), "{err}");
    }

    #[test]
    fn substitute_cases() {
        let vars = [("a", "1"), ("prompt", "{{a}}")];
        let check = |arg: &str, want: &str| assert_eq!(substitute(arg, &vars), want, "{arg:?}");
        check("{{a}}", "1");
        check("x{{a}}y{{a}}", "x1y1");
        check("{{prompt}}", "{{a}}");
        check("{{b}}", "{{b}}");
        check("{", "{");
        check("{\"json\": true}", "{\"json\": true}");
    }

    /// The old single-brace placeholders are refused, saying what to write.
    #[test]
    fn old_placeholders_are_refused() {
        let config = AgentConfig {
            preset: "command".into(),
            command: strs(&["my-agent", "--stage={stage}"]),
            ..AgentConfig::default()
        };
        let err = validate(&config).expect_err("refused").to_string();
        assert!(
            err.contains("\"--stage={stage}\": placeholders are written {{stage}}, not {stage}"),
            "{err}"
        );
    }
}
