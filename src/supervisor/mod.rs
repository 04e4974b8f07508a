//! The supervisor: a registry of repositories, one worker instance per repository run by an
//! [`backend::InstanceBackend`] (systemd units or child processes), and the TCP control
//! protocol of the original HydraFlow supervisor ([`protocol`], [`server`], [`client`]).
//!
//! [`Supervisor`] is the service: plain async functions, one per action, that the TCP
//! handlers call. [`run_daemon`] is `hydraflow supervisor`.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;

use crate::config::{Config, SupervisorConfig};
use crate::layout::{Slug, SlugError};

pub mod backend;
pub mod client;
mod directory;
pub mod polkit;
pub mod process;
pub mod protocol;
pub mod registry;
pub mod server;
pub mod systemd_backend;

use backend::{BackendError, InstanceBackend, InstanceStatus};
use protocol::{
    Added, Registered, Reply, RepoInfo, RepoList, RepoRef, RepoStatus, RepoTarget, Response,
    Version,
};
use registry::{Registry, RegistryError, RepoEntry};

/// Name of the port file in the state directory.
pub const PORT_FILE: &str = "supervisor-port";
/// Environment variable naming the port file (the original's).
pub const PORT_FILE_ENV: &str = "HF_SUPERVISOR_PORT_FILE";
/// The original's default port.
pub const DEFAULT_PORT: u16 = 8765;

/// The supervisor's state directory: `[supervisor] state_dir`, else `$HYDRAFLOW_HOME`, else
/// `~/.hydraflow` (the packaged configuration sets `/var/lib/hydraflow`); absolute. Instance
/// `<slug>` keeps its data in `<state dir>/<slug>/` ([`crate::config::loader::state_dir`]).
pub fn state_dir(config: &SupervisorConfig) -> PathBuf {
    let env: Vec<(String, String)> = std::env::vars().collect();
    crate::config::loader::state_dir(config, &env)
}

/// Why an action failed; the text is the `error` of the reply. The original's wording is kept
/// where the meaning is the same.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// The checkout path does not exist.
    #[error("Repo path not found: {0}")]
    PathNotFound(String),
    /// The checkout path is not a directory.
    #[error("Repo path is not a directory: {0}")]
    NotADirectory(String),
    /// No registration matches what the client named (a slug, `owner/name` or path).
    #[error("Repo not found: {0} is not registered (see hydraflow repo list)")]
    NotFound(String),
    /// `repo` is not `owner/name`.
    #[error(
        "repository \"{0}\" is not valid: expected owner/name with letters, digits, '.', '_' or '-'"
    )]
    BadRepo(String),
    /// No valid slug can be made from the path or repository.
    #[error("cannot make an instance name from {from}: {cause}; give repo_slug")]
    Slug {
        /// The path or repository.
        from: String,
        /// Why.
        cause: SlugError,
    },
    /// The path or repository is registered under another slug.
    #[error("{what} is already registered as \"{slug}\"")]
    Duplicate {
        /// The path or repository.
        what: String,
        /// Its slug.
        slug: String,
    },
    /// The registry could not be changed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The per-instance configuration file could not be written.
    #[error(
        "cannot write {path}: {cause}; set repos_dir in the configuration to a writable directory"
    )]
    InstanceFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        cause: std::io::Error,
    },
    /// The worker exited before it was ready (process backend).
    #[error(
        "Repo process exited with code {code}; see {log}{}",
        backend::output_suffix(output)
    )]
    Exited {
        /// The exit code.
        code: i32,
        /// The log file.
        log: String,
        /// The last lines the worker wrote (its error), when known.
        output: Vec<String>,
    },
    /// The slug is the name of one of the supervisor's own files in its state directory.
    #[error(
        "instance name \"{0}\" is reserved for the supervisor's own files: choose another slug (repo_slug)"
    )]
    ReservedSlug(String),
    /// The instance did not become active in time.
    #[error("Timed out waiting for repo {slug} to become active within {secs} s; see {log}")]
    Timeout {
        /// The slug.
        slug: String,
        /// Seconds waited.
        secs: u64,
        /// The log file or journal command.
        log: String,
    },
    /// Any other backend failure.
    #[error(transparent)]
    Backend(BackendError),
}

/// Fixed settings of a [`Supervisor`].
#[derive(Debug, Clone)]
pub struct Settings {
    /// State directory (registry, port file, process-backend instance homes).
    pub state_dir: PathBuf,
    /// Where per-instance files go: `<repos_dir>/<slug>.toml`.
    pub repos_dir: PathBuf,
    /// How long `add_repo` and `restart_repo` wait for an instance.
    pub start_timeout: Duration,
    /// Base URL of the supervisor's dashboard (`http://127.0.0.1:5555`): `dashboard_url` is
    /// `<dashboard_base>/repos/<slug>/`.
    pub dashboard_base: String,
    /// The port the dashboard listens on (the protocol's `port`); 0 when it does not listen.
    pub dashboard_port: u16,
}

