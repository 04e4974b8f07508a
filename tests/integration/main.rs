mod agent;
mod git_fixture;
mod git_worktrees;
mod local_forge;
mod util;
mod worker_e2e;
