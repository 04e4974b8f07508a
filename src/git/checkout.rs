//! Bringing the main checkout from one commit of its branch to another, as
//! `forge::local` needs when a merge advances the branch the operator has
//! checked out (and, to undo a half-made update, back). The rule is `git checkout`'s when it switches between two
//! commits with local changes (git-read-tree(1), "Two Tree Merge"): the
//! paths the two commits differ in are brought to the new one, and the
//! operator's changes elsewhere are carried along, staged or not.
//!
//! [`sync_checkout`] takes the commit the checkout is at (`old`) and the
//! one it goes to (`new`). It changes nothing unless the checkout is not
//! bare, `HEAD` names the branch, and every path the two commits differ in
//! holds what one of them holds:
//! - outside the paths the two commits differ in, anything goes: the
//!   index entries and files there are not touched;
//! - on the paths they differ in, the index entry and the file each hold the
//!   `old` or the `new` version (or are absent where that commit has none),
//!   so an update killed half-way is finished, while an operator's version,
//!   or an untracked or ignored file where `new` puts a file, leaves the
//!   checkout alone;
//! - no untracked file sits where `new` needs a directory.
//!
//! All of it happens under the checkout's index lock
//! ([`super::index_lock`]), which the caller holds from before the update
//! until after it moved the branch: the index is replaced first, then the
//! branch moves. git reads `HEAD` before the index and writes the index only
//! under the lock, so no git command can pair the new `HEAD` with the old
//! index (a `git commit -a` doing so would undo the merge). The files `new`
//! removes are deleted (with directories left empty), the files it adds or
//! changes are checked out by libgit2 (filters, modes, symbolic links), and
//! last the index entries of those paths become `new`'s (the others kept as
//! they are): built in a copy outside the git directory, then renamed over
//! the index while the lock is held.
//! Each step can be interrupted and the whole run again: the rule above
//! accepts every intermediate state. Submodule changes are left to the
//! operator.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};

use git2::{Delta, DiffOptions, ErrorCode, ObjectType, Oid, Repository, Tree};

use super::index_lock::IndexLock;
use super::{GitError, git, io};

/// Mode of a gitlink (a submodule's commit) in a tree or the index.
const GITLINK: u32 = 0o160000;

/// What [`sync_checkout`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckoutSync {
    /// The index and working tree now match `new`; `paths` files were in the
    /// difference between the two commits.
    Updated {
        /// How many paths differ between `old` and `new`.
        paths: usize,
    },
    /// Nothing was touched: the rule does not apply (a bare repository,
    /// another branch or a detached `HEAD`, the branch moved on); the reason.
    NotApplicable(String),
    /// Nothing was touched: the checkout holds something of its own on a
    /// path (an edit, a staged change, an untracked file in the way); the
    /// reason, naming the path.
    LocalChanges(String),
}

/// A blob entry of a tree or the index: object id and git file mode.
type Entry = (Oid, u32);

/// One path that differs between `old` and `new`.
#[derive(Debug)]
struct Change {
    old: Option<Entry>,
    new: Option<Entry>,
}

fn bytes_path(bytes: &[u8]) -> PathBuf {
    PathBuf::from(OsStr::from_bytes(bytes))
}

/// The blob (file, symbolic link or gitlink) at `path` in `tree`, if any.
fn blob_at(tree: &Tree<'_>, path: &Path) -> Option<Entry> {
    let entry = tree.get_path(path).ok()?;
    (entry.kind() != Some(ObjectType::Tree)).then(|| (entry.id(), entry.filemode() as u32))
}