impl Settings {
    /// Settings from the global configuration, for a dashboard listening on `dashboard`
    /// (`None`: not served).
    pub fn from_config(config: &Config, dashboard: Option<SocketAddr>) -> Settings {
        let repos_dir = std::path::absolute(&config.repos_dir).unwrap_or(config.repos_dir.clone());
        Settings {
            state_dir: state_dir(&config.supervisor),
            repos_dir,
            start_timeout: Duration::from_secs(config.supervisor.start_timeout),
            dashboard_base: match dashboard {
                Some(addr) => format!("http://{addr}"),
                None => format!("http://{}", config.dashboard.listen),
            },
            dashboard_port: dashboard.map_or(0, |a| a.port()),
        }
    }
}

/// The supervisor service: registry + backend, one function per protocol action.
pub struct Supervisor {
    registry: Registry,
    backend: Arc<dyn InstanceBackend>,
    settings: Settings,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Bumped after every change this supervisor makes (registry, start, stop, restart).
    changes: AtomicU64,
    /// The last `list_repos` reply line, valid while neither this supervisor's nor the
    /// backend's generation has moved.
    list_cache: Mutex<Option<ListCache>>,
}

/// A `list_repos` reply line and the (supervisor, backend) generations it was made at.
struct ListCache {
    key: (u64, u64),
    line: Arc<[u8]>,
}

/// A checked `owner/name` ([`crate::layout::RepoName`]).
fn check_repo(repo: &str) -> Result<(), SupervisorError> {
    crate::layout::RepoName::parse(repo)
        .map(|_| ())
        .map_err(|e| SupervisorError::BadRepo(e.0))
}

/// `~` and `~/x` expanded with `$HOME`.
fn expand_home(path: &str) -> PathBuf {
    match (path.strip_prefix('~'), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) if rest.is_empty() || rest.starts_with('/') => {
            PathBuf::from(format!("{}{rest}", home.to_string_lossy()))
        }
        _ => PathBuf::from(path),
    }
}

impl Supervisor {
    /// A supervisor over `registry` and `backend`.
    pub fn new(registry: Registry, backend: Arc<dyn InstanceBackend>, settings: Settings) -> Self {
        Supervisor {
            registry,
            backend,
            settings,
            locks: Mutex::new(HashMap::new()),
            changes: AtomicU64::new(0),
            list_cache: Mutex::new(None),
        }
    }

    /// Something this supervisor did may have changed what `list_repos` shows.
    fn changed(&self) {
        self.changes.fetch_add(1, Ordering::Release);
    }

    /// The registry of repositories (read by the dashboard).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The instance backend (read by the dashboard).
    pub fn backend(&self) -> &Arc<dyn InstanceBackend> {
        &self.backend
    }

