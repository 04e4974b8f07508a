//! GitHub App authentication against the fake GitHub: the App's JWT (signed
//! by octocrab, verified by the fake with the App's public key) buys an
//! installation token, looked up and minted once, sent to the REST API and
//! to git; a token is renewed before it expires and replaced when GitHub
//! refuses it; a key GitHub refuses, a wrong key, an App that is not
//! installed and a key that is not a key are authentication errors naming
//! what to fix. The fake's App bodies are checked against GitHub's
//! documented responses.

use std::time::Duration;

use hydraflow::forge::github::{
    AppCredentials, Credentials, GithubForge, GithubOptions, Identity, REFRESH_BEFORE,
};
use hydraflow::forge::{Forge, ForgeError};
use serde_json::Value;

use super::fake_github::{
    APP_BOT, APP_ID, APP_KEY_FILE, FakeGithub, INSTALLATION_ID, LIMIT, OTHER_KEY_FILE, key,
};
use super::github_forge::{checkout_with_branch, conforms, options};

/// `POST /app/installations/{installation_id}/access_tokens`, as the fake counts it.
const MINT: &str = "POST /api/v3/app/installations/{installation_id}/access_tokens";
/// `GET /repos/{owner}/{repo}/installation`, as the fake counts it.
const LOOKUP: &str = "GET /api/v3/repos/{owner}/{repo}/installation";

fn app_options(fake: &FakeGithub, key_file: &str, installation_id: Option<u64>) -> GithubOptions {
    GithubOptions {
        credentials: Credentials::App(AppCredentials {
            app_id: APP_ID,
            installation_id,
            private_key: std::fs::read_to_string(key_file).expect("key file"),
        }),
        ..options(fake, "unused")
    }
}

/// A fake with the App and one labelled issue, and a forge acting as the App.
async fn app_forge() -> (FakeGithub, GithubForge) {
    let fake = FakeGithub::start().await;
    fake.enable_app();
    fake.state().collaborators.insert("alice".into());
    fake.add_issue("Add a README", "alice", &["hydraflow-find"]);
    let gh = GithubForge::new(app_options(&fake, APP_KEY_FILE, None)).expect("forge");
    (fake, gh)
}

fn find() -> Vec<String> {
    vec!["hydraflow-find".to_owned()]
}

#[tokio::test]
async fn the_app_installation_token_serves_rest_and_git() {
    let (fake, gh) = app_forge().await;
    assert_eq!(
        gh.identity(),
        Identity::App {
            app_id: APP_ID,
            installation_id: None
        }
    );
    assert_eq!(gh.list_issues(&find()).await.expect("list").len(), 1);
    gh.comment(1, "hello from the App").await.expect("comment");
    let work = tempfile::tempdir().expect("tempdir");
    checkout_with_branch(&fake, work.path(), "agent/issue-1", "A", "a\n");
    gh.push_branch(work.path(), "agent/issue-1")
        .await
        .expect("push with the installation token");
    let clone = work.path().join("clone");
    gh.clone_into(&clone, "main").await.expect("clone");
    gh.refresh_base(&clone, "main").await.expect("fetch");

    // The installation was looked up once, one token minted and used throughout.
    assert_eq!(fake.count(LOOKUP), 1);
    assert_eq!(fake.count(MINT), 1);
    assert_eq!(
        gh.identity(),
        Identity::App {
            app_id: APP_ID,
            installation_id: Some(INSTALLATION_ID)
        }
    );
    assert_eq!(
        gh.identity().to_string(),
        format!("GitHub App {APP_ID}, installation {INSTALLATION_ID}")
    );
    {
        let s = fake.state();
        assert!(s.log.iter().all(|l| l.status < 400), "{:?}", s.log);
        assert!(
            !s.git_credentials.is_empty() && s.git_credentials.iter().all(|c| *c == "installation"),
            "git used the installation token: {:?}",
            s.git_credentials
        );
        // What the App posts is the App's bot user's.
        assert_eq!(s.issues[&1].comments[0].0, APP_BOT);
        // The JWT requests cost the installation's budget nothing.
        let jwt = |path: &str| path.contains("/app/") || path.ends_with("/installation");
        let budgeted = s
            .log
            .iter()
            .filter(|l| l.budgeted() && !jwt(&l.path))
            .count() as u64;
        assert!(s.log.iter().any(|l| jwt(&l.path)));
        assert_eq!(s.remaining, LIMIT - budgeted);
    }
    let token = gh.agent_token().await.expect("agent token");
    assert!(token.starts_with("ghs_"), "{token}");
    assert_eq!(fake.count(MINT), 1, "the cached token had an hour left");
    let expires = gh.token_expires_at().expect("expiry known");
    assert!(expires > std::time::SystemTime::now() + Duration::from_secs(3000));
}

