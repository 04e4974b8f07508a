//! Deterministic simulation of the pipeline with crash injection, after
//! stratisd's `SimEngine` and FoundationDB's simulation testing.
//!
//! The outside world is a real git repository in a temporary directory, an
//! in-memory forge with GitHub's semantics ([`MemoryForge`]: labels,
//! comments, pull requests, reviews, checks, squash merges done with git on
//! that repository) and a scripted agent ([`ScriptedRunner`]) that plays
//! each stage's answer and edits and commits in the worktree as a real
//! agent would. The pipeline is the production code: the same start-up
//! resumption, poll, spool intake, stage tasks, failure policy, delayed
//! retries and garbage collection, driven one step at a time on one thread
//! (delays are taken at once: time is virtual).
//!
//! Every outside side effect (each forge mutation, each agent run, each
//! worktree made, salvaged or removed) is a numbered crash point. For each
//! scenario the test first counts them in a clean run, then for every `k`
//! runs the scenario again in a fresh world, stops the pipeline right after
//! effect `k` (the effect done, nothing after it: the task is parked and
//! dropped), builds a new pipeline from what is on disk, and runs it to the
//! end; and again with a second crash right after the restarted
//! pipeline's first, second or third effect. After each, [`check_invariants`] must hold.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use git2::{BranchType, IndexAddOption, Repository, RepositoryInitOptions, Signature};
use tokio::sync::Notify;

use super::context::{EffectHook, OrchestratorParts, Pipeline};
use super::issue_store::IssueStore;
use super::orchestrator::{
    collect_garbage, poll_once, probe, release_due, resume_interrupted, take_spooled,
};
use super::task::process;
use crate::agent::parse::DisplayLine;
use crate::agent::runner::{AgentRunner, LineSink};
use crate::agent::{AgentCall, AgentError, AgentOutcome, Stage};
use crate::config::{Config, EventsConfig};
use crate::forge::{
    ChecksState, ChecksSummary, Comment, Forge, ForgeError, ForgeResult, Issue, IssueDetail,
    IssueState, LabelSpec, MergeOutcome, NewPullRequest, PullRequest, PullRequestState, Review,
    ReviewEvent,
};
use crate::git::Worktrees;
use crate::layout::{Layout, Slug};
use crate::store::events::EventBus;
use crate::store::state::{HitlCommand, Outcome, Phase, StateTracker};

/// The six scenarios of the crash campaign.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    /// Two issues, every stage succeeds at once.
    Happy,
    /// The first plan fails validation; the second is accepted.
    PlanRejected,
    /// The review requests changes until the fix file is on the branch.
    ChangesRequested,
    /// CI fails until the CI-fix file is on the branch, and is pending at
    /// the first look at each head.
    CiRedThenGreen,
    /// A human commits a conflicting change to `main` when the pull request
    /// opens; the conflict-fix agent merges `main` and resolves it.
    MergeConflict,
    /// The implementation commits nothing (escalated); a human's correction
    /// makes the HITL agent write the file, and the issue merges.
    HitlCorrection,
}

impl Scenario {
    const ALL: [Scenario; 6] = [
        Scenario::Happy,
        Scenario::PlanRejected,
        Scenario::ChangesRequested,
        Scenario::CiRedThenGreen,
        Scenario::MergeConflict,
        Scenario::HitlCorrection,
    ];

    fn issues(self) -> Vec<u64> {
        match self {
            Scenario::Happy => vec![1, 2],
            _ => vec![1],
        }
    }

    /// What `main` must hold at the end: the initial files plus exactly
    /// the agents' (and the human's) changes.
    fn expected_main(self) -> BTreeMap<String, String> {
        let mut files: BTreeMap<String, String> = INITIAL
            .iter()
            .map(|(p, c)| ((*p).to_owned(), (*c).to_owned()))
            .collect();
        let mut add = |p: &str, c: &str| {
            files.insert(p.to_owned(), c.to_owned());
        };
        match self {
            Scenario::Happy => {
                add("file-1.txt", "content 1\n");
                add("file-2.txt", "content 2\n");
            }
            Scenario::PlanRejected => add("file-1.txt", "content 1\n"),
            Scenario::ChangesRequested => {
                add("file-1.txt", "content 1\n");
                add("fix-1.txt", "fix 1\n");
            }
            Scenario::CiRedThenGreen => {
                add("file-1.txt", "content 1\n");
                add("ci-1.txt", "ci 1\n");
            }
            Scenario::MergeConflict => {
                add("file-1.txt", "resolved 1\n");
                add("human.txt", "a human was here\n");
            }
            Scenario::HitlCorrection => add("file-1.txt", "corrected 1\n"),
        }
        files
    }
}