/// Bring the checkout of `repo`, which has `base_ref` (a full ref name,
/// `refs/heads/<branch>`) checked out, from `old` to `new` by the rule of
/// the module documentation; where `base_ref` points is the caller's
/// business.
///
/// `lock` is the checkout's index lock, taken ([`IndexLock::acquire`]) and
/// held by the caller.
///
/// # Errors
/// [`GitError`] when git or the file system fails while looking or
/// writing; a checkout that must be left alone is [`CheckoutSync::NotApplicable`]
/// or [`CheckoutSync::LocalChanges`],
/// not an error. After an error while writing, calling again with the same
/// commits finishes the update.
pub fn sync_checkout(
    repo: &Repository,
    base_ref: &str,
    old: Oid,
    new: Oid,
    lock: &IndexLock,
) -> Result<CheckoutSync, GitError> {
    let Some(root) = repo.workdir().map(Path::to_path_buf) else {
        return Ok(CheckoutSync::NotApplicable("the repository is bare".into()));
    };
    let head = match repo.find_reference("HEAD") {
        Ok(head) => head,
        Err(e) if e.code() == ErrorCode::NotFound => {
            return Ok(CheckoutSync::NotApplicable(
                "the checkout has no HEAD".into(),
            ));
        }
        Err(e) => return Err(git("cannot read HEAD")(e)),
    };
    match head.symbolic_target_bytes() {
        Some(target) if target == base_ref.as_bytes() => {}
        Some(target) => {
            return Ok(CheckoutSync::NotApplicable(format!(
                "the checkout has {} checked out, not {base_ref}",
                String::from_utf8_lossy(target)
            )));
        }
        None => {
            return Ok(CheckoutSync::NotApplicable(
                "the checkout has a detached HEAD".into(),
            ));
        }
    }
    let old_tree = repo
        .find_commit(old)
        .and_then(|c| c.tree())
        .map_err(git(format!("cannot read the tree of {old}")))?;
    let new_tree = repo
        .find_commit(new)
        .and_then(|c| c.tree())
        .map_err(git(format!("cannot read the tree of {new}")))?;
    let changes = changes(repo, &old_tree, &new_tree)?;
    if let Some(reason) = obstacle(repo, &root, &old_tree, &new_tree, &changes)? {
        return Ok(CheckoutSync::LocalChanges(reason));
    }
    // Only the paths not at `new` yet: a checkout already there keeps its
    // index as it is, byte for byte (stat data included).
    let index = repo.index().map_err(git("cannot open the index"))?;
    let differing = workdir_differences(repo, &new_tree, &changes)?;
    let pending: BTreeMap<PathBuf, Change> = changes
        .into_iter()
        .filter(|(path, change)| {
            differing.contains(path)
                || index.get_path(path, 0).map(|e| (e.id, e.mode)) != change.new
        })
        .collect();
    if !pending.is_empty() {
        apply(repo, &root, new_tree.id(), &pending, lock)?;
    }
    Ok(CheckoutSync::Updated {
        paths: pending.len(),
    })
}

/// The paths that differ between the two trees, with each side's blob.
fn changes(
    repo: &Repository,
    old: &Tree<'_>,
    new: &Tree<'_>,
) -> Result<BTreeMap<PathBuf, Change>, GitError> {
    let diff = repo
        .diff_tree_to_tree(Some(old), Some(new), None)
        .map_err(git("cannot compare the old and new trees"))?;
    let mut out = BTreeMap::new();
    for delta in diff.deltas() {
        for file in [delta.old_file(), delta.new_file()] {
            if let Some(bytes) = file.path_bytes() {
                let path = bytes_path(bytes);
                let change = Change {
                    old: blob_at(old, &path),
                    new: blob_at(new, &path),
                };
                out.insert(path, change);
            }
        }
    }
    Ok(out)
}

