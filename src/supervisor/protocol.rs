//! Wire types of the supervisor's TCP control protocol: one JSON object per line in, one JSON
//! object per line out (docs/design/protocol.md). Field names and error texts of the original
//! are kept; added fields are additive.
//!
//! **Invariant:** the wire format lives in this module alone; the server and the client only
//! call [`Request::parse`], [`Response::to_line`] and the reply types here.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::layout::Slug;

/// Longest request line accepted, in bytes (without the `\n`).
pub const MAX_LINE: usize = 64 * 1024;

/// The reply `{"status":"ok"}` as a line (`ping`, `remove_repo`), equal to
/// `Response::Ok(Reply::Done(Done {})).to_line()`.
pub const OK_LINE: &[u8] = b"{\"status\":\"ok\"}\n";

/// A repository to add or register.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RepoTarget {
    /// A local checkout (`path`), as given by the client.
    Path(String),
    /// A GitHub `owner/name` (`repo`).
    Repo(String),
}

/// A registered repository, named one of three ways.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RepoRef {
    /// Its checkout path.
    Path(String),
    /// Its slug.
    Slug(Slug),
    /// Its GitHub `owner/name`.
    Repo(String),
}

/// How a [`RepoRef`] is named in messages: `"demo"`, `octo/widgets`, `/srv/checkout`.
impl std::fmt::Display for RepoRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RepoRef::Path(p) => f.write_str(p),
            RepoRef::Slug(s) => write!(f, "\"{s}\""),
            RepoRef::Repo(r) => f.write_str(r),
        }
    }
}

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// `ping`.
    Ping,
    /// `version` (extension).
    Version,
    /// `list_repos`.
    ListRepos,
    /// `add_repo`: register and start, answer when active or failed.
    AddRepo {
        /// Which repository.
        target: RepoTarget,
        /// `repo_slug`, when given.
        slug: Option<Slug>,
    },
    /// `register_repo`: record without starting.
    RegisterRepo {
        /// Which repository.
        target: RepoTarget,
        /// `repo_slug`, when given.
        slug: Option<Slug>,
    },
    /// `remove_repo`: unregister, then stop.
    RemoveRepo(RepoRef),
    /// `restart_repo` (extension).
    RestartRepo(RepoRef),
    /// `repo_status` (extension).
    RepoStatus(RepoRef),
    /// `forge_status` (extension): each repository's forge, identity and
    /// API budget, asked of its worker.
    ForgeStatus,
}

impl Action {
    /// The action's name on the wire (`remove_repo`), as refusals name it.
    pub fn name(&self) -> &'static str {
        match self {
            Action::Ping => "ping",
            Action::Version => "version",
            Action::ListRepos => "list_repos",
            Action::AddRepo { .. } => "add_repo",
            Action::RegisterRepo { .. } => "register_repo",
            Action::RemoveRepo(_) => "remove_repo",
            Action::RestartRepo(_) => "restart_repo",
            Action::RepoStatus(_) => "repo_status",
            Action::ForgeStatus => "forge_status",
        }
    }
}

/// One parsed request line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The action and its arguments.
    pub action: Action,
    /// `"keep_alive": true` keeps the connection open for another request (extension).
    pub keep_alive: bool,
}

/// A request that cannot be served; the text is the `error` of the reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadRequest(pub String);

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The string field `key`, absent when missing, null or empty (the original treated an empty
/// path as missing).
fn opt_str<'a>(obj: &'a Map<String, Value>, key: &str) -> Result<Option<&'a str>, BadRequest> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(BadRequest(format!(
            "field \"{key}\" must be a string, found {}",
            type_name(other)
        ))),
    }
}

fn opt_slug(obj: &Map<String, Value>, key: &str) -> Result<Option<Slug>, BadRequest> {
    opt_str(obj, key)?
        .map(|s| Slug::new(s).map_err(|e| BadRequest(format!("field \"{key}\": {e}"))))
        .transpose()
}

