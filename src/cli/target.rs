//! Resolving which repository a command is about: `--instance SLUG` (a
//! configured instance), `--repo PATH|owner/name` or the current directory.

use std::path::Path;

use anyhow::Context as _;

use super::TargetArgs;
use crate::config::loader::{self, Resolved, Target};
use crate::layout::Slug;

/// Load the configuration for the target the arguments name, with extra
/// command-line overrides (dotted key, value, option name).
///
/// # Errors
/// Configuration errors (file, line, key) and invalid slugs or paths.
pub fn resolve_with(
    config_file: &Path,
    target: &TargetArgs,
    overrides: Vec<(String, toml::Value, String)>,
) -> anyhow::Result<Resolved> {
    let instance = target.instance.as_deref().map(Slug::new).transpose()?;
    let cwd = std::env::current_dir().context("cannot read the current directory")?;
    let resolved = loader::resolve(
        config_file,
        &Target {
            instance,
            repo: target.repo.clone(),
        },
        overrides,
        std::env::vars().collect(),
        &cwd,
    )?;
    Ok(resolved)
}

/// [`resolve_with`] without overrides.
///
/// # Errors
/// As [`resolve_with`].
pub fn resolve(config_file: &Path, target: &TargetArgs) -> anyhow::Result<Resolved> {
    resolve_with(config_file, target, Vec::new())
}
