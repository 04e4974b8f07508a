//! The command line: clap definitions and one module per subcommand group,
//! each with a `run`. Daemons live in the library; this is glue.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

pub mod check;
pub mod config_cmd;
pub mod dashboard;
pub mod generate;
pub mod hitl;
pub mod issue;
pub mod ownership;
pub mod supervisor_cmd;
pub mod target;
pub mod webhook_cmd;
pub mod worker;

/// HydraFlow turns labelled issues into merged pull requests: coding-agent
/// CLIs triage, plan, implement in an isolated git worktree, review, wait for
/// CI and merge; when confidence drops the issue goes to a human (HITL).
#[derive(Debug, Parser)]
#[command(
    name = "hydraflow",
    version,
    propagate_version = true,
    max_term_width = 100
)]
pub struct Cli {
    /// Global configuration file (relative paths in it are relative to its directory).
    #[arg(
        long,
        global = true,
        env = "HYDRAFLOW_CONFIG",
        value_name = "FILE",
        default_value = crate::config::DEFAULT_CONFIG_FILE
    )]
    pub config: PathBuf,

    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a configured instance (what hydraflow@<slug>.service runs).
    ///
    /// One worker runs per data directory: a second one exits at once with
    /// status 1, naming the PID of the worker that holds
    /// data_root/<slug>/worker.lock.
    Worker(worker::WorkerArgs),
    /// Run the worker in the foreground on a checkout (try-out and development).
    ///
    /// One worker runs per data directory: a second `run` on the same checkout
    /// (or the same HYDRAFLOW_HOME and slug) exits at once with status 1,
    /// naming the PID of the worker that holds data_root/<slug>/worker.lock.
    /// `issue`, `hitl`, `check` and `config` do not take that lock.
    ///
    /// On the local forge a merge never goes through your working tree: the
    /// squash commit is made from trees and `main` moves by compare-and-swap.
    /// A checkout that has `main` checked out follows the merge as `git
    /// checkout` would, keeping your changes to other files; a merge that
    /// would overwrite a change of yours waits until you commit, stash or
    /// remove it (the log names the path).
    #[command(after_long_help = RUN_EXAMPLES)]
    Run(worker::RunArgs),
    /// Make a demo repository with issues and take them through the pipeline
    /// with the scripted demo agent.
    Demo(worker::DemoArgs),
    /// The scripted demo agent (used by `hydraflow demo`).
    #[command(hide = true)]
    DemoAgent(worker::DemoAgentArgs),
    /// Run one agent call as a child subreaper that ends every descendant
    /// (run by the worker; see agent::shim).
    #[command(hide = true)]
    AgentShim(worker::AgentShimArgs),
    /// Show or check the effective configuration.
    #[command(subcommand)]
    Config(config_cmd::ConfigCommand),
    /// File and inspect issues of the local forge.
    #[command(subcommand)]
    Issue(issue::IssueCommand),
    /// List and answer issues waiting for a human.
    #[command(subcommand)]
    Hitl(hitl::HitlCommandArgs),
    /// Report and list check runs of the local forge (from your own CI).
    #[command(subcommand)]
    Check(check::CheckCommand),
    /// Serve the multi-repository dashboard for given worker sockets.
    Dashboard(dashboard::DashboardArgs),
    /// Run the supervisor: the control protocol on 127.0.0.1:8765 and one worker instance
    /// per registered repository.
    Supervisor(supervisor_cmd::SupervisorArgs),
    /// Add, remove, list and inspect the supervisor's repositories.
    #[command(subcommand)]
    Repo(supervisor_cmd::RepoCommand),
    /// Check that the supervisor answers.
    Ping,
    /// GitHub webhooks received by the supervisor.
    #[command(subcommand)]
    Webhook(webhook_cmd::WebhookCommand),
    /// Write manual pages or shell completions (used when building packages).
    #[command(subcommand, hide = true)]
    Generate(generate::GenerateCommand),
}

/// Examples shown by `hydraflow run --help` and in hydraflow-run(1).
const RUN_EXAMPLES: &str = "Examples:
  hydraflow run --repo ~/src/project
      The local forge: issues and pull requests under <checkout>/.hydraflow.
  hydraflow run --forge github --repo owner/name
      GitHub: the token comes from the credential github-token, else
      HYDRAFLOW_GH_TOKEN, GH_TOKEN or GITHUB_TOKEN; the repository is cloned
      into the data root. For GitHub Enterprise Server set github.api_url and
      github.web_url in hydraflow.toml.";

/// Which repository a command is about.
#[derive(Debug, Clone, Args, Default)]
pub struct TargetArgs {
    /// A configured instance (reads `<repos_dir>/<slug>.toml`).
    #[arg(long, value_name = "SLUG", conflicts_with = "repo")]
    pub instance: Option<String>,
    /// A checkout path (default: the current directory).
    #[arg(long, value_name = "PATH")]
    pub repo: Option<String>,
}

/// Run the parsed command line.
///
/// # Errors
/// Whatever the command failed with; `main` prints the chain.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if prints_for_a_pipe(&cli.command) {
        default_sigpipe();
    }
    match cli.command {
        Command::Worker(args) => worker::run_worker(&cli.config, args),
        Command::Run(args) => worker::run_foreground(&cli.config, args),
        Command::Demo(args) => worker::run_demo(&cli.config, args),
        Command::DemoAgent(args) => worker::run_demo_agent(args),
        Command::AgentShim(args) => Ok(worker::run_agent_shim(args)),
        Command::Config(cmd) => config_cmd::run(&cli.config, cmd),
        Command::Issue(cmd) => issue::run(&cli.config, cmd),
        Command::Hitl(cmd) => hitl::run(&cli.config, cmd),
        Command::Check(cmd) => check::run(&cli.config, cmd),
        Command::Dashboard(args) => dashboard::run(args),
        Command::Supervisor(args) => supervisor_cmd::run_supervisor(&cli.config, args),
        Command::Repo(cmd) => supervisor_cmd::run_repo(&cli.config, cmd),
        Command::Ping => supervisor_cmd::run_ping(&cli.config),
        Command::Webhook(cmd) => webhook_cmd::run(&cli.config, cmd),
        Command::Generate(cmd) => generate::run(cmd),
    }
}

/// Commands whose output is read by people and pipelines (`hydraflow config show | head`),
/// as opposed to the long-running ones (worker, supervisor, dashboard, demo), which write to
/// sockets and must see `EPIPE` as an error instead of dying.
fn prints_for_a_pipe(command: &Command) -> bool {
    matches!(
        command,
        Command::Config(_)
            | Command::Check(_)
            | Command::Issue(_)
            | Command::Hitl(_)
            | Command::Repo(_)
            | Command::Ping
            | Command::Webhook(_)
            | Command::Generate(_)
    )
}

/// Let a closed stdout end the process quietly, as it ends `cat` or `ls`: SIGPIPE gets its
/// default action back (the Rust runtime ignores it, which turns a closed pipe into a panic
/// of `println!`).
fn default_sigpipe() {
    use nix::sys::signal::{SigHandler, Signal, signal};
    // SAFETY: called from `main` before any thread exists; SIG_DFL installs no handler code.
    if let Err(e) = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) } {
        eprintln!("hydraflow: warning: cannot restore SIGPIPE: {e}");
    }
}
