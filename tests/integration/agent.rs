//! Agent runner against real child processes: small `sh` scripts stand in
//! for the coding-agent CLIs.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use hydraflow::agent::parse::{DisplayLine, LineKind};
use hydraflow::agent::runner::{AgentRunner, CallRequest, ProcessRunner, build_call_with_env};
use hydraflow::agent::{
    AgentCall, AgentError, AgentFailure, AgentOutcome, OutputFormat, PauseKind, Stage,
};
use hydraflow::config::AgentConfig;

type TestResult = Result<(), Box<dyn std::error::Error>>;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/");

fn path_env() -> Vec<(String, String)> {
    vec![(
        "PATH".into(),
        std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into()),
    )]
}

/// A call running `script` with `sh` in `dir`.
fn call(dir: &Path, script: &str, output: OutputFormat, timeout: Duration) -> AgentCall {
    let path = dir.join("agent.sh");
    std::fs::write(&path, script).expect("write script");
    AgentCall {
        stage: Stage::Implement,
        issue: 5,
        argv: vec!["sh".into(), path.display().to_string()],
        stdin: None,
        cwd: dir.to_path_buf(),
        env: path_env(),
        output,
        timeout,
        transcript_path: dir.join("logs/issue-5.txt"),
    }
}

async fn run(call: &AgentCall) -> Result<(AgentOutcome, Vec<DisplayLine>), AgentError> {
    let lines = Mutex::new(Vec::new());
    let sink = |l: &DisplayLine| lines.lock().expect("lock").push(l.clone());
    let outcome = ProcessRunner::default().run(call, &sink).await?;
    Ok((outcome, lines.into_inner().expect("lock")))
}

/// Whether `pid` is gone (or a zombie waiting to be reaped by init).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|state| state == 'Z' || state == 'X'),
    }
}

