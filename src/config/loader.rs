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
    #[error("cannot read {path}: {cause}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        cause: std::io::Error,
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
    /// More than one of the above, each on its own line (`hydraflow config check` lists them
    /// all).
    #[error("{} configuration errors:\n  {}", .0.len(), .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n  "))]
    Several(Vec<ConfigError>),
}

impl ConfigError {
    /// One error, or [`ConfigError::Several`]; `None` for none.
    fn from_all(mut errors: Vec<ConfigError>) -> Option<ConfigError> {
        match errors.len() {
            0 => None,
            1 => errors.pop(),
            _ => Some(ConfigError::Several(errors)),
        }
    }
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
    /// Things that are not errors but probably mistakes (an unknown `HYDRAFLOW_*` variable),
    /// for the caller to print or log.
    pub warnings: Vec<String>,
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
    // The test and benchmark harnesses' own variables.
    "HYDRAFLOW_TEST_CACHE",
    "HYDRAFLOW_TEST_DIR",
    "HYDRAFLOW_SCREENSHOT_DIR",
    "HYDRAFLOW_SYSTEMD_TEST_CHILD",
    "HYDRAFLOW_BENCH_BIN",
    "HYDRAFLOW_BENCH_QUICK",
    "HYDRAFLOW_NO_LINK_ORDER",
    "HYDRAFLOW_CAMPAIGN_BIN",
    "HYDRAFLOW_CAMPAIGN_RUNS",
    "HYDRAFLOW_CAMPAIGN_SEED",
    "HYDRAFLOW_AGENT_CLIS",
    "HYDRAFLOW_TEST_OUTAGE_SECS",
];

/// What [`load`] made of the layers.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The merged configuration.
    pub config: Config,
    /// Source of each dotted key that was set (absent = default).
    pub sources: BTreeMap<String, Source>,
    /// Files that were read, in order (absolute).
    pub files: Vec<PathBuf>,
    /// Probable mistakes that are not errors (see [`Resolved::warnings`]).
    pub warnings: Vec<String>,
}

/// Keys whose values are paths: a relative path in a file is taken relative to the directory
/// of that file (the supervisor, its workers and the command line all run in different
/// directories); from the environment or the command line, relative to the current directory.
pub const PATH_KEYS: &[&str] = &[
    "repo_path",
    "worktree_base",
    "repos_dir",
    "agent.prompts_dir",
    "supervisor.state_dir",
    "github.app_key_file",
    "webhook.secret_file",
];

