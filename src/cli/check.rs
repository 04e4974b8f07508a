//! `hydraflow check set|list`: the local forge's check runs from the command
//! line, so an operator's own CI script can report on the commits HydraFlow
//! waits for (the review stage waits for a pull request's checks as it does
//! on GitHub). Safe while a worker runs.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::{Subcommand, ValueEnum};

use super::TargetArgs;
use crate::config::ForgeKind;
use crate::forge::ChecksState;
use crate::forge::local::{CheckConclusion, CheckRun, CheckStatus, LocalForge};

/// Shown by `hydraflow check set --help` and in hydraflow-check-set(1).
const SET_LONG_ABOUT: &str = "Report one check run of a commit on the local forge: add it, or \
replace the run of the same name. The review stage waits while a check run of a pull \
request's head commit is queued or in progress (up to ci_check_timeout), and hands failed ones, \
with their summaries, to the agent to fix.

The runs of a commit are kept in data_root/<slug>/forge/checks/<sha>.json, a JSON list of \
{\"name\", \"status\", \"conclusion\", \"summary\"} in the vocabulary of GitHub's check runs \
(https://docs.github.com/en/rest/checks/runs): status is queued, in_progress or completed; \
conclusion, once completed, is success, failure, neutral, cancelled, skipped, timed_out or \
action_required (success, neutral and skipped pass). A commit without the file has no checks, \
which counts as a pass.";

/// Examples shown by `hydraflow check set --help` and in hydraflow-check-set(1).
const SET_EXAMPLES: &str = "Examples:
  hydraflow check set --repo ~/src/project agent/issue-7 test in_progress
  hydraflow check set --repo ~/src/project agent/issue-7 test failure --summary \"2 tests failed\"
  hydraflow check set --repo ~/src/project 3f2c9e1 build success";

/// `hydraflow check …`
#[derive(Debug, Subcommand)]
pub enum CheckCommand {
    /// Report one check run of a commit (add or replace it).
    #[command(long_about = SET_LONG_ABOUT, after_long_help = SET_EXAMPLES)]
    Set {
        /// Which repository.
        #[command(flatten)]
        target: TargetArgs,
        /// The commit: a SHA, a short SHA or a branch (`agent/issue-7`).
        commit: String,
        /// The check's name (`build`, `test`); one run per name and commit.
        name: String,
        /// Where the run is: queued or in_progress, else how it ended.
        state: CheckState,
        /// A short text shown with a failure (the agent fixing CI gets it).
        #[arg(long, default_value = "")]
        summary: String,
    },
    /// List the check runs of a commit and their combined verdict.
    List {
        /// Which repository.
        #[command(flatten)]
        target: TargetArgs,
        /// The commit: a SHA, a short SHA or a branch (`agent/issue-7`).
        commit: String,
        /// Print JSON: the runs as `checks/<sha>.json` holds them.
        #[arg(long)]
        json: bool,
    },
}

/// A check run's state as `check set` takes it: a status while it runs, its
/// conclusion once completed (GitHub's words).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum CheckState {
    /// Not started.
    Queued,
    /// Running.
    InProgress,
    /// Completed: passed.
    Success,
    /// Completed: failed.
    Failure,
    /// Completed: neither (passes).
    Neutral,
    /// Completed: cancelled (fails).
    Cancelled,
    /// Completed: skipped (passes).
    Skipped,
    /// Completed: timed out (fails).
    TimedOut,
    /// Completed: needs a person to act (fails).
    ActionRequired,
}

