//! `hydraflow worker`, `hydraflow run`, `hydraflow demo` and the scripted demo agent.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;

use super::TargetArgs;

/// `hydraflow worker`
#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// The instance slug (`%i` of hydraflow@.service).
    #[arg(long, value_name = "SLUG")]
    pub instance: String,
}

/// `hydraflow run`
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Which repository.
    #[command(flatten)]
    pub target: TargetArgs,
    /// Exit once no issue is left to work on (HITL waits do not count).
    #[arg(long)]
    pub exit_when_idle: bool,
}

/// `hydraflow demo`
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Where to make the demo repository (default: a new temporary directory).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

/// `hydraflow demo-agent`
#[derive(Debug, Args)]
pub struct DemoAgentArgs {
    /// The stage being run.
    #[arg(long)]
    pub stage: String,
    /// The issue number.
    #[arg(long)]
    pub issue: u64,
}

/// Run a configured instance.
///
/// # Errors
/// Configuration and start-up errors.
pub fn run_worker(config_file: &Path, args: WorkerArgs) -> anyhow::Result<ExitCode> {
    let _ = (config_file, args);
    todo!()
}

/// Run in the foreground on a checkout.
///
/// # Errors
/// Configuration and start-up errors.
pub fn run_foreground(config_file: &Path, args: RunArgs) -> anyhow::Result<ExitCode> {
    let _ = (config_file, args);
    todo!()
}

/// Make and run the demo.
///
/// # Errors
/// Any failure setting up or running the demo.
pub fn run_demo(config_file: &Path, args: DemoArgs) -> anyhow::Result<ExitCode> {
    let _ = (config_file, args);
    todo!()
}

/// The scripted demo agent.
///
/// # Errors
/// I/O failures.
pub fn run_demo_agent(args: DemoAgentArgs) -> anyhow::Result<ExitCode> {
    let _ = args;
    todo!()
}
