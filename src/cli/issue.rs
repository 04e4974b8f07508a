//! `hydraflow issue add|list|show|label`: the local forge's issues from the
//! command line, safe while a worker runs.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Subcommand;

use super::TargetArgs;
use crate::config::ForgeKind;
use crate::forge::local::LocalForge;
use crate::forge::{ForgeError, Issue, IssueState, PullRequest};
use crate::layout::Layout;
use crate::store::sessions::CallRecord;

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
/// ([`super::target::resolve_data`]: a checkout registered with the supervisor is its
/// instance), open its local forge and print to stdout.
///
/// # Errors
/// Configuration, I/O, an unknown issue number, a repository on GitHub, or a directory that
/// is not a git checkout.
pub fn run(config_file: &Path, cmd: IssueCommand) -> anyhow::Result<ExitCode> {
    let target = match &cmd {
        IssueCommand::Add { target, .. }
        | IssueCommand::List { target, .. }
        | IssueCommand::Show { target, .. }
        | IssueCommand::Label { target, .. } => target.clone(),
    };
    let resolved = super::target::resolve_data(config_file, &target)?;
    if resolved.config.forge != ForgeKind::Local {
        anyhow::bail!(
            "{} uses the {:?} forge: hydraflow issue files and shows issues of the local forge \
             only; file this one on GitHub",
            resolved.layout.slug,
            resolved.config.forge
        );
    }
    crate::git::check_checkout(&resolved.repo_path)?;
    let owner = super::ownership::data_owner(&resolved.layout)?;
    let forge = LocalForge::open(&resolved.layout, &resolved.repo_path).with_context(|| {
        format!(
            "cannot open the local forge of {}",
            resolved.repo_path.display()
        )
    })?;
    // `<checkout>/.hydraflow` stays out of the user's `git status`.
    crate::git::exclude_from_status(&resolved.repo_path, &resolved.layout.data_root)?;
    let mut out = std::io::stdout().lock();
    let calls = crate::store::sessions::read_calls(&resolved.layout.agent_calls_file())?;
    let result = execute(&forge, &resolved.config.labels.find, &calls, cmd, &mut out);
    // As root on a packaged instance: what the forge wrote goes to the worker's user.
    super::ownership::restore_owner(owner, &resolved.layout.repo_dir())?;
    result
}