/// Why the checkout must be left alone, or `None` when it may be updated.
fn obstacle(
    repo: &Repository,
    root: &Path,
    old_tree: &Tree<'_>,
    new_tree: &Tree<'_>,
    changes: &BTreeMap<PathBuf, Change>,
) -> Result<Option<String>, GitError> {
    if let Some((path, _)) = changes.iter().find(|(_, c)| {
        [c.old, c.new]
            .iter()
            .flatten()
            .any(|(_, mode)| *mode == GITLINK)
    }) {
        return Ok(Some(format!(
            "the merge changes the submodule {}",
            path.display()
        )));
    }
    let mut index = repo.index().map_err(git("cannot open the index"))?;
    index.read(false).map_err(git("cannot read the index"))?;
    if index.has_conflicts() {
        return Ok(Some("the index has unresolved conflicts".into()));
    }

    // The index on the changed paths: old's or new's entry (elsewhere
    // anything: the operator's staged changes are carried along).
    for (path, change) in changes {
        let entry = index.get_path(path, 0).map(|e| (e.id, e.mode));
        if entry != change.old && entry != change.new {
            return Ok(Some(format!(
                "{} is staged with changes of its own",
                path.display()
            )));
        }
    }

    // The changed paths: the old or the new version in the working tree.
    if !changes.is_empty() {
        let against_old = workdir_differences(repo, old_tree, changes)?;
        let against_new = workdir_differences(repo, new_tree, changes)?;
        if let Some(path) = against_old.intersection(&against_new).next() {
            return Ok(Some(format!(
                "{} holds neither the old nor the new version",
                path.display()
            )));
        }
    }

    // No untracked file where a new file needs a directory.
    for path in changes
        .iter()
        .filter(|(_, c)| c.new.is_some())
        .map(|(p, _)| p)
    {
        for dir in path.ancestors().skip(1) {
            if dir.as_os_str().is_empty() {
                break;
            }
            match std::fs::symlink_metadata(root.join(dir)) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    return Err(io(format!("cannot inspect {}", root.join(dir).display()))(
                        e,
                    ));
                }
                Ok(meta) if meta.is_dir() => {}
                // A tracked file of either commit, checked like the others above.
                Ok(_) if blob_at(old_tree, dir).is_some() || blob_at(new_tree, dir).is_some() => {}
                Ok(_) => {
                    return Ok(Some(format!(
                        "the untracked {} is in the way of {}",
                        dir.display(),
                        path.display()
                    )));
                }
            }
        }
    }
    Ok(None)
}

/// Paths at or under the changed paths where the working tree differs from
/// `tree` (content after filters, type, presence; untracked and ignored
/// files included).
fn workdir_differences(
    repo: &Repository,
    tree: &Tree<'_>,
    changes: &BTreeMap<PathBuf, Change>,
) -> Result<BTreeSet<PathBuf>, GitError> {
    let mut opts = DiffOptions::new();
    opts.include_untracked(true)
        .recurse_untracked_dirs(true)
        .include_ignored(true)
        .recurse_ignored_dirs(true)
        .include_typechange(true)
        .disable_pathspec_match(true);
    for path in changes.keys() {
        opts.pathspec(path.as_path());
    }
    let diff = repo
        .diff_tree_to_workdir(Some(tree), Some(&mut opts))
        .map_err(git("cannot compare the working tree with a commit"))?;
    let mut out = BTreeSet::new();
    for delta in diff.deltas() {
        if delta.status() == Delta::Unmodified {
            continue;
        }
        for file in [delta.old_file(), delta.new_file()] {
            if let Some(bytes) = file.path_bytes() {
                out.insert(bytes_path(bytes));
            }
        }
    }
    Ok(out)
}

/// Whether every directory above `path` (relative to `root`) is a real
/// directory, not a symbolic link or a file.
fn inside_real_dirs(root: &Path, path: &Path) -> bool {
    path.ancestors()
        .skip(1)
        .filter(|d| !d.as_os_str().is_empty())
        .all(|d| std::fs::symlink_metadata(root.join(d)).is_ok_and(|m| m.is_dir()))
}

