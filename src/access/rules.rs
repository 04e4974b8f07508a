//! The UID and group rules, used off systemd or without polkit: root and the server's own user
//! may do everything; members of `admin_group` may read and manage; members of `read_group`
//! (every identified local user when it is `*`) may read. Membership is the user database's
//! (`getgrouplist(3)`: the primary group and every group listing the user), as polkit's
//! `subject.isInGroup` reads it, so `usermod -aG` applies without a new login.
//!
//! Users' groups are cached per UID for [`CACHE_TTL`]; a lookup runs on tokio's blocking pool
//! (NSS may ask a directory server), never on the runtime's thread.

use std::collections::HashMap;
use std::ffi::CString;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use nix::unistd::{Gid, Group, Uid, User};

use super::{Authority, Right, Verdict};
use crate::access::peer::Caller;

/// How long a user's name and groups are trusted before they are read again.
pub const CACHE_TTL: Duration = Duration::from_secs(5);

/// What the user database says about one UID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserInfo {
    /// The user name, when the UID has an entry.
    pub name: Option<String>,
    /// Every group the user is in (primary first), empty without an entry.
    pub groups: Vec<u32>,
}

/// Read the user database (blocking).
fn read_user(uid: u32) -> UserInfo {
    let Ok(Some(user)) = User::from_uid(Uid::from_raw(uid)) else {
        return UserInfo {
            name: None,
            groups: Vec::new(),
        };
    };
    let groups = CString::new(user.name.clone())
        .ok()
        .and_then(|name| nix::unistd::getgrouplist(&name, user.gid).ok())
        .unwrap_or_else(|| vec![user.gid])
        .into_iter()
        .map(Gid::as_raw)
        .collect();
    UserInfo {
        name: Some(user.name),
        groups,
    }
}

/// The GID of the group `name` (blocking); `None` when there is no such group.
fn read_group(name: &str) -> Option<u32> {
    Group::from_name(name)
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw())
}

/// Users' names and groups, cached per UID for [`CACHE_TTL`].
#[derive(Debug, Default)]
pub struct UserDb {
    users: Mutex<HashMap<u32, (Instant, UserInfo)>>,
    groups: Mutex<HashMap<String, (Instant, Option<u32>)>>,
}

impl UserDb {
    /// What the user database says about `uid` (cached).
    pub async fn user(&self, uid: u32) -> UserInfo {
        if let Some((at, info)) = self.lock_users().get(&uid)
            && at.elapsed() < CACHE_TTL
        {
            return info.clone();
        }
        let info = tokio::task::spawn_blocking(move || read_user(uid))
            .await
            .unwrap_or(UserInfo {
                name: None,
                groups: Vec::new(),
            });
        let mut users = self.lock_users();
        // A flood of distinct UIDs cannot grow the cache without bound.
        if users.len() > 4096 {
            users.retain(|_, (at, _)| at.elapsed() < CACHE_TTL);
        }
        users.insert(uid, (Instant::now(), info.clone()));
        info
    }

    /// The GID of group `name` (cached); `None` when it does not exist.
    pub async fn group(&self, name: &str) -> Option<u32> {
        if let Some((at, gid)) = self.lock_groups().get(name)
            && at.elapsed() < CACHE_TTL
        {
            return *gid;
        }
        let owned = name.to_owned();
        let gid = tokio::task::spawn_blocking(move || read_group(&owned))
            .await
            .ok()
            .flatten();
        self.lock_groups()
            .insert(name.to_owned(), (Instant::now(), gid));
        gid
    }

    /// The name to show for `uid`: the user name, else `uid N`.
    pub async fn name(&self, uid: u32) -> String {
        self.user(uid)
            .await
            .name
            .unwrap_or_else(|| format!("uid {uid}"))
    }

