//! The GitHub forge against the fake GitHub: every `Forge` operation, ETags,
//! pagination, rate limits, faults, and the fake's bodies checked against
//! recorded real GitHub responses.

use std::path::Path;
use std::time::Duration;

use hydraflow::forge::github::{COMMENT_LIMIT, Credentials, GithubForge, GithubOptions};
use hydraflow::forge::{
    ChecksState, Forge, ForgeError, LabelSpec, NewPullRequest, PullRequestState, ReviewEvent,
};
use serde_json::Value;

use super::fake_github::{FakeGithub, Fault, LIMIT, OWNER, REPO, TOKEN, key};

pub(crate) fn options(fake: &FakeGithub, token: &str) -> GithubOptions {
    GithubOptions {
        api_url: fake.api_url(),
        web_url: fake.web_url(),
        owner: OWNER.into(),
        repo: REPO.into(),
        credentials: Credentials::Token(token.into()),
        max_concurrent_requests: 2,
        collaborators_only: true,
        max_retries: 3,
        max_retry_wait: Duration::from_secs(5),
        min_backoff: Duration::from_millis(10),
        mergeable_polls: 5,
        mergeable_poll_delay: Duration::from_millis(10),
    }
}

fn forge(fake: &FakeGithub) -> GithubForge {
    GithubForge::new(options(fake, TOKEN)).expect("forge")
}

