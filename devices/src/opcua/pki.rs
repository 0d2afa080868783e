//! The PKI directory's private keys are secrets: readable by their owner only.
//!
//! async-opcua creates the key pair at first start with the process's default file mode
//! (usually world-readable); the `private/` folder is made owner-only before it writes there,
//! and every key in it is set to 0600 after. A mode is changed only when it differs, and a
//! PKI the process may not change (a read-only mount, files of another user) is logged, not
//! refused: the session still opens with the keys as they are.

use std::io;
use std::path::Path;

/// Make `<pki>/private` (created when missing) 0700 before keys are written into it.
pub fn prepare(pki: &Path) -> io::Result<()> {
    let private = pki.join("private");
    std::fs::create_dir_all(&private)?;
    restrict(&private, 0o700);
    Ok(())
}

/// Set every file in `<pki>/private` to 0600 (after the library wrote them).
pub fn protect(pki: &Path) -> io::Result<()> {
    let private = pki.join("private");
    if !private.is_dir() {
        return Ok(());
    }
    restrict(&private, 0o700);
    for entry in std::fs::read_dir(&private)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            restrict(&entry.path(), 0o600);
        }
    }
    Ok(())
}

/// Set `path` to `mode` when it is not already; a refusal is logged.
fn restrict(path: &Path, mode: u32) {
    if let Err(e) = set_mode(path, mode) {
        tracing::warn!(path = %path.display(), mode = format!("{mode:o}"), error = %e, "cannot restrict the permissions of a PKI file; left as it is");
    }
}

#[cfg(unix)]
fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if std::fs::metadata(path)?.permissions().mode() & 0o777 == mode {
        return Ok(());
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

#[cfg(not(unix))]
fn set_mode(_path: &Path, _mode: u32) -> io::Result<()> {
    Ok(())
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn keys_end_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        prepare(dir.path()).unwrap();
        let key = dir.path().join("private/private.pem");
        std::fs::write(&key, b"key").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        protect(dir.path()).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&key), 0o600);
        assert_eq!(mode(&dir.path().join("private")), 0o700);
    }
}
