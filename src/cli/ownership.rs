//! Files that root writes into an instance's data (`sudo hydraflow issue add`, `sudo hydraflow
//! hitl …` on a packaged install) go back to the user that owns the instance: the worker of
//! `hydraflow@<slug>.service` runs as its own dynamic user and could not read or replace
//! root-owned files (hydraflow@.service(8)).

use std::io;
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;

use anyhow::Context as _;

/// When this process runs as root and `data_root` belongs to another user, give every
/// root-owned file and directory under `dir` (symbolic links not followed) to that user and
/// its group. Nothing happens for a non-root caller or a root-owned `data_root`, or when
/// either path does not exist.
///
/// A worker that meets one of these files before it is handed over cannot read it and
/// retries on its next poll.
///
/// # Errors
/// A directory that cannot be listed or an entry whose owner cannot be changed, named.
pub fn restore_owner(data_root: &Path, dir: &Path) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    let owner = match std::fs::metadata(data_root) {
        Ok(meta) => meta,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(err) => {
            return Err(err).with_context(|| format!("cannot read {}", data_root.display()));
        }
    };
    if owner.uid() == 0 {
        return Ok(());
    }
    hand_over(dir, owner.uid(), owner.gid())
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
        restore_owner(dir.path(), dir.path()).unwrap();
        assert_eq!(
            std::fs::metadata(dir.path().join("f")).unwrap().uid(),
            before
        );
        restore_owner(&dir.path().join("missing"), dir.path()).unwrap();
    }

    #[test]
    fn root_owned_entries_go_to_the_owner_of_the_data_root() {
        if !nix::unistd::geteuid().is_root() {
            println!("skipped: chown needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("forge/issues")).unwrap();
        std::fs::write(root.join("forge/issues/1.json"), "{}").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.join("forge/link")).unwrap();
        std::os::unix::fs::lchown(root, Some(4242), Some(4343)).unwrap();
        restore_owner(root, &root.join("forge")).unwrap();
        for p in ["forge", "forge/issues", "forge/issues/1.json", "forge/link"] {
            let meta = std::fs::symlink_metadata(root.join(p)).unwrap();
            assert_eq!((meta.uid(), meta.gid()), (4242, 4343), "{p}");
        }
        assert_eq!(std::fs::metadata("/etc/passwd").unwrap().uid(), 0);
    }
}