/// `main`'s files at the start.
const INITIAL: [(&str, &str); 3] = [
    ("README.md", "hello\n"),
    (".gitignore", "*.log\n"),
    ("src/lib.txt", "one\ntwo\nthree\n"),
];

/// The crash injector: counts side effects and stops the pipeline after
/// the `target`-th (a future that never ends, then dropped).
struct Crash {
    target: Option<usize>,
    count: AtomicUsize,
    crashed: AtomicBool,
    notify: Notify,
    effects: Mutex<Vec<&'static str>>,
}

impl Crash {
    fn new(target: Option<usize>) -> Arc<Crash> {
        Arc::new(Crash {
            target,
            count: AtomicUsize::new(0),
            crashed: AtomicBool::new(false),
            notify: Notify::new(),
            effects: Mutex::new(Vec::new()),
        })
    }

    /// Resolves once the crash happened.
    async fn happened(&self) {
        loop {
            let notified = self.notify.notified();
            if self.crashed.load(Ordering::SeqCst) {
                return;
            }
            notified.await;
        }
    }
}

#[async_trait]
impl EffectHook for Crash {
    async fn after(&self, what: &'static str) {
        if self.crashed.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        let k = self.count.fetch_add(1, Ordering::SeqCst) + 1;
        lock(&self.effects).push(what);
        if Some(k) == self.target {
            self.crashed.store(true, Ordering::SeqCst);
            self.notify.notify_waiters();
            std::future::pending::<()>().await;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A pull request on the memory forge.
#[derive(Debug, Clone)]
struct MemPull {
    pr: PullRequest,
    reviews: Vec<Review>,
    merged_sha: Option<String>,
}

/// What the memory forge holds.
#[derive(Debug, Default)]
struct Forgeland {
    next: u64,
    issues: BTreeMap<u64, (Issue, Vec<Comment>)>,
    pulls: BTreeMap<u64, MemPull>,
    /// Heads whose checks were looked at once (pending at the first look).
    looked_at: HashSet<String>,
}

/// An in-memory forge with GitHub's semantics; merges are real squash
/// merges of the repository's branches (the repository plays the server's
/// copy, as with the local forge). Every mutation is a crash point.
struct MemoryForge {
    repo: PathBuf,
    scenario: Scenario,
    land: Mutex<Forgeland>,
    hook: Mutex<Option<Arc<Crash>>>,
}

impl MemoryForge {
    async fn effect(&self, what: &'static str) {
        let hook = lock(&self.hook).clone();
        if let Some(hook) = hook {
            hook.after(what).await;
        }
    }

    fn file_issue(&self, title: &str, labels: &[&str]) -> u64 {
        let mut land = lock(&self.land);
        land.next += 1;
        let n = land.next;
        let issue = Issue {
            number: n,
            title: title.to_owned(),
            body: format!("Please add file-{n}.txt"),
            labels: labels.iter().map(|l| (*l).to_owned()).collect(),
            author: "alice".into(),
            state: IssueState::Open,
            url: None,
        };
        land.issues.insert(n, (issue, Vec::new()));
        n
    }

    fn with_issue<T>(
        &self,
        n: u64,
        f: impl FnOnce(&mut Issue, &mut Vec<Comment>) -> T,
    ) -> ForgeResult<T> {
        let mut land = lock(&self.land);
        let (issue, comments) = land
            .issues
            .get_mut(&n)
            .ok_or_else(|| ForgeError::NotFound(format!("issue #{n}")))?;
        Ok(f(issue, comments))
    }

    /// The pull request as GitHub would answer: head SHA from the branch,
    /// mergeability from a trial merge.
    fn live(&self, pull: &MemPull) -> PullRequest {
        let mut pr = pull.pr.clone();
        if pr.state != PullRequestState::Open {
            return pr;
        }
        let repo = Repository::open(&self.repo).expect("sim repo");
        let Some(head) = tip(&repo, &pr.head) else {
            pr.mergeable = Some(false);
            return pr;
        };
        pr.head_sha = head.id().to_string();
        let base = tip(&repo, &pr.base).expect("base branch");
        let index = repo.merge_commits(&base, &head, None).expect("trial merge");
        pr.mergeable = Some(!index.has_conflicts());
        pr
    }
}

fn tip<'r>(repo: &'r Repository, branch: &str) -> Option<git2::Commit<'r>> {
    repo.find_branch(branch, BranchType::Local)
        .ok()?
        .get()
        .peel_to_commit()
        .ok()
}

#[async_trait]
impl Forge for MemoryForge {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn list_issues(&self, labels: &[String]) -> ForgeResult<Vec<Issue>> {
        Ok(lock(&self.land)
            .issues
            .values()
            .map(|(i, _)| i)
            .filter(|i| i.state == IssueState::Open && i.labels.iter().any(|l| labels.contains(l)))
            .cloned()
            .collect())
    }

