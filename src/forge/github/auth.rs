//! Who the GitHub forge acts as: a token (a person's, or a fine-grained or
//! bot account's), or a GitHub App's installation ([`super::app`]), and
//! where each comes from (docs/design/configuration.md): the token from the
//! systemd credential `github-token` or the environment, the App's private
//! key from the systemd credential `github-app-key` or `github.app_key_file`.

use std::path::Path;
use std::time::Duration;

use super::app::{APP_KEY_CREDENTIAL, AppCredentials, Installation};
use crate::config::GithubConfig;
use crate::forge::{ForgeError, ForgeResult};

/// Environment variables consulted for the token, in order (docs/design/configuration.md).
pub const TOKEN_ENV_VARS: [&str; 3] = ["HYDRAFLOW_GH_TOKEN", "GH_TOKEN", "GITHUB_TOKEN"];

/// Name of the systemd credential holding the token.
pub const TOKEN_CREDENTIAL: &str = "github-token";

/// Pick the token: the systemd credential `github-token` when present and
/// non-empty, else the first non-empty of [`TOKEN_ENV_VARS`] as `env` returns
/// them. Surrounding whitespace (a trailing newline in a credential file) is
/// trimmed.
pub fn resolve_token(
    credential: Option<String>,
    env: impl Fn(&str) -> Option<String>,
) -> Option<String> {
    let nonempty = |v: String| {
        let t = v.trim();
        (!t.is_empty()).then(|| t.to_string())
    };
    credential.and_then(nonempty).or_else(|| {
        TOKEN_ENV_VARS
            .iter()
            .find_map(|k| env(k).and_then(nonempty))
    })
}

/// The token of this process: [`resolve_token`] over the systemd credential
/// and the real environment.
///
/// # Errors
/// [`ForgeError::Auth`] naming where a token was looked for when there is none.
pub fn token_from_environment() -> ForgeResult<String> {
    resolve_token(crate::systemd::read_credential(TOKEN_CREDENTIAL), |k| {
        std::env::var(k).ok()
    })
    .ok_or_else(|| {
        ForgeError::Auth(format!(
            "no GitHub token: set the systemd credential {TOKEN_CREDENTIAL:?} or one of {}",
            TOKEN_ENV_VARS.join(", ")
        ))
    })
}

/// The App's private key: the systemd credential `github-app-key` when
/// present and non-empty, else the file `key_file` (`github.app_key_file`).
///
/// # Errors
/// [`ForgeError::Auth`] when neither gives a key, naming both places and the
/// file's error.
pub fn resolve_app_key(credential: Option<String>, key_file: Option<&Path>) -> ForgeResult<String> {
    if let Some(key) = credential.filter(|k| !k.trim().is_empty()) {
        return Ok(key);
    }
    let Some(path) = key_file else {
        return Err(ForgeError::Auth(format!(
            "github.app_id is set but the App's private key is missing: set the systemd credential \
             {APP_KEY_CREDENTIAL:?} or github.app_key_file"
        )));
    };
    match std::fs::read_to_string(path) {
        Ok(text) if !text.trim().is_empty() => Ok(text),
        Ok(_) => Err(ForgeError::Auth(format!(
            "github.app_key_file {} is empty: put the App's private key (.pem) there",
            path.display()
        ))),
        Err(e) => Err(ForgeError::Auth(format!(
            "cannot read github.app_key_file {}: {e}",
            path.display()
        ))),
    }
}

/// How the forge authenticates, as configured.
#[derive(Clone)]
pub enum Credentials {
    /// A token, sent as `Authorization: Bearer` and to git as `x-access-token`.
    Token(String),
    /// A GitHub App: its installation's tokens.
    App(AppCredentials),
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::Token(_) => f.write_str("Token(<redacted>)"),
            Credentials::App(app) => f.debug_tuple("App").field(app).finish(),
        }
    }
}

impl Credentials {
    /// The credentials of this process: App authentication when
    /// `github.app_id` is set (its key from [`resolve_app_key`] over the
    /// systemd credential and `github.app_key_file`; a token is then
    /// ignored), else the token of [`token_from_environment`].
    ///
    /// # Errors
    /// [`ForgeError::Auth`] naming what is missing.
    pub fn from_environment(github: &GithubConfig) -> ForgeResult<Credentials> {
        match github.app_id {
            Some(app_id) => Ok(Credentials::App(AppCredentials {
                app_id,
                installation_id: github.installation_id,
                private_key: resolve_app_key(
                    crate::systemd::read_credential(APP_KEY_CREDENTIAL),
                    github.app_key_file.as_deref(),
                )?,
            })),
            None => token_from_environment().map(Credentials::Token),
        }
    }
}

