//! The JSON shapes HydraFlow's servers send and its clients read: the
//! worker API (`dashboard::worker`), the supervisor dashboard
//! (`dashboard::supervisor`) and the control protocol's replies
//! (`supervisor::protocol`) share these types, so a server and its client
//! cannot disagree on a field. Each type names the route or reply it is;
//! documented in docs/design/dashboard.md and docs/design/protocol.md.

use serde::{Deserialize, Serialize};

/// State of one worker instance, in systemd's terms (org.freedesktop.systemd1(5)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceStatus {
    /// The repository slug (the unit's instance name).
    pub slug: String,
    /// `hydraflow@<slug>.service`.
    pub unit: String,
    /// `active`, `activating`, `deactivating`, `inactive`, `failed`, `reloading`.
    pub active_state: String,
    /// systemd's SubState (`running`, `start`, `dead`, `auto-restart`, …).
    pub sub_state: String,
    /// Main PID while running.
    pub main_pid: Option<u32>,
    /// Restarts since the unit was started (systemd `NRestarts`).
    pub n_restarts: u32,
    /// Memory in bytes (systemd `MemoryCurrent`), when known.
    pub memory_bytes: Option<u64>,
    /// When it last became active (RFC 3339 UTC), when known.
    pub active_since: Option<String>,
    /// systemd `Service.Result` (`success`, `exit-code`, `timeout`, `watchdog`, `start-limit-hit`, …).
    pub result: Option<String>,
}

impl InstanceStatus {
    /// `ActiveState` is `active` or `reloading`.
    pub fn running(&self) -> bool {
        matches!(self.active_state.as_str(), "active" | "reloading")
    }
}