fn target(obj: &Map<String, Value>) -> Result<RepoTarget, BadRequest> {
    match (opt_str(obj, "path")?, opt_str(obj, "repo")?) {
        (Some(_), Some(_)) => Err(BadRequest(
            "give either \"path\" or \"repo\", not both".into(),
        )),
        (Some(path), None) => Ok(RepoTarget::Path(path.to_owned())),
        (None, Some(repo)) => Ok(RepoTarget::Repo(repo.to_owned())),
        (None, None) => Err(BadRequest("Missing path".into())),
    }
}

fn repo_ref(obj: &Map<String, Value>) -> Result<RepoRef, BadRequest> {
    if let Some(slug) = opt_slug(obj, "slug")? {
        return Ok(RepoRef::Slug(slug));
    }
    if let Some(path) = opt_str(obj, "path")? {
        return Ok(RepoRef::Path(path.to_owned()));
    }
    if let Some(repo) = opt_str(obj, "repo")? {
        return Ok(RepoRef::Repo(repo.to_owned()));
    }
    Err(BadRequest("Missing path or slug".into()))
}

impl Request {
    /// Parse one request line (without or with its `\n`).
    ///
    /// # Errors
    /// [`BadRequest`] saying what is wrong: malformed JSON, not an object, a missing or
    /// mistyped field, an invalid slug, or `unknown action` (the original's text).
    pub fn parse(line: &[u8]) -> Result<Request, BadRequest> {
        let value: Value = serde_json::from_slice(line)
            .map_err(|e| BadRequest(format!("malformed JSON request: {e}")))?;
        let Value::Object(obj) = value else {
            return Err(BadRequest(format!(
                "the request must be a JSON object, found {}",
                type_name(&value)
            )));
        };
        let keep_alive = match obj.get("keep_alive") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                return Err(BadRequest(format!(
                    "field \"keep_alive\" must be a boolean, found {}",
                    type_name(other)
                )));
            }
        };
        let action = match obj.get("action") {
            Some(Value::String(a)) => a.as_str(),
            None | Some(Value::Null) => {
                return Err(BadRequest(
                    "missing field \"action\": expected a string such as \"ping\"".into(),
                ));
            }
            Some(other) => {
                return Err(BadRequest(format!(
                    "field \"action\" must be a string, found {}",
                    type_name(other)
                )));
            }
        };
        let action = match action {
            "ping" => Action::Ping,
            "version" => Action::Version,
            "list_repos" => Action::ListRepos,
            "add_repo" => Action::AddRepo {
                target: target(&obj)?,
                slug: opt_slug(&obj, "repo_slug")?,
            },
            "register_repo" => Action::RegisterRepo {
                target: target(&obj)?,
                slug: opt_slug(&obj, "repo_slug")?,
            },
            "remove_repo" => Action::RemoveRepo(repo_ref(&obj)?),
            "restart_repo" => Action::RestartRepo(repo_ref(&obj)?),
            "repo_status" => Action::RepoStatus(repo_ref(&obj)?),
            "forge_status" => Action::ForgeStatus,
            _ => return Err(BadRequest("unknown action".into())),
        };
        Ok(Request { action, keep_alive })
    }
}

impl Request {
    /// The request as one line of compact JSON ending in `\n` (what the client sends).
    pub fn to_line(&self) -> Vec<u8> {
        let mut obj = Map::new();
        let mut put = |k: &str, v: &str| {
            obj.insert(k.to_owned(), Value::String(v.to_owned()));
        };
        let put_ref = |put: &mut dyn FnMut(&str, &str), r: &RepoRef| match r {
            RepoRef::Path(p) => put("path", p),
            RepoRef::Slug(s) => put("slug", s.as_str()),
            RepoRef::Repo(r) => put("repo", r),
        };
        let put_target = |put: &mut dyn FnMut(&str, &str), t: &RepoTarget, slug: &Option<Slug>| {
            match t {
                RepoTarget::Path(p) => put("path", p),
                RepoTarget::Repo(r) => put("repo", r),
            }
            if let Some(slug) = slug {
                put("repo_slug", slug.as_str());
            }
        };
        put("action", self.action.name());
        match &self.action {
            Action::Ping | Action::Version | Action::ListRepos | Action::ForgeStatus => {}
            Action::AddRepo { target, slug } | Action::RegisterRepo { target, slug } => {
                put_target(&mut put, target, slug);
            }
            Action::RemoveRepo(r) | Action::RestartRepo(r) | Action::RepoStatus(r) => {
                put_ref(&mut put, r);
            }
        }
        if self.keep_alive {
            obj.insert("keep_alive".into(), Value::Bool(true));
        }
        let mut line = Value::Object(obj).to_string().into_bytes();
        line.push(b'\n');
        line
    }
}

