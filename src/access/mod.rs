//! Who may do what on the control plane (docs/design/access.md): the supervisor's protocol (TCP
//! and its Unix control socket) and the dashboards' TCP listeners.
//!
//! Who is calling comes from the kernel ([`peer`]). What a request needs is a [`Right`]:
//! `ping` and `version` are open to every local user; reading (listing, status, dashboard pages
//! and `GET` routes) and managing (adding, removing, restarting repositories, HITL corrections,
//! runtime start and stop) are separate rights. Root and the server's own user hold both.
//! Everyone else is decided by an [`Authority`]: polkit on systemd hosts
//! (`supervisor::polkit`, actions `org.hydraflow.read` and `org.hydraflow.manage`), else the
//! UID and group rules ([`rules`]). A caller whose user cannot be known is nobody, and an
//! authority that does not answer is a refusal, never an allowance.
//!
//! **Invariant:** a refusal is a [`Denied`], whose text is what the protocol and the dashboards
//! send (`permission denied: <user> may not <action>`), and every refusal is logged with the
//! caller.

pub mod peer;
pub mod rules;

use std::sync::Arc;

use async_trait::async_trait;

pub use peer::{Caller, Identity};
use rules::UserDb;

/// What a request needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Right {
    /// Every local user, unidentified ones too (`ping`, `version`).
    Open,
    /// Reading: `list_repos`, `repo_status`, dashboard pages and `GET` routes.
    Read,
    /// Acting: adding, registering, removing and restarting repositories, HITL corrections,
    /// runtime start and stop (every dashboard method but `GET` and `HEAD`).
    Manage,
}

impl Right {
    /// The polkit action of this right (`org.hydraflow.read`, `org.hydraflow.manage`), as the
    /// packaged `org.hydraflow.policy` declares them.
    pub fn polkit_action(self) -> Option<&'static str> {
        match self {
            Right::Open => None,
            Right::Read => Some("org.hydraflow.read"),
            Right::Manage => Some("org.hydraflow.manage"),
        }
    }
}

/// An authority's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Allowed.
    Allow,
    /// Refused, with a reason when there is more to say than "not granted".
    Deny(Option<String>),
}

/// Decides, for an identified caller who is neither root nor the server's own user, whether it
/// holds a right.
#[async_trait]
pub trait Authority: Send + Sync {
    /// `polkit` or `groups` (for logs).
    fn name(&self) -> &'static str;

    /// Whether `caller`, whose UID is `uid`, holds `right` (never [`Right::Open`]).
    async fn check(&self, caller: &Caller, uid: u32, right: Right) -> Verdict;
}

/// A refusal: the text sent to the client (`permission denied: <user> may not <action>`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("permission denied: {user} may not {action}{}", .reason.as_ref().map(|r| format!(" ({r})")).unwrap_or_default())]
pub struct Denied {
    /// The user name, `uid N`, or `an unidentified caller`.
    pub user: String,
    /// What was asked: a protocol action (`remove_repo`) or an HTTP request (`POST /…`).
    pub action: String,
    /// Why, when there is more to say (polkit did not answer, the user is unknown).
    pub reason: Option<String>,
}

/// The access control of one server: its authority, or none (authorization off).
pub struct Access {
    /// `None`: everyone local may do everything (`[supervisor] authorization = "off"`).
    authority: Option<Arc<dyn Authority>>,
    /// This process's effective UID, which holds every right.
    own_uid: u32,
    /// Users' names (for messages) and groups.
    users: Arc<UserDb>,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access")
            .field("authority", &self.name())
            .field("own_uid", &self.own_uid)
            .finish_non_exhaustive()
    }
}

impl Access {
    /// Access decided by `authority` (plus root and this process's user), with `users` for
    /// names.
    pub fn new(authority: Arc<dyn Authority>, users: Arc<UserDb>) -> Access {
        Access {
            authority: Some(authority),
            own_uid: nix::unistd::geteuid().as_raw(),
            users,
        }
    }

    /// Access by the UID and group rules: `admin_group` may read and manage, `read_group` may
    /// read (`*`: every identified local user; empty: nobody else).
    pub fn groups(admin_group: &str, read_group: &str) -> Access {
        let users = Arc::new(UserDb::default());
        let rules = rules::GroupRules {
            admin_group: admin_group.trim().to_owned(),
            readers: rules::Readers::from_setting(Some(read_group)),
            users: Arc::clone(&users),
        };
        Access::new(Arc::new(rules), users)
    }