    /// The fixed settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The per-slug operation lock: add, remove and restart of one slug run one at a time.
    async fn lock(&self, slug: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self
                .locks
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            locks.retain(|_, l| Arc::strong_count(l) > 1);
            locks.entry(slug.to_owned()).or_default().clone()
        };
        lock.lock_owned().await
    }

    fn log_file(&self, slug: &str) -> String {
        self.backend.log_location(slug)
    }

    fn dashboard_url(&self, slug: &str) -> String {
        format!("{}/repos/{slug}/", self.settings.dashboard_base)
    }

    /// Resolve what the client named into (path, repo, slug).
    fn resolve_target(
        &self,
        target: &RepoTarget,
        slug: Option<Slug>,
    ) -> Result<(String, Option<String>, Slug), SupervisorError> {
        let resolved = self.resolve_target_unchecked(target, slug)?;
        let name = resolved.2.as_str();
        if name == PORT_FILE || name.starts_with(registry::STATE_FILE) {
            return Err(SupervisorError::ReservedSlug(name.to_owned()));
        }
        Ok(resolved)
    }

    fn resolve_target_unchecked(
        &self,
        target: &RepoTarget,
        slug: Option<Slug>,
    ) -> Result<(String, Option<String>, Slug), SupervisorError> {
        match target {
            RepoTarget::Path(given) => {
                let path = std::fs::canonicalize(expand_home(given))
                    .map_err(|_| SupervisorError::PathNotFound(given.clone()))?;
                if !path.is_dir() {
                    return Err(SupervisorError::NotADirectory(given.clone()));
                }
                let slug = match slug {
                    Some(s) => s,
                    None => Slug::from_path(&path).map_err(|source| SupervisorError::Slug {
                        from: path.display().to_string(),
                        cause: source,
                    })?,
                };
                let path = path.to_string_lossy().into_owned();
                Ok((path, None, slug))
            }
            RepoTarget::Repo(repo) => {
                check_repo(repo)?;
                let slug = match slug {
                    Some(s) => s,
                    None => Slug::from_repo(repo).map_err(|source| SupervisorError::Slug {
                        from: repo.clone(),
                        cause: source,
                    })?,
                };
                Ok((String::new(), Some(repo.clone()), slug))
            }
        }
    }

    /// The slug a [`RepoRef`] names, when registered.
    fn resolve_ref(&self, r: &RepoRef) -> Result<RepoEntry, SupervisorError> {
        let found = match r {
            RepoRef::Slug(slug) => self.registry.get(slug.as_str()),
            RepoRef::Repo(repo) => self.registry.find(repo),
            RepoRef::Path(path) => {
                let canonical = std::fs::canonicalize(expand_home(path))
                    .map(|p| p.to_string_lossy().into_owned());
                canonical
                    .ok()
                    .and_then(|p| self.registry.find(&p))
                    .or_else(|| self.registry.find(path))
            }
        };
        found.ok_or_else(|| SupervisorError::NotFound(r.to_string()))
    }

    /// `<repos_dir>/<slug>.toml`.
    fn instance_file(&self, slug: &str) -> PathBuf {
        self.settings.repos_dir.join(format!("{slug}.toml"))
    }

    /// What the supervisor writes as `<repos_dir>/<slug>.toml` for a repository it is asked
    /// to add: the checkout (local forge) or the GitHub `owner/name`.
    fn instance_file_text(slug: &str, path: &str, repo: Option<&str>) -> String {
        let mut table = toml::Table::new();
        match repo {
            Some(repo) => {
                table.insert("repo".into(), repo.into());
                table.insert("forge".into(), "github".into());
            }
            None => {
                table.insert("repo_path".into(), path.into());
                table.insert("forge".into(), "local".into());
            }
        }
        format!(
            "# Written by the HydraFlow supervisor when {slug} was added; edit freely (an edited\n\
             # file is kept when the repository is removed, this one is removed with it).\n{}",
            toml::to_string(&table).unwrap_or_default()
        )
    }

    /// Write `<repos_dir>/<slug>.toml` unless it exists (an administrator's file is kept).
    /// True when this call wrote it. Blocking (fsync): call through [`off_thread`].
    fn ensure_instance_file(
        repos_dir: &Path,
        file: &Path,
        text: &str,
    ) -> Result<bool, SupervisorError> {
        if file.exists() {
            return Ok(false);
        }
        let err = |cause| SupervisorError::InstanceFile {
            path: file.to_path_buf(),
            cause,
        };
        std::fs::create_dir_all(repos_dir).map_err(err)?;
        crate::store::atomic::create_atomic(file, text.as_bytes()).map_err(err)
    }

    /// Remove what the supervisor wrote for `entry`: its instance file when it still reads as
    /// the supervisor wrote it (an administrator's file, or one edited since, is kept) and
    /// what the backend keeps of it ([`InstanceBackend::forget`]); the worker's own data
    /// (state, the local forge's issues) stay. On the blocking pool.
    async fn remove_written_files(&self, entry: RepoEntry) {
        let file = self.instance_file(&entry.slug);
        let ours = Self::instance_file_text(&entry.slug, &entry.path, entry.repo.as_deref());
        let backend = Arc::clone(&self.backend);
        off_thread(move || {
            match std::fs::read_to_string(&file) {
                Ok(text) if text == ours => {
                    if let Err(e) = std::fs::remove_file(&file) {
                        tracing::warn!(slug = %entry.slug, "cannot remove {}: {e}", file.display());
                    }
                }
                Ok(_) => {
                    tracing::info!(slug = %entry.slug, "kept {}: not the file the supervisor wrote", file.display())
                }
                Err(_) => {}
            }
            backend.forget(&entry.slug);
        })
        .await;
    }

    fn start_error(&self, slug: &Slug, err: BackendError) -> SupervisorError {
        match err {
            BackendError::StartFailed {
                ref job_result,
                ref service_result,
                ..
            } if job_result == "exited" => match service_result
                .strip_prefix("exit-code ")
                .and_then(|c| c.parse().ok())
            {
                Some(code) => SupervisorError::Exited {
                    code,
                    log: self.log_file(slug.as_str()),
                    output: match &err {
                        BackendError::StartFailed { output, .. } => output.clone(),
                        _ => Vec::new(),
                    },
                },
                None => SupervisorError::Backend(err),
            },
            BackendError::Timeout { after, .. } => SupervisorError::Timeout {
                slug: slug.to_string(),
                secs: after.as_secs(),
                log: self.log_file(slug.as_str()),
            },
            other => SupervisorError::Backend(other),
        }
    }

    /// Make the registry entry for a new registration.
    fn new_entry(&self, slug: &Slug, path: String, repo: Option<String>) -> RepoEntry {
        RepoEntry {
            path,
            slug: slug.to_string(),
            port: 0,
            dashboard_url: self.dashboard_url(slug.as_str()),
            log_file: self.log_file(slug.as_str()),
            repo,
            added_at: Some(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
            other: serde_json::Map::new(),
        }
    }

    /// Register, refusing a path or repository registered under another slug: (whether the
    /// registration is new, whether the instance file was written now).
    /// The instance file and the registry are written on the blocking pool.
    async fn register(
        &self,
        slug: &Slug,
        path: String,
        repo: Option<String>,
    ) -> Result<(bool, bool), SupervisorError> {
        let key = repo.clone().unwrap_or_else(|| path.clone());
        if let Some(other) = self.registry.find(&key).filter(|e| e.slug != slug.as_str()) {
            return Err(SupervisorError::Duplicate {
                what: key,
                slug: other.slug,
            });
        }
        let repos_dir = self.settings.repos_dir.clone();
        let file = self.instance_file(slug.as_str());
        let text = Self::instance_file_text(slug.as_str(), &path, repo.as_deref());
        let entry = self.new_entry(slug, path, repo);
        let registry = self.registry.clone();
        let registered = off_thread(move || {
            let wrote = Self::ensure_instance_file(&repos_dir, &file, &text)?;
            match registry.insert(entry) {
                Ok(inserted) => Ok((inserted, wrote)),
                Err(e) => {
                    if wrote {
                        let _ = std::fs::remove_file(&file);
                    }
                    Err(SupervisorError::from(e))
                }
            }
        })
        .await;
        self.changed();
        registered
    }

    /// Unregister `slug` (on the blocking pool: the registry's file is rewritten).
    async fn unregister(&self, slug: &str) -> Result<Option<RepoEntry>, RegistryError> {
        let registry = self.registry.clone();
        let slug = slug.to_owned();
        off_thread(move || registry.remove(&slug)).await
    }

    /// `register_repo`: record the repository without starting it.
    ///
    /// # Errors
    /// Path, slug, registry and instance-file errors.
    pub async fn register_repo(
        &self,
        target: RepoTarget,
        slug: Option<Slug>,
    ) -> Result<Registered, SupervisorError> {
        let (path, repo, slug) = self.resolve_target(&target, slug)?;
        let _guard = self.lock(slug.as_str()).await;
        self.register(&slug, path.clone(), repo.clone()).await?;
        Ok(Registered {
            slug: slug.to_string(),
            path,
            repo,
        })
    }

    /// `add_repo`: register the repository and start its instance; answers once it is active
    /// (READY=1) or has failed, within the start timeout. A new registration whose instance
    /// fails to start is taken back.
    ///
    /// # Errors
    /// As [`Supervisor::register_repo`], plus why the instance did not start.
    pub async fn add_repo(
        &self,
        target: RepoTarget,
        slug: Option<Slug>,
    ) -> Result<Added, SupervisorError> {
        let (path, repo, slug) = self.resolve_target(&target, slug)?;
        let _guard = self.lock(slug.as_str()).await;
        let (fresh, wrote) = self.register(&slug, path.clone(), repo.clone()).await?;
        let started = self.backend.start(&slug, self.settings.start_timeout).await;
        self.changed();
        match started {
            Ok(started) => Ok(Added {
                slug: slug.to_string(),
                port: self.settings.dashboard_port,
                dashboard_url: self.dashboard_url(slug.as_str()),
                log_file: self.log_file(slug.as_str()),
                started,
                path,
                repo,
            }),
            Err(err) => {
                if fresh {
                    if let Err(e) = self.unregister(slug.as_str()).await {
                        tracing::error!(slug = %slug, "cannot take back the registration: {e}");
                    }
                    // systemd would go on restarting a unit whose start failed
                    // (Restart=on-failure): an unregistered instance must not run.
                    if let Err(e) = self.backend.stop(&slug).await {
                        tracing::warn!(slug = %slug, "cannot stop the failed instance: {e}");
                    }
                    if wrote {
                        let file = self.instance_file(slug.as_str());
                        let removed = off_thread({
                            let file = file.clone();
                            move || std::fs::remove_file(file)
                        })
                        .await;
                        if let Err(e) = removed {
                            tracing::warn!(slug = %slug, "cannot remove {}: {e}", file.display());
                        }
                    }
                    self.changed();
                }
                Err(self.start_error(&slug, err))
            }
        }
    }

    /// `remove_repo`: unregister, then stop the instance.
    ///
    /// # Errors
    /// [`SupervisorError::NotFound`], registry and stop errors.
    pub async fn remove_repo(&self, r: RepoRef) -> Result<(), SupervisorError> {
        let entry = self.resolve_ref(&r)?;
        let _guard = self.lock(&entry.slug).await;
        let removed = self.unregister(&entry.slug).await;
        self.changed();
        let Some(entry) = removed? else {
            // Removed by a concurrent request while this one waited for the lock.
            return Err(SupervisorError::NotFound(format!("\"{}\"", entry.slug)));
        };
        let slug = Slug::new(&entry.slug).map_err(|source| SupervisorError::Slug {
            from: entry.slug.clone(),
            cause: source,
        })?;
        let stopped = self.backend.stop(&slug).await;
        self.changed();
        stopped.map_err(SupervisorError::Backend)?;
        self.remove_written_files(entry).await;
        Ok(())
    }

    /// `restart_repo`: restart a registered repository's instance and report its status.
    ///
    /// # Errors
    /// [`SupervisorError::NotFound`] and why the instance did not start.
    pub async fn restart_repo(&self, r: RepoRef) -> Result<RepoStatus, SupervisorError> {
        let entry = self.resolve_ref(&r)?;
        let _guard = self.lock(&entry.slug).await;
        let slug = self.entry_slug(&entry)?;
        let restarted = self
            .backend
            .restart(&slug, self.settings.start_timeout)
            .await;
        self.changed();
        restarted.map_err(|e| self.start_error(&slug, e))?;
        self.status_of(&entry, &slug).await
    }

    /// `repo_status`: a registered repository's instance state.
    ///
    /// # Errors
    /// [`SupervisorError::NotFound`] and backend errors.
    pub async fn repo_status(&self, r: RepoRef) -> Result<RepoStatus, SupervisorError> {
        let entry = self.resolve_ref(&r)?;
        let slug = self.entry_slug(&entry)?;
        self.status_of(&entry, &slug).await
    }

    fn entry_slug(&self, entry: &RepoEntry) -> Result<Slug, SupervisorError> {
        Slug::new(&entry.slug).map_err(|source| SupervisorError::Slug {
            from: entry.slug.clone(),
            cause: source,
        })
    }

    async fn status_of(
        &self,
        entry: &RepoEntry,
        slug: &Slug,
    ) -> Result<RepoStatus, SupervisorError> {
        let status = self
            .backend
            .status(slug)
            .await
            .map_err(SupervisorError::Backend)?;
        Ok(RepoStatus {
            info: self.info(entry, Some(&status)),
            unit: status.unit.clone(),
            main_pid: status.main_pid,
            memory_bytes: status.memory_bytes,
            result: status.result.clone(),
            backend: self.backend.name().to_owned(),
        })
    }

    fn info(&self, entry: &RepoEntry, status: Option<&InstanceStatus>) -> RepoInfo {
        RepoInfo {
            path: entry.path.clone(),
            slug: entry.slug.clone(),
            port: self.settings.dashboard_port,
            dashboard_url: self.dashboard_url(&entry.slug),
            log_file: self.log_file(&entry.slug),
            running: status.is_some_and(InstanceStatus::running),
            repo: entry.repo.clone(),
            active_state: status
                .map_or("inactive", |s| s.active_state.as_str())
                .to_owned(),
            sub_state: status.map_or("dead", |s| s.sub_state.as_str()).to_owned(),
            n_restarts: status.map_or(0, |s| s.n_restarts),
            active_since: status.and_then(|s| s.active_since.clone()),
        }
    }

    /// `list_repos`: every registration with `running` from the backend's `ActiveState`.
    ///
    /// The API socket of `slug`'s worker: `/run/hydraflow-dashboard/<slug>.sock` under systemd
    /// (`hydraflow@<slug>.socket`), `<state_dir>/<slug>/dashboard.sock` under the process backend.
    pub fn worker_socket(&self, slug: &str) -> PathBuf {
        self.backend.api_socket(slug)
    }

    /// `forge_status`: each registered repository's forge, identity and API budget, asked of
    /// its worker (all at once, [`crate::dashboard::supervisor::HEALTH_TIMEOUT`] each).
    pub async fn forge_status(&self) -> protocol::ForgeStatuses {
        let asks = self.registry.entries().into_iter().map(|e| async move {
            let socket = self.worker_socket(&e.slug);
            let mut status = protocol::ForgeStatus {
                slug: e.slug,
                forge: None,
                identity: None,
                remaining: None,
                limit: None,
                reset_at: None,
                error: None,
            };
            match crate::dashboard::supervisor::worker_forge(&socket).await {
                Ok(forge) => {
                    status.forge = Some(forge.name);
                    status.identity = forge.identity;
                    if let Some(b) = forge.budget {
                        (status.remaining, status.limit, status.reset_at) =
                            (Some(b.remaining), Some(b.limit), Some(b.reset_at));
                    }
                }
                Err(e) => status.error = Some(e),
            }
            status
        });
        protocol::ForgeStatuses {
            forges: futures_util::future::join_all(asks).await,
        }
    }

    /// # Errors
    /// Backend errors.
    pub async fn list_repos(&self) -> Result<RepoList, SupervisorError> {
        let statuses: HashMap<String, InstanceStatus> = self
            .backend
            .list()
            .await
            .map_err(SupervisorError::Backend)?
            .into_iter()
            .map(|s| (s.slug.clone(), s))
            .collect();
        let repos = self
            .registry
            .entries()
            .iter()
            .map(|e| self.info(e, statuses.get(&e.slug)))
            .collect();
        Ok(RepoList { repos })
    }

    /// The `list_repos` reply line (see [`Supervisor::list_repos`]), made once and served from
    /// a cache until this supervisor or the backend reports a change ([`InstanceBackend::generation`]);
    /// made afresh every time for a backend that cannot tell.
    ///
    /// # Errors
    /// Backend errors.
    pub async fn list_repos_line(&self) -> Result<Arc<[u8]>, SupervisorError> {
        // Read before listing: a change during the listing moves a generation past the key.
        let key = self
            .backend
            .generation()
            .map(|backend| (self.changes.load(Ordering::Acquire), backend));
        let cache = || {
            self.list_cache
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        if let Some(key) = key
            && let Some(hit) = cache().as_ref().filter(|c| c.key == key)
        {
            return Ok(hit.line.clone());
        }
        let line: Arc<[u8]> = Response::Ok(Reply::Repos(self.list_repos().await?))
            .to_line()
            .into();
        if let Some(key) = key {
            *cache() = Some(ListCache {
                key,
                line: line.clone(),
            });
        }
        Ok(line)
    }

    /// `version`: the program's version and backend; `connections` comes from the server.
    pub fn version(&self, connections: usize) -> Version {
        Version {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            backend: self.backend.name().to_owned(),
            connections,
        }
    }

    /// Start every registered repository (concurrently, each within the start timeout) and log
    /// instances that run without a registration; those are left running.
    pub async fn reconcile(self: Arc<Self>) {
        // A few at a time, so that starting hundreds of instances leaves the runtime free to
        // answer clients.
        let gate = Arc::new(tokio::sync::Semaphore::new(4));
        let mut starts = tokio::task::JoinSet::new();
        for entry in self.registry.entries() {
            let sup = self.clone();
            let gate = gate.clone();
            starts.spawn(async move {
                let _turn = gate.acquire_owned().await;
                let slug = sup.entry_slug(&entry)?;
                let _guard = sup.lock(slug.as_str()).await;
                if sup.registry.get(slug.as_str()).is_none() {
                    return Ok((slug, false));
                }
                let started = sup.backend.start(&slug, sup.settings.start_timeout).await;
                sup.changed();
                started
                    .map(|started| (slug.clone(), started))
                    .map_err(|e| sup.start_error(&slug, e))
            });
        }
        while let Some(done) = starts.join_next().await {
            match done {
                Ok(Ok((slug, true))) => tracing::info!(slug = %slug, "started registered repo"),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::error!("cannot start a registered repo: {e}"),
                Err(e) => tracing::error!("reconcile task failed: {e}"),
            }
        }
        match self.backend.list().await {
            Ok(list) => {
                for status in list {
                    if self.registry.get(&status.slug).is_none() && status.running() {
                        tracing::warn!(
                            slug = %status.slug,
                            unit = %status.unit,
                            "instance runs without a registration; left running \
                             (hydraflow repo add to adopt it, or stop the unit)"
                        );
                    }
                }
            }
            Err(e) => tracing::error!("cannot list instances: {e}"),
        }
    }
}

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The state directory could not be created.
    #[error("cannot create the state directory {path}: {cause}")]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        cause: std::io::Error,
    },
    /// The registry could not be read.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// No backend could be used.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The listen address could not be bound or the passed socket used.
    #[error("cannot listen on {addr}: {cause}")]
    Listen {
        /// The address or `LISTEN_FDS`.
        addr: String,
        /// The I/O error.
        cause: std::io::Error,
    },
    /// `[supervisor] authorization = "polkit"` and polkit cannot be used.
    #[error("[supervisor] authorization is \"polkit\" but {0}; or set authorization = \"groups\"")]
    Polkit(polkit::PolkitError),
    /// The port file could not be written.
    #[error("cannot write the port file {path}: {cause}")]
    PortFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        cause: std::io::Error,
    },
    /// The server failed.
    #[error("the control server failed: {0}")]
    Serve(std::io::Error),
}

