//! Repository slugs and the on-disk data layout (docs/design/data-layout.md).
//!
//! `data_root` is `$HYDRAFLOW_HOME` when set, else `<repo>/.hydraflow`; every
//! per-repository artifact lives under `data_root/<slug>/`, and worktrees live
//! at `<worktree_base>/<slug>/issue-<N>` on branch `agent/issue-<N>`.

use std::fmt;
use std::path::{Path, PathBuf};

/// Longest slug accepted, in bytes (systemd instance names and user names stay short).
pub const MAX_SLUG_LEN: usize = 100;

/// A GitHub repository's `owner/name`: two parts of ASCII letters, digits,
/// `.`, `_` or `-`, neither empty nor starting with `.` (GitHub's rules for
/// account and repository names, as far as they matter here). Parsed once,
/// where it comes in: the configuration's `repo`, the protocol's `repo`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RepoName(String);

/// `"<text>"` is not an `owner/name`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "repository \"{0}\" is not valid: expected owner/name with letters, digits, '.', '_' or '-'"
)]
pub struct RepoNameError(pub String);

impl RepoName {
    /// Check `text` as an `owner/name`.
    ///
    /// # Errors
    /// [`RepoNameError`] naming the text when it is not one.
    pub fn parse(text: &str) -> Result<RepoName, RepoNameError> {
        let part_ok = |p: &str| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        };
        match text.split_once('/') {
            Some((owner, name)) if part_ok(owner) && part_ok(name) => Ok(RepoName(text.to_owned())),
            _ => Err(RepoNameError(text.to_owned())),
        }
    }

    /// `owner/name`.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a slug was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlugError {
    /// The slug is the empty string.
    #[error("instance name is empty: use 1 to {MAX_SLUG_LEN} letters, digits, '.', '_' or '-'")]
    Empty,
    /// The slug is longer than [`MAX_SLUG_LEN`].
    #[error(
        "instance name \"{shown}\" is {len} characters long: at most {MAX_SLUG_LEN} are allowed"
    )]
    TooLong {
        /// The first characters of the slug, for the message.
        shown: String,
        /// Its length in bytes.
        len: usize,
    },
    /// The slug starts with a dot (hidden files, `..`).
    #[error("instance name \"{0}\" is not valid: it must not start with '.'")]
    LeadingDot(String),
    /// The slug holds a character outside `[A-Za-z0-9._-]`.
    #[error(
        "instance name \"{slug}\" is not valid: {found:?} is not allowed; use only letters, digits, '.', '_' and '-'"
    )]
    BadChar {
        /// The slug as given.
        slug: String,
        /// The first offending character.
        found: char,
    },
}

/// A validated repository slug: `[A-Za-z0-9._-]`, no leading `.`, at most
/// [`MAX_SLUG_LEN`] bytes. It is also the systemd instance name (`%i`), so it
/// never contains `/`, `:` or `..` as a path component.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct Slug(String);

impl Slug {
    /// Validate `s` as a slug.
    ///
    /// # Errors
    /// [`SlugError`] saying what is wrong and what is allowed.
    pub fn new(s: &str) -> Result<Slug, SlugError> {
        if s.is_empty() {
            return Err(SlugError::Empty);
        }
        if s.len() > MAX_SLUG_LEN {
            return Err(SlugError::TooLong {
                shown: format!("{}…", s.chars().take(20).collect::<String>()),
                len: s.len(),
            });
        }
        if let Some(found) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(SlugError::BadChar {
                slug: s.to_owned(),
                found,
            });
        }
        if s.starts_with('.') {
            return Err(SlugError::LeadingDot(s.to_owned()));
        }
        Ok(Slug(s.to_owned()))
    }

    /// The slug of a GitHub `owner/name`: `/` becomes `-` (docs/design/data-layout.md).
    ///
    /// # Errors
    /// [`SlugError`] when the result is not a valid slug.
    pub fn from_repo(owner_name: &str) -> Result<Slug, SlugError> {
        Slug::new(&owner_name.replace('/', "-"))
    }

    /// The slug of a checkout path: its directory name with spaces replaced by
    /// `-`, as the original supervisor did.
    ///
    /// # Errors
    /// [`SlugError`] when the directory name does not make a valid slug.
    pub fn from_path(path: &Path) -> Result<Slug, SlugError> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().replace(' ', "-"))
            .unwrap_or_default();
        Slug::new(&name)
    }

    /// The slug as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Slug {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for Slug {
    type Err = SlugError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Slug::new(s)
    }
}

impl<'de> serde::Deserialize<'de> for Slug {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Slug::new(&s).map_err(serde::de::Error::custom)
    }
}

/// Every path of one repository's data, derived from `data_root`, the slug and
/// `worktree_base` (docs/design/data-layout.md). Creating the directories is
/// [`Layout::create_dirs`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// The repository slug.
    pub slug: Slug,
    /// `$HYDRAFLOW_HOME`, else `<repo>/.hydraflow`.
    pub data_root: PathBuf,
    /// Where worktrees of all repositories go; this one's are under `<worktree_base>/<slug>/`.
    pub worktree_base: PathBuf,
}

