//! Owner-only local files and directories. The state, cache and runtime
//! directories hold what must stay this user's: session records with the
//! lock nonce, sealed session databases, encrypted chunks, the control
//! socket. They are created 0700 and tightened to 0700 when they exist (if
//! they are ours and not a shared sticky directory such as /tmp); session
//! files are created 0600.

use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Creates `dir` (and missing parents) owner-only, or tightens it to 0700.
pub fn private_dir(dir: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let metadata = std::fs::metadata(dir)?;
    let ours = metadata.uid() == nix::unistd::geteuid().as_raw();
    let shared = metadata.mode() & 0o1000 != 0;
    if ours && !shared && metadata.mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Creates (or truncates) `path` for writing, readable by its owner only.
pub fn create_private_file(path: &Path) -> io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directories_are_created_and_tightened_owner_only() {
        let root = tempfile::tempdir().unwrap();
        let new = root.path().join("a/b");
        private_dir(&new).unwrap();
        for dir in [root.path().join("a"), new] {
            assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        }
        let open = root.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&open).unwrap();
        assert_eq!(std::fs::metadata(&open).unwrap().mode() & 0o777, 0o700);
        let sticky = root.path().join("tmp");
        std::fs::create_dir(&sticky).unwrap();
        std::fs::set_permissions(&sticky, std::fs::Permissions::from_mode(0o1777)).unwrap();
        private_dir(&sticky).unwrap();
        assert_eq!(std::fs::metadata(&sticky).unwrap().mode() & 0o7777, 0o1777);
        let file = root.path().join("f");
        create_private_file(&file).unwrap();
        assert_eq!(std::fs::metadata(&file).unwrap().mode() & 0o777, 0o600);
    }
}