/// What `hydraflow supervisor` needs.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    /// The global configuration.
    pub config: Config,
    /// The global configuration file (passed to workers as `HYDRAFLOW_CONFIG`, made absolute).
    pub config_file: PathBuf,
    /// Connection handling.
    pub server: server::ServerOptions,
}

/// The port file path: `$HF_SUPERVISOR_PORT_FILE`, else `<state_dir>/supervisor-port`.
pub fn port_file(state_dir: &Path) -> PathBuf {
    std::env::var_os(PORT_FILE_ENV)
        .filter(|v| !v.is_empty())
        .map_or_else(|| state_dir.join(PORT_FILE), PathBuf::from)
}

fn write_port_file(path: &Path, port: u16) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    // Readable by every local user (mode 0666 less the umask), as the original's was: their
    // clients find the port here.
    crate::store::atomic::write_atomic(path, port.to_string().as_bytes())
}

/// The default Unix control socket when not socket-activated: `<state dir>/control.sock`.
pub fn default_control_socket(state_dir: &Path) -> PathBuf {
    state_dir.join(CONTROL_SOCKET_NAME)
}

/// File name of the Unix control socket in the state directory (not socket-activated).
pub const CONTROL_SOCKET_NAME: &str = "control.sock";

/// The control socket of the packaged units (`hydraflow-supervisor.socket`).
pub const SYSTEM_CONTROL_SOCKET: &str = "/run/hydraflow/control.sock";

