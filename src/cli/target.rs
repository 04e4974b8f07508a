//! Resolving which repository a command is about: `--instance SLUG` (a
//! configured instance), `--repo PATH` or the current directory.

use std::path::Path;

use super::TargetArgs;
use crate::config::loader::Resolved;

/// Load the configuration for the target the arguments name.
///
/// # Errors
/// Configuration errors (file, line, key) and invalid slugs or paths.
pub fn resolve(config_file: &Path, target: &TargetArgs) -> anyhow::Result<Resolved> {
    let _ = (config_file, target);
    todo!("integrator implements this")
}
