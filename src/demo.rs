//! The demo: a small repository with issues, a configuration that uses the
//! scripted demo agent, and that agent itself — a stand-in for an LLM CLI
//! that follows the output contract, so the whole pipeline can be watched
//! on any machine without an account or network.
//!
//! The demo agent commits with the `git` command line, as a real coding
//! agent does; HydraFlow itself never shells out to git.

use std::io::Read as _;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context as _, bail};

use crate::config::loader::Resolved;
use crate::forge::IssueState;
use crate::forge::local::LocalForge;
use crate::store::state::Outcome;

/// The demo's issues: three to implement, one already satisfied.
pub const ISSUES: [(&str, &str); 4] = [
    (
        "Add a greeting script",
        "Add `greet.sh` that prints a friendly greeting for the name given as its first argument.",
    ),
    (
        "Add a farewell script",
        "Add `farewell.sh` that says goodbye to the name given as its first argument.",
    ),
    (
        "Document the scripts in USAGE.md",
        "Write `USAGE.md` explaining how to run the scripts.",
    ),
    (
        "Make sure the repository has a README",
        "Every repository needs a README.",
    ),
];

/// Create a git repository at `path` on branch `main` with one commit.
///
/// # Errors
/// I/O and git errors.
pub fn make_repository(path: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(path).with_context(|| format!("cannot create {}", path.display()))?;
    std::fs::write(
        path.join("README.md"),
        "# Demo repository\n\nA tiny repository that HydraFlow's demo works on.\n",
    )?;
    std::fs::write(path.join(".gitignore"), ".hydraflow/\n")?;
    crate::git::init_with_files(
        path,
        "main",
        ("HydraFlow demo", "demo@hydraflow.invalid"),
        "Initial commit",
    )?;
    Ok(())
}

/// Write the demo's configuration: the `command` preset running
/// `<exe> demo-agent`, and short poll intervals.
///
/// # Errors
/// I/O errors.
pub fn write_config(path: &Path, exe: &Path) -> anyhow::Result<()> {
    let config = format!(
        r#"# HydraFlow demo configuration: the scripted demo agent stands in for an LLM CLI.
poll_interval = 2
data_poll_interval = 5

[agent]
preset = "command"
command = [{exe:?}, "demo-agent", "--stage", "{{{{stage}}}}", "--issue", "{{{{issue}}}}"]
output = "plain"
"#,
        exe = exe.display().to_string()
    );
    std::fs::write(path, config).with_context(|| format!("cannot write {}", path.display()))
}

/// Print the merged commits and the issues' final state.
///
/// # Errors
/// git and forge errors.
pub fn print_summary(resolved: &Resolved, forge: &LocalForge) -> anyhow::Result<()> {
    let branch = &resolved.config.main_branch;
    eprintln!("commits on {branch}:");
    for (sha, subject) in crate::git::log(&resolved.repo_path, branch, 10)? {
        eprintln!("  {sha} {subject}");
    }
    eprintln!("issues:");
    let state = crate::store::state::StateTracker::read_only(&resolved.layout.state_file())
        .unwrap_or_default();
    for issue in forge.all_issues()? {
        let outcome = state.issues.get(&issue.number).and_then(|r| r.outcome());
        let merged = forge
            .pull_requests_for_head(&crate::layout::Layout::branch_name(issue.number))?
            .into_iter()
            .find(|p| p.state == crate::forge::PullRequestState::Merged);
        let what = match (outcome, merged) {
            (_, Some(pull)) => format!("merged (pull request #{})", pull.number),
            (Some(Outcome::AlreadySatisfied), None) => "closed as already satisfied".to_owned(),
            (Some(other), None) => format!("{other:?}").to_lowercase(),
            (None, None) => format!(
                "{} [{}]",
                match issue.state {
                    IssueState::Open => "open",
                    IssueState::Closed => "closed",
                },
                issue.labels.join(", ")
            ),
        };
        eprintln!("  #{} {what}: {}", issue.number, issue.title);
    }
    Ok(())
}

/// Stage everything and commit it; `false` when there was nothing to commit.
fn commit_all(message: &str) -> anyhow::Result<bool> {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .status()
            .context("cannot run git (the demo agent commits with the git command)")
    };
    let status = git(&["add", "-A"])?;
    if !status.success() {
        bail!("git add -A failed with {status}");
    }
    if git(&["diff", "--cached", "--quiet"])?.success() {
        return Ok(false);
    }
    let args = [
        "-c",
        "user.name=HydraFlow demo agent",
        "-c",
        "user.email=demo-agent@hydraflow.invalid",
        "commit",
        "-q",
        "-m",
        message,
    ];
    let status = git(&args)?;
    if !status.success() {
        bail!("git {} failed with {status}", args.join(" "));
    }
    Ok(true)
}

/// The scripted demo agent: reads the prompt on stdin and answers as the
/// output contract asks for `stage`.
///
/// # Errors
/// I/O failures.
pub fn agent(stage: &str, issue: u64) -> anyhow::Result<ExitCode> {
    let mut prompt = String::new();
    std::io::stdin().read_to_string(&mut prompt)?;
    println!(
        "demo agent: {stage} for issue #{issue} ({} bytes of prompt)",
        prompt.len()
    );
    match stage {
        "triage" => {
            println!(
                r#"{{"ready": true, "reasons": ["the issue says exactly what to add"], "issue_type": "feature", "clarity_score": 9, "complexity_score": 1, "needs_discovery": false, "already_addressed": false}}"#
            );
        }
        "plan" => {
            if prompt.contains("has a README") {
                println!(
                    "ALREADY_SATISFIED_START\nREADME.md exists at the top of the repository.\nALREADY_SATISFIED_END"
                );
            } else {
                println!(
                    "PLAN_START\n1. Add the file the issue asks for.\n2. Commit it.\nSUMMARY: add the requested file\nPLAN_END"
                );
            }
        }
        "review" if !prompt.contains("VERDICT") || prompt.contains("diff") => {
            println!(
                "The change adds what the issue asks for.\nVERDICT: APPROVE\nSUMMARY: does what the issue asks"
            );
        }
        _ => {
            let (file, content) = if prompt.contains("greeting script") {
                (
                    "greet.sh",
                    "#!/bin/sh\necho \"Hello, ${1:-world}!\"\n".to_owned(),
                )
            } else if prompt.contains("farewell script") {
                (
                    "farewell.sh",
                    "#!/bin/sh\necho \"Goodbye, ${1:-world}!\"\n".to_owned(),
                )
            } else if prompt.contains("USAGE.md") {
                (
                    "USAGE.md",
                    "# Usage\n\n    sh greet.sh Ada\n    sh farewell.sh Ada\n".to_owned(),
                )
            } else {
                ("NOTES.md", format!("Notes for issue #{issue}.\n"))
            };
            std::fs::write(file, content)?;
            println!("wrote {file}");
            // Run again on its own finished work (a restart), it finds nothing
            // to change, as a real agent would, and says so.
            if commit_all(&format!("Add {file} (issue #{issue})"))? {
                println!("committed {file}");
            } else {
                println!("{file} is already as the issue asks: nothing to commit");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
