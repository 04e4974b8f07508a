//! `hydraflow worker`, `hydraflow run`, `hydraflow demo` and the scripted
//! demo agent.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Args;
use tokio::signal::unix::{Signal, SignalKind, signal};

use super::TargetArgs;
use crate::agent::contain::{Containment, Limits};
use crate::agent::runner::ProcessRunner;
use crate::config::ForgeKind;
use crate::config::loader::Resolved;
use crate::forge::github::{self, GithubForge, GithubOptions};
use crate::forge::local::LocalForge;
use crate::forge::{Forge, ForgeError};
use crate::runtime::RepoRuntime;
use crate::store::sessions::CallLedger;
use crate::{dashboard, systemd, worker};

/// First wait before cloning again after a refused token or a network failure.
const CLONE_RETRY_FIRST: Duration = Duration::from_secs(60);
/// Longest wait between clone attempts.
const CLONE_RETRY_MAX: Duration = Duration::from_secs(1800);

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

/// `hydraflow agent-shim`
#[derive(Debug, Args)]
pub struct AgentShimArgs {
    /// The worker's pid: the shim gives up when its parent is already another process.
    #[arg(long)]
    pub parent: u32,
    /// The agent's program and arguments.
    #[arg(last = true, required = true)]
    pub argv: Vec<std::ffi::OsString>,
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

/// The forge of the configuration, and the environment its agents get.
struct ForgeSetup {
    forge: Arc<dyn Forge>,
    /// The GitHub forge again (typed), to clone the checkout.
    github: Option<Arc<GithubForge>>,
    /// `GH_TOKEN` when `agent.allow_token` is set.
    agent_env: Vec<(String, String)>,
    /// The GitHub token (redacted from agent output).
    token: Option<String>,
}

fn build_forge(resolved: &Resolved) -> anyhow::Result<ForgeSetup> {
    match resolved.config.forge {
        ForgeKind::Local => Ok(ForgeSetup {
            forge: Arc::new(
                LocalForge::open(&resolved.layout, &resolved.repo_path)
                    .context("cannot open the local forge")?,
            ),
            github: None,
            agent_env: Vec::new(),
            token: None,
        }),
        ForgeKind::Github => {
            let token =
                github::token_from_environment().context("cannot set up the GitHub forge")?;
            let agent_env = if resolved.config.agent.allow_token {
                vec![("GH_TOKEN".to_owned(), token.clone())]
            } else {
                Vec::new()
            };
            let options = GithubOptions::from_config(&resolved.config, token.clone())
                .context("cannot set up the GitHub forge")?;
            let forge =
                Arc::new(GithubForge::new(options).context("cannot set up the GitHub forge")?);
            Ok(ForgeSetup {
                forge: Arc::clone(&forge) as Arc<dyn Forge>,
                github: Some(forge),
                agent_env,
                token: Some(token),
            })
        }
    }
}

/// Clone the checkout when it does not exist yet. A refused token or a
/// network failure is reported (journal and `STATUS=`) and retried with a
/// doubling wait; returns false when a signal asked to stop meanwhile.
async fn ensure_checkout(
    gh: &GithubForge,
    resolved: &Resolved,
    sigterm: &mut Signal,
    sigint: &mut Signal,
) -> anyhow::Result<bool> {
    let dest = &resolved.repo_path;
    let slug = &resolved.layout.slug;
    let mut waits = crate::backoff::doubling(CLONE_RETRY_FIRST, CLONE_RETRY_MAX);
    while !dest.exists() {
        eprintln!("cloning {} into {}", gh.clone_url(), dest.display());
        match gh.clone_into(dest, &resolved.config.main_branch).await {
            Ok(()) => break,
            Err(
                e @ (ForgeError::Auth(_)
                | ForgeError::Transient(_)
                | ForgeError::RateLimited { .. }),
            ) => {
                let mut wait = waits.next().unwrap_or(CLONE_RETRY_MAX);
                if let ForgeError::RateLimited { retry_after } = &e {
                    wait = wait.max(*retry_after);
                }
                let status = format!(
                    "waiting {}s to retry: cannot clone {}: {e}",
                    wait.as_secs(),
                    gh.clone_url()
                );
                tracing::error!(repo_slug = %slug, error = %e, seconds = wait.as_secs(), "cannot clone the repository; will retry");
                // Started, though waiting: a start timeout must not kill a worker waiting for a token.
                systemd::notify_ready(&status);
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    _ = sigterm.recv() => return Ok(false),
                    _ = sigint.recv() => return Ok(false),
                }
            }
            Err(e) => {
                return Err(e).with_context(|| format!("cannot clone into {}", dest.display()));
            }
        }
    }
    Ok(true)
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
    // Before any thread exists: take the sockets of socket activation and clear its variables.
    let passed = systemd::take_named_listen_fds().context("cannot take LISTEN_FDS")?;
    let log_file =
        (!systemd::stderr_is_journal()).then(|| resolved.layout.logs_dir().join("hydraflow.log"));
    if log_file.is_some() {
        std::fs::create_dir_all(resolved.layout.logs_dir())
            .with_context(|| format!("cannot create {}", resolved.layout.logs_dir().display()))?;
    }
    systemd::init_logging(
        &format!("hydraflow@{}", resolved.layout.slug),
        log_file.as_deref(),
    );
    if options.print_paths {
        print_paths(&resolved, log_file.as_deref());
    }
    // `<checkout>/.hydraflow` stays out of the user's `git status`.
    if let Err(e) = crate::git::exclude_from_status(&resolved.repo_path, &resolved.layout.data_root)
    {
        tracing::warn!(error = %e, "cannot keep the data directory out of git status");
    }
    let activated = dashboard_fd(passed);
    // One thread runs the loops: the worker waits on agents, git and the
    // forge, and git2's blocking calls go to tokio's blocking pool. This
    // keeps an idle worker small (BENCHMARKS.md).
    let rt = tokio::runtime::Builder::new_current_thread()
        .thread_name("hydraflow")
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let code = rt.block_on(daemon(resolved, options, activated))?;
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(code)
}