    async fn get_issue(&self, number: u64) -> ForgeResult<IssueDetail> {
        self.with_issue(number, |i, c| IssueDetail {
            issue: i.clone(),
            comments: c.clone(),
        })
    }

    async fn add_label(&self, number: u64, label: &str) -> ForgeResult<()> {
        self.with_issue(number, |i, _| {
            if !i.labels.iter().any(|l| l == label) {
                i.labels.push(label.to_owned());
            }
        })?;
        self.effect("add_label").await;
        Ok(())
    }

    async fn remove_label(&self, number: u64, label: &str) -> ForgeResult<()> {
        self.with_issue(number, |i, _| i.labels.retain(|l| l != label))?;
        self.effect("remove_label").await;
        Ok(())
    }

    async fn ensure_labels(&self, _labels: &[LabelSpec]) -> ForgeResult<()> {
        Ok(())
    }

    async fn comment(&self, number: u64, body: &str) -> ForgeResult<()> {
        self.with_issue(number, |_, c| {
            c.push(Comment {
                author: "hydraflow".into(),
                body: body.to_owned(),
                created_at: "2026-01-01T00:00:00Z".into(),
            });
        })?;
        self.effect("comment").await;
        Ok(())
    }

    async fn close_issue(&self, number: u64) -> ForgeResult<()> {
        self.with_issue(number, |i, _| i.state = IssueState::Closed)?;
        self.effect("close").await;
        Ok(())
    }

    async fn push_branch(&self, _repo: &Path, branch: &str) -> ForgeResult<()> {
        let repo = Repository::open(&self.repo).expect("sim repo");
        if tip(&repo, branch).is_none() {
            return Err(ForgeError::NotFound(format!("branch {branch}")));
        }
        self.effect("push").await;
        Ok(())
    }

    async fn find_or_create_pull_request(&self, req: &NewPullRequest) -> ForgeResult<PullRequest> {
        let existing = lock(&self.land)
            .pulls
            .values()
            .find(|p| p.pr.head == req.head && p.pr.state == PullRequestState::Open)
            .cloned();
        if let Some(pull) = existing {
            return Ok(self.live(&pull));
        }
        if self.scenario == Scenario::MergeConflict {
            // Meanwhile a human changed main in a way that conflicts.
            let issue: u64 = req
                .head
                .trim_start_matches("agent/issue-")
                .parse()
                .unwrap_or(0);
            commit_on_branch(
                &Repository::open(&self.repo).expect("sim repo"),
                "main",
                &[
                    (format!("file-{issue}.txt"), format!("human {issue}\n")),
                    ("human.txt".into(), "a human was here\n".into()),
                ],
                "a human's change",
            );
        }
        let pull = {
            let mut land = lock(&self.land);
            land.next += 1;
            let pull = MemPull {
                pr: PullRequest {
                    number: land.next,
                    head: req.head.clone(),
                    head_sha: String::new(),
                    base: req.base.clone(),
                    title: req.title.clone(),
                    body: req.body.clone(),
                    state: PullRequestState::Open,
                    mergeable: None,
                    url: None,
                },
                reviews: Vec::new(),
                merged_sha: None,
            };
            land.pulls.insert(pull.pr.number, pull.clone());
            pull
        };
        self.effect("open_pull_request").await;
        Ok(self.live(&pull))
    }

    async fn get_pull_request(&self, number: u64) -> ForgeResult<PullRequest> {
        let pull = lock(&self.land)
            .pulls
            .get(&number)
            .cloned()
            .ok_or_else(|| ForgeError::NotFound(format!("pull request #{number}")))?;
        Ok(self.live(&pull))
    }

    async fn checks(&self, sha: &str) -> ForgeResult<ChecksSummary> {
        if self.scenario != Scenario::CiRedThenGreen {
            return Ok(ChecksSummary {
                state: ChecksState::None,
                failures: Vec::new(),
            });
        }
        if lock(&self.land).looked_at.insert(sha.to_owned()) {
            return Ok(ChecksSummary {
                state: ChecksState::Pending,
                failures: Vec::new(),
            });
        }
        let repo = Repository::open(&self.repo).expect("sim repo");
        let tree = repo
            .find_commit(git2::Oid::from_str(sha).expect("sha"))
            .expect("head commit")
            .tree()
            .expect("tree");
        let green = tree
            .iter()
            .any(|e| e.name().is_ok_and(|n| n.starts_with("ci-")));
        Ok(if green {
            ChecksSummary {
                state: ChecksState::Success,
                failures: Vec::new(),
            }
        } else {
            ChecksSummary {
                state: ChecksState::Failure,
                failures: vec!["unit tests: the ci file is missing".into()],
            }
        })
    }

