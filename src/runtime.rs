//! RepoRuntime and RepoRuntimeRegistry (ADR-0006/0038).