/// Load and merge the layers, then check the result. Every problem is reported, not only
/// the first: each file is checked key by key, then each variable, then the merged values.
///
/// # Errors
/// [`ConfigError`] naming the file, line and key, or the variable; [`ConfigError::Several`]
/// when there is more than one.
pub fn load(req: &LoadRequest<'_>) -> Result<Loaded, ConfigError> {
    let mut merged = to_table(&Config::default());
    let mut sources = BTreeMap::new();
    let mut files = Vec::new();
    let mut errors = Vec::new();
    let mut warnings = Vec::new();

    // Read, parse and merge one file; `optional`: a missing file is no error.
    let mut layer =
        |merged: &mut Table, path: PathBuf, optional: bool| match std::fs::read_to_string(&path) {
            Ok(text) => {
                let (table, bad) = parse_file(&path, &text);
                errors.extend(bad);
                merge_layer(
                    merged,
                    &table,
                    &Source::File(path.clone()),
                    &mut sources,
                    "",
                );
                files.push(path);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && optional => {}
            Err(cause) => errors.push(ConfigError::Read { path, cause }),
        };

    if let Some(given) = req.global_file {
        let path = std::path::absolute(given).unwrap_or_else(|_| given.to_owned());
        layer(&mut merged, path, req.global_optional);
    }

    if let Some(slug) = req.instance {
        let repos_dir = match lookup(&merged, "repos_dir").and_then(Value::as_str) {
            Some(dir) => PathBuf::from(dir),
            None => PathBuf::from(super::DEFAULT_REPOS_DIR),
        };
        layer(&mut merged, repos_dir.join(format!("{slug}.toml")), false);
    }

    let defaults = to_table(&Config::default());
    let keys = env_keys(&defaults);
    for (var, value) in &req.env {
        if !var.starts_with("HYDRAFLOW_") || NON_KEY_ENV.contains(&var.as_str()) {
            continue;
        }
        let Some(key) = keys.get(var.as_str()) else {
            warnings.push(unknown_variable(var, &keys));
            continue;
        };
        match env_value(&defaults, key, value) {
            Ok(parsed) => {
                set_dotted(&mut merged, key, parsed);
                sources.insert(key.clone(), Source::Env(var.clone()));
            }
            Err(message) => errors.push(ConfigError::Env {
                var: var.clone(),
                value: value.clone(),
                key: key.clone(),
                message,
            }),
        }
    }

    for (key, value, option) in &req.overrides {
        set_dotted(&mut merged, key, value.clone());
        sources.insert(key.clone(), Source::CommandLine(option.clone()));
    }

    match Value::Table(merged).try_into::<Config>() {
        Ok(config) => {
            // Each named with where its value came from.
            errors.extend(out_of_range(&config).into_iter().map(|(key, message)| {
                ConfigError::Semantic(match sources.get(key) {
                    Some(Source::Default) | None => message,
                    Some(source) => format!("{source}: {message}"),
                })
            }));
            match ConfigError::from_all(errors) {
                Some(err) => Err(err),
                None => Ok(Loaded {
                    config,
                    sources,
                    files,
                    warnings,
                }),
            }
        }
        Err(e) => {
            errors.push(ConfigError::Semantic(e.to_string().trim_end().to_owned()));
            Err(ConfigError::from_all(errors).unwrap_or_else(|| unreachable!()))
        }
    }
}

/// The warning for `HYDRAFLOW_<X>` that names no key, with the nearest variable that does.
fn unknown_variable(var: &str, keys: &BTreeMap<String, String>) -> String {
    let nearest = keys
        .iter()
        .min_by_key(|(name, _)| strsim::levenshtein(name, var));
    match nearest {
        Some((name, key)) => format!(
            "environment variable {var} names no configuration key and is ignored: did you mean {name} ({key})?"
        ),
        None => format!("environment variable {var} names no configuration key and is ignored"),
    }
}

/// Check values that the types alone do not constrain.
///
/// # Errors
/// The first of [`check_all`]'s errors.
pub fn check(config: &Config) -> Result<(), ConfigError> {
    match check_all(config).into_iter().next() {
        Some(err) => Err(err),
        None => Ok(()),
    }
}

/// Every value that the types alone do not constrain and that is out of range, each as a
/// [`ConfigError::Semantic`] naming the key and what is allowed.
pub fn check_all(config: &Config) -> Vec<ConfigError> {
    out_of_range(config)
        .into_iter()
        .map(|(_, message)| ConfigError::Semantic(message))
        .collect()
}

/// The values [`check_all`] refuses, as (dotted key, message).
fn out_of_range(config: &Config) -> Vec<(&'static str, String)> {
    let mut errors = Vec::new();
    let limits = [
        ("limits.max_triagers", config.limits.max_triagers),
        ("limits.max_planners", config.limits.max_planners),
        ("limits.max_workers", config.limits.max_workers),
        ("limits.max_reviewers", config.limits.max_reviewers),
        ("limits.max_hitl_workers", config.limits.max_hitl_workers),
    ];
    for (key, value) in limits {
        if !(1..=10).contains(&value) {
            errors.push((key, format!("{key} = {value} is out of range: use 1 to 10")));
        }
    }
    for (key, value) in [
        ("poll_interval", config.poll_interval),
        ("data_poll_interval", config.data_poll_interval),
        ("agent_timeout", config.agent_timeout),
        ("ci_poll_interval", config.ci_poll_interval),
        (
            "github.fallback_poll_interval",
            config.github.fallback_poll_interval,
        ),
    ] {
        if value == 0 {
            errors.push((
                key,
                format!("{key} = 0 is not allowed: use a number of seconds of at least 1"),
            ));
        }
    }
    if config.max_issue_attempts == 0 {
        errors.push((
            "max_issue_attempts",
            "max_issue_attempts = 0 is not allowed: use at least 1".into(),
        ));
    }
    if config.forge == super::ForgeKind::Github {
        match &config.repo {
            Some(r) if valid_owner_name(r) => {}
            Some(r) => errors.push((
                "repo",
                format!("repo = {r:?} is not valid: use \"owner/name\""),
            )),
            None => errors.push((
                "forge",
                "forge = \"github\" needs repo = \"owner/name\"".into(),
            )),
        }
    }
    if let Some(slug) = &config.slug
        && let Err(e) = Slug::new(slug)
    {
        errors.push(("slug", e.to_string()));
    }
    if config.github.app_id.is_none() {
        for (key, set) in [
            (
                "github.installation_id",
                config.github.installation_id.is_some(),
            ),
            ("github.app_key_file", config.github.app_key_file.is_some()),
        ] {
            if set {
                errors.push((
                    key,
                    format!("{key} is set but github.app_id is not: set the GitHub App's id, or remove {key}"),
                ));
            }
        }
    }
    errors
}

/// Whether `s` is a GitHub `owner/name` ([`crate::layout::RepoName`]).
pub fn valid_owner_name(s: &str) -> bool {
    crate::layout::RepoName::parse(s).is_ok()
}

fn to_table(config: &Config) -> Table {
    match Value::try_from(config) {
        Ok(Value::Table(t)) => t,
        _ => Table::new(),
    }
}

/// Parse one file: its table with the keys that fit the schema (relative paths anchored at
/// the file's directory, see [`PATH_KEYS`]), and an error for each key that does not, naming
/// the file, line and key. A syntax error makes the whole file one error.
fn parse_file(path: &Path, text: &str) -> (Table, Vec<ConfigError>) {
    let invalid = |message: String| ConfigError::Invalid {
        path: path.to_owned(),
        message,
    };
    let mut table = match toml::from_str::<Table>(text) {
        Ok(table) => table,
        Err(e) => {
            return (
                Table::new(),
                vec![invalid(e.to_string().trim_end().to_owned())],
            );
        }
    };
    let mut errors = Vec::new();
    if toml::from_str::<Config>(text).is_err() {
        let mut bad = Vec::new();
        // Check every key on its own, so that each wrong one is reported with its line.
        if let Ok(doc) = toml::de::DeTable::parse(text) {
            let mut leaves = Vec::new();
            spanned_leaves(doc.get_ref(), &mut Vec::new(), &mut leaves);
            for (keys, value) in leaves {
                let single = nest(&keys, value);
                let checked = <Config as serde::Deserialize>::deserialize(
                    toml::de::Deserializer::from(single),
                );
                if let Err(e) = checked {
                    let at = e.span().map_or(0, |s| s.start);
                    let line = text[..at.min(text.len())].matches('\n').count() + 1;
                    let dotted: Vec<&str> = keys.iter().map(|k| k.get_ref().as_ref()).collect();
                    let parent = dotted[..dotted.len().saturating_sub(1)].join(".");
                    let message = match unknown_key(e.message(), &parent) {
                        Some(message) => format!("line {line}: {message}"),
                        None => format!("line {line}, key {}: {}", dotted.join("."), e.message()),
                    };
                    bad.push((line, message));
                    remove_dotted(&mut table, &dotted);
                }
            }
        }
        bad.sort();
        errors.extend(bad.into_iter().map(|(_, message)| invalid(message)));
    }
    if let Some(dir) = path.parent() {
        anchor_paths(&mut table, dir);
    }
    (table, errors)
}

/// serde's "unknown field `x`, expected one of `a`, `b`" for a key in table `parent` as
/// "unknown key `parent.x`: did you mean `parent.a`?" (the nearest by edit distance); `None`
/// for any other message.
fn unknown_key(message: &str, parent: &str) -> Option<String> {
    let (field, expected) = message
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split_once("`, expected "))?;
    let full = |name: &str| {
        if parent.is_empty() {
            name.to_owned()
        } else {
            format!("{parent}.{name}")
        }
    };
    let nearest = expected
        .split('`')
        .skip(1)
        .step_by(2)
        .min_by_key(|candidate| strsim::levenshtein(candidate, field));
    Some(match nearest {
        Some(name) => format!(
            "unknown key `{}`: did you mean `{}`?",
            full(field),
            full(name)
        ),
        None => format!("unknown key `{}`", full(field)),
    })
}