/// The descriptor socket activation named `dashboard` (`FileDescriptorName=`
/// of hydraflow@.socket), if any; the others are closed with a warning.
fn dashboard_fd(passed: Vec<(String, OwnedFd)>) -> Option<OwnedFd> {
    let mut found = None;
    for (name, fd) in passed {
        if name == dashboard::ACTIVATION_NAME && found.is_none() {
            found = Some(fd);
        } else {
            tracing::warn!(
                name,
                "closing a socket passed by socket activation: only one named {:?} is used",
                dashboard::ACTIVATION_NAME
            );
        }
    }
    found
}

async fn daemon(
    resolved: Resolved,
    options: DaemonOptions,
    activated: Option<OwnedFd>,
) -> anyhow::Result<ExitCode> {
    let slug = resolved.layout.slug.clone();
    let mut sigterm = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut sigint = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let setup = build_forge(&resolved)?;
    if let Some(gh) = &setup.github
        && !ensure_checkout(gh, &resolved, &mut sigterm, &mut sigint).await?
    {
        tracing::info!(repo_slug = %slug, "stopped before the checkout was cloned");
        return Ok(ExitCode::SUCCESS);
    }
    let mut agent_env = setup.agent_env;
    agent_env.extend(crate::agent::runner::credential_env());
    let mut secrets: Vec<String> = agent_env.iter().map(|(_, v)| v.clone()).collect();
    secrets.extend(setup.token);
    let runner = agent_runner(&resolved, secrets)?;
    let runtime = RepoRuntime::create(resolved, setup.forge, Arc::new(runner), agent_env)
        .with_context(|| format!("cannot start the worker for {slug}"))?;
    let listeners = listeners(&runtime, activated).await?;
    let shutdown = async move {
        tokio::select! {
            _ = sigterm.recv() => "SIGTERM".to_owned(),
            _ = sigint.recv() => "SIGINT".to_owned(),
        }
    };
    let options = worker::Options {
        exit_when_idle: options.exit_when_idle,
        side_tasks: Vec::new(),
    };
    worker::run(runtime, listeners, &worker::Systemd, options, shutdown)
        .await
        .with_context(|| format!("the worker for {slug} stopped"))?;
    Ok(ExitCode::SUCCESS)
}

/// The worker API's sockets: `activated` (the one systemd passed) or else a
/// Unix socket bound here, plus its TCP address when
/// `dashboard.worker_listen` is set.
async fn listeners(
    runtime: &RepoRuntime,
    activated: Option<OwnedFd>,
) -> anyhow::Result<worker::Listeners> {
    let slug = &runtime.layout().slug;
    let (api, api_path, remove_api_socket) = match activated {
        Some(fd) => {
            let (listener, path) = dashboard::activated_socket(fd)?;
            tracing::info!(repo_slug = %slug, socket = %path.display(), "worker API on the socket passed by socket activation");
            (listener, path, false)
        }
        None => {
            let path = dashboard::worker_socket_path(runtime.layout());
            let listener = dashboard::bind_private_socket(&path)?;
            tracing::info!(repo_slug = %slug, socket = %path.display(), "worker API on a socket bound by the worker (no socket activation)");
            (listener, path, true)
        }
    };
    let config = &runtime.resolved().config.dashboard;
    let tcp = match &config.worker_listen {
        Some(address) => Some((
            dashboard::bind_tcp(address, config.token.as_deref()).await?,
            config.token.as_deref().map(Arc::from),
        )),
        None => None,
    };
    Ok(worker::Listeners {
        api,
        api_path,
        remove_api_socket,
        tcp,
    })
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

/// The agent shim ([`crate::agent::shim`]); exits as the agent did.
pub fn run_agent_shim(args: AgentShimArgs) -> ExitCode {
    let code = crate::agent::shim::run(args.parent, &args.argv);
    ExitCode::from(u8::try_from(code).unwrap_or(125))
}

/// The agent runner of a worker: containment decided and reported (the
/// mode, and each limit that cannot be applied, with why), calls recorded
/// in the ledger, credentials and tokens redacted from what agents print.
fn agent_runner(resolved: &Resolved, secrets: Vec<String>) -> anyhow::Result<ProcessRunner> {
    let agent = &resolved.config.agent;
    let containment = Containment::setup(
        Limits {
            memory_max: agent.memory_max,
            tasks_max: agent.tasks_max,
        },
        PathBuf::from("/proc/self/exe"),
    );
    let slug = &resolved.layout.slug;
    tracing::info!(repo_slug = %slug, mode = ?containment.mode(), "{}", containment.describe());
    for note in containment.notes() {
        tracing::warn!(repo_slug = %slug, "agent containment: {note}");
    }
    let ledger = CallLedger::open(
        &resolved.layout.agent_calls_file(),
        &resolved.layout.sessions_file(),
    )
    .context("cannot open the agent call ledger")?;
    Ok(ProcessRunner::new(containment)
        .with_ledger(ledger)
        .with_secrets(secrets))
}
