//! Loading the configuration in layers with provenance: defaults, the global
//! file, the instance file, then `HYDRAFLOW_<KEY>` environment variables.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::Config;
use crate::layout::Layout;

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
