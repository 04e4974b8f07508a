//! `hydraflow supervisor` (the daemon), `hydraflow repo …` and `hydraflow ping` (clients of
//! its control protocol).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::config::{Config, DEFAULT_CONFIG_FILE};
use crate::layout::Slug;
use crate::supervisor::protocol::{
    Action, Added, ForgeStatuses, Registered, RepoList, RepoRef, RepoStatus, RepoTarget, Request,
};
use crate::supervisor::{self, client, server::ServerOptions};

/// `hydraflow supervisor`
#[derive(Debug, Args)]
pub struct SupervisorArgs {
    /// Listen address of the control protocol (overrides `[supervisor] listen`).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Seconds a client may stay silent before its connection is closed.
    #[arg(long, value_name = "SECONDS", default_value_t = 5)]
    pub idle_timeout: u64,
    /// Most connections served at once.
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub max_connections: usize,
}

/// `hydraflow repo …`
#[derive(Debug, Subcommand)]
pub enum RepoCommand {
    /// Register a repository and start its instance; returns once it is active or failed.
    Add {
        /// A GitHub `owner/name` or a checkout path.
        #[arg(value_name = "OWNER/NAME|PATH")]
        target: String,
        /// The instance name (default: `owner-name` or the checkout's directory name).
        #[arg(long, value_name = "SLUG")]
        slug: Option<String>,
    },
    /// Register a repository without starting it.
    Register {
        /// A GitHub `owner/name` or a checkout path.
        #[arg(value_name = "OWNER/NAME|PATH")]
        target: String,
        /// The instance name.
        #[arg(long, value_name = "SLUG")]
        slug: Option<String>,
    },
    /// Unregister a repository and stop its instance.
    Remove {
        /// Its slug, `owner/name` or checkout path.
        #[arg(value_name = "SLUG|OWNER/NAME|PATH")]
        target: String,
    },
    /// List registered repositories: slug, repo, state, since, restarts.
    List,
    /// Show one repository's instance: state, main PID, restarts, memory, active since.
    Status {
        /// Its slug, `owner/name` or checkout path.
        #[arg(value_name = "SLUG|OWNER/NAME|PATH")]
        target: String,
    },
    /// Restart one repository's instance.
    Restart {
        /// Its slug, `owner/name` or checkout path.
        #[arg(value_name = "SLUG|OWNER/NAME|PATH")]
        target: String,
    },
}

/// The global configuration with `HYDRAFLOW_*` overrides (no instance file).
pub(crate) fn load_config(path: &Path) -> anyhow::Result<Config> {
    let req = crate::config::loader::LoadRequest {
        global_file: Some(path),
        global_optional: path == Path::new(DEFAULT_CONFIG_FILE),
        instance: None,
        overrides: Vec::new(),
        env: std::env::vars().collect(),
    };
    let loaded = crate::config::loader::load(&req)?;
    for warning in &loaded.warnings {
        eprintln!("hydraflow: warning: {warning}");
    }
    Ok(loaded.config)
}

/// Run the supervisor daemon until SIGTERM or SIGINT.
///
/// # Errors
/// Configuration, socket and start-up errors.
pub fn run_supervisor(config_file: &Path, args: SupervisorArgs) -> anyhow::Result<ExitCode> {
    // Before any thread exists: take the sockets of socket activation and clear its variables.
    let fds = crate::systemd::take_listen_fds().context("cannot take LISTEN_FDS")?;
    let mut config = load_config(config_file)?;
    if let Some(listen) = args.listen {
        config.supervisor.listen = listen;
    }
    crate::systemd::init_logging("hydraflow-supervisor", None);
    let opts = supervisor::DaemonOptions {
        config,
        config_file: config_file.to_owned(),
        server: ServerOptions {
            idle_timeout: Duration::from_secs(args.idle_timeout),
            max_connections: args.max_connections.max(1),
            ..ServerOptions::default()
        },
    };
    // One thread serves everything (blocking work goes to tokio's blocking pool): on two
    // vCPUs it answered as fast as two worker threads did, with less memory (BENCHMARKS.md).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("cannot handle SIGTERM")?;
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: stopping"),
                _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping"),
            }
        };
        supervisor::run_daemon(opts, fds, shutdown).await?;
        anyhow::Ok(ExitCode::SUCCESS)
    })
}

