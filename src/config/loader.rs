//! Loading the configuration in layers with provenance: built-in defaults,
//! the global file, the instance file, then `HYDRAFLOW_<KEY>` environment
//! variables (docs/design/configuration.md). Every file is parsed strictly on its own first, so an
//! unknown key or a wrong type is reported with the file, line and key.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use toml::{Table, Value};

use super::Config;
use crate::layout::{Layout, Slug, SlugError};

/// Where a value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The built-in default.
    Default,
    /// A configuration file.
    File(PathBuf),
    /// An environment variable.
    Env(String),
    /// A command-line option.
    CommandLine(String),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Default => f.write_str("default"),
            Source::File(p) => write!(f, "{}", p.display()),
            Source::Env(v) => write!(f, "environment {v}"),
            Source::CommandLine(o) => write!(f, "command line {o}"),
        }
    }
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A file is not valid TOML or does not fit the schema (toml's message names line, column and key).
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// toml's message, with line and key.
        message: String,
    },
    /// An environment override has a value of the wrong type.
    #[error("environment variable {var}={value:?} is not valid for {key}: {message}")]
    Env {
        /// The variable.
        var: String,
        /// Its value.
        value: String,
        /// The key it sets.
        key: String,
        /// What was expected.
        message: String,
    },
    /// The merged configuration is inconsistent.
    #[error("{0}")]
    Semantic(String),
    /// The slug is not valid.
    #[error(transparent)]
    Slug(#[from] SlugError),
}

/// The effective configuration of one repository and where it lives.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The merged configuration.
    pub config: Config,
    /// Source of each dotted key that was set (absent = default).
    pub sources: BTreeMap<String, Source>,
    /// Files that were read, in order.
    pub files: Vec<PathBuf>,
    /// The checkout.
    pub repo_path: PathBuf,
    /// Paths of this repository's data.
    pub layout: Layout,
}

/// The layers to merge; later layers win.
#[derive(Debug, Default)]
pub struct LoadRequest<'a> {
    /// The global file; a missing file is fine only when `global_optional`.
    pub global_file: Option<&'a Path>,
    /// Whether a missing global file is fine.
    pub global_optional: bool,
    /// The instance slug whose `<repos_dir>/<slug>.toml` must be read.
    pub instance: Option<&'a Slug>,
    /// Values from the command line, as dotted key → TOML value, with the option name.
    pub overrides: Vec<(String, Value, String)>,
    /// Environment variables (name, value); pass `std::env::vars()`.
    pub env: Vec<(String, String)>,
}

/// Environment variables that are not configuration keys.
const NON_KEY_ENV: &[&str] = &[
    "HYDRAFLOW_HOME",
    "HYDRAFLOW_CONFIG",
    "HYDRAFLOW_GH_TOKEN",
    "HYDRAFLOW_LOG",
    "HYDRAFLOW_STAGE",
    "HYDRAFLOW_ISSUE",
];

/// The merged configuration, the source of each key set, and the files read.
pub type Loaded = (Config, BTreeMap<String, Source>, Vec<PathBuf>);

/// Load and merge the layers, then check the result.
///
/// # Errors
/// [`ConfigError`] naming the file, line and key, or the variable.
pub fn load(req: &LoadRequest<'_>) -> Result<Loaded, ConfigError> {
    let mut merged = to_table(&Config::default());
    let mut sources = BTreeMap::new();
    let mut files = Vec::new();

    if let Some(path) = req.global_file {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let table = parse_file(path, &text)?;
                merge_layer(
                    &mut merged,
                    &table,
                    &Source::File(path.to_owned()),
                    &mut sources,
                    "",
                );
                files.push(path.to_owned());
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && req.global_optional => {}
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_owned(),
                    source,
                });
            }
        }
    }

    if let Some(slug) = req.instance {
        let so_far: Config = Value::Table(merged.clone())
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Semantic(e.to_string()))?;
        let path = so_far.repos_dir.join(format!("{slug}.toml"));
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        let table = parse_file(&path, &text)?;
        merge_layer(
            &mut merged,
            &table,
            &Source::File(path.clone()),
            &mut sources,
            "",
        );
        files.push(path);
    }

    let defaults = to_table(&Config::default());
    let keys = env_keys(&defaults);
    for (var, value) in &req.env {
        if !var.starts_with("HYDRAFLOW_") || NON_KEY_ENV.contains(&var.as_str()) {
            continue;
        }
        let Some(key) = keys.get(var.as_str()) else {
            tracing::warn!(variable = %var, "ignoring environment variable: it names no configuration key");
            continue;
        };
        let parsed = env_value(&defaults, key, value).map_err(|message| ConfigError::Env {
            var: var.clone(),
            value: value.clone(),
            key: key.clone(),
            message,
        })?;
        set_dotted(&mut merged, key, parsed);
        sources.insert(key.clone(), Source::Env(var.clone()));
    }

    for (key, value, option) in &req.overrides {
        set_dotted(&mut merged, key, value.clone());
        sources.insert(key.clone(), Source::CommandLine(option.clone()));
    }

    let config: Config = Value::Table(merged)
        .try_into()
        .map_err(|e: toml::de::Error| ConfigError::Semantic(e.to_string()))?;
    check(&config)?;
    Ok((config, sources, files))
}

