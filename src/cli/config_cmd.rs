//! `hydraflow config show|check`.

use std::path::Path;
use std::process::ExitCode;

use clap::Subcommand;

use super::TargetArgs;

/// `hydraflow config …`
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the effective configuration and where each value came from.
    Show {
        /// Which repository.
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Validate the configuration; exit 1 with the problem if invalid.
    Check {
        /// Which repository.
        #[command(flatten)]
        target: TargetArgs,
    },
}

/// Run a `config` subcommand.
///
/// # Errors
/// Configuration errors.
pub fn run(config_file: &Path, cmd: ConfigCommand) -> anyhow::Result<ExitCode> {
    let _ = (config_file, cmd);
    todo!()
}
