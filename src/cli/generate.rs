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
    /// Write hydraflow.1, one hydraflow-<subcommand>.1 per subcommand and the hand-written
    /// pages of man/ (hydraflow.toml.5, hydraflow@.service.8, hydraflow-supervisor.8) into DIR,
    /// all dated with the release (SOURCE_DATE_EPOCH, else packaging/debian/changelog).
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
    let date = page_date();
    for (name, text) in HAND_WRITTEN {
        let file = dir.join(name);
        std::fs::write(&file, with_date(text, &date))
            .with_context(|| format!("cannot write {}", file.display()))?;
        written.push(file);
    }
    Ok(written)
}

/// The hand-written manual pages (man/), by file name.
const HAND_WRITTEN: [(&str, &str); 3] = [
    (
        "hydraflow.toml.5",
        include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/man/hydraflow.toml.5")),
    ),
    (
        "hydraflow@.service.8",
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/man/hydraflow@.service.8"
        )),
    ),
    (
        "hydraflow-supervisor.8",
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/man/hydraflow-supervisor.8"
        )),
    ),
];

/// `page` with the date of its `.TH` line (its third argument, man(7)) replaced by `date`.
fn with_date(page: &str, date: &str) -> String {
    let mut out = String::with_capacity(page.len());
    for line in page.split_inclusive('\n') {
        match line.strip_prefix(".TH ") {
            Some(rest) => {
                let mut args: Vec<&str> = rest.splitn(4, ' ').collect();
                if args.len() == 4 {
                    args[2] = date;
                }
                out.push_str(".TH ");
                out.push_str(&args.join(" "));
            }
            None => out.push_str(line),
        }
    }
    out
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

/// The package's release date, which the pages carry: `$SOURCE_DATE_EPOCH` (reproducible
/// builds) when set, else the date of the newest entry of packaging/debian/changelog (its
/// trailer line, ` -- NAME <MAIL>  DATE` with an RFC 2822 date, deb-changelog(5)).
fn page_date() -> String {
    let from_epoch = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
        .and_then(|secs| chrono::DateTime::from_timestamp(secs, 0));
    let from_changelog = || {
        CHANGELOG
            .lines()
            .find_map(|l| l.strip_prefix(" -- "))
            .and_then(|l| l.split_once(">  "))
            .and_then(|(_, date)| chrono::DateTime::parse_from_rfc2822(date.trim()).ok())
            .map(|d| d.with_timezone(&chrono::Utc))
    };
    from_epoch
        .or_else(from_changelog)
        .unwrap_or_else(chrono::Utc::now)
        .format("%Y-%m-%d")
        .to_string()
}

/// The Debian changelog, whose newest entry dates the release.
const CHANGELOG: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/packaging/debian/changelog"
));

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

    #[test]
    fn the_date_of_a_page_is_replaced() {
        let check =
            |page: &str, expected: &str| assert_eq!(with_date(page, "2030-02-03"), expected);
        check(
            ".TH HYDRAFLOW.TOML 5 2025-01-01 \"hydraflow\" \"HydraFlow Manual\"\n.SH NAME\n",
            ".TH HYDRAFLOW.TOML 5 2030-02-03 \"hydraflow\" \"HydraFlow Manual\"\n.SH NAME\n",
        );
        check(".SH NAME\n.TH not first\n", ".SH NAME\n.TH not first\n");
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
