//! The supervisor's registry of repositories, kept in `<state dir>/supervisor-state.json`
//! with the original's keys (`repos[].path`, `slug`, `port`, `dashboard_url`, `log_file`) and
//! additions (`repo`, `added_at`); keys this version does not know are kept as they were.
//!
//! Every change rewrites the file atomically (a temporary file in the same directory, fsync,
//! rename, fsync of the directory). An unreadable file is renamed aside, never overwritten.
//! Changes are blocking calls (fsync): the supervisor makes them on tokio's blocking pool, and
//! they hold only a writer lock while the file is written, so readers never wait for the disk.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Name of the registry file in the state directory.
pub const STATE_FILE: &str = "supervisor-state.json";

/// One registered repository.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RepoEntry {
    /// Absolute checkout path; empty for a repository named by `owner/name`.
    pub path: String,
    /// The slug (instance name).
    pub slug: String,
    /// The original's per-repository dashboard port; 0 in the file (replies carry the
    /// supervisor dashboard's port).
    #[serde(default)]
    pub port: u16,
    /// See the protocol's `dashboard_url`.
    #[serde(default)]
    pub dashboard_url: String,
    /// See the protocol's `log_file`.
    #[serde(default)]
    pub log_file: String,
    /// GitHub `owner/name`, when named so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo: Option<String>,
    /// When it was registered (RFC 3339 UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub added_at: Option<String>,
    /// Keys written by other versions, kept unchanged.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct StateFile {
    #[serde(default)]
    repos: Vec<RepoEntry>,
    #[serde(flatten)]
    other: Map<String, Value>,
}

/// Why the registry could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// Reading, writing or renaming failed.
    #[error("cannot {what} {path}: {cause}")]
    Io {
        /// `read`, `write`, …
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        cause: std::io::Error,
    },
    /// The slug is registered already with another path or repository.
    #[error(
        "slug \"{slug}\" is already registered for {existing}: remove it first or choose another slug (repo_slug)"
    )]
    SlugTaken {
        /// The slug.
        slug: String,
        /// What it is registered for.
        existing: String,
    },
}

/// What loading found.
#[derive(Debug)]
pub struct Loaded {
    /// The registry.
    pub registry: Registry,
    /// Where an unreadable state file was moved, with the reason; the registry then starts
    /// empty and the old file stays there for a human.
    pub set_aside: Option<(PathBuf, String)>,
}

/// The registry: an in-memory copy of the file, changed only through methods that persist
/// each change before returning. Cloning gives another handle on the same registry.
#[derive(Debug, Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    state: Mutex<StateFile>,
    /// Held by a change from its check until its file is durable: changes one at a time, in
    /// the order their files are written, while readers only take `state`, briefly.
    writer: Mutex<()>,
}

