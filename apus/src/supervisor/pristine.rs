//! The server's pristine data directory.
//!
//! A replicated server's state is a function of the log, replayed from the
//! beginning into the server as it was before its first input. So the first
//! time `apus run` starts a server with a `server_dir`, it copies that
//! directory aside (for PostgreSQL: the freshly initialised cluster; for
//! Redis: an empty directory), and every start, a rebuild included, begins
//! from a fresh copy of it. Modes, owners and symbolic links are kept.

use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt, lchown, symlink};
use std::path::{Path, PathBuf};

/// A server directory and its pristine copy.
#[derive(Clone, Debug)]
pub struct Pristine {
    /// The server's own directory.
    pub server_dir: PathBuf,
    /// The copy taken before the server's first start.
    pub copy: PathBuf,
}

impl Pristine {
    /// Takes the pristine copy of `server_dir` into `copy` unless one exists
    /// (a copy is complete only once its marker is written, so a crash while
    /// copying is redone).
    pub fn prepare(server_dir: &Path, copy: &Path) -> io::Result<Pristine> {
        let marker = marker(copy);
        if !marker.exists() {
            if !server_dir.is_dir() {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "server_dir {} does not exist: create it as the server expects to find it \
                         at its first start (e.g. after initdb)",
                        server_dir.display()
                    ),
                ));
            }
            remove(copy)?;
            if let Some(parent) = copy.parent() {
                std::fs::create_dir_all(parent)?;
            }
            copy_tree(server_dir, copy)?;
            std::fs::write(&marker, b"")?;
        }
        Ok(Pristine {
            server_dir: server_dir.to_path_buf(),
            copy: copy.to_path_buf(),
        })
    }

    /// Replaces the server directory with a fresh copy of the pristine one.
    pub fn restore(&self) -> io::Result<()> {
        remove(&self.server_dir)?;
        copy_tree(&self.copy, &self.server_dir)?;
        let _ = std::fs::remove_file(marker(&self.server_dir));
        Ok(())
    }
}

fn marker(copy: &Path) -> PathBuf {
    copy.join(".apus-pristine-complete")
}

fn remove(p: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(p) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Copies `from` to `to` (which must not exist), keeping modes, owners and
/// symbolic links.
fn copy_tree(from: &Path, to: &Path) -> io::Result<()> {
    let meta = std::fs::symlink_metadata(from)?;
    let ft = meta.file_type();
    if ft.is_symlink() {
        symlink(std::fs::read_link(from)?, to)?;
    } else if ft.is_dir() {
        std::fs::create_dir(to)?;
        for e in std::fs::read_dir(from)? {
            let e = e?;
            copy_tree(&e.path(), &to.join(e.file_name()))?;
        }
        std::fs::set_permissions(to, std::fs::Permissions::from_mode(meta.mode()))?;
    } else if ft.is_file() {
        std::fs::copy(from, to)?;
        std::fs::set_permissions(to, std::fs::Permissions::from_mode(meta.mode()))?;
    } else {
        // Sockets, FIFOs and devices are the server's run-time files: it
        // makes them anew.
        return Ok(());
    }
    match lchown(to, Some(meta.uid()), Some(meta.gid())) {
        // Without the right to give files away, they stay ours.
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => Ok(()),
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restores_the_first_contents() {
        let t = tempfile::tempdir().unwrap();
        let server = t.path().join("server");
        std::fs::create_dir_all(server.join("sub")).unwrap();
        std::fs::write(server.join("sub/PG_VERSION"), "15\n").unwrap();
        std::fs::set_permissions(&server, std::fs::Permissions::from_mode(0o700)).unwrap();
        symlink("sub/PG_VERSION", server.join("link")).unwrap();
        let p = Pristine::prepare(&server, &t.path().join("pristine")).unwrap();
        // The server changes its directory; a restore undoes it.
        std::fs::write(server.join("sub/PG_VERSION"), "changed").unwrap();
        std::fs::write(server.join("dump.rdb"), "state").unwrap();
        p.restore().unwrap();
        assert_eq!(
            std::fs::read_to_string(server.join("sub/PG_VERSION")).unwrap(),
            "15\n"
        );
        assert!(!server.join("dump.rdb").exists());
        assert_eq!(
            std::fs::read_to_string(server.join("link")).unwrap(),
            "15\n"
        );
        assert_eq!(std::fs::metadata(&server).unwrap().mode() & 0o777, 0o700);
        // A second prepare keeps the first copy, not today's contents.
        std::fs::write(server.join("dump.rdb"), "later").unwrap();
        let p = Pristine::prepare(&server, &t.path().join("pristine")).unwrap();
        p.restore().unwrap();
        assert!(!server.join("dump.rdb").exists());
        assert!(Pristine::prepare(&t.path().join("missing"), &t.path().join("p2")).is_err());
    }
}
