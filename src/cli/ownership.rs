//! Files that root writes into an instance's data (`sudo hydraflow issue add`, `sudo hydraflow
//! hitl …` on a packaged install) go back to the user that owns the instance's directory: the worker of
//! `hydraflow@<slug>.service` runs as its own dynamic user and could not read or replace
//! root-owned files (hydraflow@.service(8)).

use std::io;
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;

use anyhow::Context as _;

use crate::layout::Layout;

/// Who owns a repository's data: the owner of `data_root/<slug>` (the instance's own
/// directory: under systemd a dynamic user's state directory, reached through a symbolic link
/// in `/var/lib/hydraflow`), else of `data_root`, whichever exists first. `None` when this
/// process does not run as root, when neither exists, or when root owns it: then nothing is
/// handed over. Ask before anything is written, since writing as root creates root-owned
/// directories.
///
/// # Errors
/// A directory whose owner cannot be read, named.
pub fn data_owner(layout: &Layout) -> anyhow::Result<Option<(u32, u32)>> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    for dir in [layout.repo_dir(), layout.data_root.clone()] {
        match std::fs::metadata(&dir) {
            Ok(meta) if meta.uid() == 0 => return Ok(None),
            Ok(meta) => return Ok(Some((meta.uid(), meta.gid()))),
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(err).with_context(|| format!("cannot read {}", dir.display())),
        }
    }
    Ok(None)
}

/// Give every root-owned file and directory under `dir` (itself resolved when it is a symbolic
/// link; links below it not followed) to `owner` ([`data_owner`]); nothing when `owner` is
/// `None` or `dir` does not exist.
///
/// A worker that meets one of these files before it is handed over cannot read it and
/// retries on its next poll.
///
/// # Errors
/// A directory that cannot be listed or an entry whose owner cannot be changed, named.
pub fn restore_owner(owner: Option<(u32, u32)>, dir: &Path) -> anyhow::Result<()> {
    let Some((uid, gid)) = owner else {
        return Ok(());
    };
    // `dir` itself may be a symbolic link (systemd's `/var/lib/hydraflow/<slug>` to
    // `/var/lib/private/hydraflow/<slug>`): start from where it points.
    match std::fs::canonicalize(dir) {
        Ok(real) => hand_over(&real, uid, gid),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(err).with_context(|| format!("cannot resolve {}", dir.display())),
    }
}

/// Give `path` and what is below it to `uid`:`gid` where root owns it.
fn hand_over(path: &Path, uid: u32, gid: u32) -> anyhow::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(err).with_context(|| format!("cannot read {}", path.display())),
    };
    if meta.uid() == 0 {
        std::os::unix::fs::lchown(path, Some(uid), Some(gid))
            .with_context(|| format!("cannot give {} to uid {uid}", path.display()))?;
    }
    if meta.is_dir() {
        let entries =
            std::fs::read_dir(path).with_context(|| format!("cannot list {}", path.display()))?;
        for entry in entries {
            let entry = entry.with_context(|| format!("cannot list {}", path.display()))?;
            hand_over(&entry.path(), uid, gid)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_non_root_caller_or_root_owned_data_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), "x").unwrap();
        let before = std::fs::metadata(dir.path().join("f")).unwrap().uid();
        let layout = |root: &Path| Layout {
            slug: crate::layout::Slug::new("s").unwrap(),
            data_root: root.to_path_buf(),
            worktree_base: root.join("wt"),
        };
        let owner = data_owner(&layout(dir.path())).unwrap();
        if !nix::unistd::geteuid().is_root() {
            assert_eq!(owner, None, "a user hands nothing over");
        }
        assert_eq!(
            data_owner(&layout(&dir.path().join("missing"))).unwrap(),
            None
        );
        restore_owner(None, dir.path()).unwrap();
        assert_eq!(
            std::fs::metadata(dir.path().join("f")).unwrap().uid(),
            before
        );
    }

    #[test]
    #[ignore = "needs root (chown): run as root with cargo test -- --include-ignored (.ci/run does)"]
    fn root_owned_entries_go_to_the_owner_of_the_instance_directory() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test changes owners and must run as root"
        );
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("forge/issues")).unwrap();
        std::fs::write(root.join("forge/issues/1.json"), "{}").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.join("forge/link")).unwrap();
        let layout = Layout {
            slug: crate::layout::Slug::new("forge").unwrap(),
            data_root: root.to_path_buf(),
            worktree_base: root.join("wt"),
        };
        // The instance's own directory decides, not the data root (root-owned here).
        std::os::unix::fs::lchown(root.join("forge"), Some(4242), Some(4343)).unwrap();
        let owner = data_owner(&layout).unwrap();
        assert_eq!(owner, Some((4242, 4343)));
        restore_owner(owner, &root.join("forge")).unwrap();
        for p in ["forge", "forge/issues", "forge/issues/1.json", "forge/link"] {
            let meta = std::fs::symlink_metadata(root.join(p)).unwrap();
            assert_eq!((meta.uid(), meta.gid()), (4242, 4343), "{p}");
        }
        assert_eq!(std::fs::metadata("/etc/passwd").unwrap().uid(), 0);

        // As under systemd's DynamicUser=: the instance directory is a symbolic link to the
        // private one; what root writes through it is handed over all the same.
        let private = root.join("private/inst");
        std::fs::create_dir_all(&private).unwrap();
        std::os::unix::fs::lchown(&private, Some(4242), Some(4343)).unwrap();
        std::os::unix::fs::symlink(&private, root.join("inst")).unwrap();
        let layout = Layout {
            slug: crate::layout::Slug::new("inst").unwrap(),
            ..layout
        };
        let owner = data_owner(&layout).unwrap();
        assert_eq!(owner, Some((4242, 4343)));
        std::fs::create_dir_all(root.join("inst/forge/issues")).unwrap();
        std::fs::write(root.join("inst/forge/issues/2.json"), "{}").unwrap();
        restore_owner(owner, &layout.repo_dir()).unwrap();
        for p in ["forge", "forge/issues", "forge/issues/2.json"] {
            let meta = std::fs::symlink_metadata(private.join(p)).unwrap();
            assert_eq!((meta.uid(), meta.gid()), (4242, 4343), "{p}");
        }
    }
}
