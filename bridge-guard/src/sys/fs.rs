//! Files other processes read while the agent writes them.

use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _, path::Path};

/// Writes `contents` to `path` atomically (a reader never sees half a file), readable by
/// everyone (0644, whatever the umask): what it holds is meant for unprivileged readers
/// (`bridge-guard status`, node_exporter).
pub fn write_atomically(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(&tmp)?;
    // The umask may have taken bits off the mode `open` was given.
    f.set_permissions(std::fs::Permissions::from_mode(0o644))?;
    f.write_all(contents.as_bytes())?;
    drop(f);
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_file_world_readable_whatever_the_umask() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("bg-fs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("state.json");
        // SAFETY: umask has no failure mode; restored below.
        let old = unsafe { libc::umask(0o077) };
        let written = write_atomically(&path, "one").and_then(|()| write_atomically(&path, "two"));
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        written.expect("writes");
        assert_eq!(std::fs::read_to_string(&path).expect("reads"), "two");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o644);
        assert!(!path.with_extension("tmp").exists());
        std::fs::remove_dir_all(dir).expect("cleanup");
    }
}
