//! git's smart HTTP protocol for libgit2, spoken by `ureq` over rustls, so
//! that git2 is built without its `https` feature and the process carries
//! one TLS stack (rustls, which octocrab uses too) instead of OpenSSL as well.
//!
//! [`register`] installs a git2 smart subtransport for `http://` and
//! `https://` remotes, once per process. The protocol is git's
//! (`gitprotocol-http(5)`, "Smart Clients"): the ref advertisement is
//! `GET <url>/info/refs?service=git-upload-pack` (or `git-receive-pack`),
//! answered with `application/x-git-<service>-advertisement`; each request of
//! the exchange that follows is `POST <url>/git-<service>` with the body
//! `application/x-git-<service>-request`, answered with
//! `application/x-git-<service>-result`. libgit2 drives it statelessly (each
//! request is a new stream), so a stream collects what libgit2 writes and
//! sends the request when libgit2 first reads the answer.
//!
//! **Credentials.** There is no credentials callback: [`with_token`] puts a
//! token in a thread-local slot for the duration of one git2 operation, and
//! the transport libgit2 creates on that thread (libgit2 runs a fetch or push
//! entirely on the calling thread) takes it from there. The token is sent as
//! HTTP Basic (`x-access-token:<token>`, what GitHub expects of an
//! installation or personal token) on requests to the origin (scheme, host,
//! port) of the configured web URL only, and on redirects within that host;
//! it never appears in a URL, a git config, an error message or a log (the
//! header value is marked sensitive). Certificates are checked against the
//! platform's roots as `rustls-native-certs` finds them (`/etc/ssl/certs` on
//! Debian, `SSL_CERT_FILE`/`SSL_CERT_DIR` when set), the same roots octocrab
//! uses for the REST API, so a GitHub Enterprise Server behind a private CA
//! that the system trusts works for both. Proxies are not used (octocrab uses
//! none either).

use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once, OnceLock};
use std::time::Duration;

use base64::Engine as _;
use git2::transport::{Service, SmartSubtransport, SmartSubtransportStream, Transport};
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderValue, USER_AGENT};
use http::{Method, Request, StatusCode, Uri};

/// Sent as `User-Agent`: servers (GitHub among them) recognise git clients
/// by the `git/` prefix.
const AGENT: &str = concat!("git/2.0 (hydraflow ", env!("CARGO_PKG_VERSION"), ")");

/// Longest wait for a TCP connection and TLS handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest silence while reading an answer (the whole transfer may take longer).
const READ_TIMEOUT: Duration = Duration::from_secs(300);

/// Why [`with_token`] could not start.
#[derive(Debug, thiserror::Error)]
pub enum GitHttpError {
    /// The web URL has no `http`/`https` scheme or no host.
    #[error("web URL {0:?} is not valid: expected http(s)://HOST[:PORT][/PATH]")]
    WebUrl(String),
    /// The `Authorization` header could not be built (base64 text always
    /// makes a valid header value, so this is not expected).
    #[error("cannot build the Authorization header for the GitHub token")]
    Header,
}

/// The result of an operation run by [`with_token`].
#[derive(Debug)]
pub struct Authorized<T> {
    /// What the operation returned.
    pub value: T,
    /// Whether the server answered 401 or 403 to a request that carried the token.
    pub token_refused: bool,
}

/// Scheme, host (lowercase) and port of a URL.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Origin {
    scheme: String,
    host: String,
    port: u16,
}

impl Origin {
    fn of(uri: &Uri) -> Option<Origin> {
        let scheme = uri.scheme_str()?.to_ascii_lowercase();
        let default_port = match scheme.as_str() {
            "https" => 443,
            "http" => 80,
            _ => return None,
        };
        let host = uri.host().filter(|h| !h.is_empty())?.to_ascii_lowercase();
        Some(Origin {
            port: uri.port_u16().unwrap_or(default_port),
            scheme,
            host,
        })
    }
}

/// The token of one git2 operation and where it may be sent.
struct Session {
    origin: Origin,
    authorization: HeaderValue,
    refused: AtomicBool,
}

