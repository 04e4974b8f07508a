//! GitHub App authentication: the forge acts as an App's installation on the
//! repository, with installation tokens instead of a person's token
//! (<https://docs.github.com/en/apps/creating-github-apps/authenticating-with-a-github-app/authenticating-as-a-github-app-installation>).
//!
//! octocrab signs the App's JSON Web Token (RS256 with the App's private
//! key, `iss` = the App's id, valid for nine minutes) and sends it on the
//! two App requests made here: `GET /repos/{owner}/{repo}/installation`
//! (the installation's id, when `github.installation_id` is unset) and
//! `POST /app/installations/{id}/access_tokens` (an installation token and
//! its `expires_at`, an hour later). The token is cached and replaced once
//! less than [`REFRESH_BEFORE`] of it is left, so the REST client and git
//! never send an expired one; a token GitHub refuses anyway (revoked) is
//! dropped with [`Installation::invalidate`] and the next caller mints a new
//! one. A JWT GitHub refuses (the key was deleted from the App, the App id is
//! wrong) is [`ForgeError::Auth`]: the pipeline pauses with the reason.

use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use http::header::ACCEPT;
use http::{Method, StatusCode};
use serde::Deserialize;

use super::rest::{Reply, enc};
use crate::forge::{ForgeError, ForgeResult};

/// Name of the systemd credential holding the App's private key (PEM).
pub const APP_KEY_CREDENTIAL: &str = "github-app-key";

/// A cached installation token is replaced once it has less than this left.
pub const REFRESH_BEFORE: Duration = Duration::from_secs(300);

/// What App authentication needs (`github.app_id`, `github.installation_id`,
/// the private key).
#[derive(Clone)]
pub struct AppCredentials {
    /// The App's id (its settings page, "App ID").
    pub app_id: u64,
    /// The installation on the repository's owner; looked up from the
    /// repository when `None`.
    pub installation_id: Option<u64>,
    /// The App's private key as GitHub hands it out (PEM, PKCS#1 or PKCS#8).
    pub private_key: String,
}

impl std::fmt::Debug for AppCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppCredentials")
            .field("app_id", &self.app_id)
            .field("installation_id", &self.installation_id)
            .field("private_key", &"<redacted>")
            .finish()
    }
}

/// An installation token and when GitHub said it expires.
#[derive(Debug, Clone)]
struct Minted {
    token: String,
    expires_at: SystemTime,
}

/// `POST /app/installations/{id}/access_tokens` (201): the fields used.
#[derive(Deserialize)]
struct TokenJson {
    token: String,
    /// RFC 3339 (`2016-07-11T22:14:10Z`).
    expires_at: String,
}

/// `GET /repos/{owner}/{repo}/installation` (200): the fields used.
#[derive(Deserialize)]
struct InstallationJson {
    id: u64,
    /// The App's slug: its bot user is `<slug>[bot]`.
    app_slug: Option<String>,
}

/// The App's installation on one repository, and its current token.
pub(super) struct Installation {
    /// Authenticated as the App: octocrab signs a JWT for every request.
    app: octocrab::Octocrab,
    app_id: u64,
    owner: String,
    repo: String,
    installation_id: tokio::sync::OnceCell<u64>,
    /// The App's bot user (`<slug>[bot]`), once the installation was looked up.
    bot: Mutex<Option<String>>,
    cached: Mutex<Option<Minted>>,
    /// One mint at a time: concurrent callers wait for it and share its token.
    mint_lock: tokio::sync::Mutex<()>,
}

impl Installation {
    /// The installation of the App in `creds` on `owner/repo` at the API
    /// `api` (no trailing slash); no request is sent.
    ///
    /// # Errors
    /// [`ForgeError::Auth`] when the private key is not an RSA key in PEM;
    /// [`ForgeError::Local`] when the client cannot be built.
    pub(super) fn new(
        api: &str,
        creds: &AppCredentials,
        owner: &str,
        repo: &str,
    ) -> ForgeResult<Installation> {
        let key = octocrab::EncodingKey::from_rsa_pem(creds.private_key.as_bytes()).map_err(|e| {
            ForgeError::Auth(format!(
                "the GitHub App's private key (credential {APP_KEY_CREDENTIAL:?} or github.app_key_file) \
                 is not an RSA private key in PEM ({e}): use the .pem file GitHub generated for the App"
            ))
        })?;
        let app = octocrab::Octocrab::builder()
            .base_uri(api)
            .map_err(|e| ForgeError::Local(format!("github.api_url {api:?} is not a URI: {e}")))?
            .app(octocrab::models::AppId(creds.app_id), key)
            .set_connect_timeout(Some(Duration::from_secs(10)))
            .set_read_timeout(Some(Duration::from_secs(60)))
            .build()
            .map_err(|e| ForgeError::Local(format!("cannot build the GitHub App client: {e}")))?;
        let installation_id = tokio::sync::OnceCell::new();
        if let Some(id) = creds.installation_id {
            let _ = installation_id.set(id);
        }
        Ok(Installation {
            app,
            app_id: creds.app_id,
            owner: owner.to_string(),
            repo: repo.to_string(),
            installation_id,
            bot: Mutex::new(None),
            cached: Mutex::new(None),
            mint_lock: tokio::sync::Mutex::new(()),
        })
    }

    /// The App's id.
    pub(super) fn app_id(&self) -> u64 {
        self.app_id
    }

    /// The installation's id, once configured or looked up.
    pub(super) fn installation_id(&self) -> Option<u64> {
        self.installation_id.get().copied()
    }

    /// The App's bot user, `<slug>[bot]`, once the installation was looked up.
    pub(super) fn bot_login(&self) -> Option<String> {
        self.bot.lock().ok().and_then(|b| b.clone())
    }

