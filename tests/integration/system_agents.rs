//! The real Claude Code under the packaged `hydraflow@.service` (DynamicUser, the full sandbox,
//! `Delegate=yes`) in a booted Debian 12 container (ignored unless asked for: as root,
//! `cargo test -- --include-ignored` with the CLIs of `tests/agents/install.sh`): the unit files of `systemd/` installed as the package
//! installs them, the built binary at `/usr/bin/hydraflow`, the CLIs of
//! `tests/agents/install.sh` bound read-only, the scripted model API serving on the container's
//! loopback (its thread joins the container's network namespace).
//!
//! Checked: the model API key reaches the agent from
//! `/etc/hydraflow/credentials/<slug>/anthropic-api-key` (the API refuses any other key) and an
//! issue is merged; the worker said at start that it runs its agents in cgroup mode and which
//! limit it cannot apply; each call ran in its own `agent-<issue>-<stage>` cgroup; cost is
//! recorded and shown; then an agent whose command forks a `setsid` grandchild, and the worker
//! SIGKILLed: nothing of the agent is left.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::agent_clis::{Clis, clis_dir, greeting_script};
use crate::model_server::{Action, ModelServer, Turn};
use crate::util_container::{Container, ContainerConfig, require_container_host, step};

const KEY: &str = "sk-ant-container-credential-0001";

fn sh(c: &Container, script: &str) -> String {
    c.exec_ok(&["sh", "-c", script])
}