/// Read a reply line: `Ok(fields)` for `"status":"ok"`, `Err(message)` for an error reply.
///
/// # Errors
/// [`BadRequest`] (naming the problem) when the line is not a reply of this protocol.
pub fn parse_reply(line: &[u8]) -> Result<Result<Map<String, Value>, String>, BadRequest> {
    let value: Value = serde_json::from_slice(line)
        .map_err(|e| BadRequest(format!("malformed reply from the supervisor: {e}")))?;
    let Value::Object(mut obj) = value else {
        return Err(BadRequest(
            "the supervisor's reply is not a JSON object".into(),
        ));
    };
    match obj.remove("status") {
        Some(Value::String(s)) if s == "ok" => Ok(Ok(obj)),
        Some(Value::String(s)) if s == "error" => Ok(Err(match obj.remove("error") {
            Some(Value::String(e)) => e,
            other => format!("unexplained error ({other:?})"),
        })),
        other => Err(BadRequest(format!(
            "the supervisor's reply has no valid \"status\" ({other:?})"
        ))),
    }
}

/// One entry of `list_repos`: the original's keys, then additions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RepoInfo {
    /// Checkout path (empty for a repository named by `owner/name`).
    pub path: String,
    /// The slug.
    pub slug: String,
    /// The port of the supervisor's dashboard, which serves every repository (0 when it is
    /// not served).
    pub port: u16,
    /// This repository's page on the supervisor's dashboard:
    /// `http://<dashboard address>/repos/<slug>/` (what the original's `hf open` opens).
    pub dashboard_url: String,
    /// The instance's log file (process backend) or the `journalctl` command (systemd).
    pub log_file: String,
    /// `ActiveState` is `active` or `reloading`.
    pub running: bool,
    /// GitHub `owner/name`, when named so (addition).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo: Option<String>,
    /// systemd `ActiveState` (addition).
    #[serde(default)]
    pub active_state: String,
    /// systemd `SubState` (addition).
    #[serde(default)]
    pub sub_state: String,
    /// Restarts since started (addition).
    #[serde(default)]
    pub n_restarts: u32,
    /// When it last became active, RFC 3339 UTC (addition).
    #[serde(default)]
    pub active_since: Option<String>,
}

/// `list_repos` reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RepoList {
    /// Registered repositories, by slug.
    pub repos: Vec<RepoInfo>,
}

/// `add_repo` reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Added {
    /// The slug.
    pub slug: String,
    /// See [`RepoInfo::port`].
    pub port: u16,
    /// See [`RepoInfo::dashboard_url`].
    pub dashboard_url: String,
    /// See [`RepoInfo::log_file`].
    pub log_file: String,
    /// False when it was already running.
    pub started: bool,
    /// The stored path (addition).
    pub path: String,
    /// GitHub `owner/name`, when named so (addition).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo: Option<String>,
}

/// `register_repo` reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Registered {
    /// The slug.
    pub slug: String,
    /// The stored path.
    pub path: String,
    /// GitHub `owner/name`, when named so (addition).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo: Option<String>,
}

/// `repo_status` and `restart_repo` reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RepoStatus {
    /// The registration, with `running`.
    #[serde(flatten)]
    pub info: RepoInfo,
    /// `hydraflow@<slug>.service`.
    pub unit: String,
    /// Main PID while running.
    pub main_pid: Option<u32>,
    /// Memory in bytes, when known.
    pub memory_bytes: Option<u64>,
    /// systemd `Service.Result`, when known.
    pub result: Option<String>,
    /// Which backend runs it (`systemd`, `process`).
    pub backend: String,
}

