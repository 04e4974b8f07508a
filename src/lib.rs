//! HydraFlow: turns labelled issues into merged pull requests with
//! coding-agent CLIs. This library holds everything; `main.rs` only parses
//! the command line and calls [`cli::run`]. See ARCHITECTURE.md for the map.

pub mod access;
pub mod agent;
pub mod api;
pub mod backoff;
pub mod child;
pub mod cli;
pub mod config;
pub mod dashboard;
pub mod demo;
pub mod forge;
pub mod git;
pub mod layout;
pub mod pipeline;
pub mod runtime;
pub mod store;
pub mod supervisor;
pub mod systemd;
pub mod template;
pub mod worker;
pub mod worker_lock;