/// Where the supervisor may listen, in order (Unix control sockets, then TCP), and how long
/// `add_repo` may take.
fn endpoint(config_file: &Path) -> anyhow::Result<(Vec<client::Endpoint>, Duration)> {
    let config = load_config(config_file)?;
    let state_dir = supervisor::state_dir(&config.supervisor);
    Ok((
        client::endpoints(&state_dir, config.supervisor.control_socket.as_deref()),
        Duration::from_secs(config.supervisor.start_timeout + 5),
    ))
}

fn call<T: DeserializeOwned>(config_file: &Path, action: Action, slow: bool) -> anyhow::Result<T> {
    let (endpoints, start_timeout) = endpoint(config_file)?;
    let timeout = if slow {
        start_timeout
    } else {
        Duration::from_secs(5)
    };
    let request = Request {
        action,
        keep_alive: false,
    };
    let fields = client::call(&endpoints, &request, timeout)?;
    serde_json::from_value(Value::Object(fields))
        .context("the supervisor's reply lacks expected fields")
}

/// `owner/name` when `target` looks like one and is not an existing path; else a path made
/// absolute against the current directory (the supervisor runs elsewhere).
fn target_of(target: &str) -> anyhow::Result<RepoTarget> {
    let looks_like_repo = target.matches('/').count() == 1
        && !target.starts_with(['/', '.', '~'])
        && !target.ends_with('/');
    if looks_like_repo && !Path::new(target).exists() {
        return Ok(RepoTarget::Repo(target.to_owned()));
    }
    let path = if target.starts_with('~') {
        PathBuf::from(target)
    } else {
        std::path::absolute(target).with_context(|| format!("cannot make {target} absolute"))?
    };
    Ok(RepoTarget::Path(path.to_string_lossy().into_owned()))
}

fn ref_of(target: &str) -> anyhow::Result<RepoRef> {
    if let Ok(slug) = Slug::new(target)
        && !Path::new(target).exists()
    {
        return Ok(RepoRef::Slug(slug));
    }
    Ok(match target_of(target)? {
        RepoTarget::Repo(r) => RepoRef::Repo(r),
        RepoTarget::Path(p) => RepoRef::Path(p),
    })
}

fn slug_arg(slug: Option<String>) -> anyhow::Result<Option<Slug>> {
    slug.map(|s| Slug::new(&s).context("--slug")).transpose()
}