/// `version` reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Version {
    /// The program's version.
    pub version: String,
    /// Which backend runs instances.
    pub backend: String,
    /// Connections being served now, this one included.
    pub connections: usize,
}

/// One repository's forge as its worker reports it (`/healthz`'s `forge`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForgeStatus {
    /// The slug.
    pub slug: String,
    /// `local` or `github`; none when the worker did not answer.
    #[serde(default)]
    pub forge: Option<String>,
    /// Who it acts as (`token`, `GitHub App 7, installation 42`).
    #[serde(default)]
    pub identity: Option<String>,
    /// REST requests left in the window, when known.
    #[serde(default)]
    pub remaining: Option<u64>,
    /// The window's size, when known.
    #[serde(default)]
    pub limit: Option<u64>,
    /// When the window resets (Unix seconds), when known.
    #[serde(default)]
    pub reset_at: Option<u64>,
    /// Why the worker could not be asked.
    #[serde(default)]
    pub error: Option<String>,
}

/// `forge_status` reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForgeStatuses {
    /// One per registered repository, by slug.
    pub forges: Vec<ForgeStatus>,
}

/// An empty `ok` reply (`ping`, `remove_repo`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Done {}

/// The body of an `ok` reply.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Reply {
    /// `{"status":"ok"}`.
    Done(Done),
    /// `list_repos`.
    Repos(RepoList),
    /// `add_repo`.
    Added(Added),
    /// `register_repo`.
    Registered(Registered),
    /// `repo_status`, `restart_repo`.
    Status(Box<RepoStatus>),
    /// `version`.
    Version(Version),
    /// `forge_status`.
    Forges(ForgeStatuses),
}

/// A reply: `{"status":"ok",…}` or `{"status":"error","error":"…"}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum Response {
    /// Success, with the action's fields.
    Ok(Reply),
    /// Failure.
    Error {
        /// What went wrong and what to do.
        error: String,
    },
}

impl Response {
    /// An error reply.
    pub fn error(message: impl Into<String>) -> Response {
        Response::Error {
            error: message.into(),
        }
    }