impl CheckState {
    /// The status and conclusion it stands for.
    fn split(self) -> (CheckStatus, Option<CheckConclusion>) {
        let done = |c| (CheckStatus::Completed, Some(c));
        match self {
            CheckState::Queued => (CheckStatus::Queued, None),
            CheckState::InProgress => (CheckStatus::InProgress, None),
            CheckState::Success => done(CheckConclusion::Success),
            CheckState::Failure => done(CheckConclusion::Failure),
            CheckState::Neutral => done(CheckConclusion::Neutral),
            CheckState::Cancelled => done(CheckConclusion::Cancelled),
            CheckState::Skipped => done(CheckConclusion::Skipped),
            CheckState::TimedOut => done(CheckConclusion::TimedOut),
            CheckState::ActionRequired => done(CheckConclusion::ActionRequired),
        }
    }
}

/// Run a `check` subcommand: resolve the repository ([`super::target::resolve_data`]: a
/// checkout registered with the supervisor is its instance), refuse a GitHub one,
/// open its local forge and print to stdout.
///
/// # Errors
/// Configuration, an unknown commit, a GitHub instance, I/O.
pub fn run(config_file: &Path, cmd: CheckCommand) -> anyhow::Result<ExitCode> {
    let target = match &cmd {
        CheckCommand::Set { target, .. } | CheckCommand::List { target, .. } => target.clone(),
    };
    let resolved = super::target::resolve_data(config_file, &target)?;
    if resolved.config.forge == ForgeKind::Github {
        bail!(
            "{} uses the GitHub forge: its checks are GitHub's, reported by your CI through GitHub's check runs API; `hydraflow check` is for the local forge",
            resolved.layout.slug
        );
    }
    let owner = super::ownership::data_owner(&resolved.layout)?;
    let forge = LocalForge::open(&resolved.layout, &resolved.repo_path).with_context(|| {
        format!(
            "cannot open the local forge of {}",
            resolved.repo_path.display()
        )
    })?;
    let mut out = std::io::stdout().lock();
    let result = execute(&forge, cmd, &mut out);
    // As root on a packaged instance: what the forge wrote goes to the worker's user.
    super::ownership::restore_owner(owner, &resolved.layout.repo_dir())?;
    result
}