/// Delete what `new_tree` removes, check out what it adds or changes, and
/// replace the index through `lock` with the current one whose entries on
/// the changed paths are `new_tree`'s (the others, with whatever the
/// operator staged, kept).
fn apply(
    repo: &Repository,
    root: &Path,
    new_tree: Oid,
    changes: &BTreeMap<PathBuf, Change>,
    lock: &IndexLock,
) -> Result<(), GitError> {
    for path in changes
        .iter()
        .filter(|(_, c)| c.new.is_none())
        .map(|(p, _)| p)
    {
        let full = root.join(path);
        if !inside_real_dirs(root, path) {
            continue;
        }
        match std::fs::symlink_metadata(&full) {
            Ok(meta) if !meta.is_dir() => {
                std::fs::remove_file(&full)
                    .map_err(io(format!("cannot remove {}", full.display())))?;
            }
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(format!("cannot inspect {}", full.display()))(e)),
        }
        // Directories the removal left empty go too, as git does.
        for dir in path.ancestors().skip(1) {
            if dir.as_os_str().is_empty() || std::fs::remove_dir(root.join(dir)).is_err() {
                break;
            }
        }
    }

    // The new index is built in a copy of the index, outside the git
    // directory (`index.lock` is ours, so libgit2 cannot write the index
    // itself), by a repository handle of its own whose index that copy is.
    let repo = Repository::open(repo.path()).map_err(git("cannot open the checkout"))?;
    let new_tree = repo
        .find_tree(new_tree)
        .map_err(git(format!("cannot read the tree {new_tree}")))?;
    let stage = crate::store::atomic::staging_dir(&std::env::temp_dir(), "hydraflow-index")
        .map_err(io("cannot make a directory for the new index"))?;
    let staged = stage.path().join("index");
    stage_index(&repo.path().join("index"), &staged)?;
    let mut index = git2::Index::open(&staged).map_err(git("cannot read the index"))?;
    repo.set_index(&mut index)
        .map_err(git("cannot read the index"))?;
    for (path, change) in changes {
        match change.new {
            Some((id, mode)) => {
                let path = path.as_os_str().as_bytes().to_vec();
                let zero = git2::IndexTime::new(0, 0);
                // Stat data zero: checked against the file until the
                // checkout below (or git) records the file's.
                let entry = git2::IndexEntry {
                    ctime: zero,
                    mtime: zero,
                    dev: 0,
                    ino: 0,
                    mode,
                    uid: 0,
                    gid: 0,
                    file_size: 0,
                    id,
                    flags: u16::try_from(path.len()).map_or(0xfff, |n| n.min(0xfff)),
                    flags_extended: 0,
                    path,
                };
                index
                    .add(&entry)
                    .map_err(git(format!("cannot stage {}", path_text(&entry.path))))?;
            }
            None => match index.remove_path(path) {
                Ok(()) => {}
                Err(e) if e.code() == ErrorCode::NotFound => {}
                Err(e) => return Err(git(format!("cannot unstage {}", path.display()))(e)),
            },
        }
    }
    index.write().map_err(git("cannot write the new index"))?;

    let writes: Vec<&PathBuf> = changes
        .iter()
        .filter(|(_, c)| c.new.is_some())
        .map(|(p, _)| p)
        .collect();
    if !writes.is_empty() {
        // Updates the staged index's entries (stat data) as it writes.
        let mut checkout = git2::build::CheckoutBuilder::new();
        checkout.force().disable_pathspec_match(true);
        for path in writes {
            checkout.path(path.as_path());
        }
        repo.checkout_tree(new_tree.as_object(), Some(&mut checkout))
            .map_err(git("cannot check out the new files"))?;
    }
    let bytes = std::fs::read(&staged).map_err(io("cannot read the new index"))?;
    lock.replace_index(&bytes)
}

fn path_text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Copy the index at `live` (if any) to `staged` with its modification
/// time, against which libgit2 judges entries racily clean when it writes
/// the copy (git's Documentation/technical/racy-git.txt): an entry that was
/// racy in the live index is checked against its file, as git would.
fn stage_index(live: &Path, staged: &Path) -> Result<(), GitError> {
    let context = || format!("cannot copy {} to {}", live.display(), staged.display());
    let modified = match std::fs::metadata(live) {
        Ok(meta) => meta.modified().map_err(io(context()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(context())(e)),
    };
    std::fs::copy(live, staged).map_err(io(context()))?;
    std::fs::File::options()
        .write(true)
        .open(staged)
        .and_then(|f| f.set_modified(modified))
        .map_err(io(context()))
}
