//! Resolving which repository a command is about: `--instance SLUG` (a
//! configured instance), `--repo PATH|owner/name` or the current directory.
//! Commands on a repository's data (`issue`, `hitl`) treat a checkout registered
//! with the supervisor as its instance ([`resolve_data`]).

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
    for warning in &resolved.warnings {
        eprintln!("hydraflow: warning: {warning}");
    }
    Ok(resolved)
}

/// [`resolve_with`] without overrides.
///
/// # Errors
/// As [`resolve_with`].
pub fn resolve(config_file: &Path, target: &TargetArgs) -> anyhow::Result<Resolved> {
    resolve_with(config_file, target, Vec::new())
}

/// For commands that read or write a repository's data (`issue`, `hitl`): as [`resolve`],
/// except that a checkout registered with the supervisor (`--repo PATH`, or the current
/// directory) is resolved as that instance (`--instance SLUG`), whose data are
/// `<state dir>/<slug>/`: issues filed there reach the supervised worker.
///
/// # Errors
/// As [`resolve_with`].
pub fn resolve_data(config_file: &Path, target: &TargetArgs) -> anyhow::Result<Resolved> {
    if target.instance.is_none()
        && let Some(slug) = registered_slug(config_file, target)
    {
        let instance = TargetArgs {
            instance: Some(slug),
            repo: None,
        };
        return resolve(config_file, &instance);
    }
    resolve(config_file, target)
}

/// The slug under which the supervisor (of this configuration) registered the checkout the
/// target names, if it did.
fn registered_slug(config_file: &Path, target: &TargetArgs) -> Option<String> {
    let cwd = std::env::current_dir().ok()?;
    let path = match &target.repo {
        Some(repo) => cwd.join(repo),
        None => cwd,
    };
    let path = std::fs::canonicalize(path).ok()?;
    let env: Vec<(String, String)> = std::env::vars().collect();
    let loaded = loader::load(&loader::LoadRequest {
        global_file: Some(config_file),
        global_optional: config_file == Path::new(crate::config::DEFAULT_CONFIG_FILE),
        instance: None,
        overrides: Vec::new(),
        env: env.clone(),
    })
    .ok()?;
    let state_dir = loader::state_dir(&loaded.config.supervisor, &env);
    crate::supervisor::registry::Registry::slug_of_path(&state_dir, &path.to_string_lossy())
}