type SpannedKey<'i> = toml::Spanned<toml::de::DeString<'i>>;
type SpannedValue<'i> = toml::Spanned<toml::de::DeValue<'i>>;

/// Every leaf of `table` (a value that is not a non-empty table) with its key path.
fn spanned_leaves<'i>(
    table: &toml::de::DeTable<'i>,
    prefix: &mut Vec<SpannedKey<'i>>,
    out: &mut Vec<(Vec<SpannedKey<'i>>, SpannedValue<'i>)>,
) {
    for (key, value) in table {
        prefix.push(key.clone());
        match value.get_ref() {
            toml::de::DeValue::Table(inner) if !inner.is_empty() => {
                spanned_leaves(inner, prefix, out);
            }
            _ => out.push((prefix.clone(), value.clone())),
        }
        prefix.pop();
    }
}

/// A document holding only `value` at the key path `keys`, with the original spans.
fn nest<'i>(
    keys: &[SpannedKey<'i>],
    value: SpannedValue<'i>,
) -> toml::Spanned<toml::de::DeTable<'i>> {
    let span = value.span();
    let mut inner = value;
    for key in keys.iter().skip(1).rev() {
        let mut table = toml::de::DeTable::new();
        table.insert(key.clone(), inner);
        inner = toml::Spanned::new(span.clone(), toml::de::DeValue::Table(table));
    }
    let mut top = toml::de::DeTable::new();
    if let Some(first) = keys.first() {
        top.insert(first.clone(), inner);
    }
    toml::Spanned::new(0..0, top)
}