/// Wait (up to a generous bound) until `pid` is gone.
async fn wait_gone(pid: u32) -> bool {
    for _ in 0..600 {
        if gone(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Wait (up to a generous bound) until `path` holds a pid.
async fn read_pid(path: &Path) -> u32 {
    for _ in 0..1500 {
        if let Ok(text) = std::fs::read_to_string(path)
            && let Ok(pid) = text.trim().parse()
        {
            return pid;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{} never got a pid", path.display());
}

const MINUTE: Duration = Duration::from_secs(60);

#[tokio::test]
async fn agent_plain_success_writes_the_transcript() -> TestResult {
    let dir = tempfile::tempdir()?;
    let c = call(
        dir.path(),
        "echo hello\necho\necho world\n",
        OutputFormat::Plain,
        MINUTE,
    );
    let (outcome, lines) = run(&c).await?;
    assert!(outcome.succeeded(), "{outcome:?}");
    assert_eq!(outcome.exit_code, Some(0));
    assert_eq!(outcome.transcript, "hello\n\nworld\n");
    assert_eq!(
        std::fs::read_to_string(&c.transcript_path)?,
        "hello\n\nworld\n"
    );
    let texts: Vec<&str> = lines.iter().map(|l| l.text.as_str()).collect();
    assert_eq!(texts, ["hello", "world"]);
    assert!(!dir.path().join("logs/issue-5.jsonl").exists());
    Ok(())
}

#[tokio::test]
async fn agent_claude_stream_is_parsed_and_raw_output_saved() -> TestResult {
    let dir = tempfile::tempdir()?;
    let fixture = PathBuf::from(FIXTURES)
        .join("claude-stream-json/guess-claude_code_2025-06_complex_tool_chain.jsonl");
    let script = format!("cat '{}'\n", fixture.display());
    let c = call(dir.path(), &script, OutputFormat::ClaudeStreamJson, MINUTE);
    let (outcome, lines) = run(&c).await?;
    assert!(outcome.succeeded(), "{outcome:?}");
    assert_eq!(
        outcome.transcript,
        "Done. Created VERSION.txt with version 0.1.0-alpha.1 from mix.exs:4."
    );
    assert!(
        lines
            .iter()
            .any(|l| l.kind == LineKind::Tool && l.text.starts_with("Write: "))
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("logs/issue-5.jsonl"))?,
        std::fs::read_to_string(&fixture)?
    );
    Ok(())
}

#[tokio::test]
async fn agent_nonzero_exit_is_an_outcome() -> TestResult {
    let dir = tempfile::tempdir()?;
    let c = call(
        dir.path(),
        "echo partial\necho 'something broke' >&2\nexit 3\n",
        OutputFormat::Plain,
        MINUTE,
    );
    let (outcome, _) = run(&c).await?;
    assert_eq!(outcome.exit_code, Some(3));
    assert!(!outcome.succeeded());
    assert!(!outcome.timed_out);
    assert_eq!(outcome.stderr_tail, "something broke\n");
    assert_eq!(outcome.transcript, "partial\n");
    Ok(())
}

#[tokio::test]
async fn agent_junk_output_is_tolerated() -> TestResult {
    let dir = tempfile::tempdir()?;
    // Invalid UTF-8, truncated JSON, a 3 MB line, an unknown event, no final newline.
    let script = "printf 'junk \\377\\376 bytes\\n{\"type\":\"assis\\n'\n\
                  head -c 3000000 /dev/zero | tr '\\0' 'a'\necho\n\
                  echo '{\"type\":\"mystery\"}'\n\
                  printf '{\"type\":\"result\",\"subtype\":\"success\",\"is_error\":false,\"result\":\"fine\"}'\n";
    let c = call(dir.path(), script, OutputFormat::ClaudeStreamJson, MINUTE);
    let (outcome, lines) = run(&c).await?;
    assert!(outcome.succeeded(), "{outcome:?}");
    assert_eq!(outcome.transcript, "fine");
    assert_eq!(lines[0].text, "junk \u{fffd}\u{fffd} bytes");
    assert!(lines.iter().any(|l| l.text == "[mystery]"));
    assert!(lines.iter().all(|l| l.text.len() < 1000));
    Ok(())
}

#[tokio::test]
async fn agent_timeout_kills_the_whole_group() -> TestResult {
    let dir = tempfile::tempdir()?;
    let script = "echo started\nsleep 1000 &\necho $! > grandchild.pid\nsleep 1000\n";
    // Long enough for the script to start its grandchild on a loaded machine.
    let c = call(
        dir.path(),
        script,
        OutputFormat::Plain,
        Duration::from_secs(3),
    );
    let (outcome, _) = run(&c).await?;
    assert!(outcome.timed_out, "{outcome:?}");
    assert_eq!(outcome.exit_code, None);
    assert!(!outcome.succeeded());
    assert_eq!(outcome.transcript, "started\n");
    let pid = read_pid(&dir.path().join("grandchild.pid")).await;
    assert!(
        wait_gone(pid).await,
        "grandchild {pid} survived the timeout"
    );
    Ok(())
}

/// The agent exits but leaves a process holding its stdout: it is killed,
/// and the call is not a timeout.
#[tokio::test]
async fn agent_stragglers_are_killed_after_exit() -> TestResult {
    let dir = tempfile::tempdir()?;
    let script = "sleep 1000 &\necho $! > straggler.pid\necho done\nexit 0\n";
    let c = call(dir.path(), script, OutputFormat::Plain, MINUTE);
    let (outcome, _) = run(&c).await?;
    assert!(outcome.succeeded(), "{outcome:?}");
    assert_eq!(outcome.transcript, "done\n");
    let pid = read_pid(&dir.path().join("straggler.pid")).await;
    assert!(wait_gone(pid).await, "straggler {pid} survived");
    Ok(())
}

/// Dropping the run future (worker shutdown) kills the group.
#[tokio::test]
async fn agent_cancelled_run_kills_the_group() -> TestResult {
    let dir = tempfile::tempdir()?;
    let script = "sleep 1000 &\necho $! > grandchild.pid\nsleep 1000\n";
    let c = call(
        dir.path(),
        script,
        OutputFormat::Plain,
        Duration::from_secs(3600),
    );
    let pid_file = dir.path().join("grandchild.pid");
    let pid = tokio::select! {
        r = run(&c) => panic!("the agent finished: {r:?}"),
        pid = read_pid(&pid_file) => pid,
    };
    assert!(
        wait_gone(pid).await,
        "grandchild {pid} survived cancellation"
    );
    Ok(())
}

#[tokio::test]
async fn agent_usage_limit_on_stderr_is_recognised() -> TestResult {
    let dir = tempfile::tempdir()?;
    let script = "echo working\necho 'Claude AI usage limit reached|1750000000' >&2\nexit 1\n";
    let c = call(dir.path(), script, OutputFormat::Plain, MINUTE);
    let (outcome, _) = run(&c).await?;
    assert_eq!(
        outcome.failure(),
        Some(AgentFailure::Pause {
            reason: "agent usage limit reached: Claude AI usage limit reached|1750000000".into(),
            kind: PauseKind::UsageLimit,
            until: Some(1_750_000_000),
        })
    );
    assert!(!outcome.succeeded());
    Ok(())
}

#[tokio::test]
async fn agent_spawn_failure_is_an_error() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut c = call(dir.path(), "", OutputFormat::Plain, MINUTE);
    c.argv = vec![dir.path().join("no-such-agent").display().to_string()];
    let err = run(&c).await.err();
    assert!(matches!(err, Some(AgentError::Spawn { .. })), "{err:?}");
    Ok(())
}

fn command_config(dir: &Path, script: &str, args: &[&str]) -> AgentConfig {
    let path = dir.join("agent.sh");
    std::fs::write(&path, script).expect("write script");
    let mut command = vec!["sh".to_string(), path.display().to_string()];
    command.extend(args.iter().map(|a| (*a).to_string()));
    AgentConfig {
        preset: "command".into(),
        command,
        ..AgentConfig::default()
    }
}

fn request(dir: &Path, prompt: &str) -> CallRequest {
    CallRequest {
        stage: Stage::Review,
        issue: 9,
        prompt: prompt.into(),
        cwd: dir.to_path_buf(),
        transcript_path: dir.join("logs/review-pr-9.txt"),
        timeout: MINUTE,
        extra_env: Vec::new(),
    }
}

#[tokio::test]
async fn agent_prompt_via_argv_and_stdin() -> TestResult {
    let dir = tempfile::tempdir()?;
    let prompt = "Review it.\nVERDICT: please; $HOME `x`";
    // As an argument.
    let config = command_config(dir.path(), "printf '%s' \"$1\"\n", &["{{prompt}}"]);
    let c = build_call_with_env(&config, request(dir.path(), prompt), path_env())?;
    let (outcome, _) = run(&c).await?;
    assert_eq!(outcome.transcript, format!("{prompt}\n"));
    // On stdin (no placeholder).
    let config = command_config(dir.path(), "cat\n", &[]);
    let c = build_call_with_env(&config, request(dir.path(), prompt), path_env())?;
    let (outcome, _) = run(&c).await?;
    assert_eq!(outcome.transcript, format!("{prompt}\n"));
    // Too large for an argument: stdin, and the argument is dropped.
    let big = "y".repeat(300 * 1024);
    let config = command_config(dir.path(), "echo \"args=$#\"\nwc -c\n", &["{{prompt}}"]);
    let c = build_call_with_env(&config, request(dir.path(), &big), path_env())?;
    let (outcome, _) = run(&c).await?;
    let words: Vec<&str> = outcome.transcript.split_whitespace().collect();
    assert_eq!(words, ["args=0", "307200"]);
    Ok(())
}

#[tokio::test]
async fn agent_environment_is_clean() -> TestResult {
    let dir = tempfile::tempdir()?;
    let config = command_config(dir.path(), "env | sort\n", &[]);
    let mut parent = path_env();
    parent.push(("GIT_DIR".into(), "/somewhere/.git".into()));
    parent.push(("CLAUDECODE".into(), "1".into()));
    parent.push(("GH_TOKEN".into(), "secret".into()));
    parent.push(("KEEP_ME".into(), "yes".into()));
    parent.push(("DROP_ME".into(), "yes".into()));
    parent.push(("CLAUDE_CODE_MAX_RETRIES".into(), "2".into()));
    parent.push(("ANTHROPIC_BASE_URL".into(), "http://127.0.0.1:9".into()));
    parent.push(("https_proxy".into(), "http://proxy:3128".into()));
    let mut config = config;
    config.pass_env = vec!["KEEP_*".into()];
    let c = build_call_with_env(&config, request(dir.path(), "p"), parent)?;
    let (outcome, _) = run(&c).await?;
    let env: Vec<&str> = outcome.transcript.lines().collect();
    for gone in ["GIT_DIR=", "CLAUDECODE=", "GH_TOKEN=", "DROP_ME="] {
        assert!(
            !env.iter().any(|l| l.starts_with(gone)),
            "{gone} leaked: {env:?}"
        );
    }
    for kept in [
        "KEEP_ME=yes",
        "HYDRAFLOW_STAGE=review",
        "HYDRAFLOW_ISSUE=9",
        "CLAUDE_CODE_MAX_RETRIES=2",
        "ANTHROPIC_BASE_URL=http://127.0.0.1:9",
        "https_proxy=http://proxy:3128",
    ] {
        assert!(env.contains(&kept), "{kept} missing: {env:?}");
    }
    Ok(())
}

#[tokio::test]
async fn agent_secrets_are_redacted_from_everything_it_prints() -> TestResult {
    let dir = tempfile::tempdir()?;
    let secret = "sk-ant-api03-very-secret-value";
    let script = format!(
        "echo '{{\"type\":\"result\",\"subtype\":\"success\",\"is_error\":false,\"result\":\"key {secret}\"}}'\necho 'stderr {secret}' >&2\n"
    );
    let c = call(dir.path(), &script, OutputFormat::ClaudeStreamJson, MINUTE);
    let lines = Mutex::new(Vec::new());
    let sink = |l: &DisplayLine| lines.lock().expect("lock").push(l.text.clone());
    let runner = ProcessRunner::default().with_secrets(vec![secret.to_string(), "short".into()]);
    let outcome = runner.run(&c, &sink).await?;
    assert_eq!(outcome.transcript, "key [redacted]");
    assert_eq!(outcome.stderr_tail, "stderr [redacted]\n");
    let raw = std::fs::read_to_string(dir.path().join("logs/issue-5.jsonl"))?;
    let saved = std::fs::read_to_string(&c.transcript_path)?;
    for text in [raw, saved]
        .iter()
        .chain(lines.lock().expect("lock").iter())
    {
        assert!(!text.contains(secret), "{text}");
    }
    Ok(())
}
