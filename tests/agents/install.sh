#!/usr/bin/env bash
# Install the pinned agent CLIs the tests run for real (tests/integration/agent_clis.rs) into DIR
# (default /var/cache/hydraflow-test/agent-clis) with npm, from the npm registry:
#   @anthropic-ai/claude-code (its native binary comes in @anthropic-ai/claude-code-linux-x64)
#   @openai/codex             (its native binary comes in @openai/codex-linux-x64)
# The tests run the native binaries directly, so npm's warning that the claude-code postinstall
# script is not approved is expected and harmless. Then run the tests with
#   HYDRAFLOW_AGENT_CLIS=DIR cargo test
set -euo pipefail

CLAUDE_CODE_VERSION=2.1.328
CODEX_VERSION=0.169.0

dir=${1:-/var/cache/hydraflow-test/agent-clis}
if ! command -v npm >/dev/null 2>&1; then
  echo "install.sh: installing nodejs and npm (Debian packages)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm
fi
mkdir -p "$dir"
claude="$dir/node_modules/@anthropic-ai/claude-code-linux-x64/claude"
codex="$dir/node_modules/@openai/codex-linux-x64/vendor/x86_64-unknown-linux-musl/bin/codex"
if [ -x "$claude" ] && [ -x "$codex" ] \
  && "$claude" --version 2>/dev/null | grep -q "^$CLAUDE_CODE_VERSION " \
  && "$codex" --version 2>/dev/null | grep -q " $CODEX_VERSION\$"; then
  echo "install.sh: Claude Code $CLAUDE_CODE_VERSION and Codex $CODEX_VERSION already in $dir"
  exit 0
fi
npm install --prefix "$dir" --no-audit --no-fund --loglevel=error \
  "@anthropic-ai/claude-code@$CLAUDE_CODE_VERSION" "@openai/codex@$CODEX_VERSION"
chmod -R a+rX "$dir"
"$claude" --version
"$codex" --version