impl Registry {
    /// Load `<state_dir>/supervisor-state.json`; a missing file is an empty registry.
    ///
    /// # Errors
    /// [`RegistryError::Io`] when the file exists but cannot be read, or cannot be set aside.
    pub fn load(state_dir: &Path) -> Result<Loaded, RegistryError> {
        let path = state_dir.join(STATE_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Loaded {
                    registry: Registry::with(path, StateFile::default()),
                    set_aside: None,
                });
            }
            Err(source) => {
                return Err(RegistryError::Io {
                    what: "read",
                    path,
                    cause: source,
                });
            }
        };
        match serde_json::from_slice::<StateFile>(&bytes) {
            Ok(state) => Ok(Loaded {
                registry: Registry::with(path, state),
                set_aside: None,
            }),
            Err(e) => {
                let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ");
                let aside = path.with_file_name(format!("{STATE_FILE}.unreadable-{stamp}"));
                std::fs::rename(&path, &aside).map_err(|source| RegistryError::Io {
                    what: "set aside",
                    path: path.clone(),
                    cause: source,
                })?;
                Ok(Loaded {
                    registry: Registry::with(path, StateFile::default()),
                    set_aside: Some((aside, e.to_string())),
                })
            }
        }
    }

    /// The slug registered for the checkout `path` (absolute, canonical) in
    /// `<state_dir>/supervisor-state.json`, read without changing anything (an unreadable or
    /// missing file registers nothing). For the command line, which must find a supervised
    /// repository's data without a running supervisor.
    pub fn slug_of_path(state_dir: &Path, path: &str) -> Option<String> {
        let bytes = std::fs::read(state_dir.join(STATE_FILE)).ok()?;
        let state: StateFile = serde_json::from_slice(&bytes).ok()?;
        state
            .repos
            .into_iter()
            .find(|e| !e.path.is_empty() && e.path == path)
            .map(|e| e.slug)
    }

    fn with(path: PathBuf, state: StateFile) -> Registry {
        Registry {
            inner: Arc::new(Inner {
                path,
                state: Mutex::new(state),
                writer: Mutex::new(()),
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, StateFile> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn writer(&self) -> MutexGuard<'_, ()> {
        self.inner
            .writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Every entry, in registration order.
    pub fn entries(&self) -> Vec<RepoEntry> {
        self.state().repos.clone()
    }

    /// The entry of `slug`.
    pub fn get(&self, slug: &str) -> Option<RepoEntry> {
        self.state().repos.iter().find(|e| e.slug == slug).cloned()
    }

    /// The entry whose `path` or `repo` is `key`.
    pub fn find(&self, key: &str) -> Option<RepoEntry> {
        self.state()
            .repos
            .iter()
            .find(|e| (!e.path.is_empty() && e.path == key) || e.repo.as_deref() == Some(key))
            .cloned()
    }

    /// Add `entry`; returns false (and writes nothing) when the same slug is registered for
    /// the same path and repository already.
    ///
    /// # Errors
    /// [`RegistryError::SlugTaken`] when the slug is registered for something else;
    /// [`RegistryError::Io`] when the file cannot be written (the registry is then unchanged).
    pub fn insert(&self, entry: RepoEntry) -> Result<bool, RegistryError> {
        let _writing = self.writer();
        let slug = entry.slug.clone();
        let bytes = {
            let mut state = self.state();
            if let Some(existing) = state.repos.iter().find(|e| e.slug == entry.slug) {
                if existing.path == entry.path && existing.repo == entry.repo {
                    return Ok(false);
                }
                return Err(RegistryError::SlugTaken {
                    slug: entry.slug,
                    existing: existing
                        .repo
                        .clone()
                        .unwrap_or_else(|| existing.path.clone()),
                });
            }
            state.repos.push(entry);
            self.encode(&state)
        };
        if let Err(e) = bytes.and_then(|bytes| self.write(&bytes)) {
            self.state().repos.retain(|e| e.slug != slug);
            return Err(e);
        }
        Ok(true)
    }

    /// Remove `slug`; returns the removed entry, `None` when it was not registered.
    ///
    /// # Errors
    /// [`RegistryError::Io`] when the file cannot be written (the registry is then unchanged).
    pub fn remove(&self, slug: &str) -> Result<Option<RepoEntry>, RegistryError> {
        let _writing = self.writer();
        let (index, entry, bytes) = {
            let mut state = self.state();
            let Some(index) = state.repos.iter().position(|e| e.slug == slug) else {
                return Ok(None);
            };
            let entry = state.repos.remove(index);
            let bytes = self.encode(&state);
            (index, entry, bytes)
        };
        if let Err(e) = bytes.and_then(|bytes| self.write(&bytes)) {
            let mut state = self.state();
            let index = index.min(state.repos.len());
            state.repos.insert(index, entry);
            return Err(e);
        }
        Ok(Some(entry))
    }

    fn io(&self, what: &'static str, cause: std::io::Error) -> RegistryError {
        RegistryError::Io {
            what,
            path: self.inner.path.clone(),
            cause,
        }
    }

    fn encode(&self, state: &StateFile) -> Result<Vec<u8>, RegistryError> {
        let mut bytes =
            serde_json::to_vec_pretty(state).map_err(|e| self.io("encode", e.into()))?;
        bytes.push(b'\n');
        Ok(bytes)
    }

    fn write(&self, bytes: &[u8]) -> Result<(), RegistryError> {
        crate::store::atomic::write_atomic(&self.inner.path, bytes)
            .map_err(|e| self.io("replace", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(slug: &str, path: &str) -> RepoEntry {
        RepoEntry {
            path: path.into(),
            slug: slug.into(),
            port: 0,
            dashboard_url: String::new(),
            log_file: String::new(),
            repo: None,
            added_at: None,
            other: Map::new(),
        }
    }

    #[test]
    fn the_original_file_loads_and_unknown_keys_survive() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(STATE_FILE),
            r#"{"repos": [{"path": "/abs/path", "slug": "demo", "port": 0, "dashboard_url": "http://localhost:0", "log_file": "", "future": 1}], "version": 3}"#,
        )
        .unwrap();
        let loaded = Registry::load(dir.path()).unwrap();
        assert!(loaded.set_aside.is_none());
        let reg = loaded.registry;
        assert_eq!(reg.get("demo").unwrap().path, "/abs/path");
        assert!(reg.insert(entry("two", "/two")).unwrap());
        let text = std::fs::read_to_string(dir.path().join(STATE_FILE)).unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["version"], 3);
        assert_eq!(v["repos"][0]["future"], 1);
        assert_eq!(v["repos"][0]["dashboard_url"], "http://localhost:0");
        assert_eq!(v["repos"][1]["slug"], "two");
    }

    #[test]
    fn an_unreadable_file_is_set_aside_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(STATE_FILE), "{\"repos\": [tru").unwrap();
        let loaded = Registry::load(dir.path()).unwrap();
        let (aside, _) = loaded.set_aside.unwrap();
        assert_eq!(std::fs::read_to_string(aside).unwrap(), "{\"repos\": [tru");
        assert!(loaded.registry.entries().is_empty());
    }

    #[test]
    fn insert_and_remove() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::load(dir.path()).unwrap().registry;
        assert!(reg.insert(entry("a", "/a")).unwrap());
        assert!(!reg.insert(entry("a", "/a")).unwrap());
        let err = reg.insert(entry("a", "/b")).unwrap_err().to_string();
        assert_eq!(
            err,
            "slug \"a\" is already registered for /a: remove it first or choose another slug (repo_slug)"
        );
        assert_eq!(reg.find("/a").unwrap().slug, "a");
        assert_eq!(reg.remove("a").unwrap().unwrap().slug, "a");
        assert!(reg.remove("a").unwrap().is_none());
        let reloaded = Registry::load(dir.path()).unwrap().registry;
        assert!(reloaded.entries().is_empty());
    }
}
