//! `hydraflow hitl list|correct|skip|close`: answer issues waiting for a
//! human. Commands go to the worker through its spool directory; the CLI
//! never writes `state.json`.

use std::path::Path;
use std::process::ExitCode;

use clap::Subcommand;

use anyhow::Context as _;

use super::TargetArgs;
use crate::pipeline::spool;
use crate::store::state::{HitlCommand, State, StateTracker};

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
    let (target, number, command) = match cmd {
        HitlCommandArgs::List { target, json } => return list(config_file, &target, json),
        HitlCommandArgs::Correct {
            target,
            number,
            text,
        } => (target, number, HitlCommand::Correct { text }),
        HitlCommandArgs::Skip { target, number } => (target, number, HitlCommand::Skip),
        HitlCommandArgs::Close { target, number } => (target, number, HitlCommand::Close),
    };
    let resolved = super::target::resolve_data(config_file, &target)?;
    let owner = super::ownership::data_owner(&resolved.layout)?;
    let state = read_state(&resolved.layout.state_file())?;
    let path = spool::submit_command(
        &resolved.layout.spool_dir(),
        &state,
        number,
        command.clone(),
    )?;
    super::ownership::restore_owner(owner, &resolved.layout.repo_dir())?;
    let what = match command {
        HitlCommand::Correct { .. } => "correction",
        HitlCommand::Skip => "skip",
        HitlCommand::Close => "close",
    };
    println!(
        "{what} for issue #{number} handed to the worker ({}); a running worker applies it within seconds, a stopped one at its next start",
        path.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn read_state(path: &Path) -> anyhow::Result<State> {
    if !path.exists() {
        return Ok(State::default());
    }
    StateTracker::read_only(path).with_context(|| format!("cannot read {}", path.display()))
}

fn list(config_file: &Path, target: &TargetArgs, json: bool) -> anyhow::Result<ExitCode> {
    let resolved = super::target::resolve_data(config_file, target)?;
    let state = read_state(&resolved.layout.state_file())?;
    let waiting: Vec<_> = state
        .issues
        .iter()
        .filter_map(|(n, r)| r.hitl().map(|h| (n, h, r.pending_hitl())))
        .collect();
    if json {
        let rows: Vec<_> = waiting
            .iter()
            .map(|(n, h, p)| {
                serde_json::json!({"issue": n, "stage": h.stage, "origin": h.origin,
                    "cause": h.cause, "escalated_at": h.escalated_at, "pending": p})
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    if waiting.is_empty() {
        println!("no issue is waiting for a human");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<7} {:<10} {:<18} {:<9} CAUSE",
        "ISSUE", "STAGE", "ORIGIN", "PENDING"
    );
    for (n, h, p) in waiting {
        let pending = match p {
            Some(HitlCommand::Correct { .. }) => "correct",
            Some(HitlCommand::Skip) => "skip",
            Some(HitlCommand::Close) => "close",
            None => "-",
        };
        println!(
            "{:<7} {:<10} {:<18} {:<9} {}",
            format!("#{n}"),
            h.stage.as_str(),
            h.origin,
            pending,
            h.cause
        );
    }
    Ok(ExitCode::SUCCESS)
}
