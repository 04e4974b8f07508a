mod fake_github;
mod github_forge;
mod util;