    async fn post_review(&self, number: u64, event: ReviewEvent, body: &str) -> ForgeResult<()> {
        {
            let mut land = lock(&self.land);
            let pull = land
                .pulls
                .get_mut(&number)
                .ok_or_else(|| ForgeError::NotFound(format!("pull request #{number}")))?;
            pull.reviews.push(Review {
                event,
                body: body.to_owned(),
            });
        }
        self.effect("post_review").await;
        Ok(())
    }

    async fn list_reviews(&self, number: u64) -> ForgeResult<Vec<Review>> {
        lock(&self.land)
            .pulls
            .get(&number)
            .map(|p| p.reviews.clone())
            .ok_or_else(|| ForgeError::NotFound(format!("pull request #{number}")))
    }

    async fn merge_pull_request(&self, number: u64, title: &str) -> ForgeResult<MergeOutcome> {
        let pull = lock(&self.land)
            .pulls
            .get(&number)
            .cloned()
            .ok_or_else(|| ForgeError::NotFound(format!("pull request #{number}")))?;
        if let Some(sha) = pull.merged_sha {
            return Ok(MergeOutcome { sha });
        }
        if pull.pr.state != PullRequestState::Open {
            return Err(ForgeError::Rejected("Pull Request is not mergeable".into()));
        }
        let sha = {
            let repo = Repository::open(&self.repo).expect("sim repo");
            let head = tip(&repo, &pull.pr.head)
                .ok_or_else(|| ForgeError::Rejected("head branch is gone".into()))?;
            let base = tip(&repo, &pull.pr.base).expect("base");
            let mut index = repo.merge_commits(&base, &head, None).expect("merge");
            if index.has_conflicts() {
                return Err(ForgeError::MergeConflict(format!(
                    "{} conflicts with {}",
                    pull.pr.head, pull.pr.base
                )));
            }
            let tree = repo
                .find_tree(index.write_tree_to(&repo).expect("tree"))
                .expect("tree");
            let sig = Signature::now("forge", "forge@example.com").expect("sig");
            let commit = repo
                .commit(None, &sig, &sig, title, &tree, &[&base])
                .expect("squash commit");
            repo.reference_matching(
                &format!("refs/heads/{}", pull.pr.base),
                commit,
                true,
                base.id(),
                "squash merge",
            )
            .expect("move base");
            commit.to_string()
        };
        {
            let mut land = lock(&self.land);
            let p = land.pulls.get_mut(&number).expect("pull");
            p.pr.state = PullRequestState::Merged;
            p.merged_sha = Some(sha.clone());
        }
        self.effect("merge").await;
        Ok(MergeOutcome { sha })
    }
}

/// Commit `files` on top of `branch` (no checkout), moving the branch.
fn commit_on_branch(repo: &Repository, branch: &str, files: &[(String, String)], message: &str) {
    let parent = tip(repo, branch).expect("branch");
    let mut builder = repo
        .treebuilder(Some(&parent.tree().expect("tree")))
        .expect("builder");
    for (path, content) in files {
        assert!(!path.contains('/'), "top-level files only");
        let blob = repo.blob(content.as_bytes()).expect("blob");
        builder.insert(path, blob, 0o100_644).expect("insert");
    }
    let tree = repo
        .find_tree(builder.write().expect("write"))
        .expect("tree");
    let sig = Signature::now("Human", "human@example.com").expect("sig");
    repo.commit(
        Some(&format!("refs/heads/{branch}")),
        &sig,
        &sig,
        message,
        &tree,
        &[&parent],
    )
    .expect("commit");
}

/// The scripted agent: answers by stage and by what the worktree holds, so
/// a run repeated after a crash answers the same; edits and commits with
/// git in the worktree.
struct ScriptedRunner {
    scenario: Scenario,
    calls: Mutex<Vec<(String, u64)>>,
}

impl ScriptedRunner {
    fn answer(&self, kind: &str, n: u64, cwd: &Path) -> String {
        let plan_calls = lock(&self.calls)
            .iter()
            .filter(|(k, i)| k == "plan" && *i == n)
            .count();
        let write = |file: String, content: String| {
            std::fs::write(cwd.join(&file), content).expect("agent writes");
            commit_all(cwd, &format!("agent: {file}"));
            format!("wrote {file}")
        };
        match kind {
            "triage" => r#"{"ready": true, "reasons": ["clear"], "issue_type": "feature", "clarity_score": 9, "complexity_score": 1, "needs_discovery": false, "already_addressed": false}"#.to_owned(),
            "plan" if self.scenario == Scenario::PlanRejected && plan_calls == 1 => {
                "I could not come up with a plan.".to_owned()
            }
            "plan" => format!("PLAN_START\nWrite file-{n}.txt.\nSUMMARY: add file-{n}.txt\nPLAN_END"),
            "implement" if self.scenario == Scenario::HitlCorrection => {
                "I am not sure what to do.".to_owned()
            }
            "implement" => write(format!("file-{n}.txt"), format!("content {n}\n")),
            "review" => {
                let approve = self.scenario != Scenario::ChangesRequested
                    || cwd.join(format!("fix-{n}.txt")).is_file();
                if approve {
                    "VERDICT: APPROVE\nSUMMARY: looks right".to_owned()
                } else {
                    "VERDICT: REQUEST_CHANGES\nSUMMARY: add the fix file\nThe fix file is missing.".to_owned()
                }
            }
            "review-fix" => write(format!("fix-{n}.txt"), format!("fix {n}\n")),
            "ci-fix" => write(format!("ci-{n}.txt"), format!("ci {n}\n")),
            "conflict-fix" => {
                merge_main_resolving(cwd, &format!("file-{n}.txt"), &format!("resolved {n}\n"));
                "merged main and resolved the conflict".to_owned()
            }
            "hitl" => write(format!("file-{n}.txt"), format!("corrected {n}\n")),
            other => panic!("unknown prompt kind {other:?}"),
        }
    }
}

/// `git add -A && git commit` in the worktree; nothing when nothing changed.
fn commit_all(cwd: &Path, message: &str) {
    let repo = Repository::open(cwd).expect("worktree");
    let mut index = repo.index().expect("index");
    index
        .add_all(["*"], IndexAddOption::DEFAULT, None)
        .expect("add");
    index.update_all(["*"], None).expect("update");
    index.write().expect("write index");
    let tree_id = index.write_tree().expect("tree");
    let head = repo.head().expect("head").peel_to_commit().expect("commit");
    if head.tree_id() == tree_id {
        return;
    }
    let tree = repo.find_tree(tree_id).expect("tree");
    let sig = Signature::now("Agent", "agent@example.com").expect("sig");
    repo.commit(Some("HEAD"), &sig, &sig, message, &tree, &[&head])
        .expect("commit");
}

/// Merge `main` into the worktree's branch, taking `content` for `path`
/// where they conflict, and check the result out.
fn merge_main_resolving(cwd: &Path, path: &str, content: &str) {
    let repo = Repository::open(cwd).expect("worktree");
    let head = repo.head().expect("head").peel_to_commit().expect("commit");
    let main = tip(&repo, "main").expect("main");
    if repo
        .graph_descendant_of(head.id(), main.id())
        .unwrap_or(false)
    {
        return;
    }
    let mut index = repo.merge_commits(&head, &main, None).expect("merge");
    if index.has_conflicts() {
        index.conflict_remove(Path::new(path)).expect("resolve");
        let entry = git2::IndexEntry {
            ctime: git2::IndexTime::new(0, 0),
            mtime: git2::IndexTime::new(0, 0),
            dev: 0,
            ino: 0,
            mode: 0o100_644,
            uid: 0,
            gid: 0,
            file_size: 0,
            id: repo.blob(content.as_bytes()).expect("blob"),
            flags: 0,
            flags_extended: 0,
            path: path.as_bytes().to_vec(),
        };
        index.add(&entry).expect("add");
    }
    assert!(!index.has_conflicts(), "resolved");
    let tree = repo
        .find_tree(index.write_tree_to(&repo).expect("tree"))
        .expect("tree");
    let sig = Signature::now("Agent", "agent@example.com").expect("sig");
    repo.commit(
        Some("HEAD"),
        &sig,
        &sig,
        "merge main",
        &tree,
        &[&head, &main],
    )
    .expect("merge commit");
    let mut checkout = git2::build::CheckoutBuilder::new();
    checkout.force();
    repo.checkout_head(Some(&mut checkout)).expect("checkout");
}

#[async_trait]
impl AgentRunner for ScriptedRunner {
    async fn run(
        &self,
        call: &AgentCall,
        on_line: LineSink<'_>,
    ) -> Result<AgentOutcome, AgentError> {
        let prompt = call.stdin.clone().unwrap_or_default();
        let kind = prompt
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("KIND "))
            .expect("the simulation's prompt templates start with KIND")
            .trim()
            .to_owned();
        lock(&self.calls).push((kind.clone(), call.issue));
        let transcript = self.answer(&kind, call.issue, &call.cwd);
        on_line(&DisplayLine {
            kind: crate::agent::parse::LineKind::Text,
            text: transcript.lines().next().unwrap_or("").to_owned(),
        });
        Ok(AgentOutcome {
            exit_code: Some(0),
            transcript,
            ..AgentOutcome::default()
        })
    }
}

