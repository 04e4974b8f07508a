//! The pipeline of one repository: the issue store (per-stage FIFO queues fed
//! by the poller), labels as the state machine (spec §2), the five stage
//! loops and the orchestrator that runs them (spec §3), and the HITL spool
//! through which the CLI hands commands to a running worker.
//!
//! **Invariant:** the pipeline talks to the forge only through
//! [`crate::forge::Forge`], to agents only through
//! [`crate::agent::runner::AgentRunner`], and to git only through
//! [`crate::git::Worktrees`].

pub mod issue_store;
pub mod labels;
pub mod orchestrator;
pub mod spool;
mod stages;

pub use orchestrator::{Orchestrator, OrchestratorHandle};
