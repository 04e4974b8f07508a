//! `hydraflow dashboard`: the supervisor's dashboard for a fixed list of
//! worker sockets, without the supervisor (the supervisor daemon serves the
//! same dashboard for its registered repositories).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Args;

use crate::dashboard::{self, supervisor::StaticRepos};

/// `hydraflow dashboard`
#[derive(Debug, Args)]
pub struct DashboardArgs {
    /// Listen address.
    #[arg(long, default_value = "127.0.0.1:5555", value_name = "HOST:PORT")]
    pub listen: String,
    /// A worker to show, as `SLUG=SOCKET` (repeatable; at least one).
    #[arg(long = "worker", value_name = "SLUG=SOCKET", value_parser = parse_worker)]
    pub workers: Vec<(String, PathBuf)>,
    /// Access token (required for a non-loopback address). On a loopback address the caller's
    /// user decides: only this user and root are let in (or whoever sends the token).
    #[arg(long, env = "HYDRAFLOW_DASHBOARD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

fn parse_worker(s: &str) -> Result<(String, PathBuf), String> {
    let (slug, socket) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not SLUG=SOCKET"))?;
    crate::layout::Slug::new(slug).map_err(|e| e.to_string())?;
    Ok((slug.to_owned(), PathBuf::from(socket)))
}

/// Serve until SIGTERM or SIGINT.
///
/// # Errors
/// No `--worker`, a bad address, a missing token for a non-loopback address, a failed bind.
pub fn run(args: DashboardArgs) -> anyhow::Result<ExitCode> {
    if args.workers.is_empty() {
        anyhow::bail!(
            "no worker to show: give --worker SLUG=SOCKET for each one (a worker started with \
             `hydraflow run` listens on <checkout>/.hydraflow/<slug>/dashboard.sock), or open the \
             dashboard the supervisor serves for its repositories"
        );
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        let listener = dashboard::bind_tcp(&args.listen, args.token.as_deref()).await?;
        let address = listener
            .local_addr()
            .context("cannot read the bound address")?;
        eprintln!("dashboard: http://{address}/");
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("cannot handle SIGTERM")?;
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        };
        // On loopback: this user and root (the workers' sockets are reached with this user's
        // rights); elsewhere: the token.
        let guard = dashboard::auth::Guard {
            token: args.token.map(Arc::from),
            access: Arc::new(crate::access::Access::groups("", "")),
        };
        dashboard::supervisor::serve(
            listener,
            Arc::new(StaticRepos(args.workers)),
            guard,
            shutdown,
        )
        .await
        .context("the dashboard failed")?;
        Ok(ExitCode::SUCCESS)
    })
}