    /// The reply as one line of compact JSON ending in `\n`.
    pub fn to_line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self).unwrap_or_else(|e| {
            // Serializing these types cannot fail (string keys, no maps with other keys);
            // answer with an error instead of panicking should that ever change.
            format!(r#"{{"status":"error","error":"cannot encode the reply: {e}"}}"#).into_bytes()
        });
        line.push(b'\n');
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(line: &str, expected: Result<Action, &str>) {
        let got = Request::parse(line.as_bytes()).map(|r| r.action);
        let expected = expected.map_err(|e| BadRequest(e.to_owned()));
        assert_eq!(got, expected, "{line}");
    }

    fn slug(s: &str) -> Slug {
        Slug::new(s).unwrap()
    }

    #[test]
    fn requests() {
        check(r#"{"action":"ping"}"#, Ok(Action::Ping));
        check("{\"action\":\"ping\"}\n", Ok(Action::Ping));
        check(r#"{"action":"list_repos"}"#, Ok(Action::ListRepos));
        check(r#"{"action":"version"}"#, Ok(Action::Version));
        check(
            r#"{"action":"add_repo","path":"/a/b"}"#,
            Ok(Action::AddRepo {
                target: RepoTarget::Path("/a/b".into()),
                slug: None,
            }),
        );
        check(
            r#"{"action":"add_repo","path":"/a/b","repo_slug":"x"}"#,
            Ok(Action::AddRepo {
                target: RepoTarget::Path("/a/b".into()),
                slug: Some(slug("x")),
            }),
        );
        check(
            r#"{"action":"register_repo","repo":"o/n"}"#,
            Ok(Action::RegisterRepo {
                target: RepoTarget::Repo("o/n".into()),
                slug: None,
            }),
        );
        check(
            r#"{"action":"remove_repo","slug":"x"}"#,
            Ok(Action::RemoveRepo(RepoRef::Slug(slug("x")))),
        );
        check(
            r#"{"action":"remove_repo","path":"/p"}"#,
            Ok(Action::RemoveRepo(RepoRef::Path("/p".into()))),
        );
        check(
            r#"{"action":"repo_status","slug":"x"}"#,
            Ok(Action::RepoStatus(RepoRef::Slug(slug("x")))),
        );
        check(
            r#"{"action":"restart_repo","repo":"o/n"}"#,
            Ok(Action::RestartRepo(RepoRef::Repo("o/n".into()))),
        );
    }

    #[test]
    fn bad_requests() {
        check(r#"{"action":"nope"}"#, Err("unknown action"));
        check(r#"{"action":"add_repo"}"#, Err("Missing path"));
        check(r#"{"action":"add_repo","path":""}"#, Err("Missing path"));
        check(r#"{"action":"remove_repo"}"#, Err("Missing path or slug"));
        check(
            r#"{"action":"add_repo","path":5}"#,
            Err("field \"path\" must be a string, found a number"),
        );
        check(
            r#"{"action":7}"#,
            Err("field \"action\" must be a string, found a number"),
        );
        check(
            "{}",
            Err("missing field \"action\": expected a string such as \"ping\""),
        );
        check(
            "[1]",
            Err("the request must be a JSON object, found an array"),
        );
        check(
            r#"{"action":"ping","keep_alive":"yes"}"#,
            Err("field \"keep_alive\" must be a boolean, found a string"),
        );
        check(
            r#"{"action":"add_repo","path":"/a","repo":"o/n"}"#,
            Err("give either \"path\" or \"repo\", not both"),
        );
        let err = Request::parse(br#"{"action":"add_repo","path":"/a","repo_slug":"a/b"}"#)
            .unwrap_err()
            .0;
        assert!(err.starts_with("field \"repo_slug\": instance name \"a/b\" is not valid"));
        let err = Request::parse(b"{\"action\":").unwrap_err().0;
        assert!(err.starts_with("malformed JSON request: "), "{err}");
    }

    #[test]
    fn requests_round_trip() {
        for line in [
            r#"{"action":"ping"}"#,
            r#"{"action":"add_repo","path":"/a","repo_slug":"s"}"#,
            r#"{"action":"register_repo","repo":"o/n"}"#,
            r#"{"action":"remove_repo","slug":"s","keep_alive":true}"#,
            r#"{"action":"repo_status","path":"/p"}"#,
            r#"{"action":"version"}"#,
            r#"{"action":"list_repos"}"#,
            r#"{"action":"restart_repo","repo":"o/n"}"#,
        ] {
            let req = Request::parse(line.as_bytes()).unwrap();
            assert_eq!(Request::parse(&req.to_line()).unwrap(), req, "{line}");
        }
    }

    #[test]
    fn replies_parse() {
        assert_eq!(
            parse_reply(b"{\"status\":\"ok\"}\n").unwrap(),
            Ok(Map::new())
        );
        assert_eq!(
            parse_reply(br#"{"status":"error","error":"Repo not found"}"#).unwrap(),
            Err("Repo not found".to_owned())
        );
        assert!(parse_reply(b"[]").is_err());
        assert!(parse_reply(br#"{"status":1}"#).is_err());
    }

    #[test]
    fn keep_alive_is_opt_in() {
        let r = Request::parse(br#"{"action":"ping","keep_alive":true}"#).unwrap();
        assert!(r.keep_alive);
        assert!(!Request::parse(br#"{"action":"ping"}"#).unwrap().keep_alive);
    }

    #[test]
    fn replies_are_one_compact_line() {
        assert_eq!(
            Response::Ok(Reply::Done(Done {})).to_line(),
            b"{\"status\":\"ok\"}\n"
        );
        assert_eq!(Response::Ok(Reply::Done(Done {})).to_line(), OK_LINE);
        assert_eq!(
            Response::error("Repo not found").to_line(),
            b"{\"status\":\"error\",\"error\":\"Repo not found\"}\n"
        );
        let line = Response::Ok(Reply::Registered(Registered {
            slug: "demo".into(),
            path: "/a/demo".into(),
            repo: None,
        }))
        .to_line();
        assert_eq!(
            line,
            b"{\"status\":\"ok\",\"slug\":\"demo\",\"path\":\"/a/demo\"}\n"
        );
    }
}