fn remove_dotted(table: &mut Table, keys: &[&str]) {
    match keys {
        [] => {}
        [last] => {
            table.remove(*last);
        }
        [first, rest @ ..] => {
            if let Some(Value::Table(inner)) = table.get_mut(*first) {
                remove_dotted(inner, rest);
            }
        }
    }
}

/// Make the relative [`PATH_KEYS`] values of a file's table relative to `dir`.
fn anchor_paths(table: &mut Table, dir: &Path) {
    for key in PATH_KEYS {
        let parts: Vec<&str> = key.split('.').collect();
        let mut cur = Some(&mut *table);
        for part in &parts[..parts.len() - 1] {
            cur = cur
                .and_then(|t| t.get_mut(*part))
                .and_then(Value::as_table_mut);
        }
        let Some(Value::String(value)) = cur.and_then(|t| t.get_mut(parts[parts.len() - 1])) else {
            continue;
        };
        if !value.is_empty() && Path::new(value.as_str()).is_relative() {
            *value = dir.join(value.as_str()).display().to_string();
        }
    }
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
    let mut out: BTreeMap<String, String> = table_leaves(defaults)
        .into_iter()
        .map(|(dotted, _)| (env_name(&dotted), dotted))
        .collect();
    for optional in OPTIONAL_KEYS {
        out.insert(env_name(optional), (*optional).to_owned());
    }
    out
}

/// Every leaf of `table` with its dotted key (`limits.max_workers`). An
/// empty table is no leaf: its keys are all optional (`webhook`), and
/// [`OPTIONAL_KEYS`] names them.
fn table_leaves(table: &Table) -> Vec<(String, Value)> {
    fn walk(t: &Table, prefix: &str, out: &mut Vec<(String, Value)>) {
        for (k, v) in t {
            let dotted = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match v {
                Value::Table(inner) if !inner.is_empty() => walk(inner, &dotted, out),
                Value::Table(_) => {}
                leaf => out.push((dotted, leaf.clone())),
            }
        }
    }
    let mut out = Vec::new();
    walk(table, "", &mut out);
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
    "github.app_id",
    "github.installation_id",
    "github.app_key_file",
    "webhook.listen",
    "webhook.secret_file",
];