#[tokio::test]
async fn a_configured_installation_is_not_looked_up() {
    let fake = FakeGithub::start().await;
    fake.enable_app();
    let gh =
        GithubForge::new(app_options(&fake, APP_KEY_FILE, Some(INSTALLATION_ID))).expect("forge");
    gh.list_issues(&find()).await.expect("list");
    assert_eq!(fake.count(LOOKUP), 0);
    assert_eq!(fake.count(MINT), 1);
}

#[tokio::test]
async fn the_token_is_renewed_before_it_expires() {
    let (fake, gh) = app_forge().await;
    // Each token has two seconds to go before the renewal margin.
    fake.set_token_ttl(REFRESH_BEFORE + Duration::from_secs(2));
    let work = tempfile::tempdir().expect("tempdir");
    checkout_with_branch(&fake, work.path(), "agent/issue-1", "A", "a\n");
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        gh.list_issues(&find()).await.expect("list");
        gh.push_branch(work.path(), "agent/issue-1")
            .await
            .expect("push");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let minted = fake.minted();
    assert!(
        minted.len() >= 2,
        "tokens were renewed during the run: {}",
        minted.len()
    );
    let s = fake.state();
    assert!(
        s.log.iter().all(|l| l.status != 401),
        "no request went out with an expired token"
    );
    assert!(s.git_credentials.iter().all(|c| *c == "installation"));
}

#[tokio::test]
async fn a_token_github_refuses_is_replaced_once() {
    let (fake, gh) = app_forge().await;
    gh.list_issues(&find()).await.expect("list");
    // GitHub revokes the token behind the forge's back (its cache still
    // thinks it has an hour): REST gets a 401 and a new token.
    fake.expire_tokens();
    gh.list_issues(&find())
        .await
        .expect("list with a new token");
    assert_eq!(fake.count(MINT), 2);
    let statuses: Vec<u16> = fake
        .state()
        .log
        .iter()
        .filter(|l| l.path.contains("/issues?"))
        .map(|l| l.status)
        .collect();
    assert_eq!(statuses, [200, 401, 304], "refused once, then sent again");
    // The same for git.
    fake.expire_tokens();
    let work = tempfile::tempdir().expect("tempdir");
    checkout_with_branch(&fake, work.path(), "agent/issue-1", "A", "a\n");
    gh.push_branch(work.path(), "agent/issue-1")
        .await
        .expect("push with a new token");
    assert_eq!(fake.count(MINT), 3);
    // A token revoked through the API is refused too.
    let token = gh.agent_token().await.expect("token");
    let revoke = reqwest_like_delete(&fake, &token).await;
    assert_eq!(revoke, 204);
    gh.comment(1, "after revocation").await.expect("comment");
    assert_eq!(fake.count(MINT), 4);
}

/// `DELETE /installation/token` with `token`, as GitHub's "Revoke an
/// installation access token" takes it; the status.
async fn reqwest_like_delete(fake: &FakeGithub, token: &str) -> u16 {
    let mut stream = tokio::net::TcpStream::connect(fake.addr)
        .await
        .expect("connect");
    let request = format!(
        "DELETE /api/v3/installation/token HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\n\
         Accept: application/vnd.github+json\r\nConnection: close\r\n\r\n",
        fake.addr
    );
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.expect("read");
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    response.parse(&answer).expect("an HTTP response");
    response.code.expect("a status")
}

async fn auth_error(gh: &GithubForge) -> String {
    match gh.list_issues(&find()).await {
        Err(ForgeError::Auth(message)) => message,
        other => panic!("expected an authentication error, got {other:?}"),
    }
}