/// The outside world of one simulated run; it survives crashes.
struct World {
    _tmp: tempfile::TempDir,
    repo: PathBuf,
    layout: Layout,
    config: Config,
    scenario: Scenario,
    forge: Arc<MemoryForge>,
    runner: Arc<ScriptedRunner>,
    /// Issues a human has sent a correction for.
    corrected: Mutex<HashSet<u64>>,
}

impl World {
    fn new(scenario: Scenario) -> World {
        // On a tmpfs when there is one: the runs are many, and fsync is slow.
        let shm = Path::new("/dev/shm");
        let tmp = if shm.is_dir() {
            tempfile::tempdir_in(shm)
        } else {
            tempfile::tempdir()
        }
        .expect("temp dir");
        let repo_path = tmp.path().join("repo");
        let mut opts = RepositoryInitOptions::new();
        opts.initial_head("main");
        let repo = Repository::init_opts(&repo_path, &opts).expect("git init");
        for (path, content) in INITIAL {
            let file = repo_path.join(path);
            std::fs::create_dir_all(file.parent().expect("parent")).expect("dirs");
            std::fs::write(file, content).expect("write");
        }
        let mut index = repo.index().expect("index");
        index
            .add_all(["*"], IndexAddOption::DEFAULT, None)
            .expect("add");
        index.write().expect("index");
        let tree = repo
            .find_tree(index.write_tree().expect("tree"))
            .expect("tree");
        let sig = Signature::now("Test", "test@example.com").expect("sig");
        repo.commit(Some("HEAD"), &sig, &sig, "initial commit", &tree, &[])
            .expect("commit");

        let prompts = tmp.path().join("prompts");
        std::fs::create_dir_all(&prompts).expect("prompts");
        for kind in [
            "triage",
            "plan",
            "implement",
            "review",
            "review-fix",
            "ci-fix",
            "conflict-fix",
            "hitl",
        ] {
            std::fs::write(
                prompts.join(format!("{kind}.md")),
                format!("KIND {kind}\n{{{{title}}}}\n{{{{feedback}}}}\n"),
            )
            .expect("template");
        }
        let mut config = Config {
            poll_interval: 1,
            max_issue_attempts: 3,
            ..Config::default()
        };
        config.agent.preset = "command".into();
        config.agent.command = vec!["scripted-agent".into()];
        config.agent.output = Some("plain".into());
        config.agent.prompts_dir = Some(prompts);
        let layout = Layout {
            slug: Slug::new("sim").expect("slug"),
            data_root: tmp.path().join("data"),
            worktree_base: tmp.path().join("wt"),
        };
        layout.create_dirs().expect("dirs");
        let forge = Arc::new(MemoryForge {
            repo: repo_path.clone(),
            scenario,
            land: Mutex::new(Forgeland::default()),
            hook: Mutex::new(None),
        });
        for n in scenario.issues() {
            let filed = forge.file_issue(&format!("Add file {n}"), &["hydraflow-find"]);
            assert_eq!(filed, n);
        }
        World {
            _tmp: tmp,
            repo: repo_path,
            layout,
            config,
            scenario,
            forge,
            runner: Arc::new(ScriptedRunner {
                scenario,
                calls: Mutex::new(Vec::new()),
            }),
            corrected: Mutex::new(HashSet::new()),
        }
    }

