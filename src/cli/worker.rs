//! `hydraflow worker`, `hydraflow run`, `hydraflow demo` and the scripted
//! demo agent.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Args;

use super::TargetArgs;
use crate::agent::runner::ProcessRunner;
use crate::config::ForgeKind;
use crate::config::loader::Resolved;
use crate::forge::Forge;
use crate::forge::local::LocalForge;
use crate::runtime::{RepoRuntime, RepoRuntimeRegistry};
use crate::systemd;

/// How long a stop may take before the process exits anyway (the unit's
/// `TimeoutStopSec=` is longer).
const STOP_DEADLINE: Duration = Duration::from_secs(8);

/// `hydraflow worker`
#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// The instance slug (`%i` of hydraflow@.service); reads `<repos_dir>/<slug>.toml`.
    #[arg(long, value_name = "SLUG")]
    pub instance: String,
}

/// `hydraflow run`
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Which repository.
    #[command(flatten)]
    pub target: TargetArgs,
    /// The forge to use (default: the configuration's, else `local`).
    #[arg(long, value_enum)]
    pub forge: Option<ForgeArg>,
    /// Exit once no issue is left to work on (issues waiting for a human do not count).
    #[arg(long)]
    pub exit_when_idle: bool,
}

/// `--forge`
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ForgeArg {
    /// The embedded local forge.
    Local,
    /// GitHub (or GitHub Enterprise Server with `github.api_url`).
    Github,
}

/// `hydraflow demo`
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Where to make the demo repository (default: a new directory under the temporary directory).
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

/// How the daemon runs.
#[derive(Debug, Clone, Copy, Default)]
struct DaemonOptions {
    exit_when_idle: bool,
    print_paths: bool,
}

/// Run a configured instance.
///
/// # Errors
/// Configuration and start-up errors.
pub fn run_worker(config_file: &Path, args: WorkerArgs) -> anyhow::Result<ExitCode> {
    let target = TargetArgs {
        instance: Some(args.instance),
        repo: None,
    };
    let resolved = super::target::resolve(config_file, &target)?;
    run_daemon(resolved, DaemonOptions::default())
}

/// Run in the foreground on a checkout.
///
/// # Errors
/// Configuration and start-up errors.
pub fn run_foreground(config_file: &Path, args: RunArgs) -> anyhow::Result<ExitCode> {
    let mut overrides = Vec::new();
    if let Some(forge) = args.forge {
        let name = match forge {
            ForgeArg::Local => "local",
            ForgeArg::Github => "github",
        };
        overrides.push((
            "forge".to_owned(),
            toml::Value::String(name.into()),
            "--forge".to_owned(),
        ));
    }
    let resolved = super::target::resolve_with(config_file, &args.target, overrides)?;
    run_daemon(
        resolved,
        DaemonOptions {
            exit_when_idle: args.exit_when_idle,
            print_paths: true,
        },
    )
}

fn build_forge(resolved: &Resolved) -> anyhow::Result<Arc<dyn Forge>> {
    match resolved.config.forge {
        ForgeKind::Local => Ok(Arc::new(
            LocalForge::open(&resolved.layout, &resolved.repo_path)
                .context("cannot open the local forge")?,
        )),
        ForgeKind::Github => Ok(Arc::new(
            crate::forge::github::GithubForge::from_config(&resolved.config)
                .context("cannot set up the GitHub forge")?,
        )),
    }
}

fn print_paths(resolved: &Resolved, log_file: Option<&Path>) {
    let layout = &resolved.layout;
    eprintln!("repository:  {}", resolved.repo_path.display());
    eprintln!("data:        {}", layout.repo_dir().display());
    eprintln!("transcripts: {}", layout.logs_dir().display());
    eprintln!("worktrees:   {}", layout.worktrees_dir().display());
    match log_file {
        Some(p) => eprintln!("log:         {}", p.display()),
        None => eprintln!(
            "log:         the journal (journalctl -u 'hydraflow@{}')",
            layout.slug
        ),
    }
}