/// The sockets passed by systemd socket activation, sorted by kind: every Unix socket is the
/// control socket (the first one served), every other one TCP (the first one served).
fn passed_listeners(fds: Vec<OwnedFd>) -> Result<(Option<OwnedFd>, Option<OwnedFd>), DaemonError> {
    let mut tcp = None;
    let mut unix = None;
    for fd in fds {
        let as_unix = std::os::unix::net::UnixListener::from(fd);
        let is_unix = as_unix.local_addr().is_ok();
        let fd = OwnedFd::from(as_unix);
        let slot = if is_unix { &mut unix } else { &mut tcp };
        if slot.is_none() {
            *slot = Some(fd);
        } else {
            tracing::warn!(
                "socket activation passed more than one {} socket: only the first is served",
                if is_unix { "Unix" } else { "TCP" }
            );
        }
    }
    Ok((tcp, unix))
}

/// The listeners: the sockets passed by systemd socket activation, else `listen` (TCP, unless
/// empty) and `control` (the Unix control socket, unless `None`) bound here. Returns the TCP
/// listener's address and the control socket's path (to remove on exit) too.
async fn listeners(
    listen: &str,
    control: Option<&Path>,
    fds: Vec<OwnedFd>,
) -> Result<(server::Listeners, Option<PathBuf>), DaemonError> {
    let passed = |source| DaemonError::Listen {
        addr: "the socket passed in LISTEN_FDS".into(),
        cause: source,
    };
    if !fds.is_empty() {
        let (tcp, unix) = passed_listeners(fds)?;
        if tcp.is_some() && listen.is_empty() {
            return Err(DaemonError::Listen {
                addr: "the TCP socket passed in LISTEN_FDS".into(),
                cause: std::io::Error::other(
                    "[supervisor] listen is empty (TCP off) but hydraflow-supervisor.socket \
                     passes a TCP socket: drop its ListenStream=127.0.0.1:8765 (systemctl edit \
                     hydraflow-supervisor.socket), or set listen",
                ),
            });
        }
        let tcp = match tcp {
            Some(fd) => {
                let l = std::net::TcpListener::from(fd);
                l.set_nonblocking(true).map_err(passed)?;
                Some(TcpListener::from_std(l).map_err(passed)?)
            }
            None => None,
        };
        let unix = match unix {
            Some(fd) => {
                let l = std::os::unix::net::UnixListener::from(fd);
                l.set_nonblocking(true).map_err(passed)?;
                Some(tokio::net::UnixListener::from_std(l).map_err(passed)?)
            }
            None => None,
        };
        return Ok((server::Listeners { tcp, unix }, None));
    }
    let tcp = if listen.is_empty() {
        None
    } else {
        Some(
            TcpListener::bind(listen)
                .await
                .map_err(|source| DaemonError::Listen {
                    addr: listen.to_owned(),
                    cause: source,
                })?,
        )
    };
    let unix = match control {
        Some(path) => Some(
            bind_control_socket(path).map_err(|source| DaemonError::Listen {
                addr: path.display().to_string(),
                cause: source,
            })?,
        ),
        None => None,
    };
    let path = unix.as_ref().and(control).map(Path::to_path_buf);
    Ok((server::Listeners { tcp, unix }, path))
}