thread_local! {
    /// The session of the git2 operation running on this thread, if any.
    static SESSION: RefCell<Option<Arc<Session>>> = const { RefCell::new(None) };
}

/// Restores the thread's previous session when an operation ends (or unwinds).
struct SessionGuard(Option<Arc<Session>>);

impl Drop for SessionGuard {
    fn drop(&mut self) {
        let previous = self.0.take();
        SESSION.with(|s| *s.borrow_mut() = previous);
    }
}

/// Install the `http://` and `https://` transports, once per process. Call
/// it before the first git2 network operation ([`with_token`] does); calling
/// it again does nothing.
///
/// # Errors
/// The libgit2 error when a transport for these schemes is already
/// registered by someone else.
pub fn register() -> Result<(), git2::Error> {
    static ONCE: Once = Once::new();
    static FAILED: OnceLock<String> = OnceLock::new();
    ONCE.call_once(|| {
        for scheme in ["http", "https"] {
            // SAFETY: git2 requires registration not to race with the creation
            // of transports on other threads; `Once` makes this run once, and
            // it runs before this process's first remote operation (the
            // GitHub forge calls it when it is built and again before each
            // fetch, clone or push).
            let registered = unsafe {
                git2::transport::register(scheme, |remote| {
                    let session = SESSION.with(|s| s.borrow().clone());
                    Transport::smart(remote, true, HttpSubtransport { session })
                })
            };
            if let Err(e) = registered {
                let _ = FAILED.set(format!(
                    "cannot register the {scheme}:// git transport: {}",
                    e.message()
                ));
                return;
            }
        }
    });
    match FAILED.get() {
        Some(msg) => Err(git2::Error::from_str(msg)),
        None => Ok(()),
    }
}

/// Run `op` (a git2 clone, fetch or push) on this thread with `token` sent as
/// HTTP Basic to the origin of `web_url` (and nowhere else).
///
/// # Errors
/// [`GitHttpError`] when `web_url` or `token` cannot be used; the transports
/// failing to register is reported by the git2 operation itself (it then has
/// no transport for the URL).
pub fn with_token<T>(
    web_url: &str,
    token: &str,
    op: impl FnOnce() -> T,
) -> Result<Authorized<T>, GitHttpError> {
    let origin = web_url
        .parse::<Uri>()
        .ok()
        .as_ref()
        .and_then(Origin::of)
        .ok_or_else(|| GitHttpError::WebUrl(web_url.to_string()))?;
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("x-access-token:{token}"));
    let mut authorization =
        HeaderValue::from_str(&format!("Basic {basic}")).map_err(|_| GitHttpError::Header)?;
    authorization.set_sensitive(true);
    if let Err(e) = register() {
        tracing::warn!(error = e.message(), "git over HTTP(S) is not available");
    }
    let session = Arc::new(Session {
        origin,
        authorization,
        refused: AtomicBool::new(false),
    });
    let previous = SESSION.with(|s| s.borrow_mut().replace(Arc::clone(&session)));
    let guard = SessionGuard(previous);
    let value = op();
    drop(guard);
    Ok(Authorized {
        value,
        token_refused: session.refused.load(Ordering::Relaxed),
    })
}

/// The HTTP client shared by every git operation of the process, built on
/// first use (loading the platform's roots then, not at start).
fn agent() -> io::Result<&'static ureq::Agent> {
    static AGENT_CELL: OnceLock<Result<ureq::Agent, String>> = OnceLock::new();
    AGENT_CELL
        .get_or_init(build_agent)
        .as_ref()
        .map_err(|e| io::Error::other(e.clone()))
}