impl Layout {
    /// `data_root/<slug>/`: everything of this repository.
    pub fn repo_dir(&self) -> PathBuf {
        self.data_root.join(self.slug.as_str())
    }
    /// `data_root/<slug>/state.json`.
    pub fn state_file(&self) -> PathBuf {
        self.repo_dir().join("state.json")
    }
    /// `data_root/<slug>/events.jsonl`.
    pub fn events_file(&self) -> PathBuf {
        self.repo_dir().join("events.jsonl")
    }
    /// `data_root/<slug>/sessions.jsonl`.
    pub fn sessions_file(&self) -> PathBuf {
        self.repo_dir().join("sessions.jsonl")
    }

    /// `data_root/<slug>/agent-calls.jsonl`: one record per agent call.
    pub fn agent_calls_file(&self) -> PathBuf {
        self.repo_dir().join("agent-calls.jsonl")
    }
    /// `data_root/<slug>/logs/`: transcripts and the worker's own log off the journal.
    pub fn logs_dir(&self) -> PathBuf {
        self.repo_dir().join("logs")
    }
    /// `data_root/<slug>/plans/`.
    pub fn plans_dir(&self) -> PathBuf {
        self.repo_dir().join("plans")
    }
    /// `data_root/<slug>/plans/issue-<N>.md`.
    pub fn plan_file(&self, issue: u64) -> PathBuf {
        self.plans_dir().join(format!("issue-{issue}.md"))
    }
    /// `data_root/<slug>/forge/`: the embedded local forge's issues and pull requests.
    pub fn forge_dir(&self) -> PathBuf {
        self.repo_dir().join("forge")
    }
    /// `data_root/<slug>/worker.lock`: locked by the one worker of this data
    /// directory for its life, holding its PID ([`crate::worker_lock`]).
    pub fn worker_lock_file(&self) -> PathBuf {
        self.repo_dir().join("worker.lock")
    }
    /// `data_root/<slug>/spool/`: HITL commands handed to a running worker by the CLI.
    pub fn spool_dir(&self) -> PathBuf {
        self.repo_dir().join("spool")
    }
    /// `<worktree_base>/<slug>/`: this repository's worktrees.
    pub fn worktrees_dir(&self) -> PathBuf {
        self.worktree_base.join(self.slug.as_str())
    }
    /// `<worktree_base>/<slug>/issue-<N>`.
    pub fn worktree_path(&self, issue: u64) -> PathBuf {
        self.worktrees_dir().join(format!("issue-{issue}"))
    }
    /// `agent/issue-<N>`.
    pub fn branch_name(issue: u64) -> String {
        format!("agent/issue-{issue}")
    }

    /// Create `data_root/<slug>/` and its subdirectories.
    ///
    /// # Errors
    /// The I/O error with the path that could not be created.
    pub fn create_dirs(&self) -> std::io::Result<()> {
        for dir in [
            self.repo_dir(),
            self.logs_dir(),
            self.plans_dir(),
            self.spool_dir(),
        ] {
            std::fs::create_dir_all(&dir).map_err(|e| {
                std::io::Error::new(e.kind(), format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, ok: bool) {
        assert_eq!(Slug::new(input).is_ok(), ok, "{input:?}");
    }

    #[test]
    fn slug_rules() {
        check("org-repo", true);
        check("a.b_c-D9", true);
        check(&"x".repeat(100), true);
        check(&"x".repeat(101), false);
        check(&"x".repeat(300), false);
        check("", false);
        check(".hidden", false);
        check("..", false);
        check("../x", false);
        check("a/b", false);
        check("a:b", false);
        check("a b", false);
        check("héllo", false);
    }

    #[test]
    fn slug_errors_say_what_is_allowed() {
        let err = Slug::new("a/b").unwrap_err().to_string();
        assert_eq!(
            err,
            "instance name \"a/b\" is not valid: '/' is not allowed; use only letters, digits, '.', '_' and '-'"
        );
    }

    #[test]
    fn slug_from_repo_and_path() {
        assert_eq!(Slug::from_repo("org/repo").unwrap().as_str(), "org-repo");
        assert_eq!(
            Slug::from_path(Path::new("/src/my repo")).unwrap().as_str(),
            "my-repo"
        );
    }

    #[test]
    fn layout_paths() {
        let layout = Layout {
            slug: Slug::new("org-repo").unwrap(),
            data_root: PathBuf::from("/var/lib/hydraflow/org-repo"),
            worktree_base: PathBuf::from("/wt"),
        };
        assert_eq!(
            layout.state_file(),
            Path::new("/var/lib/hydraflow/org-repo/org-repo/state.json")
        );
        assert_eq!(layout.worktree_path(7), Path::new("/wt/org-repo/issue-7"));
        assert_eq!(
            layout.worker_lock_file(),
            Path::new("/var/lib/hydraflow/org-repo/org-repo/worker.lock")
        );
        assert_eq!(Layout::branch_name(7), "agent/issue-7");
    }
}
