//! The supervisor: keeps one worker instance per repository slug running through an
//! [`backend::InstanceBackend`] (systemd units over D-Bus, or child processes).

pub mod backend;
pub mod systemd_backend;
