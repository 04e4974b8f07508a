//! `hydraflow issue add|list|show|label`: the local forge's issues from the
//! command line, safe while a worker runs.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Subcommand;

use super::TargetArgs;
use crate::forge::local::LocalForge;
use crate::forge::{ForgeError, Issue, IssueState, PullRequest};
use crate::layout::Layout;

/// `hydraflow issue …`
#[derive(Debug, Subcommand)]
pub enum IssueCommand {
    /// File a new issue (labelled `hydraflow-find` unless --label is given).
    Add {
        /// Which repository.
        #[command(flatten)]
        target: TargetArgs,
        /// Title.
        #[arg(long, short)]
        title: String,
        /// Body (Markdown).
        #[arg(long, short, default_value = "")]
        body: String,
        /// Labels (repeatable).
        #[arg(long = "label", short = 'l', value_name = "LABEL")]
        labels: Vec<String>,
    },
    /// List issues (open ones unless --all).
    List {
        /// Which repository.
        #[command(flatten)]
        target: TargetArgs,
        /// Include closed issues.
        #[arg(long)]
        all: bool,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one issue with its comments and pull request.
    Show {
        /// Which repository.
        #[command(flatten)]
        target: TargetArgs,
        /// Issue number.
        number: u64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Add or remove labels.
    Label {
        /// Which repository.
        #[command(flatten)]
        target: TargetArgs,
        /// Issue number.
        number: u64,
        /// Labels to add (repeatable).
        #[arg(long = "add", value_name = "LABEL")]
        add: Vec<String>,
        /// Labels to remove (repeatable).
        #[arg(long = "remove", value_name = "LABEL")]
        remove: Vec<String>,
    },
}

/// Run an `issue` subcommand: resolve the repository
/// ([`super::target::resolve`]), open its local forge and print to stdout.
///
/// # Errors
/// Configuration, I/O, or an unknown issue number.
pub fn run(config_file: &Path, cmd: IssueCommand) -> anyhow::Result<ExitCode> {
    let target = match &cmd {
        IssueCommand::Add { target, .. }
        | IssueCommand::List { target, .. }
        | IssueCommand::Show { target, .. }
        | IssueCommand::Label { target, .. } => target.clone(),
    };
    let resolved = super::target::resolve(config_file, &target)?;
    let forge = LocalForge::open(&resolved.layout, &resolved.repo_path).with_context(|| {
        format!(
            "cannot open the local forge of {}",
            resolved.repo_path.display()
        )
    })?;
    let mut out = std::io::stdout().lock();
    execute(&forge, &resolved.config.labels.find, cmd, &mut out)
}

/// Run `cmd` against `forge`, writing what the user sees to `out`;
/// `default_label` is given to new issues filed without `--label`.
fn execute(
    forge: &LocalForge,
    default_label: &str,
    cmd: IssueCommand,
    out: &mut impl Write,
) -> anyhow::Result<ExitCode> {
    match cmd {
        IssueCommand::Add {
            title,
            body,
            mut labels,
            ..
        } => {
            if title.trim().is_empty() {
                anyhow::bail!("the issue title is empty: give one with --title");
            }
            if labels.is_empty() {
                labels.push(default_label.to_owned());
            }
            let issue = forge.create_issue(&title, &body, &labels)?;
            writeln!(out, "created issue #{}: {}", issue.number, issue.title)?;
        }
        IssueCommand::List { all, json, .. } => {
            let issues: Vec<Issue> = forge
                .all_issues()?
                .into_iter()
                .filter(|i| all || i.state == IssueState::Open)
                .collect();
            if json {
                serde_json::to_writer_pretty(&mut *out, &issues)?;
                writeln!(out)?;
            } else {
                write_table(out, &issues)?;
            }
        }
        IssueCommand::Show { number, json, .. } => {
            let detail = forge.issue_detail(number).map_err(|e| explain(number, e))?;
            let pulls = forge.pull_requests_for_head(&Layout::branch_name(number))?;
            if json {
                let value = serde_json::json!({
                    "issue": detail.issue,
                    "comments": detail.comments,
                    "pull_requests": pulls,
                });
                serde_json::to_writer_pretty(&mut *out, &value)?;
                writeln!(out)?;
            } else {
                let issue = &detail.issue;
                writeln!(
                    out,
                    "#{} {} [{}]",
                    issue.number,
                    issue.title,
                    state_name(issue.state)
                )?;
                writeln!(out, "author: {}", issue.author)?;
                writeln!(out, "labels: {}", issue.labels.join(", "))?;
                if !issue.body.is_empty() {
                    writeln!(out, "\n{}", issue.body.trim_end())?;
                }
                for comment in &detail.comments {
                    writeln!(out, "\n--- {} at {}", comment.author, comment.created_at)?;
                    writeln!(out, "{}", comment.body.trim_end())?;
                }
                for pull in &pulls {
                    write_pull(out, pull)?;
                }
            }
        }
        IssueCommand::Label {
            number,
            add,
            remove,
            ..
        } => {
            if add.is_empty() && remove.is_empty() {
                anyhow::bail!("nothing to change: give --add LABEL and/or --remove LABEL");
            }
            let issue = forge
                .edit_labels(number, &add, &remove)
                .map_err(|e| explain(number, e))?;
            writeln!(
                out,
                "issue #{} labels: {}",
                issue.number,
                issue.labels.join(", ")
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Turn a missing issue into a message that says what to do.
fn explain(number: u64, err: ForgeError) -> anyhow::Error {
    match err {
        ForgeError::NotFound(_) => {
            anyhow::anyhow!("issue #{number} does not exist: see `hydraflow issue list`")
        }
        other => other.into(),
    }
}

fn state_name(state: IssueState) -> &'static str {
    match state {
        IssueState::Open => "open",
        IssueState::Closed => "closed",
    }
}

/// `NUMBER  STATE  LABELS  TITLE`, columns padded to their widest cell.
fn write_table(out: &mut impl Write, issues: &[Issue]) -> std::io::Result<()> {
    if issues.is_empty() {
        return writeln!(
            out,
            "no issues: file one with `hydraflow issue add --title TITLE`"
        );
    }
    let rows: Vec<[String; 4]> = issues
        .iter()
        .map(|i| {
            [
                format!("#{}", i.number),
                state_name(i.state).to_owned(),
                i.labels.join(","),
                i.title.clone(),
            ]
        })
        .collect();
    let header = ["NUMBER", "STATE", "LABELS", "TITLE"].map(str::to_owned);
    let mut widths = [0usize; 3];
    for row in std::iter::once(&header).chain(&rows) {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in std::iter::once(&header).chain(&rows) {
        writeln!(
            out,
            "{:<w0$}  {:<w1$}  {:<w2$}  {}",
            row[0],
            row[1],
            row[2],
            row[3],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2]
        )?;
    }
    Ok(())
}

fn write_pull(out: &mut impl Write, pull: &PullRequest) -> std::io::Result<()> {
    let state = match pull.state {
        crate::forge::PullRequestState::Open => "open",
        crate::forge::PullRequestState::Closed => "closed",
        crate::forge::PullRequestState::Merged => "merged",
    };
    let short = pull.head_sha.get(..7).unwrap_or(&pull.head_sha);
    writeln!(
        out,
        "\npull request #{} ({} -> {}): {state}, head {short}\n  {}",
        pull.number, pull.head, pull.base, pull.title
    )
}
