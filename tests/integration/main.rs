mod git_fixture;
mod git_worktrees;
mod util;
