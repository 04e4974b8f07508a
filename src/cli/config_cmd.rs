//! `hydraflow config show|check`.

use std::path::Path;
use std::process::ExitCode;

use clap::Subcommand;

use super::TargetArgs;
use crate::config::loader::{self, Source};

/// `hydraflow config …`
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the effective configuration and where each value came from.
    Show {
        /// Which repository.
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Validate the configuration and find each stage's agent program on the
    /// agents' PATH; exit 1 with the problem if invalid or a program is missing.
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
    match cmd {
        ConfigCommand::Show { target } => {
            let r = super::target::resolve(config_file, &target)?;
            println!(
                "# files read: {}",
                if r.files.is_empty() {
                    "none".to_owned()
                } else {
                    r.files
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            );
            println!("# slug: {}", r.layout.slug);
            println!("# checkout: {}", r.repo_path.display());
            println!("# data: {}", r.layout.repo_dir().display());
            println!("# worktrees: {}", r.layout.worktrees_dir().display());
            let rows = loader::leaves(&r.config);
            let width = rows
                .iter()
                .map(|(k, v)| k.len() + v.len() + 3)
                .max()
                .unwrap_or(0);
            for (key, value) in rows {
                let source = r.sources.get(&key).cloned().unwrap_or(Source::Default);
                // Secrets are never printed.
                let value = if key == "dashboard.token" && value != "null" {
                    "\"(set, not shown)\"".to_owned()
                } else {
                    value
                };
                let line = format!("{key} = {value}");
                println!("{line:<width$}  # {source}");
            }
            Ok(ExitCode::SUCCESS)
        }
        ConfigCommand::Check { target } => {
            let r = super::target::resolve(config_file, &target)?;
            crate::agent::runner::validate(&r.config.agent)?;
            let programs = crate::agent::runner::stage_programs(&r.config.agent)?;
            let mut missing = Vec::new();
            for (stage, program, found) in &programs {
                match found {
                    Some(path) => println!("agent for {stage}: {program} ({})", path.display()),
                    None => {
                        println!("agent for {stage}: {program} (not found)");
                        if !missing.contains(program) {
                            missing.push(program.clone());
                        }
                    }
                }
            }
            if !missing.is_empty() {
                anyhow::bail!(
                    "agent program{} {} not found on the agents' PATH ({}): install {} or set \
                     agent.command, agent.<stage>.command or agent.env.PATH",
                    if missing.len() == 1 { "" } else { "s" },
                    missing
                        .iter()
                        .map(|m| format!("{m:?}"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    r.config
                        .agent
                        .env
                        .get("PATH")
                        .cloned()
                        .or_else(|| std::env::var("PATH").ok())
                        .unwrap_or_default(),
                    if missing.len() == 1 { "it" } else { "them" }
                );
            }
            println!(
                "configuration of {} is valid ({} file{} read)",
                r.layout.slug,
                r.files.len(),
                if r.files.len() == 1 { "" } else { "s" }
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