/// Bind the Unix control socket at `path`, mode 0666 (who may do what is decided per request by
/// the caller's credentials): bound under a temporary name, then renamed into place. A stale
/// socket is replaced; one that answers is another supervisor's, and an error.
fn bind_control_socket(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt as _;
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            "another supervisor listens there: stop it, or set [supervisor] control_socket",
        ));
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{CONTROL_SOCKET_NAME}.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener = tokio::net::UnixListener::bind(&tmp)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o666))?;
    std::fs::rename(&tmp, path)?;
    Ok(listener)
}

/// Who decides who may do what (`[supervisor] authorization`): polkit (`auto` on a host booted
/// with systemd where polkit answers for HydraFlow's actions), the UID and group rules, or
/// nobody (`off`).
///
/// # Errors
/// [`DaemonError::Polkit`] when `polkit` is asked for and cannot be used.
pub async fn select_access(
    config: &SupervisorConfig,
) -> Result<crate::access::Access, DaemonError> {
    use crate::access::Access;
    use crate::config::Authorization;
    let groups = || Access::groups(&config.admin_group, &config.read_group);
    let polkit = |p: polkit::Polkit| Access::new(Arc::new(p), Arc::default());
    let access = match config.authorization {
        Authorization::Off => {
            tracing::warn!(
                "[supervisor] authorization is \"off\": every local user may read and manage \
                 every repository"
            );
            Access::off()
        }
        Authorization::Groups => groups(),
        Authorization::Polkit => polkit(
            polkit::Polkit::connect(None)
                .await
                .map_err(DaemonError::Polkit)?,
        ),
        Authorization::Auto if crate::systemd::booted() => {
            match polkit::Polkit::connect(None).await {
                Ok(p) => polkit(p),
                Err(e) => {
                    tracing::info!("polkit is not used ({e}): the UID and group rules decide");
                    groups()
                }
            }
        }
        Authorization::Auto => groups(),
    };
    tracing::info!(
        authority = access.name(),
        admin_group = %config.admin_group,
        read_group = %config.read_group,
        "access control"
    );
    Ok(access)
}

