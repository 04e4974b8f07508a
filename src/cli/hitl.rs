//! `hydraflow hitl list|correct|skip|close`: answer issues waiting for a
//! human. Commands go to the worker through its spool directory; the CLI
//! never writes `state.json`.

use std::path::Path;
use std::process::ExitCode;

use clap::Subcommand;

use super::TargetArgs;

/// `hydraflow hitl …`
#[derive(Debug, Subcommand)]
pub enum HitlCommandArgs {
    /// Issues waiting for a human, with origin and cause.
    List {
        /// Which repository.
        #[command(flatten)]
        target: TargetArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Send a correction: the issue goes back into the pipeline with it.
    Correct {
        /// Which repository.
        #[command(flatten)]
        target: TargetArgs,
        /// Issue number.
        number: u64,
        /// The correction.
        text: String,
    },
    /// Take the issue out of the pipeline.
    Skip {
        /// Which repository.
        #[command(flatten)]
        target: TargetArgs,
        /// Issue number.
        number: u64,
    },
    /// Close the issue.
    Close {
        /// Which repository.
        #[command(flatten)]
        target: TargetArgs,
        /// Issue number.
        number: u64,
    },
}

/// Run a `hitl` subcommand.
///
/// # Errors
/// Configuration and I/O errors, or an issue that is not waiting for a human.
pub fn run(config_file: &Path, cmd: HitlCommandArgs) -> anyhow::Result<ExitCode> {
    let _ = (config_file, cmd);
    todo!()
}