/// Check values that the types alone do not constrain.
///
/// # Errors
/// [`ConfigError::Semantic`] naming the key and the allowed range.
pub fn check(config: &Config) -> Result<(), ConfigError> {
    let limits = [
        ("limits.max_triagers", config.limits.max_triagers),
        ("limits.max_planners", config.limits.max_planners),
        ("limits.max_workers", config.limits.max_workers),
        ("limits.max_reviewers", config.limits.max_reviewers),
        ("limits.max_hitl_workers", config.limits.max_hitl_workers),
    ];
    for (key, value) in limits {
        if !(1..=10).contains(&value) {
            return Err(ConfigError::Semantic(format!(
                "{key} = {value} is out of range: use 1 to 10"
            )));
        }
    }
    for (key, value) in [
        ("poll_interval", config.poll_interval),
        ("data_poll_interval", config.data_poll_interval),
        ("agent_timeout", config.agent_timeout),
        ("ci_poll_interval", config.ci_poll_interval),
    ] {
        if value == 0 {
            return Err(ConfigError::Semantic(format!(
                "{key} = 0 is not allowed: use a number of seconds of at least 1"
            )));
        }
    }
    if config.max_issue_attempts == 0 {
        return Err(ConfigError::Semantic(
            "max_issue_attempts = 0 is not allowed: use at least 1".into(),
        ));
    }
    if config.forge == super::ForgeKind::Github {
        match &config.repo {
            Some(r) if valid_owner_name(r) => {}
            Some(r) => {
                return Err(ConfigError::Semantic(format!(
                    "repo = {r:?} is not valid: use \"owner/name\""
                )));
            }
            None => {
                return Err(ConfigError::Semantic(
                    "forge = \"github\" needs repo = \"owner/name\"".into(),
                ));
            }
        }
    }
    if let Some(slug) = &config.slug {
        Slug::new(slug)?;
    }
    Ok(())
}

/// Whether `s` looks like a GitHub `owner/name`.
pub fn valid_owner_name(s: &str) -> bool {
    let mut parts = s.split('/');
    let ok = |p: Option<&str>| {
        p.is_some_and(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        })
    };
    ok(parts.next()) && ok(parts.next()) && parts.next().is_none()
}

fn to_table(config: &Config) -> Table {
    match Value::try_from(config) {
        Ok(Value::Table(t)) => t,
        _ => Table::new(),
    }
}

fn parse_file(path: &Path, text: &str) -> Result<Table, ConfigError> {
    // Strict parse against the schema first, for messages with line and key.
    toml::from_str::<Config>(text).map_err(|e| ConfigError::Invalid {
        path: path.to_owned(),
        message: e.to_string().trim_end().to_owned(),
    })?;
    toml::from_str::<Table>(text).map_err(|e| ConfigError::Invalid {
        path: path.to_owned(),
        message: e.to_string().trim_end().to_owned(),
    })
}

/// Merge `layer` into `base`: tables merge key by key, anything else replaces.
fn merge_layer(
    base: &mut Table,
    layer: &Table,
    source: &Source,
    sources: &mut BTreeMap<String, Source>,
    prefix: &str,
) {
    for (key, value) in layer {
        let dotted = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match (base.get_mut(key), value) {
            (Some(Value::Table(b)), Value::Table(l)) => {
                merge_layer(b, l, source, sources, &dotted);
            }
            _ => {
                if let Value::Table(l) = value {
                    // A table where the defaults have none (e.g. agent.env): record its leaves.
                    for k in l.keys() {
                        sources.insert(format!("{dotted}.{k}"), source.clone());
                    }
                } else {
                    sources.insert(dotted, source.clone());
                }
                base.insert(key.clone(), value.clone());
            }
        }
    }
}