    /// A pipeline built from what is on disk, as a restarted worker builds it.
    fn pipeline(&self, crash: &Arc<Crash>) -> Arc<Pipeline> {
        let (state, _) = StateTracker::load(&self.layout.state_file()).expect("state");
        let events = EventBus::open(
            &self.layout.events_file(),
            "sim",
            "sim-session",
            &EventsConfig::default(),
        )
        .expect("events");
        let worktrees = Worktrees::open(&self.repo, &self.layout, "main").expect("worktrees");
        *lock(&self.forge.hook) = Some(Arc::clone(crash));
        let hook: Arc<dyn EffectHook> = crash.clone();
        Arc::new(Pipeline::new(
            OrchestratorParts {
                config: self.config.clone(),
                layout: self.layout.clone(),
                repo_name: "sim".into(),
                forge: self.forge.clone(),
                runner: self.runner.clone(),
                worktrees,
                state: Arc::new(state),
                events: Arc::new(events),
                store: Arc::new(IssueStore::new()),
                extra_agent_env: Vec::new(),
            },
            Some(hook),
        ))
    }

    /// A human answers an escalated issue (once per issue).
    fn human_step(&self, ctx: &Pipeline) -> bool {
        if self.scenario != Scenario::HitlCorrection {
            return false;
        }
        let state = ctx.state.snapshot();
        for (n, record) in &state.issues {
            let waiting = matches!(record.phase, Phase::WaitingForHuman { pending: None, .. })
                && record.journal.is_none();
            if waiting && lock(&self.corrected).insert(*n) {
                super::spool::submit_command(
                    &ctx.layout.spool_dir(),
                    &state,
                    *n,
                    HitlCommand::Correct {
                        text: "write the file the issue asks for".into(),
                    },
                )
                .expect("spool a correction");
                return true;
            }
        }
        false
    }
}

