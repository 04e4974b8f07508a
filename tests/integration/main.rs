mod agent;
mod fake_github;
mod git_fixture;
mod git_worktrees;
mod github_forge;
mod local_forge;
mod util;
mod worker_e2e;
