//! The JSON bodies of GitHub's REST API as the forge reads them: small
//! serde structs holding only the fields used, so a GitHub Enterprise
//! Server that lacks a newer field still works, and their conversion into
//! the forge's types. Shapes: <https://docs.github.com/en/rest> (issues,
//! pulls, reviews, checks, commit statuses); the fake GitHub's bodies are
//! checked against recorded responses (tests/fixtures/github-api).

use serde::Deserialize;
use serde_json::Value;

use crate::forge::{Issue, IssueState, PullRequest, PullRequestState, Review, ReviewEvent};

#[derive(Deserialize)]
pub(super) struct User {
    pub(super) login: String,
}

#[derive(Deserialize)]
pub(super) struct LabelJson {
    pub(super) name: String,
}

#[derive(Deserialize)]
pub(super) struct IssueJson {
    pub(super) number: u64,
    pub(super) title: String,
    pub(super) body: Option<String>,
    #[serde(default)]
    pub(super) labels: Vec<LabelJson>,
    pub(super) user: Option<User>,
    pub(super) state: String,
    pub(super) html_url: Option<String>,
    pub(super) pull_request: Option<Value>,
    /// How many comments the issue has (lets `get_issue` skip listing none).
    pub(super) comments: Option<u64>,
}

impl IssueJson {
    pub(super) fn into_issue(self) -> Issue {
        Issue {
            number: self.number,
            title: self.title,
            body: self.body.unwrap_or_default(),
            labels: self.labels.into_iter().map(|l| l.name).collect(),
            author: self.user.map(|u| u.login).unwrap_or_default(),
            state: if self.state == "closed" {
                IssueState::Closed
            } else {
                IssueState::Open
            },
            url: self.html_url,
        }
    }
}

#[derive(Deserialize)]
pub(super) struct CommentJson {
    pub(super) user: Option<User>,
    pub(super) body: Option<String>,
    pub(super) created_at: String,
}

#[derive(Deserialize)]
pub(super) struct RefJson {
    #[serde(rename = "ref")]
    pub(super) name: String,
    pub(super) sha: String,
}

/// One entry of "List reviews for a pull request"
/// (<https://docs.github.com/en/rest/pulls/reviews#list-reviews-for-a-pull-request>):
/// `state` is `APPROVED`, `CHANGES_REQUESTED`, `COMMENTED`, `DISMISSED` or
/// `PENDING`; the last two are not verdicts and are left out.
#[derive(Debug, Deserialize)]
pub(super) struct ReviewJson {
    #[serde(default)]
    pub(super) body: Option<String>,
    pub(super) state: String,
}

impl ReviewJson {
    pub(super) fn into_review(self) -> Option<Review> {
        let event = match self.state.as_str() {
            "APPROVED" => ReviewEvent::Approve,
            "CHANGES_REQUESTED" => ReviewEvent::RequestChanges,
            "COMMENTED" => ReviewEvent::Comment,
            _ => return None,
        };
        Some(Review {
            event,
            body: self.body.unwrap_or_default(),
        })
    }
}

#[derive(Deserialize)]
pub(super) struct PullJson {
    pub(super) number: u64,
    pub(super) state: String,
    pub(super) title: String,
    pub(super) body: Option<String>,
    pub(super) head: RefJson,
    pub(super) base: RefJson,
    pub(super) mergeable: Option<bool>,
    #[serde(default)]
    pub(super) merged: bool,
    pub(super) merged_at: Option<String>,
    pub(super) html_url: Option<String>,
}

impl PullJson {
    pub(super) fn into_pull(self) -> PullRequest {
        let state = if self.merged || self.merged_at.is_some() {
            PullRequestState::Merged
        } else if self.state == "closed" {
            PullRequestState::Closed
        } else {
            PullRequestState::Open
        };
        PullRequest {
            number: self.number,
            head: self.head.name,
            head_sha: self.head.sha,
            base: self.base.name,
            title: self.title,
            body: self.body.unwrap_or_default(),
            state,
            mergeable: self.mergeable,
            url: self.html_url,
        }
    }
}

#[derive(Deserialize)]
pub(super) struct CheckRunsJson {
    pub(super) check_runs: Vec<CheckRunJson>,
}

#[derive(Deserialize)]
pub(super) struct CheckRunOutput {
    pub(super) summary: Option<String>,
}

#[derive(Deserialize)]
pub(super) struct CheckRunJson {
    pub(super) name: String,
    pub(super) status: String,
    pub(super) conclusion: Option<String>,
    pub(super) output: Option<CheckRunOutput>,
}

#[derive(Deserialize)]
pub(super) struct StatusJson {
    pub(super) state: String,
    pub(super) context: String,
    pub(super) description: Option<String>,
}

#[derive(Deserialize)]
pub(super) struct CombinedStatusJson {
    pub(super) statuses: Vec<StatusJson>,
}

#[derive(Deserialize)]
pub(super) struct MergeJson {
    pub(super) sha: String,
}