/// Run the pipeline until nothing is left to do, or until the crash.
/// Returns whether it crashed.
async fn run(world: &World, crash: &Arc<Crash>) -> bool {
    let ctx = world.pipeline(crash);
    let body = async {
        assert!(resume_interrupted(&ctx).await, "interrupted issues queued");
        for round in 0..1000 {
            poll_once(&ctx).await.expect("poll");
            ctx.polled.store(true, Ordering::SeqCst);
            if round == 0 {
                collect_garbage(&ctx).await;
            }
            take_spooled(&ctx, &ctx.layout.spool_dir());
            if let Some(p) = ctx.paused() {
                assert!(probe(&ctx, &p.cause).await.is_ok(), "{:?}", p.cause);
                ctx.resume();
            }
            if let Some((stage, issue)) = next_work(&ctx) {
                process(Arc::clone(&ctx), stage, issue).await;
                continue;
            }
            release_due(&ctx, None);
            if ctx.store.depths().is_empty() && !world.human_step(&ctx) {
                collect_garbage(&ctx).await;
                return;
            }
        }
        panic!("{:?}: the pipeline did not settle", world.scenario);
    };
    tokio::select! {
        () = body => false,
        () = crash.happened() => true,
    }
}

fn next_work(ctx: &Pipeline) -> Option<(Stage, Issue)> {
    Stage::ALL
        .into_iter()
        .find_map(|s| ctx.store.take(s).map(|i| (s, i)))
}

/// Every file of `branch`'s tree with its content.
fn files_of(repo: &Repository, branch: &str) -> BTreeMap<String, String> {
    let tree = tip(repo, branch).expect("branch").tree().expect("tree");
    let mut out = BTreeMap::new();
    tree.walk(git2::TreeWalkMode::PreOrder, |dir, entry| {
        if entry.kind() == Some(git2::ObjectType::Blob) {
            let blob = repo.find_blob(entry.id()).expect("blob");
            out.insert(
                format!("{dir}{}", entry.name().unwrap_or_default()),
                String::from_utf8_lossy(blob.content()).into_owned(),
            );
        }
        git2::TreeWalkResult::Ok
    })
    .expect("walk");
    out
}

