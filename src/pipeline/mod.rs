//! The pipeline of one repository: the issue store (per-stage FIFO queues fed
//! by the poller), labels as the state machine, the five stage loops and the
//! orchestrator that runs them (docs/design/pipeline.md), and the HITL spool
//! through which the CLI hands commands to a running worker.
//!
//! How it is layered (each module uses only those listed after it):
//! `orchestrator` (loops) → `task` (one issue through one stage: pick-up,
//! routing, claim, the failure policy's decisions carried out) → `stages`
//! (the work and decisions of each stage) → `journal` (the step journal's
//! executor: every outside side effect, recorded before and after) →
//! `context` (what they share) and `decide` (the failure taxonomy and the
//! pure policy), `events` (typed events).
//!
//! **Invariant:** the pipeline talks to the forge only through
//! [`crate::forge::Forge`], to agents only through
//! [`crate::agent::runner::AgentRunner`], and to git only through
//! [`crate::git::Worktrees`]; every outside side effect of a decision goes
//! through `journal`.

mod context;
pub mod decide;
pub mod events;
pub mod issue_store;
mod journal;
pub mod labels;
pub mod orchestrator;
pub mod spool;
mod stages;
mod task;

#[cfg(test)]
mod sim;

pub use orchestrator::{Orchestrator, OrchestratorHandle};

/// The message of a task that panicked (or was cancelled).
pub(crate) fn panic_message(e: tokio::task::JoinError) -> String {
    context::Pipeline::panic_message(e)
}