/// Optional keys whose value is a number: an environment value for them is
/// parsed as TOML (an integer or a float), not taken as a string.
const OPTIONAL_NUMBERS: &[(&str, &str)] = &[
    ("agent.memory_max", "1"),
    ("agent.tasks_max", "1"),
    ("agent.daily_budget_usd", "1.0"),
    ("github.app_id", "1"),
    ("github.installation_id", "1"),
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
    let mut out: Vec<(String, String)> = table_leaves(&to_table(config))
        .into_iter()
        .map(|(dotted, value)| (dotted, value.to_string()))
        .collect();
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

/// The supervisor's state directory: `[supervisor] state_dir`, else `$HYDRAFLOW_HOME`, else
/// `$HOME/.hydraflow` (`env` is the process environment as (name, value) pairs). A supervised
/// instance `<slug>` keeps its data in `<state dir>/<slug>/`, whichever backend runs it: the
/// one rule the supervisor and `hydraflow issue|hitl --instance` share.
pub fn state_dir(supervisor: &super::SupervisorConfig, env: &[(String, String)]) -> PathBuf {
    let var = |name: &str| {
        env.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| PathBuf::from(v))
            .filter(|p| !p.as_os_str().is_empty())
    };
    let dir = supervisor
        .state_dir
        .clone()
        .or_else(|| var(super::HOME_ENV))
        .unwrap_or_else(|| {
            var("HOME")
                .unwrap_or_else(|| PathBuf::from("/"))
                .join(".hydraflow")
        });
    std::path::absolute(&dir).unwrap_or(dir)
}

/// Resolve the configuration, slug, checkout and data layout of `target`.
///
/// The global file is optional only when it is the default path. The slug is
/// the instance name, else `slug` from the configuration, else the GitHub
/// `owner/name` with `/` → `-`, else the checkout's directory name. The data
/// root of a configured instance (`--instance`) is the supervisor's state
/// directory ([`state_dir`]), so that its data are `<state dir>/<slug>/`;
/// otherwise `$HYDRAFLOW_HOME`, else `<checkout>/.hydraflow` (docs/design/data-layout.md). A
/// GitHub repository without a checkout is cloned into `<data root>/<slug>/checkout`.
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
        .map(|(_, v)| cwd.join(v))
        .filter(|p| !p.as_os_str().is_empty());
    let req = LoadRequest {
        global_file: Some(global_file),
        global_optional: global_file == Path::new(super::DEFAULT_CONFIG_FILE),
        instance: target.instance.as_ref(),
        overrides,
        env: env.clone(),
    };
    let Loaded {
        config,
        sources,
        files,
        warnings,
    } = load(&req)?;

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

    // A configured instance keeps its data where the supervisor keeps it.
    let instance_root = target
        .instance
        .is_some()
        .then(|| state_dir(&config.supervisor, &env));
    // Where a GitHub repository without a checkout is cloned: next to its data.
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
        (None, None)
            if config.forge == super::ForgeKind::Github
                && (target.instance.is_some() || target.repo.is_some()) =>
        {
            let root = instance_root
                .clone()
                .or_else(|| home.clone())
                .unwrap_or_else(|| cwd.join(".hydraflow"));
            let checkout = root.join(slug.as_str()).join("checkout");
            clone_root = Some(root);
            checkout
        }
        (None, None) => cwd.to_owned(),
    };
    let repo_path = std::fs::canonicalize(&repo_path).unwrap_or(repo_path);
    let data_root = instance_root
        .or(home)
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
        warnings,
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
        load(&req).map(|l| (l.config, l.sources))
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
                (
                    "HYDRAFLOW_AGENT_COMMAND",
                    "[\"/bin/agent\", \"{{prompt}}\"]",
                ),
                ("HYDRAFLOW_REPO_PATH", "/srv/x"),
                ("HYDRAFLOW_SOMETHING_ELSE", "ignored"),
                ("HYDRAFLOW_HOME", "/var/lib/x"),
            ],
        )
        .unwrap();
        assert_eq!(c.main_branch, "develop");
        assert_eq!(c.agent.command, vec!["/bin/agent", "{{prompt}}"]);
        assert_eq!(c.repo_path.as_deref(), Some(Path::new("/srv/x")));
    }

    #[test]
    fn semantic_checks() {
        // Each names the file its value came from.
        let e = error_of("[limits]\nmax_workers = 11\n", None, &[]);
        assert!(
            e.ends_with("/hydraflow.toml: limits.max_workers = 11 is out of range: use 1 to 10"),
            "{e}"
        );
        let e = error_of("forge = \"github\"\n", None, &[]);
        assert!(
            e.ends_with("/hydraflow.toml: forge = \"github\" needs repo = \"owner/name\""),
            "{e}"
        );
        let e = error_of("", None, &[("HYDRAFLOW_LIMITS_MAX_WORKERS", "0")]);
        assert_eq!(
            e,
            "environment HYDRAFLOW_LIMITS_MAX_WORKERS: limits.max_workers = 0 is out of range: use 1 to 10"
        );
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