/// Bind the dashboard's listener (`dashboard.listen`); a dashboard that cannot listen is
/// logged and left out (the control protocol still runs).
async fn bind_dashboard(config: &Config) -> Option<TcpListener> {
    let d = &config.dashboard;
    match crate::dashboard::bind_tcp(&d.listen, d.token.as_deref()).await {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::error!("the dashboard is not served: {e}");
            None
        }
    }
}

/// Run `job` on tokio's blocking pool and wait for it: durable writes (fsync) go there, so
/// the supervisor's one runtime thread goes on serving while the disk is slow. A panic in
/// `job` goes on in the caller.
async fn off_thread<T: Send + 'static>(job: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(job).await {
        Ok(value) => value,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// Serve the dashboard on `listener` until `stop`, letting in whom `access` (or the token)
/// lets in, with the webhook route beside it (outside that guard: a delivery's signature
/// authenticates it) unless it has a listener of its own.
fn start_dashboard(
    config: &Config,
    listener: TcpListener,
    supervisor: &Arc<Supervisor>,
    webhook: Option<crate::dashboard::webhook::Route>,
    access: Arc<crate::access::Access>,
    stop: &tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tracing::info!(url = %supervisor.settings.dashboard_base, "dashboard listening");
    let directory: Arc<dyn crate::dashboard::supervisor::RepoDirectory> = supervisor.clone();
    let guard = crate::dashboard::auth::Guard {
        token: config.dashboard.token.as_deref().map(Arc::from),
        access,
    };
    let stop = stop.clone();
    tokio::spawn(async move {
        let shutdown = async move { stop.cancelled().await };
        if let Err(e) =
            crate::dashboard::supervisor::serve_with(listener, directory, guard, webhook, shutdown)
                .await
        {
            tracing::error!("the dashboard stopped: {e}");
        }
    })
}

