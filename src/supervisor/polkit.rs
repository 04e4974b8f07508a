//! The polkit authority (polkit(8); `org.freedesktop.PolicyKit1.Authority`, whose
//! `CheckAuthorization` is documented in polkit's reference manual): on systemd hosts, whether
//! a caller may read (`org.hydraflow.read`) or manage (`org.hydraflow.manage`) is polkit's
//! decision, made by the packaged `org.hydraflow.policy` (no one by default) and
//! `50-hydraflow.rules` (root and members of `hydraflow-admin`), plus any rule the
//! administrator adds.
//!
//! The subject is a `unix-process`: the caller's own process when it came over the Unix control
//! socket (`SO_PEERCRED` gives its PID); for a TCP caller, whose process the kernel does not
//! name, the supervisor's process with the caller's UID, so rules should decide by
//! `subject.user` and its groups, not by the process or its session. polkit lets the
//! supervisor ask about other users because the policy names its user as the actions' owner
//! (`org.freedesktop.policykit.owner`). No interaction is ever asked for: an answer that would
//! need a password is a refusal. polkit not answering within [`ANSWER_TIMEOUT`] is a refusal
//! with that reason.
//!
//! **Invariant:** with `systemd_backend`, the only module that imports zbus.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use zbus::Variant;

use crate::access::{Authority, Caller, Right, Verdict};

/// How long a `CheckAuthorization` may take before the request is refused.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(1);
/// How long connecting to the bus and the start-up probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// A UID that holds no right, for the start-up probe (`nobody`).
const PROBE_UID: u32 = 65534;

#[zbus::proxy(
    interface = "org.freedesktop.PolicyKit1.Authority",
    default_service = "org.freedesktop.PolicyKit1",
    default_path = "/org/freedesktop/PolicyKit1/Authority"
)]
trait PolkitAuthority {
    /// `CheckAuthorization(subject (sa{sv}), action_id s, details a{ss}, flags u,
    /// cancellation_id s) -> (is_authorized b, is_challenge b, details a{ss})`.
    fn check_authorization(
        &self,
        subject: &(&str, HashMap<&str, Variant<'_>>),
        action_id: &str,
        details: HashMap<&str, &str>,
        flags: u32,
        cancellation_id: &str,
    ) -> zbus::Result<(bool, bool, HashMap<String, String>)>;
}

/// Why polkit cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PolkitError {
    /// The system bus cannot be reached.
    #[error("cannot connect to {bus}: {cause}")]
    Bus {
        /// Which bus.
        bus: String,
        /// Why.
        cause: zbus::Error,
    },
    /// polkit answered the probe with an error (not installed, the policy is missing, this user
    /// may not ask about others).
    #[error("polkit cannot decide for HydraFlow: {0}")]
    Refused(String),
    /// polkit did not answer the probe in time.
    #[error("polkit did not answer within {} s", PROBE_TIMEOUT.as_secs())]
    Timeout,
}

/// The polkit authority on one bus connection.
pub struct Polkit {
    proxy: PolkitAuthorityProxy<'static>,
    own_pid: u32,
}

/// A D-Bus error as text, with what to do for the errors polkit is known to give.
fn explain(err: &zbus::Error) -> String {
    let text = err.to_string();
    if text.contains("not registered") {
        format!(
            "{text}: install org.hydraflow.policy in /usr/share/polkit-1/actions (the hydraflow \
             package ships it)"
        )
    } else if text.contains("Only trusted callers") {
        format!(
            "{text}: run the supervisor as the hydraflow user or root (org.hydraflow.policy names \
             unix-user:hydraflow as the actions' owner)"
        )
    } else if text.contains("ServiceUnknown") || text.contains("was not provided") {
        format!("{text}: install polkitd, or set [supervisor] authorization = \"groups\"")
    } else {
        text
    }
}

impl Polkit {
    /// Connect to the system bus (`address` = `None`) or another D-Bus address, and check that
    /// polkit answers for HydraFlow's actions about another user (so that the policy is
    /// installed and this user may ask).
    ///
    /// # Errors
    /// [`PolkitError`] saying why polkit cannot be used.
    pub async fn connect(address: Option<&str>) -> Result<Polkit, PolkitError> {
        let bus = address.unwrap_or("the system bus").to_owned();
        let connect = async {
            let builder = match address {
                Some(address) => zbus::connection::Builder::address(address),
                None => zbus::connection::Builder::system(),
            };
            let conn = builder.build().await.map_err(|source| PolkitError::Bus {
                bus: bus.clone(),
                cause: source,
            })?;
            let proxy = PolkitAuthorityProxy::builder(&conn)
                .cache_properties(zbus::proxy::CacheProperties::No)
                .build()
                .await
                .map_err(|e| PolkitError::Refused(explain(&e)))?;
            let polkit = Polkit {
                proxy,
                own_pid: std::process::id(),
            };
            polkit
                .ask(None, PROBE_UID, "org.hydraflow.read")
                .await
                .map_err(|e| PolkitError::Refused(explain(&e)))?;
            Ok(polkit)
        };
        tokio::time::timeout(PROBE_TIMEOUT, connect)
            .await
            .map_err(|_| PolkitError::Timeout)?
    }

    /// `CheckAuthorization` for `uid` (and its process `pid`, when known) and `action`, without
    /// interaction.
    async fn ask(&self, pid: Option<u32>, uid: u32, action: &str) -> zbus::Result<bool> {
        let uid = i32::try_from(uid)
            .map_err(|_| zbus::Error::Failure(format!("uid {uid} is beyond polkit's range")))?;
        let mut details = HashMap::new();
        details.insert("pid", Variant::U32(pid.unwrap_or(self.own_pid)));
        // 0: polkit reads the process's start time itself.
        details.insert("start-time", Variant::U64(0));
        details.insert("uid", Variant::I32(uid));
        let subject = ("unix-process", details);
        // Flags 0: no user interaction (a password prompt is never shown).
        let (authorized, _challenge, _) = self
            .proxy
            .check_authorization(&subject, action, HashMap::new(), 0, "")
            .await?;
        Ok(authorized)
    }
}

#[async_trait]
impl Authority for Polkit {
    fn name(&self) -> &'static str {
        "polkit"
    }

    async fn check(&self, caller: &Caller, uid: u32, right: Right) -> Verdict {
        let Some(action) = right.polkit_action() else {
            return Verdict::Allow;
        };
        match tokio::time::timeout(ANSWER_TIMEOUT, self.ask(caller.pid(), uid, action)).await {
            Ok(Ok(true)) => Verdict::Allow,
            Ok(Ok(false)) => Verdict::Deny(None),
            Ok(Err(e)) => Verdict::Deny(Some(format!("polkit: {}", explain(&e)))),
            Err(_) => Verdict::Deny(Some(format!(
                "polkit did not answer within {} s",
                ANSWER_TIMEOUT.as_secs()
            ))),
        }
    }
}