    /// When the cached token expires, if there is one.
    pub(super) fn expires_at(&self) -> Option<SystemTime> {
        self.lock().as_ref().map(|m| m.expires_at)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Minted>> {
        self.cached.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cached token when it has at least `left` before it expires.
    fn cached_for(&self, left: Duration) -> Option<String> {
        let now = SystemTime::now();
        self.lock()
            .as_ref()
            .filter(|m| m.expires_at.duration_since(now).is_ok_and(|d| d >= left))
            .map(|m| m.token.clone())
    }

    /// An installation token with at least `left` before it expires: the
    /// cached one, else a new one (which replaces it).
    ///
    /// # Errors
    /// [`ForgeError::Auth`] when GitHub refuses the App's JWT or the App is
    /// not installed on the repository; [`ForgeError::Transient`] and
    /// [`ForgeError::RateLimited`] for passing failures.
    pub(super) async fn token(&self, left: Duration) -> ForgeResult<String> {
        if let Some(token) = self.cached_for(left) {
            return Ok(token);
        }
        let _mint = self.mint_lock.lock().await;
        // Someone else may have minted one while this caller waited.
        if let Some(token) = self.cached_for(left) {
            return Ok(token);
        }
        let id = *self
            .installation_id
            .get_or_try_init(|| self.lookup_installation())
            .await?;
        let minted = self.mint(id).await?;
        let token = minted.token.clone();
        *self.lock() = Some(minted);
        Ok(token)
    }

    /// Forget `token` when it is the cached one (GitHub refused it: revoked).
    pub(super) fn invalidate(&self, token: &str) {
        let mut cached = self.lock();
        if cached.as_ref().is_some_and(|m| m.token == token) {
            *cached = None;
        }
    }

    /// One request authenticated as the App (a fresh JWT).
    async fn send(&self, method: Method, path: &str, what: &str) -> ForgeResult<Reply> {
        let builder = http::Request::builder()
            .method(method)
            // Relative: octocrab adds the JWT only to requests for its base URI.
            .uri(path)
            .header(ACCEPT, "application/vnd.github+json")
            .header("x-github-api-version", "2022-11-28");
        super::rest::exchange::<()>(&self.app, builder, None, what).await
    }

    /// The status of an App request mapped to an error, when it failed.
    fn check(
        &self,
        reply: Reply,
        what: &str,
        not_found: impl FnOnce() -> String,
    ) -> ForgeResult<Reply> {
        let status = reply.status;
        if status.is_success() {
            return Ok(reply);
        }
        let message = format!("{what}: {} {}", status.as_u16(), reply.message());
        Err(match status {
            StatusCode::UNAUTHORIZED => ForgeError::Auth(format!(
                "{message}: GitHub refused the App's JWT; check that github.app_id ({}) is the App's id \
                 and that the private key (credential {APP_KEY_CREDENTIAL:?} or github.app_key_file) is \
                 one of its keys and was not deleted",
                self.app_id
            )),
            StatusCode::NOT_FOUND => ForgeError::Auth(format!("{message}: {}", not_found())),
            StatusCode::FORBIDDEN | StatusCode::TOO_MANY_REQUESTS => {
                match super::rest::classify_forbidden(&reply, what) {
                    e @ ForgeError::RateLimited { .. } => e,
                    _ => ForgeError::Auth(format!(
                        "{message}: GitHub refused the App (suspended, or missing a permission)"
                    )),
                }
            }
            s if s.is_server_error() => ForgeError::Transient(message),
            _ => ForgeError::Rejected(message),
        })
    }

    async fn lookup_installation(&self) -> ForgeResult<u64> {
        let what = format!(
            "looking up the GitHub App's installation on {}/{}",
            self.owner, self.repo
        );
        let path = format!(
            "/repos/{}/{}/installation",
            enc(&self.owner),
            enc(&self.repo)
        );
        let reply = self.send(Method::GET, &path, &what).await?;
        let reply = self.check(reply, &what, || {
            format!(
                "the GitHub App {} is not installed on {}/{}: install it on the repository (or its owner), \
                 or set github.installation_id",
                self.app_id, self.owner, self.repo
            )
        })?;
        let json = reply.json::<InstallationJson>(&what)?;
        let id = json.id;
        if let (Some(slug), Ok(mut bot)) = (json.app_slug, self.bot.lock()) {
            *bot = Some(format!("{slug}[bot]"));
        }
        tracing::info!(
            app_id = self.app_id,
            installation_id = id,
            "found the GitHub App's installation"
        );
        Ok(id)
    }

    async fn mint(&self, id: u64) -> ForgeResult<Minted> {
        let what = format!(
            "minting a token for installation {id} of the GitHub App {}",
            self.app_id
        );
        let reply = self
            .send(
                Method::POST,
                &format!("/app/installations/{id}/access_tokens"),
                &what,
            )
            .await?;
        let reply = self.check(reply, &what, || {
            format!(
                "the App has no installation {id}: set github.installation_id to its installation on \
                 {}/{}, or unset it to look it up",
                self.owner, self.repo
            )
        })?;
        let json = reply.json::<TokenJson>(&what)?;
        let expires_at = chrono::DateTime::parse_from_rfc3339(&json.expires_at)
            .map_err(|e| {
                ForgeError::Transient(format!(
                    "{what}: expires_at {:?} is not an RFC 3339 time: {e}",
                    json.expires_at
                ))
            })
            .map(SystemTime::from)?;
        tracing::debug!(installation_id = id, expires_at = %json.expires_at, "minted an installation token");
        Ok(Minted {
            token: json.token,
            expires_at,
        })
    }
}