fn build_agent() -> Result<ureq::Agent, String> {
    let found = rustls_native_certs::load_native_certs();
    for e in &found.errors {
        tracing::warn!(error = %e, "cannot load a root certificate");
    }
    if found.certs.is_empty() {
        return Err(
            "no root certificates found for HTTPS (install ca-certificates, or set SSL_CERT_FILE)"
                .into(),
        );
    }
    let roots: Vec<ureq::tls::Certificate<'static>> = found
        .certs
        .iter()
        .map(|c| ureq::tls::Certificate::from_der(c.as_ref()).to_owned())
        .collect();
    let tls = ureq::tls::TlsConfig::builder()
        .provider(ureq::tls::TlsProvider::Rustls)
        .root_certs(ureq::tls::RootCerts::new_with_certs(&roots))
        .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .build();
    let config = ureq::Agent::config_builder()
        .tls_config(tls)
        .proxy(None)
        .http_status_as_error(false)
        .https_only(false)
        .redirect_auth_headers(ureq::config::RedirectAuthHeaders::SameHost)
        .user_agent(AGENT)
        .timeout_connect(Some(CONNECT_TIMEOUT))
        .timeout_per_read(Some(READ_TIMEOUT))
        .build();
    Ok(config.new_agent())
}

/// One remote's transport: creates a stream per request.
struct HttpSubtransport {
    session: Option<Arc<Session>>,
}

impl SmartSubtransport for HttpSubtransport {
    fn action(
        &self,
        url: &str,
        action: Service,
    ) -> Result<Box<dyn SmartSubtransportStream>, git2::Error> {
        let base = url.trim_end_matches('/');
        let (service, ls) = match action {
            Service::UploadPackLs => ("git-upload-pack", true),
            Service::UploadPack => ("git-upload-pack", false),
            Service::ReceivePackLs => ("git-receive-pack", true),
            Service::ReceivePack => ("git-receive-pack", false),
        };
        let target = if ls {
            format!("{base}/info/refs?service={service}")
        } else {
            format!("{base}/{service}")
        };
        let uri = target.parse::<Uri>().map_err(|e| {
            git2::Error::new(
                git2::ErrorCode::GenericError,
                git2::ErrorClass::Net,
                format!("remote URL {base:?} is not valid: {e}"),
            )
        })?;
        let authorization = self
            .session
            .as_ref()
            .filter(|s| Origin::of(&uri).as_ref() == Some(&s.origin))
            .cloned();
        Ok(Box::new(HttpStream {
            uri,
            service,
            ls,
            session: authorization,
            body: Vec::new(),
            response: None,
        }))
    }

    fn close(&self) -> Result<(), git2::Error> {
        Ok(())
    }
}

/// One request and its answer.
struct HttpStream {
    uri: Uri,
    service: &'static str,
    /// The ref advertisement (GET) rather than an exchange (POST).
    ls: bool,
    /// Present when the request goes to the web URL's origin: the token goes with it.
    session: Option<Arc<Session>>,
    /// What libgit2 wrote, sent as the POST body.
    body: Vec<u8>,
    response: Option<ureq::BodyReader<'static>>,
}

impl HttpStream {
    /// The URL without its query, for messages.
    fn shown(&self) -> String {
        format!(
            "{}://{}{}",
            self.uri.scheme_str().unwrap_or_default(),
            self.uri.authority().map(|a| a.as_str()).unwrap_or_default(),
            self.uri.path()
        )
    }

    fn send(&mut self) -> io::Result<ureq::BodyReader<'static>> {
        let (method, accept) = if self.ls {
            (Method::GET, "*/*".to_string())
        } else {
            (
                Method::POST,
                format!("application/x-{}-result", self.service),
            )
        };
        let mut request = Request::builder()
            .method(method)
            .uri(self.uri.clone())
            .header(USER_AGENT, AGENT)
            .header(ACCEPT, accept);
        if !self.ls {
            request = request.header(
                CONTENT_TYPE,
                format!("application/x-{}-request", self.service),
            );
        }
        if let Some(session) = &self.session {
            request = request.header(AUTHORIZATION, session.authorization.clone());
        }
        let request = request.body(std::mem::take(&mut self.body)).map_err(|e| {
            io::Error::other(format!("cannot build the request to {}: {e}", self.shown()))
        })?;
        let agent = agent()?;
        let request = if self.ls {
            request
        } else {
            // A redirected POST would lose its body: refuse, as git does.
            agent.configure_request(request).max_redirects(0).build()
        };
        let response = agent
            .run(request)
            .map_err(|e| io::Error::other(format!("{} {}: {e}", self.service, self.shown())))?;
        let status = response.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            let Some(session) = &self.session else {
                return Err(io::Error::other(format!(
                    "{} answered {status} and no token is sent there (only to the web URL's host)",
                    self.shown()
                )));
            };
            session.refused.store(true, Ordering::Relaxed);
            return Err(io::Error::other(format!(
                "{} refused the GitHub token ({status}): check its value, expiry and permissions",
                self.shown()
            )));
        }
        if status == StatusCode::NOT_FOUND {
            return Err(io::Error::other(format!(
                "repository {} not found (404)",
                self.shown()
            )));
        }
        if !status.is_success() {
            return Err(io::Error::other(format!(
                "{} answered {status}",
                self.shown()
            )));
        }
        let expected = if self.ls {
            format!("application/x-{}-advertisement", self.service)
        } else {
            format!("application/x-{}-result", self.service)
        };
        let content_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if !content_type
            .split(';')
            .next()
            .is_some_and(|t| t.trim().eq_ignore_ascii_case(&expected))
        {
            return Err(io::Error::other(format!(
                "{} answered {content_type:?}, expected {expected:?}: not a smart HTTP git server",
                self.shown()
            )));
        }
        Ok(response.into_body().into_reader())
    }
}

