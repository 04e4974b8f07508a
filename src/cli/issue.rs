//! `hydraflow issue add|list|show|label`: the local forge's issues from the
//! command line, safe while a worker runs.

use std::path::Path;
use std::process::ExitCode;

use clap::Subcommand;

use super::TargetArgs;

/// `hydraflow issue …`
#[derive(Debug, Subcommand)]
pub enum IssueCommand {
    /// File a new issue (labelled `hydraflow-find` unless --label is given).
    Add {
        /// Which repository.
        #[command(flatten)]
        target: TargetArgs,
        /// Title.
        #[arg(long, short)]
        title: String,
        /// Body (Markdown).
        #[arg(long, short, default_value = "")]
        body: String,
        /// Labels (repeatable).
        #[arg(long = "label", short = 'l', value_name = "LABEL")]
        labels: Vec<String>,
    },
    /// List issues (open ones unless --all).
    List {
        /// Which repository.
        #[command(flatten)]
        target: TargetArgs,
        /// Include closed issues.
        #[arg(long)]
        all: bool,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one issue with its comments and pull request.
    Show {
        /// Which repository.
        #[command(flatten)]
        target: TargetArgs,
        /// Issue number.
        number: u64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Add or remove labels.
    Label {
        /// Which repository.
        #[command(flatten)]
        target: TargetArgs,
        /// Issue number.
        number: u64,
        /// Labels to add (repeatable).
        #[arg(long = "add", value_name = "LABEL")]
        add: Vec<String>,
        /// Labels to remove (repeatable).
        #[arg(long = "remove", value_name = "LABEL")]
        remove: Vec<String>,
    },
}

/// Run an `issue` subcommand.
///
/// # Errors
/// Configuration, I/O, or an unknown issue number.
pub fn run(config_file: &Path, cmd: IssueCommand) -> anyhow::Result<ExitCode> {
    let _ = (config_file, cmd);
    todo!("forge helper implements this")
}
