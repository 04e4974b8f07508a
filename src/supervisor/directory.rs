//! The supervisor as the dashboards see it: the supervisor dashboard's
//! [`RepoDirectory`] and the webhook receiver's [`Targets`] are its registry
//! and backend. Implemented here so that `dashboard` never names the
//! supervisor (the dependency goes one way: `supervisor` → `dashboard`).

use std::path::PathBuf;

use async_trait::async_trait;

use super::Supervisor;
use crate::dashboard::supervisor::{RepoDirectory, RepoEntry};
use crate::dashboard::webhook::{Target, Targets};

/// The supervisor's registry and backend: a worker's socket is where the
/// backend says ([`crate::supervisor::backend::InstanceBackend::api_socket`]).
#[async_trait]
impl RepoDirectory for Supervisor {
    async fn repos(&self) -> Vec<RepoEntry> {
        let backend = self.backend();
        let listed = backend.list().await;
        let mut out = Vec::new();
        for e in self.registry().entries() {
            let known = match &listed {
                Ok(all) => all.iter().find(|s| s.slug == e.slug).cloned(),
                Err(_) => None,
            };
            let (unit, unit_error) = match known {
                Some(s) => (Some(s), None),
                None => match crate::layout::Slug::new(&e.slug) {
                    Ok(slug) => match backend.status(&slug).await {
                        Ok(s) => (Some(s), None),
                        Err(err) => (None, Some(err.to_string())),
                    },
                    Err(err) => (None, Some(err.to_string())),
                },
            };
            let socket = backend.api_socket(&e.slug);
            out.push(RepoEntry {
                slug: e.slug.clone(),
                path: (!e.path.is_empty()).then(|| PathBuf::from(&e.path)),
                socket,
                unit,
                unit_error,
            });
        }
        out
    }
}

/// The supervisor's registry: a repository registered as `owner/name`
/// (`hydraflow repo add owner/name`), its worker's socket where the
/// backend says.
impl Targets for Supervisor {
    fn target(&self, full_name: &str) -> Option<Target> {
        let entry = self.registry().entries().into_iter().find(|e| {
            e.repo
                .as_deref()
                .is_some_and(|r| r.eq_ignore_ascii_case(full_name))
        })?;
        Some(Target {
            socket: self.worker_socket(&entry.slug),
            slug: entry.slug,
        })
    }
}