    fn lock_users(&self) -> std::sync::MutexGuard<'_, HashMap<u32, (Instant, UserInfo)>> {
        self.users
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn lock_groups(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, Option<u32>)>> {
        self.groups
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Who may read besides the administrators (`[supervisor] read_group`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readers {
    /// Nobody else (`read_group` empty or unset).
    Nobody,
    /// Members of this group.
    Group(String),
    /// Every identified local user (`read_group = "*"`).
    Everyone,
}

impl Readers {
    /// From the configuration's `read_group`: empty is nobody, `*` everyone, else a group.
    pub fn from_setting(read_group: Option<&str>) -> Readers {
        match read_group.map(str::trim) {
            None | Some("") => Readers::Nobody,
            Some("*") => Readers::Everyone,
            Some(group) => Readers::Group(group.to_owned()),
        }
    }
}

/// The UID and group rules.
#[derive(Debug)]
pub struct GroupRules {
    /// Members may read and manage (`[supervisor] admin_group`); empty: nobody but root and
    /// the server's own user.
    pub admin_group: String,
    /// Who else may read.
    pub readers: Readers,
    /// The user database.
    pub users: Arc<UserDb>,
}

impl GroupRules {
    /// Whether `uid` is a member of group `name` (a missing group has no members).
    async fn member(&self, info: &UserInfo, name: &str) -> bool {
        if name.is_empty() {
            return false;
        }
        match self.users.group(name).await {
            Some(gid) => info.groups.contains(&gid),
            None => false,
        }
    }
}

#[async_trait]
impl Authority for GroupRules {
    fn name(&self) -> &'static str {
        "groups"
    }

    async fn check(&self, caller: &Caller, uid: u32, right: Right) -> Verdict {
        let _ = caller;
        let info = self.users.user(uid).await;
        if info.name.is_none() {
            return Verdict::Deny(Some(format!("uid {uid} has no entry in the user database")));
        }
        if self.member(&info, &self.admin_group).await {
            return Verdict::Allow;
        }
        let may_read = match &self.readers {
            Readers::Nobody => false,
            Readers::Everyone => true,
            Readers::Group(group) => self.member(&info, group).await,
        };
        match right {
            Right::Open => Verdict::Allow,
            Right::Read if may_read => Verdict::Allow,
            Right::Read | Right::Manage => Verdict::Deny(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_group_settings() {
        assert_eq!(Readers::from_setting(None), Readers::Nobody);
        assert_eq!(Readers::from_setting(Some(" ")), Readers::Nobody);
        assert_eq!(Readers::from_setting(Some("*")), Readers::Everyone);
        assert_eq!(
            Readers::from_setting(Some("staff")),
            Readers::Group("staff".into())
        );
    }

    #[tokio::test]
    async fn root_is_in_the_user_database_with_its_primary_group() {
        let db = UserDb::default();
        let root = db.user(0).await;
        assert_eq!(root.name.as_deref(), Some("root"));
        assert!(root.groups.contains(&0), "{root:?}");
        assert_eq!(db.group("root").await, Some(0));
        assert_eq!(db.group("no-such-group-hydraflow").await, None);
        assert_eq!(db.name(0).await, "root");
        assert_eq!(db.name(4_000_000_001).await, "uid 4000000001");
    }

    #[tokio::test]
    async fn the_rules_by_group() {
        let caller = |uid| Caller {
            identity: crate::access::Identity::Known { uid, pid: None },
            from: "test".into(),
        };
        let rules = |admin: &str, readers: Readers| GroupRules {
            admin_group: admin.into(),
            readers,
            users: Arc::default(),
        };
        let check = |r: GroupRules, uid: u32, right: Right| async move {
            r.check(&caller(uid), uid, right).await
        };
        // Root is a member of its primary group "root".
        assert_eq!(
            check(rules("root", Readers::Nobody), 0, Right::Manage).await,
            Verdict::Allow
        );
        assert_eq!(
            check(rules("no-such-group-hf", Readers::Nobody), 0, Right::Read).await,
            Verdict::Deny(None)
        );
        assert_eq!(
            check(rules("", Readers::Group("root".into())), 0, Right::Read).await,
            Verdict::Allow
        );
        assert_eq!(
            check(rules("", Readers::Group("root".into())), 0, Right::Manage).await,
            Verdict::Deny(None)
        );
        assert_eq!(
            check(rules("", Readers::Everyone), 0, Right::Read).await,
            Verdict::Allow
        );
        assert_eq!(
            check(rules("root", Readers::Everyone), 4_000_000_001, Right::Read).await,
            Verdict::Deny(Some(
                "uid 4000000001 has no entry in the user database".into()
            ))
        );
    }
}