/// Run `cmd` against `forge`, writing what the user sees to `out`.
fn execute(
    forge: &LocalForge,
    cmd: CheckCommand,
    out: &mut impl Write,
) -> anyhow::Result<ExitCode> {
    match cmd {
        CheckCommand::Set {
            commit,
            name,
            state,
            summary,
            ..
        } => {
            let sha = forge.resolve_commit(&commit)?;
            let (status, conclusion) = state.split();
            forge.set_check_run(
                &sha,
                CheckRun {
                    name: name.clone(),
                    status,
                    conclusion,
                    summary,
                },
            )?;
            let word = conclusion.map_or(status.as_str(), CheckConclusion::as_str);
            writeln!(out, "check {name} of {}: {word}", &sha[..12])?;
        }
        CheckCommand::List { commit, json, .. } => {
            let sha = forge.resolve_commit(&commit)?;
            let runs = forge.check_runs(&sha)?;
            if json {
                serde_json::to_writer_pretty(&mut *out, &runs)?;
                writeln!(out)?;
                return Ok(ExitCode::SUCCESS);
            }
            let verdict = match forge.check_summary(&sha)?.state {
                ChecksState::None => "no checks",
                ChecksState::Pending => "pending",
                ChecksState::Success => "success",
                ChecksState::Failure => "failure",
            };
            writeln!(out, "{sha}: {verdict}")?;
            for run in &runs {
                let word = run
                    .conclusion
                    .map_or(run.status.as_str(), CheckConclusion::as_str);
                if run.summary.is_empty() {
                    writeln!(out, "  {}: {word}", run.name)?;
                } else {
                    writeln!(out, "  {}: {word}: {}", run.name, run.summary)?;
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{Layout, Slug};

    struct Cli {
        _tmp: tempfile::TempDir,
        forge: LocalForge,
        main: String,
    }

    impl Cli {
        /// A checkout with one commit on `main` and its local forge.
        fn new() -> Cli {
            let tmp = tempfile::tempdir().unwrap();
            let path = tmp.path().join("repo");
            let mut opts = git2::RepositoryInitOptions::new();
            opts.initial_head("main");
            let repo = git2::Repository::init_opts(&path, &opts).unwrap();
            let sig = git2::Signature::now("T", "t@example.com").unwrap();
            let tree = repo
                .find_tree(repo.index().unwrap().write_tree().unwrap())
                .unwrap();
            let main = repo
                .commit(Some("HEAD"), &sig, &sig, "root", &tree, &[])
                .unwrap()
                .to_string();
            let layout = Layout {
                slug: Slug::new("repo").unwrap(),
                data_root: tmp.path().join("data"),
                worktree_base: tmp.path().join("wt"),
            };
            let forge = LocalForge::open(&layout, &path).unwrap();
            Cli {
                _tmp: tmp,
                forge,
                main,
            }
        }

        fn run(&self, cmd: CheckCommand) -> Result<String, String> {
            let mut out = Vec::new();
            execute(&self.forge, cmd, &mut out)
                .map(|_| String::from_utf8(out).unwrap())
                .map_err(|e| format!("{e:#}"))
        }

        fn set(
            &self,
            commit: &str,
            name: &str,
            state: CheckState,
            summary: &str,
        ) -> Result<String, String> {
            self.run(CheckCommand::Set {
                target: TargetArgs::default(),
                commit: commit.into(),
                name: name.into(),
                state,
                summary: summary.into(),
            })
        }

        fn list(&self, commit: &str) -> String {
            self.run(CheckCommand::List {
                target: TargetArgs::default(),
                commit: commit.into(),
                json: false,
            })
            .unwrap()
        }
    }

    #[test]
    fn set_and_list_a_branchs_checks() {
        let cli = Cli::new();
        let short = &cli.main[..12];
        assert_eq!(cli.list("main"), format!("{}: no checks\n", cli.main));
        assert_eq!(
            cli.set("main", "test", CheckState::InProgress, ""),
            Ok(format!("check test of {short}: in_progress\n"))
        );
        assert_eq!(
            cli.list("main"),
            format!("{}: pending\n  test: in_progress\n", cli.main)
        );
        cli.set(
            &cli.main[..7],
            "test",
            CheckState::Failure,
            "2 tests failed",
        )
        .unwrap();
        cli.set("HEAD", "build", CheckState::Success, "").unwrap();
        assert_eq!(
            cli.list("main"),
            format!(
                "{}: failure\n  test: failure: 2 tests failed\n  build: success\n",
                cli.main
            )
        );
        let runs = cli.forge.check_runs(&cli.main).unwrap();
        assert_eq!(runs[0].status, CheckStatus::Completed);
        assert_eq!(runs[0].conclusion, Some(CheckConclusion::Failure));
    }

    #[test]
    fn an_unknown_commit_is_named() {
        let cli = Cli::new();
        let err = cli
            .set("agent/issue-9", "test", CheckState::Success, "")
            .unwrap_err();
        assert!(err.contains("\"agent/issue-9\""), "{err}");
        let err = cli.set("main", " ", CheckState::Success, "").unwrap_err();
        assert!(err.contains("name is empty"), "{err}");
    }

    #[test]
    fn states_use_githubs_words() {
        use clap::ValueEnum as _;
        let names: Vec<String> = CheckState::value_variants()
            .iter()
            .map(|v| v.to_possible_value().unwrap().get_name().to_owned())
            .collect();
        assert_eq!(
            names,
            [
                "queued",
                "in_progress",
                "success",
                "failure",
                "neutral",
                "cancelled",
                "skipped",
                "timed_out",
                "action_required"
            ]
        );
        for state in CheckState::value_variants() {
            let (status, conclusion) = state.split();
            let word = conclusion.map_or(status.as_str(), CheckConclusion::as_str);
            assert_eq!(word, state.to_possible_value().unwrap().get_name());
        }
    }
}