/// Run the worker until SIGTERM/SIGINT (or idleness when asked).
fn run_daemon(resolved: Resolved, options: DaemonOptions) -> anyhow::Result<ExitCode> {
    let log_file =
        (!systemd::stderr_is_journal()).then(|| resolved.layout.logs_dir().join("hydraflow.log"));
    if let Some(p) = &log_file {
        std::fs::create_dir_all(resolved.layout.logs_dir())
            .with_context(|| format!("cannot create {}", resolved.layout.logs_dir().display()))?;
        let _ = p;
    }
    systemd::init_logging(log_file.as_deref());
    if options.print_paths {
        print_paths(&resolved, log_file.as_deref());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("hydraflow")
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let code = rt.block_on(daemon(resolved.clone(), options))?;
    rt.shutdown_timeout(Duration::from_secs(1));
    if options.print_paths {
        print_paths(&resolved, log_file.as_deref());
    }
    Ok(code)
}

async fn daemon(resolved: Resolved, options: DaemonOptions) -> anyhow::Result<ExitCode> {
    use tokio::signal::unix::{SignalKind, signal};
    let slug = resolved.layout.slug.clone();
    let forge = build_forge(&resolved)?;
    let runtime = RepoRuntime::create(resolved, forge, Arc::new(ProcessRunner), Vec::new())
        .with_context(|| format!("cannot start the worker for {slug}"))?;
    let registry = RepoRuntimeRegistry::new();
    registry.register(Arc::clone(&runtime));
    let mut sigterm = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut sigint = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;

    runtime.start().await;
    let status = runtime.status_line().await;
    systemd::notify_ready(&status);
    tracing::info!(repo_slug = %slug, status, "worker ready");
    let mut changes = runtime
        .status_changes()
        .await
        .context("the orchestrator did not start")?;
    let mut idle_check = tokio::time::interval(Duration::from_millis(250));
    let mut idle_since: Option<Instant> = None;
    let reason = loop {
        tokio::select! {
            _ = sigterm.recv() => break "SIGTERM",
            _ = sigint.recv() => break "SIGINT",
            changed = changes.changed() => {
                if changed.is_err() { break "the orchestrator stopped"; }
                let line = changes.borrow_and_update().clone();
                systemd::notify_status(&line);
            }
            _ = idle_check.tick(), if options.exit_when_idle => {
                if runtime.is_idle().await {
                    let since = *idle_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= Duration::from_millis(500) {
                        break "no work left";
                    }
                } else {
                    idle_since = None;
                }
            }
        }
    };
    tracing::info!(repo_slug = %slug, reason, "stopping");
    systemd::notify_stopping();
    systemd::notify_status(&format!("stopping: {reason}"));
    runtime.stop(STOP_DEADLINE).await;
    registry.remove(slug.as_str());
    tracing::info!(repo_slug = %slug, "stopped");
    Ok(ExitCode::SUCCESS)
}

/// Make and run the demo: a repository with four issues, the scripted demo
/// agent, and the local forge, until no work is left.
///
/// # Errors
/// Any failure setting up or running the demo.
pub fn run_demo(config_file: &Path, args: DemoArgs) -> anyhow::Result<ExitCode> {
    let base = match args.dir {
        Some(d) => d,
        None => std::env::temp_dir().join(format!(
            "hydraflow-demo-{}",
            chrono::Utc::now().format("%Y%m%d-%H%M%S")
        )),
    };
    let repo = base.join("demo-repo");
    if repo.exists() {
        bail!(
            "{} already exists: pass --dir with a new directory",
            repo.display()
        );
    }
    crate::demo::make_repository(&repo)?;
    let exe = std::env::current_exe().context("cannot find the hydraflow executable")?;
    let demo_config = base.join("hydraflow.toml");
    crate::demo::write_config(&demo_config, &exe)?;
    let target = TargetArgs {
        instance: None,
        repo: Some(repo.display().to_string()),
    };
    let _ = config_file;
    let resolved = super::target::resolve(&demo_config, &target)?;
    let forge = LocalForge::open(&resolved.layout, &resolved.repo_path)
        .context("cannot open the local forge")?;
    for (title, body) in crate::demo::ISSUES {
        let issue = forge.create_issue(
            title,
            body,
            std::slice::from_ref(&resolved.config.labels.find),
        )?;
        eprintln!("filed issue #{}: {}", issue.number, issue.title);
    }
    let started = Instant::now();
    let code = run_daemon(
        resolved.clone(),
        DaemonOptions {
            exit_when_idle: true,
            print_paths: false,
        },
    )?;
    eprintln!();
    eprintln!("demo finished in {:.1} s", started.elapsed().as_secs_f64());
    crate::demo::print_summary(&resolved, &forge)?;
    print_paths(
        &resolved,
        Some(&resolved.layout.logs_dir().join("hydraflow.log")),
    );
    eprintln!("config:      {}", demo_config.display());
    Ok(code)
}

/// The scripted demo agent.
///
/// # Errors
/// I/O failures.
pub fn run_demo_agent(args: DemoAgentArgs) -> anyhow::Result<ExitCode> {
    crate::demo::agent(&args.stage, args.issue)
}