    /// No access control: every local user may do everything (the original's behaviour).
    pub fn off() -> Access {
        Access {
            authority: None,
            own_uid: nix::unistd::geteuid().as_raw(),
            users: Arc::default(),
        }
    }

    /// `polkit`, `groups` or `off`.
    pub fn name(&self) -> &'static str {
        self.authority.as_ref().map_or("off", |a| a.name())
    }

    /// Whether every request is allowed without knowing the caller.
    pub fn is_off(&self) -> bool {
        self.authority.is_none()
    }

    /// Whether `right` is allowed whoever calls (open rights, or access control off): then
    /// the caller need not be looked up.
    pub fn needs_caller(&self, right: Right) -> bool {
        right != Right::Open && !self.is_off()
    }

    /// Whether `caller` holds `right`; a refusal is logged with the caller and says who may not
    /// do what (`action`).
    ///
    /// # Errors
    /// [`Denied`] when the caller does not hold the right, cannot be identified, or the
    /// authority did not answer.
    pub async fn authorize(
        &self,
        caller: &Caller,
        right: Right,
        action: &str,
    ) -> Result<(), Denied> {
        let Some(authority) = self.authority.as_ref().filter(|_| right != Right::Open) else {
            return Ok(());
        };
        let (user, reason) = match &caller.identity {
            Identity::Known { uid, .. } if *uid == 0 || *uid == self.own_uid => return Ok(()),
            Identity::Known { uid, .. } => match authority.check(caller, *uid, right).await {
                Verdict::Allow => return Ok(()),
                Verdict::Deny(reason) => (self.users.name(*uid).await, reason),
            },
            Identity::Unknown(why) => ("an unidentified caller".to_owned(), Some(why.clone())),
        };
        let denied = Denied {
            user,
            action: action.to_owned(),
            reason,
        };
        tracing::warn!(
            uid = caller.uid(),
            pid = caller.pid(),
            from = %caller.from,
            authority = authority.name(),
            "{denied}"
        );
        Err(denied)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An authority that answers `verdict` for everyone and counts its calls.
    struct Fixed(Verdict, std::sync::atomic::AtomicUsize);

    #[async_trait]
    impl Authority for Fixed {
        fn name(&self) -> &'static str {
            "fixed"
        }
        async fn check(&self, _: &Caller, _: u32, _: Right) -> Verdict {
            self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.0.clone()
        }
    }

    fn caller(uid: Option<u32>) -> Caller {
        Caller {
            identity: match uid {
                Some(uid) => Identity::Known { uid, pid: None },
                None => Identity::Unknown("closed before the lookup".into()),
            },
            from: "127.0.0.1:4000".into(),
        }
    }

    #[tokio::test]
    async fn root_and_the_own_user_need_no_authority_and_nobody_is_refused() {
        let fixed = Arc::new(Fixed(Verdict::Deny(None), Default::default()));
        let access = Access::new(fixed.clone(), Arc::default());
        let own = nix::unistd::geteuid().as_raw();
        for uid in [0, own] {
            access
                .authorize(&caller(Some(uid)), Right::Manage, "remove_repo")
                .await
                .expect("root and own user");
        }
        assert_eq!(fixed.1.load(std::sync::atomic::Ordering::Relaxed), 0);
        // Open rights are open to the unidentified too.
        access
            .authorize(&caller(None), Right::Open, "ping")
            .await
            .expect("open");
        let err = access
            .authorize(&caller(None), Right::Read, "list_repos")
            .await
            .expect_err("nobody");
        assert_eq!(
            err.to_string(),
            "permission denied: an unidentified caller may not list_repos (closed before the lookup)"
        );
        let err = access
            .authorize(&caller(Some(4_000_000_001)), Right::Manage, "remove_repo")
            .await
            .expect_err("denied");
        assert_eq!(
            err.to_string(),
            "permission denied: uid 4000000001 may not remove_repo"
        );
        assert_eq!(fixed.1.load(std::sync::atomic::Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn off_allows_everything_and_needs_no_caller() {
        let access = Access::off();
        assert!(!access.needs_caller(Right::Manage));
        access
            .authorize(&caller(None), Right::Manage, "remove_repo")
            .await
            .expect("off");
        let on = Access::new(
            Arc::new(Fixed(Verdict::Allow, Default::default())),
            Arc::default(),
        );
        assert!(on.needs_caller(Right::Read));
        assert!(!on.needs_caller(Right::Open));
    }
}