/// Who requests are made as: what `hydraflow repo list` and the dashboard
/// show as a worker's identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Identity {
    /// A token.
    Token,
    /// A GitHub App's installation (its id once known).
    App {
        /// The App's id.
        app_id: u64,
        /// The installation's id, once configured or looked up.
        installation_id: Option<u64>,
    },
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Identity::Token => f.write_str("token"),
            Identity::App {
                app_id,
                installation_id: Some(id),
            } => write!(f, "GitHub App {app_id}, installation {id}"),
            Identity::App {
                app_id,
                installation_id: None,
            } => write!(f, "GitHub App {app_id}, installation not looked up yet"),
        }
    }
}

/// The credentials in use.
pub(super) enum Auth {
    /// A token.
    Token(String),
    /// A GitHub App's installation and its current token.
    App(Box<Installation>),
}

impl Auth {
    /// A token to send that is valid for at least `left` (an App's cached
    /// installation token, or a new one; a plain token as it is).
    pub(super) async fn token(&self, left: Duration) -> ForgeResult<String> {
        match self {
            Auth::Token(token) => Ok(token.clone()),
            Auth::App(installation) => installation.token(left).await,
        }
    }

    /// GitHub refused `token`: an App mints a new one next time (returns
    /// true, worth one more try); a plain token cannot be renewed (false).
    pub(super) fn refused(&self, token: &str) -> bool {
        match self {
            Auth::Token(_) => false,
            Auth::App(installation) => {
                installation.invalidate(token);
                true
            }
        }
    }

    /// Who requests are made as.
    pub(super) fn identity(&self) -> Identity {
        match self {
            Auth::Token(_) => Identity::Token,
            Auth::App(installation) => Identity::App {
                app_id: installation.app_id(),
                installation_id: installation.installation_id(),
            },
        }
    }

    /// What to do about a refused token, for error messages.
    pub(super) fn advice(&self) -> &'static str {
        match self {
            Auth::Token(_) => "check the token's value and expiry",
            Auth::App(_) => {
                "a token minted a moment ago was refused: the App's installation may be suspended or removed"
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_token(cred: Option<&str>, env: &[(&str, &str)], expected: Option<&str>) {
        let got = resolve_token(cred.map(str::to_string), |k| {
            env.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        });
        assert_eq!(got.as_deref(), expected, "cred {cred:?} env {env:?}");
    }

    #[test]
    fn token_resolution_order() {
        check_token(Some("cred\n"), &[("GH_TOKEN", "g")], Some("cred"));
        check_token(Some("  "), &[("GH_TOKEN", "g")], Some("g"));
        check_token(None, &[("GITHUB_TOKEN", "x"), ("GH_TOKEN", "g")], Some("g"));
        check_token(
            None,
            &[("GITHUB_TOKEN", "x"), ("HYDRAFLOW_GH_TOKEN", "h")],
            Some("h"),
        );
        check_token(None, &[("GITHUB_TOKEN", "x")], Some("x"));
        check_token(
            None,
            &[("HYDRAFLOW_GH_TOKEN", ""), ("GITHUB_TOKEN", "x")],
            Some("x"),
        );
        check_token(None, &[], None);
    }

    fn check_key(cred: Option<&str>, file: Option<&str>, expected: Result<&str, &str>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = file.map(|content| {
            let p = dir.path().join("app.pem");
            std::fs::write(&p, content).expect("write key");
            p
        });
        let got = resolve_app_key(cred.map(str::to_string), path.as_deref());
        match (got, expected) {
            (Ok(key), Ok(want)) => assert_eq!(key, want),
            (Err(e), Err(want)) => assert!(e.to_string().contains(want), "{e}"),
            (got, want) => panic!("cred {cred:?} file {file:?}: got {got:?}, expected {want:?}"),
        }
    }

    #[test]
    fn app_key_resolution_order() {
        check_key(Some("PEM-C"), Some("PEM-F"), Ok("PEM-C"));
        check_key(Some(" \n"), Some("PEM-F"), Ok("PEM-F"));
        check_key(None, Some("PEM-F"), Ok("PEM-F"));
        check_key(None, Some("\n"), Err("is empty"));
        check_key(
            None,
            None,
            Err("set the systemd credential \"github-app-key\""),
        );
        let missing = resolve_app_key(None, Some(Path::new("/nonexistent/app.pem")));
        assert!(missing.is_err_and(|e| {
            e.to_string()
                .contains("cannot read github.app_key_file /nonexistent/app.pem")
        }),);
    }

    #[test]
    fn identity_is_shown_as_operators_name_it() {
        assert_eq!(Identity::Token.to_string(), "token");
        let app = |installation_id| Identity::App {
            app_id: 7,
            installation_id,
        };
        assert_eq!(app(Some(42)).to_string(), "GitHub App 7, installation 42");
        assert_eq!(
            app(None).to_string(),
            "GitHub App 7, installation not looked up yet"
        );
    }
}