/// Run `cmd` against `forge`, writing what the user sees to `out`;
/// `default_label` is given to new issues filed without `--label`; `calls`
/// are the agent calls recorded for the repository (for `show`'s cost).
fn execute(
    forge: &LocalForge,
    default_label: &str,
    calls: &[CallRecord],
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
            let cost = IssueCost::of(calls, number);
            if json {
                let value = serde_json::json!({
                    "issue": detail.issue,
                    "comments": detail.comments,
                    "pull_requests": pulls,
                    "agent_cost": cost,
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
                writeln!(out, "cost: {}", cost.line())?;
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

/// What the agents spent on one issue.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize)]
struct IssueCost {
    /// US dollars, as the agents reported it.
    usd: f64,
    /// Agent calls.
    calls: u64,
    /// Input and output tokens.
    input_tokens: u64,
    output_tokens: u64,
    /// US dollars per UTC day.
    per_day: std::collections::BTreeMap<String, f64>,
}

impl IssueCost {
    fn of(calls: &[CallRecord], number: u64) -> IssueCost {
        let mut cost = IssueCost::default();
        for c in calls.iter().filter(|c| c.issue == number) {
            let usd = c.cost_usd.unwrap_or(0.0);
            cost.usd += usd;
            cost.calls += 1;
            cost.input_tokens += c.usage.input_tokens
                + c.usage.cache_read_input_tokens
                + c.usage.cache_creation_input_tokens;
            cost.output_tokens += c.usage.output_tokens;
            *cost.per_day.entry(c.day.clone()).or_default() += usd;
        }
        cost
    }

    /// `$0.1234 in 5 agent calls (12000 tokens in, 800 out; 2026-11-27 $0.1234)`.
    fn line(&self) -> String {
        if self.calls == 0 {
            return "no agent calls recorded".to_string();
        }
        let days: Vec<String> = self
            .per_day
            .iter()
            .map(|(day, usd)| format!("{day} ${usd:.4}"))
            .collect();
        format!(
            "${:.4} in {} agent call{} ({} tokens in, {} out; {})",
            self.usd,
            self.calls,
            if self.calls == 1 { "" } else { "s" },
            self.input_tokens,
            self.output_tokens,
            days.join(", ")
        )
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::Slug;

    struct Cli {
        _tmp: tempfile::TempDir,
        forge: LocalForge,
        calls: Vec<CallRecord>,
    }

    impl Cli {
        fn new() -> Cli {
            let tmp = tempfile::tempdir().unwrap();
            let layout = Layout {
                slug: Slug::new("repo").unwrap(),
                data_root: tmp.path().join("data"),
                worktree_base: tmp.path().join("wt"),
            };
            let forge = LocalForge::open(&layout, &tmp.path().join("repo")).unwrap();
            Cli {
                _tmp: tmp,
                forge,
                calls: Vec::new(),
            }
        }

        /// Run `cmd`; its output or the error message.
        fn run(&self, cmd: IssueCommand) -> Result<String, String> {
            let mut out = Vec::new();
            execute(&self.forge, "hydraflow-find", &self.calls, cmd, &mut out)
                .map(|_| String::from_utf8(out).unwrap())
                .map_err(|e| format!("{e:#}"))
        }

        fn add(&self, title: &str, labels: &[&str]) -> String {
            self.run(IssueCommand::Add {
                target: TargetArgs::default(),
                title: title.into(),
                body: "the body".into(),
                labels: labels.iter().map(|l| (*l).to_owned()).collect(),
            })
            .unwrap()
        }

        fn label(&self, number: u64, add: &[&str], remove: &[&str]) -> Result<String, String> {
            let owned = |v: &[&str]| v.iter().map(|l| (*l).to_owned()).collect();
            self.run(IssueCommand::Label {
                target: TargetArgs::default(),
                number,
                add: owned(add),
                remove: owned(remove),
            })
        }

        fn list(&self, all: bool, json: bool) -> String {
            self.run(IssueCommand::List {
                target: TargetArgs::default(),
                all,
                json,
            })
            .unwrap()
        }

        fn show(&self, number: u64) -> Result<String, String> {
            self.run(IssueCommand::Show {
                target: TargetArgs::default(),
                number,
                json: false,
            })
        }
    }

    #[test]
    fn add_uses_the_find_label_unless_told_otherwise() {
        let cli = Cli::new();
        assert_eq!(
            cli.add("Fix the bug", &[]),
            "created issue #1: Fix the bug\n"
        );
        assert_eq!(
            cli.add("Plan it", &["hydraflow-plan"]),
            "created issue #2: Plan it\n"
        );
        let labels = |n| cli.forge.issue_detail(n).unwrap().issue.labels;
        assert_eq!(labels(1), ["hydraflow-find"]);
        assert_eq!(labels(2), ["hydraflow-plan"]);
    }

    #[test]
    fn empty_title_is_refused() {
        let cli = Cli::new();
        let err = cli
            .run(IssueCommand::Add {
                target: TargetArgs::default(),
                title: "  ".into(),
                body: String::new(),
                labels: Vec::new(),
            })
            .unwrap_err();
        assert_eq!(err, "the issue title is empty: give one with --title");
        assert!(cli.forge.all_issues().unwrap().is_empty());
    }

    #[test]
    fn list_prints_a_table_or_json() {
        let cli = Cli::new();
        assert_eq!(
            cli.list(false, false),
            "no issues: file one with `hydraflow issue add --title TITLE`\n"
        );
        cli.add("First", &["a", "b"]);
        cli.add("Second", &[]);
        assert_eq!(
            cli.list(false, false),
            "NUMBER  STATE  LABELS          TITLE\n\
             #1      open   a,b             First\n\
             #2      open   hydraflow-find  Second\n"
        );
        let json: Vec<Issue> = serde_json::from_str(&cli.list(false, true)).unwrap();
        assert_eq!(json.len(), 2);
        assert_eq!(json[1].title, "Second");
    }

    #[tokio::test]
    async fn list_hides_closed_issues_unless_all() {
        use crate::forge::Forge as _;
        let cli = Cli::new();
        cli.add("Open one", &[]);
        cli.add("Done one", &[]);
        cli.forge.close_issue(2).await.unwrap();
        assert!(!cli.list(false, false).contains("Done one"));
        assert!(cli.list(true, false).contains("#2      closed"));
    }

    #[test]
    fn label_adds_and_removes() {
        let cli = Cli::new();
        cli.add("Work", &[]);
        let check = |add: &[&str], remove: &[&str], expected: &str| {
            assert_eq!(
                cli.label(1, add, remove).as_deref(),
                Ok(expected),
                "{add:?} {remove:?}"
            );
        };
        check(&["x"], &[], "issue #1 labels: hydraflow-find, x\n");
        check(&["x"], &[], "issue #1 labels: hydraflow-find, x\n");
        check(&["y"], &["hydraflow-find"], "issue #1 labels: x, y\n");
        check(&[], &["absent"], "issue #1 labels: x, y\n");
        assert_eq!(
            cli.label(1, &[], &[]).unwrap_err(),
            "nothing to change: give --add LABEL and/or --remove LABEL"
        );
    }

    #[test]
    fn show_sums_the_cost_of_the_issue_per_day() {
        let mut cli = Cli::new();
        cli.add("Crash on start", &[]);
        let call = |issue: u64, day: &str, usd: f64| CallRecord {
            at: format!("{day}T10:00:00Z"),
            day: day.into(),
            issue,
            stage: crate::agent::Stage::Plan,
            program: "claude".into(),
            model: None,
            exit_code: Some(0),
            signal: None,
            timed_out: false,
            outcome: "success".into(),
            resources: Default::default(),
            usage: crate::agent::Usage {
                input_tokens: 100,
                output_tokens: 10,
                ..Default::default()
            },
            cost_usd: Some(usd),
        };
        cli.calls = vec![
            call(1, "2026-03-01", 0.25),
            call(2, "2026-03-01", 5.0),
            call(1, "2026-03-02", 0.5),
        ];
        let text = cli.show(1).unwrap();
        assert!(
            text.contains(
                "cost: $0.7500 in 2 agent calls (200 tokens in, 20 out; 2026-03-01 $0.2500, 2026-03-02 $0.5000)\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn unknown_issues_say_what_to_do() {
        let cli = Cli::new();
        let expected = "issue #9 does not exist: see `hydraflow issue list`";
        assert_eq!(cli.show(9).unwrap_err(), expected);
        assert_eq!(cli.label(9, &["x"], &[]).unwrap_err(), expected);
    }

    #[tokio::test]
    async fn show_prints_the_issue_and_its_comments() {
        use crate::forge::Forge as _;
        let cli = Cli::new();
        cli.add("Crash on start", &[]);
        cli.forge.comment(1, "triage: confirmed").await.unwrap();
        let text = cli.show(1).unwrap();
        assert!(text.starts_with("#1 Crash on start [open]\n"), "{text}");
        assert!(text.contains("labels: hydraflow-find\n"), "{text}");
        assert!(text.contains("cost: no agent calls recorded\n"), "{text}");
        assert!(text.contains("\nthe body\n"), "{text}");
        assert!(text.contains("triage: confirmed\n"), "{text}");
        let json = cli
            .run(IssueCommand::Show {
                target: TargetArgs::default(),
                number: 1,
                json: true,
            })
            .unwrap();
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(value["issue"]["title"], "Crash on start");
        assert_eq!(value["comments"][0]["body"], "triage: confirmed");
        assert_eq!(value["pull_requests"], serde_json::json!([]));
    }

    #[tokio::test]
    async fn show_lists_the_pull_request_of_the_issue() {
        use crate::forge::{Forge as _, NewPullRequest};
        let cli = Cli::new();
        let repo_path = cli.forge.repo_path().to_path_buf();
        let mut opts = git2::RepositoryInitOptions::new();
        opts.initial_head("main");
        let repo = git2::Repository::init_opts(&repo_path, &opts).unwrap();
        let sig = git2::Signature::now("T", "t@example.com").unwrap();
        let tree = repo
            .find_tree(repo.index().unwrap().write_tree().unwrap())
            .unwrap();
        let root = repo
            .commit(Some("HEAD"), &sig, &sig, "root", &tree, &[])
            .unwrap();
        repo.branch("agent/issue-1", &repo.find_commit(root).unwrap(), false)
            .unwrap();
        cli.add("With a PR", &[]);
        let pr = cli
            .forge
            .find_or_create_pull_request(&NewPullRequest {
                head: "agent/issue-1".into(),
                base: "main".into(),
                title: "Fixes #1: With a PR".into(),
                body: "Closes #1".into(),
            })
            .await
            .unwrap();
        let text = cli.show(1).unwrap();
        let short = &root.to_string()[..7];
        assert!(
            text.contains(&format!(
                "pull request #{} (agent/issue-1 -> main): open, head {short}\n  Fixes #1: With a PR\n",
                pr.number
            )),
            "{text}"
        );
    }
}
