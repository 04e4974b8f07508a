//! [`Forge`] for GitHub: each operation as the REST calls and git
//! transfers it takes.

use std::path::Path;

use async_trait::async_trait;
use http::{Method, StatusCode};
use serde_json::json;

use super::json::{
    CheckRunsJson, CombinedStatusJson, CommentJson, IssueJson, LabelJson, MergeJson, PullJson,
    ReviewJson, User,
};
use super::rest::{Reply, enc, next_link};
use super::{COMMENT_LIMIT, GithubForge, split_comment};
use crate::forge::{
    CheckRunView, ChecksSummary, Comment, CommitStatusView, Forge, ForgeError, ForgeResult, Issue,
    IssueDetail, LabelSpec, MergeOutcome, NewPullRequest, PullRequest, PullRequestState,
    RateBudget, Review, ReviewEvent, summarise_checks,
};

impl GithubForge {
    /// With a token, ask once who it is (`GET /user`, one request per
    /// process), so that webhook deliveries of the worker's own changes are
    /// known as such from the start; an App's bot login comes from its
    /// installation instead. A failure is only logged (the login is then
    /// learned from the first post).
    async fn learn_own_login(&self) {
        if !matches!(self.rest.auth, super::auth::Auth::Token(_))
            || self.login.lock().map_or(true, |l| l.is_some())
            || self
                .asked_login
                .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            return;
        }
        let url = format!("{}/user", self.rest.api);
        match self.rest.send(Method::GET, &url, None).await {
            Ok(reply) if reply.status.is_success() => {
                if let Ok(user) = reply.json::<User>("the authenticated user")
                    && let Ok(mut login) = self.login.lock()
                {
                    tracing::debug!(login = %user.login, "the token is");
                    *login = Some(user.login);
                }
            }
            Ok(reply) => {
                tracing::debug!(
                    status = reply.status.as_u16(),
                    "cannot tell whose the token is"
                )
            }
            Err(e) => tracing::debug!(error = %e, "cannot tell whose the token is"),
        }
    }

    /// Remember who authored what GitHub answered a post of ours with (its `user.login`).
    fn learn_login(&self, reply: &Reply) {
        #[derive(serde::Deserialize)]
        struct Authored {
            user: Option<User>,
        }
        if let Ok(Authored { user: Some(user) }) = serde_json::from_str(&reply.body)
            && let Ok(mut login) = self.login.lock()
            && login.is_none()
        {
            tracing::debug!(login = %user.login, "the forge posts as");
            *login = Some(user.login);
        }
    }

    async fn is_collaborator(&self, login: &str) -> ForgeResult<bool> {
        if let Some(known) = self
            .collaborators
            .lock()
            .ok()
            .and_then(|m| m.get(login).copied())
        {
            return Ok(known);
        }
        let url = self.repo_url(&format!("/collaborators/{}", enc(login)));
        let reply = self.rest.send(Method::GET, &url, None).await?;
        let yes = match reply.status.as_u16() {
            204 => true,
            404 => false,
            _ => return Err(reply.fail(&format!("collaborator check of {login:?}"))),
        };
        if let Ok(mut m) = self.collaborators.lock() {
            m.insert(login.to_string(), yes);
        }
        Ok(yes)
    }

    async fn fetch_pull(&self, number: u64) -> ForgeResult<PullRequest> {
        let what = format!("pull request #{number}");
        let reply = self
            .rest
            .send(
                Method::GET,
                &self.repo_url(&format!("/pulls/{number}")),
                None,
            )
            .await?
            .ok(&what)?;
        Ok(reply.json::<PullJson>(&what)?.into_pull())
    }
}