/// Map `HYDRAFLOW_<KEY>` names to dotted keys for every leaf of the schema
/// (`limits.max_workers` → `HYDRAFLOW_LIMITS_MAX_WORKERS`), plus the
/// optional top-level keys absent from the serialized defaults.
pub fn env_keys(defaults: &Table) -> BTreeMap<String, String> {
    fn walk(t: &Table, prefix: &str, out: &mut BTreeMap<String, String>) {
        for (k, v) in t {
            let dotted = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match v {
                Value::Table(inner) if !inner.is_empty() => walk(inner, &dotted, out),
                _ => {
                    out.insert(env_name(&dotted), dotted);
                }
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(defaults, "", &mut out);
    for optional in OPTIONAL_KEYS {
        out.insert(env_name(optional), (*optional).to_owned());
    }
    out
}

/// Keys whose default is unset (so absent from the serialized defaults).
const OPTIONAL_KEYS: &[&str] = &[
    "repo",
    "repo_path",
    "slug",
    "worktree_base",
    "quality_command",
    "agent.output",
    "agent.prompts_dir",
    "agent.memory_max",
    "agent.tasks_max",
    "agent.daily_budget_usd",
    "agent.triage.model",
    "agent.plan.model",
    "agent.implement.model",
    "agent.review.model",
    "agent.hitl.model",
];

/// Optional keys whose value is a number: an environment value for them is
/// parsed as TOML (an integer or a float), not taken as a string.
const OPTIONAL_NUMBERS: &[(&str, &str)] = &[
    ("agent.memory_max", "1"),
    ("agent.tasks_max", "1"),
    ("agent.daily_budget_usd", "1.0"),
];

/// `limits.max_workers` → `HYDRAFLOW_LIMITS_MAX_WORKERS`.
pub fn env_name(dotted: &str) -> String {
    format!(
        "HYDRAFLOW_{}",
        dotted.replace(['.', '-'], "_").to_ascii_uppercase()
    )
}

fn lookup<'t>(t: &'t Table, dotted: &str) -> Option<&'t Value> {
    let mut parts = dotted.split('.');
    let mut cur = t.get(parts.next()?)?;
    for p in parts {
        cur = cur.as_table()?.get(p)?;
    }
    Some(cur)
}

fn set_dotted(t: &mut Table, dotted: &str, value: Value) {
    let parts: Vec<&str> = dotted.split('.').collect();
    let mut cur = t;
    for p in &parts[..parts.len() - 1] {
        let entry = cur
            .entry((*p).to_owned())
            .or_insert_with(|| Value::Table(Table::new()));
        if !entry.is_table() {
            *entry = Value::Table(Table::new());
        }
        let Value::Table(next) = entry else { return };
        cur = next;
    }
    cur.insert(parts[parts.len() - 1].to_owned(), value);
}

/// Parse an environment value for `key`: strings are taken as they are,
/// anything else is parsed as a TOML value of the default's type.
fn env_value(defaults: &Table, key: &str, raw: &str) -> Result<Value, String> {
    let number = OPTIONAL_NUMBERS
        .iter()
        .find(|(k, _)| *k == key)
        .and_then(|(_, sample)| toml::from_str::<Table>(&format!("v = {sample}")).ok())
        .and_then(|t| t.get("v").cloned());
    let default = lookup(defaults, key).or(number.as_ref());
    match default {
        None | Some(Value::String(_)) => Ok(Value::String(raw.to_owned())),
        Some(expected) => {
            let parsed: Table =
                toml::from_str(&format!("v = {raw}")).map_err(|_| expected_type(expected))?;
            let v = parsed
                .get("v")
                .cloned()
                .ok_or_else(|| expected_type(expected))?;
            if std::mem::discriminant(&v) == std::mem::discriminant(expected) {
                Ok(v)
            } else {
                Err(expected_type(expected))
            }
        }
    }
}

fn expected_type(v: &Value) -> String {
    match v {
        Value::Integer(_) => "expected an integer".into(),
        Value::Boolean(_) => "expected true or false".into(),
        Value::Float(_) => "expected a number".into(),
        Value::Array(_) => "expected a TOML array such as [\"a\", \"b\"]".into(),
        Value::Table(_) => "expected a TOML inline table".into(),
        _ => "expected a string".into(),
    }
}

/// Every leaf of `config` as (dotted key, value rendered as TOML), for `config show`.
pub fn leaves(config: &Config) -> Vec<(String, String)> {
    fn walk(t: &Table, prefix: &str, out: &mut Vec<(String, String)>) {
        for (k, v) in t {
            let dotted = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match v {
                Value::Table(inner) if !inner.is_empty() => walk(inner, &dotted, out),
                other => out.push((dotted, other.to_string())),
            }
        }
    }
    let mut out = Vec::new();
    walk(&to_table(config), "", &mut out);
    for key in OPTIONAL_KEYS {
        if !out.iter().any(|(k, _)| k == key) {
            out.push(((*key).to_owned(), "(unset)".to_owned()));
        }
    }
    out.sort();
    out
}

/// Which repository to resolve, from the command line.
#[derive(Debug, Clone, Default)]
pub struct Target {
    /// A configured instance slug.
    pub instance: Option<Slug>,
    /// A checkout path, or `owner/name`.
    pub repo: Option<String>,
}

/// Resolve the configuration, slug, checkout and data layout of `target`.
///
/// The global file is optional only when it is the default path. The slug is
/// the instance name, else `slug` from the configuration, else the GitHub
/// `owner/name` with `/` → `-`, else the checkout's directory name. The data
/// root is `$HYDRAFLOW_HOME`, else `<checkout>/.hydraflow` (docs/design/data-layout.md).
///
/// # Errors
/// [`ConfigError`] for invalid files, slugs or paths.
pub fn resolve(
    global_file: &Path,
    target: &Target,
    mut overrides: Vec<(String, Value, String)>,
    env: Vec<(String, String)>,
    cwd: &Path,
) -> Result<Resolved, ConfigError> {
    let mut path_arg = None;
    if let Some(repo) = &target.repo {
        let candidate = cwd.join(repo);
        if candidate.exists() {
            path_arg = Some(candidate);
        } else if valid_owner_name(repo) {
            overrides.push(("repo".into(), Value::String(repo.clone()), "--repo".into()));
        } else {
            return Err(ConfigError::Semantic(format!(
                "repository path {} does not exist (and {repo:?} is not an owner/name)",
                candidate.display()
            )));
        }
    }
    let home = env
        .iter()
        .find(|(k, _)| k == super::HOME_ENV)
        .map(|(_, v)| PathBuf::from(v))
        .filter(|p| !p.as_os_str().is_empty());
    let req = LoadRequest {
        global_file: Some(global_file),
        global_optional: global_file == Path::new(super::DEFAULT_CONFIG_FILE),
        instance: target.instance.as_ref(),
        overrides,
        env,
    };
    let (config, sources, files) = load(&req)?;

    let slug = match (&target.instance, &config.slug, &config.repo) {
        (Some(s), _, _) => s.clone(),
        (None, Some(s), _) => Slug::new(s)?,
        (None, None, Some(r)) if path_arg.is_none() => Slug::from_repo(r)?,
        _ => {
            let p = config
                .repo_path
                .clone()
                .or_else(|| path_arg.clone())
                .unwrap_or_else(|| cwd.to_owned());
            let p = std::fs::canonicalize(&p).unwrap_or(p);
            Slug::from_path(&p)?
        }
    };

    // Where `run --repo owner/name` keeps both the clone and the data.
    let mut clone_root = None;
    let repo_path = match (&config.repo_path, &path_arg) {
        (Some(p), _) => cwd.join(p),
        (None, Some(p)) => p.clone(),
        (None, None) if target.instance.is_some() && config.forge == super::ForgeKind::Local => {
            return Err(ConfigError::Semantic(format!(
                "instance {slug} has no repo_path: set repo_path = \"/path/to/checkout\" in {}",
                files
                    .last()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            )));
        }
        (None, None) if config.forge == super::ForgeKind::Github && target.repo.is_some() => {
            // `run --repo owner/name`: the checkout is cloned into the data root.
            let root = home.clone().unwrap_or_else(|| cwd.join(".hydraflow"));
            let checkout = root.join(slug.as_str()).join("checkout");
            clone_root = Some(root);
            checkout
        }
        (None, None) => cwd.to_owned(),
    };
    let repo_path = std::fs::canonicalize(&repo_path).unwrap_or(repo_path);
    let data_root = home
        .or(clone_root)
        .unwrap_or_else(|| repo_path.join(".hydraflow"));
    let worktree_base = match &config.worktree_base {
        Some(p) => cwd.join(p),
        None => repo_path
            .parent()
            .unwrap_or(&repo_path)
            .join("hydraflow-worktrees"),
    };
    Ok(Resolved {
        layout: Layout {
            slug,
            data_root,
            worktree_base,
        },
        config,
        sources,
        files,
        repo_path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
        p
    }

    fn load_with(
        global: &str,
        instance: Option<&str>,
        env: &[(&str, &str)],
    ) -> Result<(Config, BTreeMap<String, Source>), ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let repos = dir.path().join("repos");
        let global = format!("repos_dir = {:?}\n{global}", repos.display().to_string());
        let g = write(dir.path(), "hydraflow.toml", &global);
        let slug = Slug::new("org-repo").unwrap();
        if let Some(text) = instance {
            write(&repos, "org-repo.toml", text);
        }
        let req = LoadRequest {
            global_file: Some(&g),
            global_optional: false,
            instance: instance.map(|_| &slug),
            overrides: vec![],
            env: env
                .iter()
                .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
                .collect(),
        };
        load(&req).map(|(c, s, _)| (c, s))
    }

    #[test]
    fn defaults_match_the_spec() {
        let c = Config::default();
        assert_eq!(c.poll_interval, 30);
        assert_eq!(c.data_poll_interval, 300);
        assert_eq!(c.agent_timeout, 3600);
        assert_eq!(c.max_issue_attempts, 3);
        assert_eq!(c.ci_check_timeout, 600);
        assert_eq!(c.ci_poll_interval, 30);
        assert_eq!(c.main_branch, "main");
        assert_eq!(c.dashboard.listen, "127.0.0.1:5555");
        assert_eq!(c.supervisor.listen, "127.0.0.1:8765");
        // Models per stage are the claude preset's defaults (agent::runner), not configuration.
        assert_eq!(c.agent.implement.model, None);
        assert_eq!(c.agent.daily_budget_usd, None);
    }

    #[test]
    fn precedence_global_then_instance_then_env() {
        let (c, s) = load_with(
            "poll_interval = 10\nmain_branch = \"trunk\"\n[limits]\nmax_workers = 2\n",
            Some("poll_interval = 20\n"),
            &[("HYDRAFLOW_LIMITS_MAX_WORKERS", "4")],
        )
        .unwrap();
        assert_eq!(c.poll_interval, 20);
        assert_eq!(c.main_branch, "trunk");
        assert_eq!(c.limits.max_workers, 4);
        assert!(
            matches!(s.get("poll_interval"), Some(Source::File(p)) if p.ends_with("org-repo.toml"))
        );
        assert!(
            matches!(s.get("main_branch"), Some(Source::File(p)) if p.ends_with("hydraflow.toml"))
        );
        assert_eq!(
            s.get("limits.max_workers"),
            Some(&Source::Env("HYDRAFLOW_LIMITS_MAX_WORKERS".into()))
        );
        assert_eq!(s.get("agent_timeout"), None);
    }

    fn error_of(global: &str, instance: Option<&str>, env: &[(&str, &str)]) -> String {
        load_with(global, instance, env).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_file_line_and_key() {
        // `load_with` puts a `repos_dir` line first: global-file lines are one lower.
        let e = error_of("\n\npoll_intervall = 3\n", None, &[]);
        assert!(e.contains("hydraflow.toml"), "{e}");
        assert!(e.contains("line 4"), "{e}");
        assert!(e.contains("poll_intervall"), "{e}");

        let e = error_of("", Some("[limits]\nmax_workers = \"two\"\n"), &[]);
        assert!(e.contains("org-repo.toml"), "{e}");
        assert!(e.contains("line 2"), "{e}");
        assert!(e.contains("max_workers"), "{e}");

        let e = error_of("[agent]\nbogus = 1\n", None, &[]);
        assert!(e.contains("bogus") && e.contains("line 3"), "{e}");

        let e = error_of("poll_interval = [\n", None, &[]);
        assert!(e.contains("hydraflow.toml"), "{e}");
    }

    #[test]
    fn env_errors_name_the_variable() {
        let e = error_of("", None, &[("HYDRAFLOW_POLL_INTERVAL", "soon")]);
        assert_eq!(
            e,
            "environment variable HYDRAFLOW_POLL_INTERVAL=\"soon\" is not valid for poll_interval: expected an integer"
        );
        let e = error_of("", None, &[("HYDRAFLOW_COLLABORATORS_ONLY", "1")]);
        assert!(e.contains("expected true or false"), "{e}");
    }

    #[test]
    fn env_strings_and_arrays() {
        let (c, _) = load_with(
            "",
            None,
            &[
                ("HYDRAFLOW_MAIN_BRANCH", "develop"),
                ("HYDRAFLOW_AGENT_COMMAND", "[\"/bin/agent\", \"{prompt}\"]"),
                ("HYDRAFLOW_REPO_PATH", "/srv/x"),
                ("HYDRAFLOW_SOMETHING_ELSE", "ignored"),
                ("HYDRAFLOW_HOME", "/var/lib/x"),
            ],
        )
        .unwrap();
        assert_eq!(c.main_branch, "develop");
        assert_eq!(c.agent.command, vec!["/bin/agent", "{prompt}"]);
        assert_eq!(c.repo_path.as_deref(), Some(Path::new("/srv/x")));
    }

    #[test]
    fn semantic_checks() {
        let e = error_of("[limits]\nmax_workers = 11\n", None, &[]);
        assert_eq!(e, "limits.max_workers = 11 is out of range: use 1 to 10");
        let e = error_of("forge = \"github\"\n", None, &[]);
        assert_eq!(e, "forge = \"github\" needs repo = \"owner/name\"");
        let e = error_of("forge = \"github\"\nrepo = \"nope\"\n", None, &[]);
        assert!(e.contains("use \"owner/name\""), "{e}");
        let e = error_of("forge = \"gitlab\"\n", None, &[]);
        assert!(e.contains("gitlab"), "{e}");
    }

    #[test]
    fn missing_instance_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let g = write(
            dir.path(),
            "g.toml",
            &format!(
                "repos_dir = {:?}\n",
                dir.path().join("repos").display().to_string()
            ),
        );
        let slug = Slug::new("absent").unwrap();
        let req = LoadRequest {
            global_file: Some(&g),
            instance: Some(&slug),
            ..LoadRequest::default()
        };
        let e = load(&req).unwrap_err().to_string();
        assert!(e.contains("repos/absent.toml"), "{e}");
    }

    #[test]
    fn env_names_are_unique() {
        let keys = env_keys(&to_table(&Config::default()));
        let values: std::collections::BTreeSet<_> = keys.values().collect();
        assert_eq!(keys.len(), values.len());
        assert_eq!(
            keys.get("HYDRAFLOW_LIMITS_MAX_WORKERS").map(String::as_str),
            Some("limits.max_workers")
        );
    }

    #[test]
    fn owner_name_shapes() {
        for (s, ok) in [
            ("a/b", true),
            ("org/repo.rs", true),
            ("a", false),
            ("a/b/c", false),
            ("/b", false),
            ("a/.b", false),
        ] {
            assert_eq!(valid_owner_name(s), ok, "{s}");
        }
    }

    fn check_clone_paths(home: Option<&str>, expected_root: &str) {
        let dir = tempfile::tempdir().unwrap();
        let g = write(dir.path(), "g.toml", "forge = \"github\"\n");
        let env: Vec<(String, String)> = home
            .map(|h| {
                (
                    super::super::HOME_ENV.to_string(),
                    dir.path().join(h).display().to_string(),
                )
            })
            .into_iter()
            .collect();
        let r = resolve(
            &g,
            &Target {
                instance: None,
                repo: Some("octo-org/demo".into()),
            },
            Vec::new(),
            env,
            dir.path(),
        )
        .unwrap();
        let root = dir.path().join(expected_root);
        assert_eq!(r.layout.slug.as_str(), "octo-org-demo");
        assert_eq!(r.repo_path, root.join("octo-org-demo").join("checkout"));
        assert_eq!(r.layout.data_root, root, "the data sit next to the clone");
        assert_eq!(r.config.repo.as_deref(), Some("octo-org/demo"));
    }

    #[test]
    fn run_with_owner_name_clones_into_the_data_root() {
        check_clone_paths(None, ".hydraflow");
        check_clone_paths(Some("home"), "home");
    }
}
