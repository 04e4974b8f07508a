//! Runs one agent call: builds the command line from the stage's preset or
//! argv template, spawns it in its own process group with a clean
//! environment, streams stdout line by line through the format's parser,
//! kills the whole group on timeout, and saves the transcript.

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;

use super::parse::DisplayLine;
use super::{AgentCall, AgentError, AgentOutcome, Stage};
use crate::config::AgentConfig;

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
}

/// Runs agents as child processes.
#[derive(Debug, Clone, Default)]
pub struct ProcessRunner;

#[async_trait]
impl AgentRunner for ProcessRunner {
    async fn run(
        &self,
        call: &AgentCall,
        on_line: LineSink<'_>,
    ) -> Result<AgentOutcome, AgentError> {
        let _ = (call, on_line);
        todo!("agent helper implements this")
    }
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

/// Resolve the stage's preset or template into a runnable call.
///
/// # Errors
/// [`AgentError::Config`] for an unknown preset or output format, or a
/// `command` preset with no command.
pub fn build_call(config: &AgentConfig, request: CallRequest) -> Result<AgentCall, AgentError> {
    let _ = (config, request);
    todo!("agent helper implements this")
}

/// Check every stage's agent settings without running anything (for
/// `hydraflow config check` and worker start-up).
///
/// # Errors
/// [`AgentError::Config`] naming the stage and the problem.
pub fn validate(config: &AgentConfig) -> Result<(), AgentError> {
    let _ = config;
    todo!("agent helper implements this")
}
