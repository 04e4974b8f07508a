//! `hydraflow webhook test`: send a signed `ping` delivery, as GitHub sends
//! one when a hook is created, to this host's webhook endpoint, and say
//! what the supervisor answered.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use serde_json::Value;

use crate::dashboard::webhook;

/// `hydraflow webhook …`
#[derive(Debug, Subcommand)]
pub enum WebhookCommand {
    /// Send a signed ping to the supervisor's webhook endpoint (as GitHub does
    /// when the hook is made) and print its answer; exits 1 unless it is 200.
    Test(TestArgs),
}

/// `hydraflow webhook test`
#[derive(Debug, Args)]
pub struct TestArgs {
    /// Where to send it (default: http://<webhook.listen, else dashboard.listen>/github/webhook).
    #[arg(long, value_name = "URL")]
    pub url: Option<String>,
    /// A repository (`owner/name`) for the ping to name: the answer says
    /// which registered instance its deliveries reach.
    #[arg(long, value_name = "OWNER/NAME")]
    pub repo: Option<String>,
    /// The file holding the secret (default: the systemd credential
    /// github-webhook-secret, else webhook.secret_file; the packaged units
    /// read /etc/hydraflow/credentials/github-webhook-secret).
    #[arg(long, value_name = "FILE")]
    pub secret_file: Option<PathBuf>,
}

/// The endpoint on this host: `webhook.listen`, else `dashboard.listen`,
/// an unspecified address (`0.0.0.0`, `[::]`) reached on loopback.
fn local_url(config: &crate::config::Config) -> String {
    let listen = config
        .webhook
        .listen
        .clone()
        .unwrap_or_else(|| config.dashboard.listen.clone());
    let address = match listen.rsplit_once(':') {
        Some(("0.0.0.0", port)) => format!("127.0.0.1:{port}"),
        Some(("[::]", port)) => format!("[::1]:{port}"),
        _ => listen,
    };
    format!("http://{address}{}", webhook::PATH)
}

/// Run `hydraflow webhook …`.
///
/// # Errors
/// A missing secret, an unreachable endpoint, or an answer other than 200.
pub fn run(config_file: &Path, cmd: WebhookCommand) -> anyhow::Result<ExitCode> {
    let WebhookCommand::Test(args) = cmd;
    let config = super::supervisor_cmd::load_config(config_file)?;
    let secret = match &args.secret_file {
        Some(file) => webhook::secret(None, Some(file)),
        None => webhook::secret(
            crate::systemd::read_credential(webhook::SECRET_CREDENTIAL),
            config.webhook.secret_file.as_deref(),
        ),
    }
    .map_err(anyhow::Error::msg)?
    .with_context(|| {
        format!(
            "no webhook secret: pass --secret-file, or set webhook.secret_file (the packaged \
             units read the systemd credential {:?} from /etc/hydraflow/credentials/)",
            webhook::SECRET_CREDENTIAL
        )
    })?;
    let url = args.url.clone().unwrap_or_else(|| local_url(&config));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let (status, answer, delivery) = rt
        .block_on(webhook::send_test_ping(&url, &secret, args.repo.as_deref()))
        .map_err(anyhow::Error::msg)?;
    if status != http::StatusCode::OK {
        bail!(
            "{url} answered the signed ping with {}",
            webhook::describe(status, &answer)
        );
    }
    println!("{url} answered the signed ping (delivery {delivery}): 200");
    if let Some(repo) = &args.repo {
        match answer.get("slug").and_then(Value::as_str) {
            Some(slug) => println!("deliveries for {repo} wake the worker of {slug}"),
            None => println!(
                "{repo} is not registered here: its deliveries are ignored (hydraflow repo add {repo})"
            ),
        }
    }
    Ok(ExitCode::SUCCESS)
}