#[async_trait]
impl Forge for GithubForge {
    fn name(&self) -> &'static str {
        "github"
    }

    async fn list_issues(&self, labels: &[String]) -> ForgeResult<Vec<Issue>> {
        self.learn_own_login().await;
        // GitHub's `labels=a,b` means "all of"; "any of" takes one listing per label.
        let mut seen = std::collections::BTreeMap::new();
        for label in labels {
            let url = self.repo_url(&format!(
                "/issues?state=open&labels={}&per_page=100",
                enc(label)
            ));
            let issues: Vec<IssueJson> = self.rest.get_all(url, "issue listing").await?;
            for issue in issues.into_iter().filter(|i| i.pull_request.is_none()) {
                seen.entry(issue.number)
                    .or_insert_with(|| issue.into_issue());
            }
        }
        let mut out = Vec::with_capacity(seen.len());
        for issue in seen.into_values() {
            if !self.opts.collaborators_only || self.is_collaborator(&issue.author).await? {
                out.push(issue);
            } else {
                tracing::debug!(number = issue.number, author = %issue.author, "skipping issue of a non-collaborator");
            }
        }
        Ok(out)
    }

    async fn get_issue(&self, number: u64) -> ForgeResult<IssueDetail> {
        let what = format!("issue #{number}");
        let reply = self
            .rest
            .send(
                Method::GET,
                &self.repo_url(&format!("/issues/{number}")),
                None,
            )
            .await?
            .ok(&what)?;
        let json = reply.json::<IssueJson>(&what)?;
        // The issue carries its comment count: listing none would be a wasted request.
        let comments: Vec<CommentJson> = if json.comments == Some(0) {
            Vec::new()
        } else {
            self.rest
                .get_all(
                    self.repo_url(&format!("/issues/{number}/comments?per_page=100")),
                    &format!("comments of issue #{number}"),
                )
                .await?
        };
        let issue = json.into_issue();
        Ok(IssueDetail {
            issue,
            comments: comments
                .into_iter()
                .map(|c| Comment {
                    author: c.user.map(|u| u.login).unwrap_or_default(),
                    body: c.body.unwrap_or_default(),
                    created_at: c.created_at,
                })
                .collect(),
        })
    }

    async fn add_label(&self, number: u64, label: &str) -> ForgeResult<()> {
        let body = json!({ "labels": [label] });
        self.rest
            .send(
                Method::POST,
                &self.repo_url(&format!("/issues/{number}/labels")),
                Some(&body),
            )
            .await?
            .ok(&format!("adding label {label:?} to issue #{number}"))?;
        Ok(())
    }

    async fn remove_label(&self, number: u64, label: &str) -> ForgeResult<()> {
        let url = self.repo_url(&format!("/issues/{number}/labels/{}", enc(label)));
        let reply = self.rest.send(Method::DELETE, &url, None).await?;
        if reply.status == StatusCode::NOT_FOUND {
            return Ok(());
        }
        reply.ok(&format!("removing label {label:?} from issue #{number}"))?;
        Ok(())
    }

    async fn ensure_labels(&self, labels: &[LabelSpec]) -> ForgeResult<()> {
        let existing: Vec<LabelJson> = self
            .rest
            .get_all(self.repo_url("/labels?per_page=100"), "label listing")
            .await?;
        for spec in labels {
            if existing
                .iter()
                .any(|l| l.name.eq_ignore_ascii_case(&spec.name))
            {
                continue;
            }
            let body = json!({
                "name": spec.name,
                "color": spec.color.trim_start_matches('#'),
                "description": spec.description,
            });
            let reply = self
                .rest
                .send(Method::POST, &self.repo_url("/labels"), Some(&body))
                .await?;
            // 422 already_exists: created meanwhile by another worker.
            if reply.status == StatusCode::UNPROCESSABLE_ENTITY
                && reply.body.contains("already_exists")
            {
                continue;
            }
            reply.ok(&format!("creating label {:?}", spec.name))?;
        }
        Ok(())
    }

    async fn comment(&self, number: u64, body: &str) -> ForgeResult<()> {
        let url = self.repo_url(&format!("/issues/{number}/comments"));
        for piece in split_comment(body, COMMENT_LIMIT) {
            let reply = self
                .rest
                .send(Method::POST, &url, Some(&json!({ "body": piece })))
                .await?
                .ok(&format!("commenting on issue #{number}"))?;
            self.learn_login(&reply);
        }
        Ok(())
    }

    async fn close_issue(&self, number: u64) -> ForgeResult<()> {
        let body = json!({ "state": "closed", "state_reason": "completed" });
        self.rest
            .send(
                Method::PATCH,
                &self.repo_url(&format!("/issues/{number}")),
                Some(&body),
            )
            .await?
            .ok(&format!("closing issue #{number}"))?;
        Ok(())
    }

    async fn push_branch(&self, repo: &Path, branch: &str) -> ForgeResult<()> {
        let repo = repo.to_path_buf();
        let branch = branch.to_string();
        let url = self.clone_url();
        self.run_git("push", move |web_url, token| {
            GithubForge::with_token(
                web_url,
                token,
                || GithubForge::push_blocking(&repo, &branch, &url),
                |e| {
                    format!(
                        "cannot push {branch} from {}: {}",
                        repo.display(),
                        e.message()
                    )
                },
            )
        })
        .await
    }

    async fn find_or_create_pull_request(&self, req: &NewPullRequest) -> ForgeResult<PullRequest> {
        let list_url = self.repo_url(&format!(
            "/pulls?state=open&head={}&base={}&per_page=100",
            enc(&format!("{}:{}", self.opts.owner, req.head)),
            enc(&req.base)
        ));
        let find = || async {
            let open: Vec<PullJson> = self
                .rest
                .get_all(list_url.clone(), "pull request listing")
                .await?;
            ForgeResult::Ok(open.into_iter().find(|p| p.head.name == req.head))
        };
        // Create first: the pull request is new in the common case, and GitHub
        // refuses a second open one for the same head (422 with a `custom`
        // error "A pull request already exists for …"), which is when the
        // listing is needed. Any 422 is checked against the listing, so the
        // wording of the error does not matter.
        let body = json!({
            "title": req.title,
            "head": req.head,
            "base": req.base,
            "body": req.body,
        });
        let reply = self
            .rest
            .send(Method::POST, &self.repo_url("/pulls"), Some(&body))
            .await?;
        if reply.status == StatusCode::UNPROCESSABLE_ENTITY
            && let Some(pr) = find().await?
        {
            return Ok(pr.into_pull());
        }
        let what = format!("creating the pull request for {}", req.head);
        let reply = reply.ok(&what)?;
        self.learn_login(&reply);
        Ok(reply.json::<PullJson>(&what)?.into_pull())
    }

    async fn get_pull_request(&self, number: u64) -> ForgeResult<PullRequest> {
        let mut pr = self.fetch_pull(number).await?;
        let mut polls = 0;
        while pr.mergeable.is_none()
            && pr.state == PullRequestState::Open
            && polls < self.opts.mergeable_polls
        {
            polls += 1;
            tokio::time::sleep(self.opts.mergeable_poll_delay).await;
            pr = self.fetch_pull(number).await?;
        }
        Ok(pr)
    }

    async fn checks(&self, sha: &str) -> ForgeResult<ChecksSummary> {
        let what = format!("check runs of {sha}");
        let mut runs = Vec::new();
        let mut next =
            Some(self.repo_url(&format!("/commits/{}/check-runs?per_page=100", enc(sha))));
        while let Some(url) = next.take() {
            let reply = self.rest.send(Method::GET, &url, None).await?.ok(&what)?;
            runs.extend(reply.json::<CheckRunsJson>(&what)?.check_runs);
            next = reply.header("link").and_then(next_link);
        }
        let what = format!("combined status of {sha}");
        let status: CombinedStatusJson = self
            .rest
            .send(
                Method::GET,
                &self.repo_url(&format!("/commits/{}/status", enc(sha))),
                None,
            )
            .await?
            .ok(&what)?
            .json(&what)?;
        let runs: Vec<CheckRunView<'_>> = runs
            .iter()
            .map(|run| CheckRunView {
                name: &run.name,
                status: &run.status,
                conclusion: run.conclusion.as_deref(),
                summary: run.output.as_ref().and_then(|o| o.summary.as_deref()),
            })
            .collect();
        let statuses: Vec<CommitStatusView<'_>> = status
            .statuses
            .iter()
            .map(|s| CommitStatusView {
                context: &s.context,
                state: &s.state,
                description: s.description.as_deref(),
            })
            .collect();
        Ok(summarise_checks(&runs, &statuses))
    }

    async fn post_review(&self, number: u64, event: ReviewEvent, body: &str) -> ForgeResult<()> {
        let event = match event {
            ReviewEvent::Approve => "APPROVE",
            ReviewEvent::RequestChanges => "REQUEST_CHANGES",
            ReviewEvent::Comment => "COMMENT",
        };
        let body = json!({ "event": event, "body": body });
        let reply = self
            .rest
            .send(
                Method::POST,
                &self.repo_url(&format!("/pulls/{number}/reviews")),
                Some(&body),
            )
            .await?
            .ok(&format!("reviewing pull request #{number}"))?;
        self.learn_login(&reply);
        Ok(())
    }

    async fn list_reviews(&self, number: u64) -> ForgeResult<Vec<Review>> {
        let what = format!("reviews of pull request #{number}");
        let reply = self
            .rest
            .send(
                Method::GET,
                &self.repo_url(&format!("/pulls/{number}/reviews?per_page=100")),
                None,
            )
            .await?
            .ok(&what)?;
        Ok(reply
            .json::<Vec<ReviewJson>>(&what)?
            .into_iter()
            .filter_map(ReviewJson::into_review)
            .collect())
    }

    async fn merge_pull_request(&self, number: u64, title: &str) -> ForgeResult<MergeOutcome> {
        let pr = self.fetch_pull(number).await?;
        if pr.state != PullRequestState::Open {
            return Err(ForgeError::Rejected(format!(
                "pull request #{number} is {:?}, not open",
                pr.state
            )));
        }
        let body = json!({
            "merge_method": "squash",
            "commit_title": format!("{title} (#{number})"),
            "sha": pr.head_sha,
        });
        let what = format!("merging pull request #{number}");
        let reply = self
            .rest
            .send(
                Method::PUT,
                &self.repo_url(&format!("/pulls/{number}/merge")),
                Some(&body),
            )
            .await?;
        let merged: MergeJson = reply.ok(&what)?.json(&what)?;
        let reply = self
            .rest
            .send(
                Method::DELETE,
                &self.repo_url(&format!(
                    "/git/refs/heads/{}",
                    pr.head.split('/').map(enc).collect::<Vec<_>>().join("/")
                )),
                None,
            )
            .await?;
        // Already gone (404/422 "Reference does not exist"): fine.
        if !reply.status.is_success()
            && reply.status != StatusCode::NOT_FOUND
            && reply.status != StatusCode::UNPROCESSABLE_ENTITY
        {
            tracing::warn!(
                number,
                status = reply.status.as_u16(),
                "cannot delete the merged branch"
            );
        }
        Ok(MergeOutcome { sha: merged.sha })
    }

    async fn refresh_base(&self, repo: &Path, base: &str) -> ForgeResult<()> {
        let _guard = self.git_lock.lock().await;
        let (repo, base) = (repo.to_path_buf(), base.to_string());
        let url = self.clone_url();
        self.run_git("fetch", move |web_url, token| {
            GithubForge::refresh_blocking(&repo, &base, &url, web_url, token)
        })
        .await
    }

    fn rate_budget(&self) -> Option<RateBudget> {
        self.rest.budget()
    }

    fn identity(&self) -> Option<String> {
        Some(GithubForge::identity(self).to_string())
    }

    fn login(&self) -> Option<String> {
        let learned = self.login.lock().ok().and_then(|l| l.clone());
        learned.or_else(|| match &self.rest.auth {
            super::auth::Auth::App(installation) => installation.bot_login(),
            super::auth::Auth::Token(_) => None,
        })
    }
}