impl Read for HttpStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.response.is_none() {
            self.response = Some(self.send()?);
        }
        match self.response.as_mut() {
            Some(reader) => reader.read(buf),
            None => Ok(0),
        }
    }
}

impl Write for HttpStream {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.response.is_some() {
            return Err(io::Error::other(format!(
                "git wrote to {} after reading its answer",
                self.shown()
            )));
        }
        self.body.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_origin(url: &str, expected: Option<(&str, &str, u16)>) {
        let got = url.parse::<Uri>().ok().as_ref().and_then(Origin::of);
        let expected = expected.map(|(scheme, host, port)| Origin {
            scheme: scheme.into(),
            host: host.into(),
            port,
        });
        assert_eq!(got, expected, "{url}");
    }

    #[test]
    fn origins() {
        check_origin("https://github.com", Some(("https", "github.com", 443)));
        check_origin("https://GitHub.com/", Some(("https", "github.com", 443)));
        check_origin(
            "HTTPS://github.com:443/o/r.git",
            Some(("https", "github.com", 443)),
        );
        check_origin("http://127.0.0.1:8080/x", Some(("http", "127.0.0.1", 8080)));
        check_origin("http://ghe.example/", Some(("http", "ghe.example", 80)));
        check_origin(
            "https://ghe.example:8443",
            Some(("https", "ghe.example", 8443)),
        );
        check_origin("ssh://github.com/o/r", None);
        check_origin("/local/path", None);
        check_origin("github.com", None);
    }

    #[test]
    fn a_bad_web_url_is_refused_before_running() {
        for url in ["git@github.com:o/r", "github.com", "ftp://github.com", ""] {
            let ran = std::cell::Cell::new(false);
            let err = with_token(url, "t", || ran.set(true));
            assert!(
                matches!(err, Err(GitHttpError::WebUrl(_))),
                "{url}: {err:?}"
            );
            assert!(!ran.get(), "{url}");
        }
    }

    #[test]
    fn the_header_is_basic_with_the_token_and_sensitive() {
        let header = with_token("https://github.com", "to:k\nen", || {
            SESSION.with(|s| s.borrow().as_ref().map(|s| s.authorization.clone()))
        })
        .expect("session")
        .value
        .expect("header");
        // base64 of "x-access-token:to:k\nen"
        assert_eq!(header, "Basic eC1hY2Nlc3MtdG9rZW46dG86awplbg==");
        assert!(header.is_sensitive());
    }

    #[test]
    fn the_session_is_set_only_during_the_operation() {
        let current = || SESSION.with(|s| s.borrow().as_ref().map(|s| s.origin.host.clone()));
        assert_eq!(current(), None);
        let inner = with_token("https://outer.example", "t", || {
            let nested = with_token("https://inner.example", "u", current)
                .expect("nested")
                .value;
            (nested, current())
        })
        .expect("outer");
        assert_eq!(
            inner.value,
            (Some("inner.example".into()), Some("outer.example".into()))
        );
        assert!(!inner.token_refused);
        assert_eq!(current(), None);
    }
}
