//! The GitHub forge: [`Forge`](crate::forge::Forge) over GitHub's REST API
//! (api.github.com or GitHub Enterprise Server) with octocrab as the HTTP
//! client, and clones, fetches and branch pushes with git2 over git's smart
//! HTTP protocol ([`crate::forge::git_http`]: ureq and rustls, no OpenSSL).
//!
//! One job per submodule: `rest` (the REST client: conditional requests,
//! rate-limit accounting, retries, the mapping of statuses to
//! [`ForgeError`]), `json` (the response bodies it reads), `git` (clone,
//! fetch and push with the token), `forge` (the [`Forge`](crate::forge::Forge)
//! operations as REST calls and git transfers), `auth` (who the forge acts
//! as: a token or a GitHub App's installation, and where each comes from),
//! `app` (GitHub App authentication: installation tokens minted with the
//! App's JWT, cached and renewed before they expire). This file holds the
//! options and the forge value they share.
//!
//! **Invariant:** only this module imports octocrab.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use super::{ForgeError, ForgeResult, git_http};
use crate::config::Config;

mod app;
mod auth;
mod forge;
mod git;
mod json;
mod rest;

pub use app::{APP_KEY_CREDENTIAL, AppCredentials, REFRESH_BEFORE};
pub use auth::{
    Credentials, Identity, TOKEN_CREDENTIAL, TOKEN_ENV_VARS, resolve_app_key, resolve_token,
    token_from_environment,
};
pub use rest::next_link;

/// Least validity of the installation token an agent gets (`GH_TOKEN` with
/// `agent.allow_token`): installation tokens last an hour, so an agent call
/// longer than this may see its token expire.
pub const AGENT_TOKEN_LEFT: Duration = Duration::from_secs(50 * 60);

/// GitHub's limit on the body of one comment, in characters
/// (the API answers 422 "body is too long (maximum is 65536 characters)").
pub const COMMENT_LIMIT: usize = 65_536;

/// Split a comment body into pieces of at most `limit` characters, cutting
/// after the last newline of a piece when there is one so lines stay whole.
/// An empty body gives one empty piece.
pub fn split_comment(body: &str, limit: usize) -> Vec<String> {
    let limit = limit.max(1);
    let mut pieces = Vec::new();
    let mut rest = body;
    while rest.chars().count() > limit {
        // Byte offset just past the `limit`-th character.
        let hard = rest
            .char_indices()
            .nth(limit)
            .map_or(rest.len(), |(i, _)| i);
        let cut = match rest[..hard].rfind('\n') {
            Some(i) if i > 0 => i + 1,
            _ => hard,
        };
        pieces.push(rest[..cut].to_string());
        rest = &rest[cut..];
    }
    pieces.push(rest.to_string());
    pieces
}

/// Everything [`GithubForge::new`] needs.
#[derive(Clone)]
pub struct GithubOptions {
    /// REST API base URL, e.g. `https://api.github.com` or `https://HOST/api/v3`.
    pub api_url: String,
    /// Web base URL; clone URLs are `<web_url>/<owner>/<repo>.git`.
    pub web_url: String,
    /// Repository owner.
    pub owner: String,
    /// Repository name.
    pub repo: String,
    /// A token or a GitHub App (see [`Credentials::from_environment`]).
    pub credentials: Credentials,
    /// Most concurrent API requests of this forge.
    pub max_concurrent_requests: usize,
    /// Only list issues whose author is a collaborator.
    pub collaborators_only: bool,
    /// Retries after a transient failure or a rate limit.
    pub max_retries: usize,
    /// Longest rate-limit wait slept inside a call; longer waits return
    /// [`ForgeError::RateLimited`] to the caller.
    pub max_retry_wait: Duration,
    /// First backoff delay after a transient failure.
    pub min_backoff: Duration,
    /// Times `get_pull_request` asks again while mergeability is unknown.
    pub mergeable_polls: u32,
    /// Delay between those polls.
    pub mergeable_poll_delay: Duration,
}

impl std::fmt::Debug for GithubOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GithubOptions")
            .field("api_url", &self.api_url)
            .field("web_url", &self.web_url)
            .field("owner", &self.owner)
            .field("repo", &self.repo)
            .field("credentials", &self.credentials)
            .finish_non_exhaustive()
    }
}

impl GithubOptions {
    /// Options from the configuration (`repo` as `owner/name`, `[github]`,
    /// `collaborators_only`) and the credentials.
    ///
    /// # Errors
    /// [`ForgeError::Local`] when `repo` is missing or not `owner/name`.
    pub fn from_config(config: &Config, credentials: Credentials) -> ForgeResult<GithubOptions> {
        let repo = config.repo.as_deref().unwrap_or_default();
        let (owner, name) = repo
            .split_once('/')
            .filter(|(o, n)| !o.is_empty() && !n.is_empty() && !n.contains('/'))
            .ok_or_else(|| {
                ForgeError::Local(format!(
                    "repo {repo:?} is not valid for the GitHub forge: expected \"owner/name\""
                ))
            })?;
        let gh = &config.github;
        Ok(GithubOptions {
            api_url: gh.api_url.clone(),
            web_url: gh.web_url.clone(),
            owner: owner.to_string(),
            repo: name.to_string(),
            credentials,
            max_concurrent_requests: gh.max_concurrent_requests.max(1),
            collaborators_only: config.collaborators_only,
            max_retries: gh.max_retries,
            max_retry_wait: Duration::from_secs(gh.max_retry_wait),
            min_backoff: Duration::from_millis(500),
            mergeable_polls: 5,
            mergeable_poll_delay: Duration::from_secs(2),
        })
    }
}

