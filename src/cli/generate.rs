//! `hydraflow generate man DIR` and `hydraflow generate completions DIR`
//! (hidden): the manual pages of the command line (from the clap
//! definitions, with clap_mangen) and the shell completions (clap_complete),
//! written at package build time by `packaging/build.sh`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{CommandFactory as _, Subcommand};
use clap_complete::Shell;

/// What to generate.
#[derive(Debug, Subcommand)]
pub enum GenerateCommand {
    /// Write hydraflow.1 and one hydraflow-<subcommand>.1 per subcommand into DIR.
    Man {
        /// The output directory (created when missing).
        dir: PathBuf,
    },
    /// Write completions for bash (hydraflow), zsh (_hydraflow) and fish (hydraflow.fish) into DIR.
    Completions {
        /// The output directory (created when missing).
        dir: PathBuf,
    },
}

/// Run `hydraflow generate`.
///
/// # Errors
/// I/O errors, naming the file.
pub fn run(cmd: GenerateCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        GenerateCommand::Man { dir } => {
            for file in write_man_pages(&dir)? {
                println!("{}", file.display());
            }
        }
        GenerateCommand::Completions { dir } => {
            for file in write_completions(&dir)? {
                println!("{}", file.display());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The command tree as the manual pages show it: hidden subcommands left out.
fn command() -> clap::Command {
    super::Cli::command().disable_help_subcommand(true)
}

/// Write `hydraflow.1` and a page per visible subcommand (`hydraflow-<name>.1`,
/// nested ones as `hydraflow-<name>-<sub>.1`) into `dir`; returns the files written.
///
/// # Errors
/// I/O errors, naming the file.
pub fn write_man_pages(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut written = Vec::new();
    let mut cmd = command();
    cmd.build();
    write_page(dir, &cmd, "hydraflow", &mut written)?;
    Ok(written)
}

fn write_page(
    dir: &Path,
    cmd: &clap::Command,
    name: &str,
    written: &mut Vec<PathBuf>,
) -> anyhow::Result<()> {
    let page = cmd.clone().name(name.to_owned());
    let mut buf = Vec::new();
    clap_mangen::Man::new(page)
        .section("1")
        .manual("HydraFlow Manual")
        .source(format!("hydraflow {}", env!("CARGO_PKG_VERSION")))
        .date(page_date())
        .render(&mut buf)
        .with_context(|| format!("cannot render the manual page of {name}"))?;
    // clap_mangen puts an empty line between two `.br` before a list of possible values,
    // which mandoc -Tlint warns about ("skipping paragraph macro"); one `.br` says the same.
    let text = String::from_utf8_lossy(&buf).replace(".br\n\n.br\n", ".br\n");
    let file = dir.join(format!("{name}.1"));
    std::fs::write(&file, text).with_context(|| format!("cannot write {}", file.display()))?;
    written.push(file);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_page(dir, sub, &format!("{name}-{}", sub.get_name()), written)?;
    }
    Ok(())
}

/// The date of the pages: `$SOURCE_DATE_EPOCH` (reproducible builds) when set, else today.
fn page_date() -> String {
    std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
        .and_then(|secs| chrono::DateTime::from_timestamp(secs, 0))
        .unwrap_or_else(chrono::Utc::now)
        .format("%Y-%m-%d")
        .to_string()
}

/// Write bash, zsh and fish completions into `dir`; returns the files written.
///
/// # Errors
/// I/O errors, naming the file.
pub fn write_completions(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut written = Vec::new();
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let file = clap_complete::generate_to(shell, &mut command(), "hydraflow", dir)
            .with_context(|| format!("cannot write {shell} completions into {}", dir.display()))?;
        written.push(file);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn man_pages_cover_every_visible_subcommand_and_no_hidden_one() {
        let dir = tempfile::tempdir().unwrap();
        let files = write_man_pages(dir.path()).unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert!(names.contains(&"hydraflow.1".to_owned()), "{names:?}");
        assert!(
            names.contains(&"hydraflow-worker.1".to_owned()),
            "{names:?}"
        );
        assert!(
            names.contains(&"hydraflow-issue-new.1".to_owned())
                || names.iter().any(|n| n.starts_with("hydraflow-issue-")),
            "{names:?}"
        );
        assert!(
            !names
                .iter()
                .any(|n| n.contains("demo-agent") || n.contains("generate")),
            "{names:?}"
        );
        let top = std::fs::read_to_string(dir.path().join("hydraflow.1")).unwrap();
        assert!(top.contains(".TH hydraflow 1"), "{top}");
    }

    /// hydraflow.toml(5) documents every key with its default and its environment variable.
    #[test]
    fn config_page_lists_every_key_with_default_and_environment() {
        use crate::config::Config;
        use crate::config::loader::{env_name, leaves};
        let page = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/man/hydraflow.toml.5"));
        let mut missing = Vec::new();
        for (key, default) in leaves(&Config::default()) {
            let entry = format!(".TP\n.B {key}\n");
            let Some(at) = page.find(&entry) else {
                missing.push(format!("{key}: no entry"));
                continue;
            };
            let rest = &page[at + entry.len()..];
            let body = &rest[..rest.find(".TP\n").unwrap_or(rest.len())];
            let default = format!("Default: \\fB{}\\fR", default.replace('"', "\\(dq"));
            if !body.contains(&default) {
                missing.push(format!("{key}: no {default}"));
            }
            let env = format!("Environment: \\fB{}\\fR", env_name(&key));
            if !body.contains(&env) {
                missing.push(format!("{key}: no {env}"));
            }
        }
        assert!(
            missing.is_empty(),
            "man/hydraflow.toml.5 is out of date: {missing:#?}"
        );
    }

    #[test]
    fn completions_for_three_shells() {
        let dir = tempfile::tempdir().unwrap();
        let files = write_completions(dir.path()).unwrap();
        let mut names: Vec<String> = files
            .iter()
            .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["_hydraflow", "hydraflow.bash", "hydraflow.fish"]);
    }
}