fn wait_sh(c: &Container, what: &str, limit: Duration, script: &str) -> String {
    let start = Instant::now();
    loop {
        let out = c.exec(&["sh", "-c", script]);
        if out.status.success() {
            return String::from_utf8_lossy(&out.stdout).into_owned();
        }
        if start.elapsed() > limit {
            let log = c.exec(&["sh", "-c", "systemctl --no-pager status 'hydraflow@*'; journalctl --no-pager -n 60 -u 'hydraflow@*'; \
                 tail -n 30 /var/lib/private/hydraflow/agents/events.jsonl; \
                 tail -n 20 /var/lib/private/hydraflow/agents/logs/*"]);
            panic!(
                "gave up waiting for {what} after {limit:?}:\n{}",
                String::from_utf8_lossy(&log.stdout)
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
#[ignore = "needs root, a booted Debian 12 container and the pinned agent CLIs: as root run tests/system/prepare-host.sh and tests/agents/install.sh, then cargo test -- --include-ignored (.ci/run does all)"]
fn claude_code_under_the_packaged_unit() {
    require_container_host();
    let clis = Clis::installed();
    let clis_dir = clis_dir();
    let units = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("systemd");
    let unit = |name: &str| std::fs::read_to_string(units.join(name)).expect("unit file");
    let config = ContainerConfig {
        files: vec![
            (
                "/usr/lib/systemd/system/hydraflow@.service".into(),
                unit("hydraflow@.service"),
                0o644,
            ),
            (
                "/usr/lib/systemd/system/hydraflow@.socket".into(),
                unit("hydraflow@.socket"),
                0o644,
            ),
            (
                "/usr/lib/systemd/system/hydraflow.target".into(),
                unit("hydraflow.target"),
                0o644,
            ),
            (
                "/usr/lib/sysusers.d/hydraflow.conf".into(),
                unit("hydraflow.sysusers"),
                0o644,
            ),
            (
                "/usr/lib/tmpfiles.d/hydraflow.conf".into(),
                unit("hydraflow.tmpfiles"),
                0o644,
            ),
            // The packaged global file: its state_dir is where `issue --instance` looks.
            (
                "/etc/hydraflow/hydraflow.toml".into(),
                std::fs::read_to_string(
                    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("packaging/hydraflow.toml"),
                )
                .expect("packaging/hydraflow.toml"),
                0o644,
            ),
        ],
        bind_ro: vec![
            (
                PathBuf::from(env!("CARGO_BIN_EXE_hydraflow")),
                "/usr/bin/hydraflow".into(),
            ),
            (clis_dir, "/opt/agent-clis".into()),
        ],
        bind: vec![],
    };
    let _ = &clis;
    let mut c = Container::boot(&config);
    sh(
        &c,
        "systemd-sysusers && systemd-tmpfiles --create && systemctl daemon-reload",
    );

    // The scripted model API on the container's loopback; it takes only the credential's key.
    let mut script = vec![Turn::all(
        &["You are implementing issue", "Hold forever"],
        vec![Action::Shell(
            "setsid sh -c 'echo $$ > \"$HOME/grandchild.pid\"; exec sleep 600' & \
             echo $$ > \"$HOME/agent.pid\"; sleep 100"
                .into(),
        )],
        "never reached",
    )];
    script.extend(greeting_script());
    let server = ModelServer::start_in(script, Some(c.netns()));
    server.require_key(Some(KEY));
    let port = server.url.rsplit(':').next().expect("port").to_string();

    step("an instance with the claude preset, its key a credential");
    sh(
        &c,
        "set -e; d=/srv/hydraflow/agents; git init -q -b main $d; printf '# agents\\n' > $d/README.md; \
         printf '.hydraflow/\\n' > $d/.gitignore; git -C $d add -A; \
         git -C $d -c user.name=Admin -c user.email=admin@example.invalid commit -q -m 'Initial commit'; \
         git -C $d config user.name Agent; git -C $d config user.email agent@example.invalid; \
         mkdir -p /opt/agent-bin; \
         ln -sf /opt/agent-clis/node_modules/@anthropic-ai/claude-code-linux-x64/claude /opt/agent-bin/claude",
    );
    c.write_file(
        "/etc/hydraflow/repos/agents.toml",
        &format!(
            "repo_path = \"/srv/hydraflow/agents\"\nforge = \"local\"\npoll_interval = 1\n\
             data_poll_interval = 2\nagent_timeout = 300\n\n[agent]\npreset = \"claude\"\n\
             memory_max = 1073741824\ntasks_max = 512\n\n[agent.env]\n\
             PATH = \"/opt/agent-bin:/usr/local/bin:/usr/bin:/bin\"\n\
             ANTHROPIC_BASE_URL = \"http://127.0.0.1:{port}\"\nCLAUDE_CODE_MAX_RETRIES = \"0\"\n\
             CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC = \"1\"\n"
        ),
        0o644,
    );
    c.write_file(
        "/etc/hydraflow/credentials/agents/anthropic-api-key",
        &format!("{KEY}\n"),
        0o600,
    );
    sh(&c, "hydraflow config check --instance agents");
    sh(&c, "systemctl start hydraflow@agents.service");
    sh(
        &c,
        "hydraflow issue add --instance agents --title 'Add a greeting' --body 'Add hello.txt.'",
    );

    step("the issue is merged by the real CLI under the unit");
    wait_sh(
        &c,
        "issue 1 merged",
        Duration::from_secs(240),
        "hydraflow issue show 1 --instance agents | grep -q hydraflow-fixed",
    );
    let merged = sh(
        &c,
        "git -c safe.directory='*' -C /srv/hydraflow/agents show main:hello.txt",
    );
    assert_eq!(merged, "hello from the agent\n");
    let show = sh(&c, "hydraflow issue show 1 --instance agents");
    assert!(
        show.contains("cost: $") && show.contains("agent calls"),
        "{show}"
    );
    let journal = sh(&c, "journalctl --no-pager -u hydraflow@agents.service");
    assert!(journal.contains("cgroup mode"), "{journal}");
    assert!(
        journal.contains("agent.memory_max = 1073741824 is not applied")
            || journal.contains("memory.max 1073741824"),
        "{journal}"
    );
    // Delegate=yes and ProtectControlGroups=no keep the unit within the package test's bound.
    let score = crate::system_deb::security_score(&c, "hydraflow@agents.service");
    step(&format!("systemd-analyze security: {score}"));
    assert!(score <= 2.5, "hydraflow@agents.service scores {score}");
    let requests = server.requests();
    assert!(
        requests.iter().any(|r| r.fault.is_none()),
        "no request got through"
    );
    let logs = sh(
        &c,
        "cat /var/lib/private/hydraflow/agents/logs/* 2>/dev/null || true",
    );
    assert!(!logs.contains(KEY), "the key is in a transcript");

    step("a setsid grandchild, then the worker SIGKILLed");
    sh(
        &c,
        "hydraflow issue add --instance agents --title 'Hold forever' --body 'Hold.'",
    );
    let home = "/var/lib/private/hydraflow/agents";
    wait_sh(
        &c,
        "the agent and its setsid grandchild",
        Duration::from_secs(240),
        &format!("test -s {home}/agent.pid && test -s {home}/grandchild.pid"),
    );
    let agent = sh(&c, &format!("cat {home}/agent.pid")).trim().to_string();
    let grandchild = sh(&c, &format!("cat {home}/grandchild.pid"))
        .trim()
        .to_string();
    let cgroup = sh(&c, &format!("cat /proc/{grandchild}/cgroup"));
    assert!(
        cgroup.contains("hydraflow@agents.service/agent-") && cgroup.contains("-implement"),
        "the grandchild is not in the call's cgroup: {cgroup}"
    );
    sh(
        &c,
        "systemctl kill --kill-whom=main --signal=SIGKILL hydraflow@agents.service",
    );
    wait_sh(
        &c,
        "nothing of the agent left",
        Duration::from_secs(60),
        &format!("! kill -0 {agent} 2>/dev/null && ! kill -0 {grandchild} 2>/dev/null"),
    );
    sh(&c, "systemctl stop hydraflow@agents.service");
    drop(server);
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(c.power_off());
}