fn labels(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// A clone of the fake's bare repository with `branch` holding one new commit
/// that writes `content` to `file`.
pub(crate) fn checkout_with_branch(
    fake: &FakeGithub,
    dir: &Path,
    branch: &str,
    file: &str,
    content: &str,
) -> git2::Repository {
    let repo = git2::Repository::clone(fake.bare.to_str().expect("utf8"), dir).expect("clone");
    {
        let head = repo.head().expect("head").peel_to_commit().expect("commit");
        repo.branch(branch, &head, true).expect("branch");
        std::fs::write(dir.join(file), content).expect("write");
        let mut index = repo.index().expect("index");
        index.add_path(Path::new(file)).expect("add");
        index.write().expect("index write");
        let tree = repo
            .find_tree(index.write_tree().expect("tree"))
            .expect("tree");
        let sig = git2::Signature::now("agent", "agent@example.com").expect("sig");
        repo.commit(
            Some(&format!("refs/heads/{branch}")),
            &sig,
            &sig,
            "change",
            &tree,
            &[&head],
        )
        .expect("commit");
    }
    repo
}

fn pr_request(n: u64) -> NewPullRequest {
    NewPullRequest {
        head: format!("agent/issue-{n}"),
        base: "main".into(),
        title: format!("Fixes #{n}: do it"),
        body: format!("Closes #{n}"),
    }
}

#[tokio::test]
async fn every_operation_against_the_fake() {
    let fake = FakeGithub::start().await;
    fake.state().collaborators.insert("alice".into());
    let n = fake.add_issue("Add a README", "alice", &["hydraflow-find"]);
    let stranger = fake.add_issue("Spam", "mallory", &["hydraflow-find"]);
    let _unlabelled = fake.add_issue("Other", "alice", &[]);
    let gh = forge(&fake);

    gh.ensure_labels(&[
        LabelSpec {
            name: "hydraflow-find".into(),
            color: "#0e8a16".into(),
            description: "triage queue".into(),
        },
        LabelSpec {
            name: "hydraflow-plan".into(),
            color: "5319e7".into(),
            description: "planning".into(),
        },
    ])
    .await
    .expect("ensure labels");
    gh.ensure_labels(&[LabelSpec {
        name: "hydraflow-plan".into(),
        color: "5319e7".into(),
        description: "planning".into(),
    }])
    .await
    .expect("ensure labels again");
    assert_eq!(fake.state().labels.len(), 2);
    assert_eq!(fake.state().labels[0].1, "0e8a16");

    let issues = gh
        .list_issues(&labels(&["hydraflow-find", "hydraflow-plan"]))
        .await
        .expect("list");
    assert_eq!(
        issues.iter().map(|i| i.number).collect::<Vec<_>>(),
        [n],
        "only the collaborator's issue"
    );
    assert!(fake.state().issues.contains_key(&stranger));
    assert_eq!(fake.count(&key("GET", "/collaborators/{user}")), 2);
    gh.list_issues(&labels(&["hydraflow-find"]))
        .await
        .expect("list again");
    assert_eq!(
        fake.count(&key("GET", "/collaborators/{user}")),
        2,
        "collaborator answers are cached"
    );

    gh.add_label(n, "hydraflow-plan").await.expect("add label");
    gh.remove_label(n, "hydraflow-find")
        .await
        .expect("remove label");
    gh.remove_label(n, "hydraflow-find")
        .await
        .expect("removing an absent label is success");
    gh.comment(n, "plan: write it").await.expect("comment");
    let detail = gh.get_issue(n).await.expect("get issue");
    assert_eq!(detail.issue.labels, ["hydraflow-plan"]);
    assert_eq!(detail.issue.author, "alice");
    assert_eq!(detail.issue.body, "body of Add a README");
    assert_eq!(detail.comments.len(), 1);
    assert_eq!(detail.comments[0].body, "plan: write it");

    let work = tempfile::tempdir().expect("tempdir");
    let branch = format!("agent/issue-{n}");
    checkout_with_branch(&fake, work.path(), &branch, "NEW.md", "new\n");
    gh.push_branch(work.path(), &branch).await.expect("push");
    assert!(
        fake.count("POST /git") >= 1,
        "the push went over smart HTTP"
    );
    let bare = git2::Repository::open_bare(&fake.bare).expect("bare");
    assert!(bare.find_reference(&format!("refs/heads/{branch}")).is_ok());

    let pr = gh
        .find_or_create_pull_request(&pr_request(n))
        .await
        .expect("create PR");
    assert_eq!(pr.title, format!("Fixes #{n}: do it"));
    assert_eq!(pr.state, PullRequestState::Open);
    let again = gh
        .find_or_create_pull_request(&pr_request(n))
        .await
        .expect("find PR");
    assert_eq!(again.number, pr.number);
    assert_eq!(fake.state().pulls.len(), 1);

    // The pull request shows up in the issue listing, but never as an issue.
    fake.state()
        .issues
        .get_mut(&n)
        .expect("issue")
        .labels
        .push("hydraflow-review".into());
    let listed = gh
        .list_issues(&labels(&["hydraflow-review"]))
        .await
        .expect("list");
    assert!(listed.iter().all(|i| i.number != pr.number));

    let polls_before = fake.count(&key("GET", "/pulls/{number}"));
    let pr = gh.get_pull_request(pr.number).await.expect("get PR");
    assert_eq!(
        pr.mergeable,
        Some(true),
        "unknown mergeability is polled until known"
    );
    assert_eq!(fake.count(&key("GET", "/pulls/{number}")) - polls_before, 2);

    assert_eq!(
        gh.checks(&pr.head_sha).await.expect("checks").state,
        ChecksState::None
    );
    fake.state().check_runs.insert(
        pr.head_sha.clone(),
        vec![
            ("build".into(), "completed".into(), Some("success".into())),
            ("lint".into(), "in_progress".into(), None),
        ],
    );
    assert_eq!(
        gh.checks(&pr.head_sha).await.expect("checks").state,
        ChecksState::Pending
    );
    fake.state().statuses.insert(
        pr.head_sha.clone(),
        vec![("ci/legacy".into(), "failure".into())],
    );
    let failed = gh.checks(&pr.head_sha).await.expect("checks");
    assert_eq!(failed.state, ChecksState::Failure);
    assert!(
        failed.failures[0].contains("ci/legacy"),
        "{:?}",
        failed.failures
    );
    fake.state().check_runs.insert(
        pr.head_sha.clone(),
        vec![("build".into(), "completed".into(), Some("success".into()))],
    );
    fake.state().statuses.insert(
        pr.head_sha.clone(),
        vec![("ci/legacy".into(), "success".into())],
    );
    assert_eq!(
        gh.checks(&pr.head_sha).await.expect("checks").state,
        ChecksState::Success
    );

    gh.post_review(pr.number, ReviewEvent::Approve, "looks good")
        .await
        .expect("review");
    assert_eq!(
        fake.state().reviews,
        [(pr.number, "APPROVE".to_string(), "looks good".to_string())]
    );

    let merged = gh
        .merge_pull_request(pr.number, &pr.title)
        .await
        .expect("merge");
    let main = bare
        .find_reference("refs/heads/main")
        .expect("main")
        .peel_to_commit()
        .expect("commit");
    assert_eq!(main.id().to_string(), merged.sha);
    assert_eq!(main.parent_count(), 1, "a squash commit has one parent");
    assert_eq!(
        main.summary().expect("utf8 summary"),
        Some(format!("Fixes #{n}: do it (#{})", pr.number).as_str())
    );
    assert!(main.tree().expect("tree").get_name("NEW.md").is_some());
    assert!(
        bare.find_reference(&format!("refs/heads/{branch}"))
            .is_err(),
        "branch deleted"
    );
    assert_eq!(
        gh.get_pull_request(pr.number).await.expect("get").state,
        PullRequestState::Merged
    );

    gh.close_issue(n).await.expect("close");
    assert_eq!(fake.state().issues[&n].state, "closed");

    let budget = gh.rate_budget().expect("budget");
    assert_eq!(budget.limit, LIMIT);
    assert_eq!(budget.remaining, fake.state().remaining);

    for dir in [fake.bare.clone(), work.path().join(".git")] {
        let config = std::fs::read_to_string(dir.join("config")).expect("config");
        assert!(
            !config.contains(TOKEN),
            "token written to {}",
            dir.display()
        );
    }

    check_shapes(&fake);
}

#[tokio::test]
async fn unchanged_poll_is_answered_304_and_costs_nothing() {
    let fake = FakeGithub::start().await;
    fake.state().collaborators.insert("alice".into());
    fake.add_issue("One", "alice", &["hydraflow-find"]);
    fake.add_issue("Two", "alice", &["hydraflow-find"]);
    let gh = forge(&fake);
    let first = gh
        .list_issues(&labels(&["hydraflow-find"]))
        .await
        .expect("list");
    let remaining = fake.state().remaining;
    let second = gh
        .list_issues(&labels(&["hydraflow-find"]))
        .await
        .expect("list");
    assert_eq!(first, second);
    assert_eq!(fake.state().not_modified, 1);
    assert_eq!(fake.state().remaining, remaining, "a 304 costs no budget");
    assert_eq!(gh.rate_budget().expect("budget").remaining, remaining);
    fake.add_issue("Three", "alice", &["hydraflow-find"]);
    assert_eq!(
        gh.list_issues(&labels(&["hydraflow-find"]))
            .await
            .expect("list")
            .len(),
        3
    );
}

#[tokio::test]
async fn listing_follows_pagination() {
    let fake = FakeGithub::start().await;
    fake.state().max_per_page = 2;
    fake.state().collaborators.insert("alice".into());
    for i in 0..5 {
        fake.add_issue(&format!("issue {i}"), "alice", &["hydraflow-ready"]);
    }
    let gh = forge(&fake);
    let issues = gh
        .list_issues(&labels(&["hydraflow-ready"]))
        .await
        .expect("list");
    assert_eq!(
        issues.iter().map(|i| i.number).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    assert_eq!(fake.count(&key("GET", "/issues")), 3);
}

#[tokio::test]
async fn non_collaborators_are_listed_when_allowed() {
    let fake = FakeGithub::start().await;
    fake.add_issue("Spam", "mallory", &["hydraflow-find"]);
    let gh = GithubForge::new(GithubOptions {
        collaborators_only: false,
        ..options(&fake, TOKEN)
    })
    .expect("forge");
    assert_eq!(
        gh.list_issues(&labels(&["hydraflow-find"]))
            .await
            .expect("list")
            .len(),
        1
    );
    assert_eq!(fake.count(&key("GET", "/collaborators/{user}")), 0);
}

async fn check_error(
    fake: &FakeGithub,
    gh: &GithubForge,
    fault: Option<Fault>,
    expected: fn(&ForgeError) -> bool,
) {
    if let Some(f) = fault.clone() {
        fake.fault(&key("GET", "/issues/{number}"), f);
    }
    let err = gh.get_issue(1).await.expect_err("must fail");
    assert!(expected(&err), "fault {fault:?} gave {err:?}");
}

#[tokio::test]
async fn errors_map_to_forge_errors() {
    let fake = FakeGithub::start().await;
    fake.add_issue("One", "alice", &[]);
    let gh = forge(&fake);
    check_error(
        &fake,
        &gh,
        Some(Fault::BadCredentials),
        |e| matches!(e, ForgeError::Auth(m) if m.contains("token")),
    )
    .await;
    check_error(
        &fake,
        &gh,
        Some(Fault::Malformed),
        |e| matches!(e, ForgeError::Transient(m) if m.contains("malformed")),
    )
    .await;
    fake.state().issues.clear();
    check_error(&fake, &gh, None, |e| matches!(e, ForgeError::NotFound(_))).await;
    let wrong = GithubForge::new(options(&fake, "ghp_wrong")).expect("forge");
    check_error(&fake, &wrong, None, |e| matches!(e, ForgeError::Auth(_))).await;
    let long = GithubForge::new(GithubOptions {
        max_retry_wait: Duration::from_secs(1),
        ..options(&fake, TOKEN)
    })
    .expect("forge");
    check_error(&fake, &long, Some(Fault::SecondaryLimit { retry_after: 30 }), |e| {
        matches!(e, ForgeError::RateLimited { retry_after } if *retry_after == Duration::from_secs(30))
    })
    .await;
}

#[tokio::test]
async fn transient_failures_are_retried() {
    let fake = FakeGithub::start().await;
    let n = fake.add_issue("One", "alice", &[]);
    let gh = forge(&fake);
    fake.fault(&key("GET", "/issues/{number}"), Fault::ServerError);
    fake.fault(
        &key("GET", "/issues/{number}"),
        Fault::SecondaryLimit { retry_after: 1 },
    );
    assert_eq!(gh.get_issue(n).await.expect("retried").issue.title, "One");
    assert_eq!(fake.count(&key("GET", "/issues/{number}")), 3);
}

#[tokio::test]
async fn pull_request_closed_by_a_human_shows_closed() {
    let fake = FakeGithub::start().await;
    let n = fake.add_issue("One", "alice", &[]);
    let gh = forge(&fake);
    let work = tempfile::tempdir().expect("tempdir");
    checkout_with_branch(&fake, work.path(), &format!("agent/issue-{n}"), "A", "a\n");
    gh.push_branch(work.path(), &format!("agent/issue-{n}"))
        .await
        .expect("push");
    let pr = gh
        .find_or_create_pull_request(&pr_request(n))
        .await
        .expect("PR");
    fake.state().pulls.get_mut(&pr.number).expect("pull").state = "closed".into();
    assert_eq!(
        gh.get_pull_request(pr.number).await.expect("get").state,
        PullRequestState::Closed
    );
}

#[tokio::test]
async fn merge_conflict_is_reported() {
    let fake = FakeGithub::start().await;
    let n = fake.add_issue("One", "alice", &[]);
    let gh = forge(&fake);
    let work = tempfile::tempdir().expect("tempdir");
    checkout_with_branch(
        &fake,
        work.path(),
        &format!("agent/issue-{n}"),
        "README",
        "agent's\n",
    );
    gh.push_branch(work.path(), &format!("agent/issue-{n}"))
        .await
        .expect("push");
    let pr = gh
        .find_or_create_pull_request(&pr_request(n))
        .await
        .expect("PR");
    crate::git_fixture::commit_on_bare_main(&fake.bare, "README", "human's\n");
    assert_eq!(
        gh.get_pull_request(pr.number).await.expect("get").mergeable,
        Some(false)
    );
    let err = gh
        .merge_pull_request(pr.number, &pr.title)
        .await
        .expect_err("conflict");
    assert!(matches!(err, ForgeError::MergeConflict(_)), "{err:?}");
}

#[tokio::test]
async fn push_with_a_wrong_token_is_refused() {
    let fake = FakeGithub::start().await;
    let gh = GithubForge::new(options(&fake, "ghp_wrong")).expect("forge");
    let work = tempfile::tempdir().expect("tempdir");
    checkout_with_branch(&fake, work.path(), "agent/issue-1", "A", "a\n");
    let err = gh
        .push_branch(work.path(), "agent/issue-1")
        .await
        .expect_err("refused");
    assert!(matches!(err, ForgeError::Auth(_)), "{err:?}");
}

#[tokio::test]
async fn long_comments_are_split_at_the_limit() {
    let fake = FakeGithub::start().await;
    let n = fake.add_issue("One", "alice", &[]);
    let gh = forge(&fake);
    let body = format!(
        "{}\n{}",
        "a".repeat(COMMENT_LIMIT - 1),
        "b".repeat(COMMENT_LIMIT + 10)
    );
    gh.comment(n, &body).await.expect("comment");
    let comments = fake.state().issues[&n]
        .comments
        .iter()
        .map(|(_, b)| b.clone())
        .collect::<Vec<_>>();
    assert_eq!(
        comments
            .iter()
            .map(|c| c.chars().count())
            .collect::<Vec<_>>(),
        [COMMENT_LIMIT, COMMENT_LIMIT, 10]
    );
    assert_eq!(comments.concat(), body);
}

// ---- the fake's bodies against recorded real GitHub responses ----

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/github-api");

fn octokit(scenario: &str, method: &str, path_suffix: &str) -> Value {
    let text = std::fs::read_to_string(format!(
        "{FIXTURES}/octokit-fixtures/{scenario}/normalized-fixture.json"
    ))
    .expect("fixture");
    let all: Vec<Value> = serde_json::from_str(&text).expect("fixture json");
    all.into_iter()
        .find(|r| {
            r["method"] == method && r["path"].as_str().is_some_and(|p| p.ends_with(path_suffix))
        })
        .map(|r| r["response"].clone())
        .unwrap_or_else(|| panic!("no {method} {path_suffix} in {scenario}"))
}

/// The response body of the first block of a PyGithub replay file whose verb
/// and path match (blocks are 10 lines: scheme, verb, host, port, path,
/// request headers, request body, status, response headers, response body).
fn pygithub(file: &str, verb: &str, path_contains: &str) -> Value {
    let text =
        std::fs::read_to_string(format!("{FIXTURES}/pygithub-replaydata/{file}")).expect("fixture");
    let lines: Vec<&str> = text.lines().collect();
    lines
        .chunks(11)
        .find(|b| b.len() >= 10 && b[1] == verb && b[4].contains(path_contains))
        .map(|b| serde_json::from_str(b[9]).expect("fixture body json"))
        .unwrap_or_else(|| panic!("no {verb} {path_contains} in {file}"))
}

/// `actual` uses only fields `reference` has, with the same JSON types,
/// recursively; a `null` on either side passes (a recording shows a nullable
/// field in one state only: `completed_at` of a finished run, `body: null`)
/// and array elements are compared with the reference's first element.
pub(crate) fn conforms(actual: &Value, reference: &Value, at: &str) -> Result<(), String> {
    match (actual, reference) {
        (_, Value::Null) | (Value::Null, _) => Ok(()),
        (Value::Object(a), Value::Object(r)) => a.iter().try_for_each(|(k, v)| match r.get(k) {
            Some(rv) => conforms(v, rv, &format!("{at}.{k}")),
            None => Err(format!("{at}.{k} is not in the recorded response")),
        }),
        (Value::Array(a), Value::Array(r)) => match r.first() {
            Some(r0) => a
                .iter()
                .enumerate()
                .try_for_each(|(i, v)| conforms(v, r0, &format!("{at}[{i}]"))),
            None => Ok(()),
        },
        (Value::Bool(_), Value::Bool(_))
        | (Value::Number(_), Value::Number(_))
        | (Value::String(_), Value::String(_)) => Ok(()),
        _ => Err(format!(
            "{at} is {actual} but the recorded response has {reference}"
        )),
    }
}

fn check_shapes(fake: &FakeGithub) {
    let label = octokit("labels", "post", "/labels");
    let mut issue = octokit("paginate-issues", "get", "/issues?per_page=3")[0].clone();
    issue["labels"] = Value::Array(vec![label.clone()]);
    let recorded_issues = pygithub(
        "Repository.testGetIssuesWithArguments.txt",
        "GET",
        "/issues",
    );
    issue["pull_request"] = recorded_issues
        .as_array()
        .and_then(|a| a.iter().find_map(|i| i.get("pull_request").cloned()))
        .expect("a recorded pull_request field");
    let issues = Value::Array(vec![issue.clone()]);
    let labels = Value::Array(vec![label.clone()]);
    let comment = pygithub("Issue.testCreateComment.txt", "POST", "/comments");
    let pull = pygithub("Repository.testCreatePull.txt", "POST", "/pulls");
    let mut error = octokit("errors", "post", "/labels");
    // GitHub documents a `message` on `custom` validation errors ("A pull
    // request already exists for …"; REST API, client errors); the recorded
    // error is an `invalid` one, without it.
    error["errors"][0]["message"] = Value::String("custom validation message".into());
    let reference = |route: &str, status: u16| -> Option<Value> {
        if status >= 400 {
            return Some(error.clone());
        }
        let r = route.split_once("{repo}").map_or(route, |(_, r)| r);
        let method = route.split(' ').next().unwrap_or_default();
        Some(match (method, r) {
            ("GET", "/issues") => issues.clone(),
            (_, "/issues/{number}") => issue.clone(),
            ("GET", "/issues/{number}/comments") => Value::Array(vec![comment.clone()]),
            ("POST", "/issues/{number}/comments") => comment.clone(),
            (_, "/issues/{number}/labels" | "/issues/{number}/labels/{name}")
            | ("GET", "/labels") => labels.clone(),
            ("POST", "/labels") => label.clone(),
            ("GET", "/pulls") => Value::Array(vec![pull.clone()]),
            (_, "/pulls" | "/pulls/{number}") => pull.clone(),
            (_, "/pulls/{number}/merge") => pygithub("PullRequest.testMerge.txt", "PUT", "/merge"),
            (_, "/commits/{sha}/check-runs") => {
                pygithub("CheckRun.testGetCheckRunsForRef.txt", "GET", "/check-runs")
            }
            (_, "/commits/{sha}/status") => octokit("create-status", "get", "/status"),
            // No recorded review response: not checked.
            _ => return None,
        })
    };
    let emitted = fake.state().emitted.clone();
    let mut checked = 0;
    for (route, status, body) in &emitted {
        if let Some(r) = reference(route, *status) {
            conforms(body, &r, route).unwrap_or_else(|e| panic!("{e}"));
            checked += 1;
        }
    }
    assert!(checked >= 20, "only {checked} bodies checked");
}

#[tokio::test]
async fn clone_and_refresh_the_base_with_the_token_kept_out_of_git() {
    let fake = FakeGithub::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let dest = dir.path().join("data").join("checkout");

    let refused = GithubForge::new(options(&fake, "ghp_wrong"))
        .expect("forge")
        .clone_into(&dest, "main")
        .await;
    assert!(matches!(refused, Err(ForgeError::Auth(_))), "{refused:?}");
    assert!(!dest.exists(), "a refused clone leaves nothing");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("data"))
        .expect("data dir")
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    let gh = forge(&fake);
    gh.clone_into(&dest, "main").await.expect("clone");
    assert!(dest.join("README").exists());
    let again = gh.clone_into(&dest, "main").await;
    assert!(matches!(again, Err(ForgeError::Local(_))), "{again:?}");
    let config = std::fs::read_to_string(dest.join(".git").join("config")).expect("config");
    assert!(config.contains(&gh.clone_url()), "{config}");
    assert!(!config.contains(TOKEN), "the token is not in .git/config");

    // Nothing new: nothing moves.
    let tip = |repo: &Path| {
        git2::Repository::open(repo)
            .expect("open")
            .refname_to_id("refs/heads/main")
            .expect("main")
    };
    let before = tip(&dest);
    gh.refresh_base(&dest, "main").await.expect("refresh");
    assert_eq!(tip(&dest), before);

    // A merge on the server: the local main fast-forwards, files included.
    crate::git_fixture::commit_on_bare_main(&fake.bare, "NOTES.md", "notes\n");
    gh.refresh_base(&dest, "main").await.expect("refresh");
    let bare_tip = git2::Repository::open_bare(&fake.bare)
        .expect("bare")
        .refname_to_id("refs/heads/main")
        .expect("main");
    assert_eq!(tip(&dest), bare_tip);
    assert_eq!(
        std::fs::read_to_string(dest.join("NOTES.md")).expect("checked out"),
        "notes\n"
    );

    // A local commit the server does not have: main is left alone.
    let repo = git2::Repository::open(&dest).expect("open");
    let head = repo.head().expect("head").peel_to_commit().expect("commit");
    let sig = git2::Signature::now("me", "me@example.com").expect("sig");
    let local = repo
        .commit(
            Some("refs/heads/main"),
            &sig,
            &sig,
            "local",
            &head.tree().expect("tree"),
            &[&head],
        )
        .expect("commit");
    gh.refresh_base(&dest, "main").await.expect("refresh");
    assert_eq!(tip(&dest), local);

    let stale = GithubForge::new(options(&fake, "ghp_wrong")).expect("forge");
    let refused = stale.refresh_base(&dest, "main").await;
    assert!(matches!(refused, Err(ForgeError::Auth(_))), "{refused:?}");
}

#[tokio::test]
async fn the_token_goes_only_to_the_web_urls_host() {
    let fake = FakeGithub::start().await;
    let url = format!("{}/{OWNER}/{REPO}.git", fake.web_url());
    let other_origin = fake.web_url().replace("127.0.0.1", "localhost");
    let dir = tempfile::tempdir().expect("tempdir");
    let clone = |web_url: String, dest: std::path::PathBuf| {
        let url = url.clone();
        tokio::task::spawn_blocking(move || {
            hydraflow::forge::git_http::with_token(&web_url, TOKEN, || {
                git2::Repository::clone(&url, &dest).map(|_| ())
            })
            .expect("session")
        })
    };
    let elsewhere = clone(other_origin, dir.path().join("a"))
        .await
        .expect("task");
    let err = elsewhere.value.expect_err("no token, no clone");
    assert!(err.message().contains("no token is sent there"), "{err}");
    assert!(!elsewhere.token_refused);
    let here = clone(fake.web_url(), dir.path().join("b"))
        .await
        .expect("task");
    assert!(here.value.is_ok(), "{:?}", here.value);
    assert!(dir.path().join("b").join("README").exists());
}