/// The GitHub forge of one repository.
pub struct GithubForge {
    rest: rest::Rest,
    opts: GithubOptions,
    /// Whether a login is a collaborator, per login, for this process's life.
    collaborators: Mutex<HashMap<String, bool>>,
    /// Serialises fetches into the checkout (two refreshes at once would race on its refs).
    git_lock: tokio::sync::Mutex<()>,
    /// The login that authors what this forge posts, once a response told it.
    login: Mutex<Option<String>>,
    /// `GET /user` was sent (once per process).
    asked_login: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for GithubForge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GithubForge")
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

impl GithubForge {
    /// Build the forge; no request is sent.
    ///
    /// # Errors
    /// [`ForgeError::Local`] when the API URL is not a valid URI or the HTTP
    /// client cannot be built; [`ForgeError::Auth`] when an App's private key
    /// is not an RSA key in PEM.
    pub fn new(opts: GithubOptions) -> ForgeResult<GithubForge> {
        // Before any git2 network operation of the process (see git_http::register).
        git_http::register().map_err(|e| ForgeError::Local(e.message().to_string()))?;
        let api = opts.api_url.trim_end_matches('/');
        let auth = match &opts.credentials {
            Credentials::Token(token) => auth::Auth::Token(token.clone()),
            Credentials::App(app) => auth::Auth::App(Box::new(app::Installation::new(
                api,
                app,
                &opts.owner,
                &opts.repo,
            )?)),
        };
        let rest = rest::Rest::new(
            api,
            auth,
            opts.max_concurrent_requests,
            rest::RetryPolicy {
                max_retries: opts.max_retries,
                max_retry_wait: opts.max_retry_wait,
                min_backoff: opts.min_backoff,
            },
        )?;
        Ok(GithubForge {
            rest,
            opts,
            collaborators: Mutex::new(HashMap::new()),
            git_lock: tokio::sync::Mutex::new(()),
            login: Mutex::new(None),
            asked_login: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The forge from the configuration, with the credentials from
    /// [`Credentials::from_environment`].
    ///
    /// # Errors
    /// As [`GithubOptions::from_config`], [`Credentials::from_environment`]
    /// and [`GithubForge::new`].
    pub fn from_config(config: &Config) -> ForgeResult<GithubForge> {
        GithubForge::new(GithubOptions::from_config(
            config,
            Credentials::from_environment(&config.github)?,
        )?)
    }

    /// Who the forge acts as.
    pub fn identity(&self) -> Identity {
        self.rest.auth.identity()
    }

    /// A token for an agent (`GH_TOKEN` with `agent.allow_token`): the token,
    /// or an installation token with at least [`AGENT_TOKEN_LEFT`] left.
    ///
    /// # Errors
    /// As minting an installation token ([`ForgeError::Auth`] when GitHub
    /// refuses the App).
    pub async fn agent_token(&self) -> ForgeResult<String> {
        self.rest.auth.token(AGENT_TOKEN_LEFT).await
    }

    /// When the current installation token expires (App authentication,
    /// once one was minted).
    pub fn token_expires_at(&self) -> Option<std::time::SystemTime> {
        match &self.rest.auth {
            auth::Auth::App(installation) => installation.expires_at(),
            auth::Auth::Token(_) => None,
        }
    }

    /// The HTTPS clone URL (no credentials in it).
    pub fn clone_url(&self) -> String {
        format!(
            "{}/{}/{}.git",
            self.opts.web_url.trim_end_matches('/'),
            self.opts.owner,
            self.opts.repo
        )
    }

    fn repo_url(&self, rest: &str) -> String {
        format!(
            "{}/repos/{}/{}{rest}",
            self.rest.api,
            rest::enc(&self.opts.owner),
            rest::enc(&self.opts.repo)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_split(body: &str, limit: usize, expected: &[&str]) {
        let got = split_comment(body, limit);
        assert_eq!(got, expected, "body {body:?} limit {limit}");
        assert_eq!(got.concat(), body);
    }

    #[test]
    fn comment_splitting() {
        check_split("", 5, &[""]);
        check_split("abc", 5, &["abc"]);
        check_split("abcde", 5, &["abcde"]);
        check_split("abcdef", 5, &["abcde", "f"]);
        check_split("ab\ncdef", 5, &["ab\n", "cdef"]);
        check_split("\nabcdef", 5, &["\nabcd", "ef"]);
        check_split("ééééé€", 5, &["ééééé", "€"]);
        let big = "x".repeat(COMMENT_LIMIT * 2 + 1);
        let pieces = split_comment(&big, COMMENT_LIMIT);
        assert_eq!(
            pieces.iter().map(|p| p.chars().count()).collect::<Vec<_>>(),
            [COMMENT_LIMIT, COMMENT_LIMIT, 1]
        );
    }

    fn check_link(header: &str, expected: Option<&str>) {
        assert_eq!(next_link(header).as_deref(), expected, "{header}");
    }

    #[test]
    fn link_header() {
        check_link(
            r#"<https://api.github.com/repositories/1000/issues?per_page=3&page=2>; rel="next", <https://api.github.com/repositories/1000/issues?per_page=3&page=5>; rel="last""#,
            Some("https://api.github.com/repositories/1000/issues?per_page=3&page=2"),
        );
        check_link(
            r#"<https://x/a?page=1>; rel="prev", <https://x/a?page=1>; rel="first""#,
            None,
        );
        check_link("", None);
        check_link("garbage", None);
    }
}