/// Run the supervisor until `shutdown` resolves: load the registry, choose the backend and who
/// decides access, listen (on the sockets passed by socket activation, else on `listen` and the
/// control socket), write the port file, send READY=1, start the registered repositories,
/// serve; on shutdown remove the port file and the control socket it bound, and stop child
/// instances.
///
/// # Errors
/// [`DaemonError`] saying which step failed.
pub async fn run_daemon(
    opts: DaemonOptions,
    listen_fds: Vec<OwnedFd>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DaemonError> {
    let dashboard_listener = bind_dashboard(&opts.config).await;
    let dashboard_addr = dashboard_listener
        .as_ref()
        .and_then(|l| l.local_addr().ok());
    let settings = Settings::from_config(&opts.config, dashboard_addr);
    std::fs::create_dir_all(&settings.state_dir).map_err(|source| DaemonError::StateDir {
        path: settings.state_dir.clone(),
        cause: source,
    })?;
    let loaded = Registry::load(&settings.state_dir)?;
    if let Some((aside, why)) = &loaded.set_aside {
        tracing::error!(
            "the registry {} was unreadable ({why}); it was moved to {} and the supervisor \
             starts with no repositories: repair it and move it back, then restart",
            loaded.registry.path().display(),
            aside.display()
        );
    }
    let worker_command = match &opts.config.supervisor.worker_command {
        Some(cmd) => cmd.clone(),
        None => vec![
            std::env::current_exe()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|_| "hydraflow".into()),
            "worker".into(),
        ],
    };
    // Workers run in their own directories: a relative `--config sup.toml` must reach them
    // as the file the supervisor read.
    let config_file =
        std::path::absolute(&opts.config_file).unwrap_or_else(|_| opts.config_file.clone());
    let process =
        process::ProcessOptions::new(settings.state_dir.clone(), worker_command, config_file);
    let backend = backend::select(opts.config.supervisor.backend, process).await?;
    tracing::info!(backend = backend.name(), "instance backend chosen");
    let access = Arc::new(select_access(&opts.config.supervisor).await?);
    let control = match &opts.config.supervisor.control_socket {
        Some(path) if path.as_os_str().is_empty() => None,
        Some(path) => Some(path.clone()),
        None => Some(default_control_socket(&settings.state_dir)),
    };
    let (listeners, control_path) = listeners(
        &opts.config.supervisor.listen,
        control.as_deref(),
        listen_fds,
    )
    .await?;
    let mut serving = Vec::new();
    let port_path = port_file(&settings.state_dir);
    let mut port_written = false;
    if let Some(tcp) = &listeners.tcp {
        let addr: SocketAddr = tcp.local_addr().map_err(DaemonError::Serve)?;
        write_port_file(&port_path, addr.port()).map_err(|source| DaemonError::PortFile {
            path: port_path.clone(),
            cause: source,
        })?;
        port_written = true;
        tracing::info!(%addr, port_file = %port_path.display(), "listening");
        serving.push(addr.to_string());
    }
    if let Some(unix) = &listeners.unix {
        // Bound here under a temporary name and renamed, or passed by systemd.
        let path = control_path
            .clone()
            .or_else(|| {
                unix.local_addr()
                    .ok()
                    .and_then(|a| a.as_pathname().map(Path::to_path_buf))
            })
            .map_or_else(|| "a Unix socket".into(), |p| p.display().to_string());
        tracing::info!(socket = %path, "listening");
        serving.push(path);
    }
    let supervisor = Arc::new(Supervisor::new(loaded.registry, backend, settings));
    // A no-op off systemd.
    crate::systemd::notify_ready(&format!("listening on {}", serving.join(" and ")));
    let reconcile = tokio::spawn(supervisor.clone().reconcile());
    let dashboard_stop = tokio_util::sync::CancellationToken::new();
    let targets: Arc<dyn crate::dashboard::webhook::Targets> = supervisor.clone();
    let webhooks =
        crate::dashboard::webhook::start(&opts.config.webhook, targets, &dashboard_stop).await;
    let webhook_tasks = webhooks.tasks;
    let dashboard = dashboard_listener.map(|listener| {
        start_dashboard(
            &opts.config,
            listener,
            &supervisor,
            webhooks.route,
            access.clone(),
            &dashboard_stop,
        )
    });
    let served = server::serve(listeners, supervisor.clone(), access, opts.server, shutdown).await;
    dashboard_stop.cancel();
    // They hold the supervisor: they must end before the backend is dropped below.
    for task in dashboard.into_iter().chain(webhook_tasks) {
        let _ = task.await;
    }
    crate::systemd::notify_stopping();
    reconcile.abort();
    let _ = reconcile.await;
    if port_written && let Err(e) = std::fs::remove_file(&port_path) {
        tracing::warn!("cannot remove {}: {e}", port_path.display());
    }
    if let Some(path) = control_path
        && let Err(e) = std::fs::remove_file(&path)
    {
        tracing::warn!("cannot remove {}: {e}", path.display());
    }
    // Dropping the last reference to the backend stops child instances (process backend).
    drop(supervisor);
    tracing::info!("supervisor stopped");
    served.map_err(DaemonError::Serve)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_names() {
        for ok in ["o/n", "Org-1/repo.name_2"] {
            assert!(check_repo(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "o", "o/", "/n", "o/n/x", "../n", "o/.git", "o n/x", "ö/n",
        ] {
            assert!(check_repo(bad).is_err(), "{bad}");
        }
    }
}