/// Run `hydraflow repo …`.
///
/// # Errors
/// The supervisor's error text, or why it could not be reached.
pub fn run_repo(config_file: &Path, cmd: RepoCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        RepoCommand::Add { target, slug } => {
            let action = Action::AddRepo {
                target: target_of(&target)?,
                slug: slug_arg(slug)?,
            };
            let added: Added = call(config_file, action, true)?;
            let verb = if added.started {
                "started"
            } else {
                "already running"
            };
            println!(
                "{}: {verb}; dashboard: {}; log: {}",
                added.slug, added.dashboard_url, added.log_file
            );
        }
        RepoCommand::Register { target, slug } => {
            let action = Action::RegisterRepo {
                target: target_of(&target)?,
                slug: slug_arg(slug)?,
            };
            let reg: Registered = call(config_file, action, false)?;
            println!("{}: registered", reg.slug);
        }
        RepoCommand::Remove { target } => {
            let _: Map<String, Value> =
                call(config_file, Action::RemoveRepo(ref_of(&target)?), true)?;
            println!("{target}: removed");
        }
        RepoCommand::List => {
            let list: RepoList = call(config_file, Action::ListRepos, false)?;
            // Asked of the workers: a supervisor too old to know the action shows none.
            let forges: ForgeStatuses = call(config_file, Action::ForgeStatus, false)
                .unwrap_or(ForgeStatuses { forges: Vec::new() });
            print!("{}", table(&list, &forges));
        }
        RepoCommand::Status { target } => {
            let status: RepoStatus =
                call(config_file, Action::RepoStatus(ref_of(&target)?), false)?;
            print!("{}", status_text(&status));
        }
        RepoCommand::Restart { target } => {
            let status: RepoStatus =
                call(config_file, Action::RestartRepo(ref_of(&target)?), true)?;
            print!("{}", status_text(&status));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Run `hydraflow ping`.
///
/// # Errors
/// Why the supervisor could not be reached.
pub fn run_ping(config_file: &Path) -> anyhow::Result<ExitCode> {
    let _: Map<String, Value> = call(config_file, Action::Ping, false)?;
    println!("ok");
    Ok(ExitCode::SUCCESS)
}

/// The `repo list` table: the registration and instance, then the forge as the worker
/// reports it (identity, REST budget left of the window, when the window resets in UTC).
fn table(list: &RepoList, forges: &ForgeStatuses) -> String {
    const COLUMNS: usize = 8;
    let mut rows = vec![
        [
            "SLUG", "REPO", "STATE", "SINCE", "RESTARTS", "IDENTITY", "BUDGET", "RESETS",
        ]
        .map(str::to_owned),
    ];
    for r in &list.repos {
        let forge = forges.forges.iter().find(|f| f.slug == r.slug);
        let identity = match forge {
            Some(f) if f.forge.as_deref() == Some("local") => "local forge".to_owned(),
            Some(f) => f.identity.clone().unwrap_or_else(|| "-".into()),
            None => "-".into(),
        };
        let budget = forge
            .and_then(|f| Some(format!("{}/{}", f.remaining?, f.limit?)))
            .unwrap_or_else(|| "-".into());
        let resets = forge
            .and_then(|f| f.reset_at)
            .and_then(|s| chrono::DateTime::from_timestamp(i64::try_from(s).ok()?, 0))
            .map_or_else(
                || "-".into(),
                |t| t.format("%Y-%m-%d %H:%M:%SZ").to_string(),
            );
        rows.push([
            r.slug.clone(),
            r.repo.clone().unwrap_or_else(|| r.path.clone()),
            format!("{} ({})", r.active_state, r.sub_state),
            r.active_since.clone().unwrap_or_else(|| "-".into()),
            r.n_restarts.to_string(),
            identity,
            budget,
            resets,
        ]);
    }
    let widths: Vec<usize> = (0..COLUMNS)
        .map(|i| {
            rows.iter()
                .map(|row| row[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            let _ = write!(line, "{cell:<w$}  ", w = widths[i]);
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn status_text(s: &RepoStatus) -> String {
    let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    let fields = [
        ("slug", s.info.slug.clone()),
        (
            "repo",
            s.info.repo.clone().unwrap_or_else(|| s.info.path.clone()),
        ),
        ("unit", s.unit.clone()),
        ("backend", s.backend.clone()),
        (
            "state",
            format!("{} ({})", s.info.active_state, s.info.sub_state),
        ),
        ("main pid", opt(s.main_pid.map(|p| p.to_string()))),
        ("restarts", s.info.n_restarts.to_string()),
        (
            "memory",
            opt(s
                .memory_bytes
                .map(|b| format!("{:.1} MiB", b as f64 / 1048576.0))),
        ),
        ("active since", opt(s.info.active_since.clone())),
        ("result", opt(s.result.clone())),
        ("log", s.info.log_file.clone()),
    ];
    fields
        .iter()
        .map(|(k, v)| format!("{k:>12}: {v}\n"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!(
            target_of("octo/widgets").unwrap(),
            RepoTarget::Repo("octo/widgets".into())
        );
        assert_eq!(
            target_of("/srv/x").unwrap(),
            RepoTarget::Path("/srv/x".into())
        );
        assert!(matches!(target_of("rel/a/b").unwrap(), RepoTarget::Path(p) if p.starts_with('/')));
        assert_eq!(
            ref_of("demo").unwrap(),
            RepoRef::Slug(Slug::new("demo").unwrap())
        );
    }
}