/// What must hold after every run, crash or not.
fn check_invariants(world: &World, what: &str) {
    let scenario = world.scenario;
    let repo = Repository::open(&world.repo).expect("repo");
    let (state, _) = StateTracker::load(&world.layout.state_file()).expect("state");
    let state = state.snapshot();
    let land = lock(&world.forge.land);
    // `main` holds exactly the agents' changes: no file lost, none extra.
    assert_eq!(
        files_of(&repo, "main"),
        scenario.expected_main(),
        "{what}: main's files"
    );
    let mut walk = repo.revwalk().expect("revwalk");
    walk.push(tip(&repo, "main").expect("main").id())
        .expect("push");
    let subjects: Vec<String> = walk
        .map(|oid| {
            repo.find_commit(oid.expect("oid"))
                .expect("commit")
                .summary()
                .ok()
                .flatten()
                .unwrap_or("")
                .to_owned()
        })
        .collect();
    for n in scenario.issues() {
        let (issue, comments) = &land.issues[&n];
        // Merged exactly once.
        let merges = subjects
            .iter()
            .filter(|s| s.starts_with(&format!("Fixes #{n}:")))
            .count();
        assert_eq!(merges, 1, "{what}: #{n} squash-merged once ({subjects:?})");
        let pulls: Vec<&MemPull> = land
            .pulls
            .values()
            .filter(|p| p.pr.head == format!("agent/issue-{n}"))
            .collect();
        assert_eq!(pulls.len(), 1, "{what}: #{n} has one pull request");
        assert_eq!(pulls[0].pr.state, PullRequestState::Merged, "{what}: #{n}");
        // Labels, state and forge agree.
        assert_eq!(issue.state, IssueState::Closed, "{what}: #{n} closed");
        assert_eq!(
            issue.labels,
            vec!["hydraflow-fixed".to_owned()],
            "{what}: #{n} labels"
        );
        let record = &state.issues[&n];
        assert_eq!(
            record.phase,
            Phase::Done {
                outcome: Outcome::Merged
            },
            "{what}: #{n} record"
        );
        assert!(record.journal.is_none(), "{what}: #{n} journal finished");
        assert!(
            record.attempts <= world.config.max_issue_attempts,
            "{what}: #{n} attempts {}",
            record.attempts
        );
        // No duplicate comment; one escalation exactly when a human was needed.
        let bodies: BTreeSet<&str> = comments.iter().map(|c| c.body.as_str()).collect();
        assert_eq!(
            bodies.len(),
            comments.len(),
            "{what}: #{n} duplicate comment: {comments:#?}"
        );
        let escalations = comments
            .iter()
            .filter(|c| c.body.contains("escalated this issue to a human"))
            .count();
        let expected = usize::from(scenario == Scenario::HitlCorrection);
        assert_eq!(
            escalations, expected,
            "{what}: #{n} escalation comments: {comments:#?}"
        );
        let plans = comments
            .iter()
            .filter(|c| c.body.starts_with("## Implementation Plan"))
            .count();
        assert_eq!(plans, 1, "{what}: #{n} plan comments");
        let reviews: BTreeSet<&str> = pulls[0].reviews.iter().map(|r| r.body.as_str()).collect();
        assert_eq!(
            reviews.len(),
            pulls[0].reviews.len(),
            "{what}: #{n} duplicate review"
        );
        // Nothing left behind.
        assert!(
            !world.layout.worktree_path(n).exists(),
            "{what}: #{n} worktree left"
        );
        assert!(
            tip(&repo, &format!("agent/issue-{n}")).is_none(),
            "{what}: #{n} branch left"
        );
    }
    assert!(
        repo.worktrees().expect("worktrees").is_empty(),
        "{what}: worktree registrations left"
    );
}

/// Runs a scenario clean, then crashed after each of its side effects and
/// restarted; returns how many crash points were covered.
async fn campaign(scenario: Scenario) -> usize {
    let world = World::new(scenario);
    let clean = Crash::new(None);
    assert!(!run(&world, &clean).await);
    check_invariants(&world, &format!("{scenario:?} without a crash"));
    let points = clean.count.load(Ordering::SeqCst);
    let names = lock(&clean.effects).clone();
    for k in 1..=points {
        // Crashed once, and crashed again right after one of the restarted
        // worker's first side effects (a crash during recovery).
        for again in [None, Some(1), Some(2), Some(3)] {
            let world = World::new(scenario);
            let crash = Crash::new(Some(k));
            assert!(
                run(&world, &crash).await,
                "{scenario:?}: crash point {k} was not reached"
            );
            if let Some(j) = again {
                // (Finishing without another effect is fine too.)
                run(&world, &Crash::new(Some(j))).await;
            }
            let restart = Crash::new(None);
            assert!(!run(&world, &restart).await);
            check_invariants(
                &world,
                &format!(
                    "{scenario:?}, crashed after effect {k} ({}){}",
                    names[k - 1],
                    again.map_or(String::new(), |j| format!(
                        " and again after the recovery's effect {j}"
                    ))
                ),
            );
        }
    }
    points
}

#[tokio::test(flavor = "current_thread")]
async fn every_crash_point_of_every_scenario_resumes_cleanly() {
    let mut total = 0;
    for scenario in Scenario::ALL {
        let points = campaign(scenario).await;
        println!(
            "{scenario:?}: {points} crash points, each resumed alone and with a second crash during recovery ({} runs)",
            points * 4
        );
        total += points;
    }
    println!(
        "simulation: {total} crash points over {} scenarios",
        Scenario::ALL.len()
    );
    assert!(total > 100, "the scenarios make side effects ({total})");
}