#[tokio::test]
async fn a_key_github_refuses_is_an_authentication_error() {
    let (fake, gh) = app_forge().await;
    gh.list_issues(&find()).await.expect("list");
    // The key is deleted from the App and the token stops working.
    fake.revoke_app_key();
    fake.expire_tokens();
    let message = auth_error(&gh).await;
    assert!(
        message.contains("401 A JSON web token could not be decoded"),
        "{message}"
    );
    assert!(
        message.contains(&format!("github.app_id ({APP_ID})")),
        "{message}"
    );
    assert!(message.contains("github-app-key"), "{message}");

    // A key of no App.
    let other = GithubForge::new(app_options(&fake, OTHER_KEY_FILE, None)).expect("forge");
    let message = auth_error(&other).await;
    assert!(
        message.contains("A JSON web token could not be decoded"),
        "{message}"
    );
}

#[tokio::test]
async fn an_app_not_installed_on_the_repository_says_so() {
    let fake = FakeGithub::start().await;
    fake.enable_app();
    fake.uninstall_app();
    let gh = GithubForge::new(app_options(&fake, APP_KEY_FILE, None)).expect("forge");
    let message = auth_error(&gh).await;
    assert!(
        message.contains(&format!(
            "the GitHub App {APP_ID} is not installed on octo-org/demo"
        )),
        "{message}"
    );
    let wrong = GithubForge::new(app_options(&fake, APP_KEY_FILE, Some(1))).expect("forge");
    let message = auth_error(&wrong).await;
    assert!(
        message.contains("the App has no installation 1"),
        "{message}"
    );
    // Nothing was sent with a token.
    assert_eq!(fake.count(&key("GET", "/issues")), 0);
}

#[tokio::test]
async fn a_key_that_is_not_a_key_is_refused_at_start() {
    let fake = FakeGithub::start().await;
    let mut opts = app_options(&fake, APP_KEY_FILE, None);
    if let Credentials::App(app) = &mut opts.credentials {
        app.private_key =
            "-----BEGIN RSA PRIVATE KEY-----\nnot base64\n-----END RSA PRIVATE KEY-----\n".into();
    }
    match GithubForge::new(opts) {
        Err(ForgeError::Auth(message)) => {
            assert!(
                message.contains("is not an RSA private key in PEM"),
                "{message}"
            )
        }
        other => panic!("expected an authentication error, got {other:?}"),
    }
}

fn documented(name: &str) -> Value {
    let path = format!(
        "{}/tests/fixtures/github-api/openapi/{name}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("fixture json")
}

#[tokio::test]
async fn the_fakes_app_bodies_have_githubs_documented_shapes() {
    let (fake, gh) = app_forge().await;
    gh.list_issues(&find()).await.expect("list");
    let (mut token, mut installation) =
        (documented("installation-token"), documented("installation"));
    // `permissions` is a map (the `app-permissions` schema: `issues`,
    // `contents`, `pull_requests`, `checks`, `metadata`, … each "read" or
    // "write"); each example shows a few of its keys.
    for reference in [&mut token, &mut installation] {
        for name in ["issues", "contents", "pull_requests", "checks", "metadata"] {
            reference["permissions"][name] = Value::String("read".into());
        }
    }
    let emitted = fake.state().emitted.clone();
    let mut checked = 0;
    for (route, status, body) in &emitted {
        let reference = match route.as_str() {
            MINT if *status == 201 => &token,
            LOOKUP if *status == 200 => &installation,
            _ => continue,
        };
        conforms(body, reference, route).unwrap_or_else(|e| panic!("{e}"));
        checked += 1;
    }
    assert_eq!(checked, 2, "{emitted:?}");
    // The token's `expires_at` is RFC 3339 in UTC, as documented ("2016-07-11T22:14:10Z").
    let minted = emitted
        .iter()
        .find(|(r, _, _)| r == MINT)
        .map(|(_, _, b)| b["expires_at"].as_str().unwrap_or_default().to_owned())
        .expect("a minted token");
    assert!(
        minted.ends_with('Z') && chrono::DateTime::parse_from_rfc3339(&minted).is_ok(),
        "{minted}"
    );
}
