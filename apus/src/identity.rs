//! A replica's identity on disk: `<data_dir>/identity`.
//!
//! ```text
//! apus identity 1
//! cluster orders
//! node 1
//! incarnation 5f0c9d2a81b3e467
//! rejoining 0
//! peer 0 a1b2c3d4e5f60718
//! superseded 9e8d7c6b5a493827
//! crc32c 1a2b3c4d
//! ```
//!
//! Written when the data directory is created (a random incarnation), and
//! replaced atomically whenever a handshake changes what it holds
//! ([`apus_tcp::identity`] has the rules). A data directory of another
//! cluster or of another replica is refused at start, with both names.
//! A replica told it is a replacement keeps `rejoining 1` until a leader has
//! brought it up to date, across restarts.

use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use apus_core::NodeId;
use apus_core::types::MAX_REPLICAS;
use apus_tcp::identity::{Identity, Introduction, MAX_SUPERSEDED, PeerBook, introduction, meet};
use tracing::{info, warn};

use crate::storage::replace_file;

const FILE: &str = "identity";
const HEADER: &str = "apus identity 1";

/// Why a data directory's identity cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The identity file.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
    /// The file is damaged.
    #[error(
        "{path} is corrupt ({why}); refusing to start without knowing this replica's incarnation"
    )]
    Corrupt {
        /// The identity file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The data directory belongs to another cluster.
    #[error(
        "{path} belongs to cluster {theirs:?}, but this configuration is cluster {ours:?} (cluster.name): refusing to mix their logs"
    )]
    OtherCluster {
        /// The identity file.
        path: PathBuf,
        /// The cluster it names.
        theirs: String,
        /// The configured cluster.
        ours: String,
    },
    /// The data directory belongs to another replica.
    #[error("{path} belongs to replica n{theirs}, not n{ours}: check replica[].data_dir")]
    OtherReplica {
        /// The identity file.
        path: PathBuf,
        /// The replica it names.
        theirs: u8,
        /// The replica starting.
        ours: u8,
    },
}

/// A replica's identity, kept in its data directory.
#[derive(Debug)]
pub struct ReplicaIdentity {
    path: PathBuf,
    cluster: String,
    node: NodeId,
    book: Mutex<PeerBook>,
    /// Told it is a replacement, and the engine has not taken it yet.
    rejoin: AtomicBool,
}

impl ReplicaIdentity {
    /// Opens `dir`'s identity, creating the directory and a new incarnation
    /// if it has none (a new replica, a wiped directory, or one from before
    /// incarnations: peers that remember another incarnation tell it).
    pub fn open(dir: &Path, cluster: &str, node: NodeId) -> Result<ReplicaIdentity, IdentityError> {
        let path = dir.join(FILE);
        let io_err = |source| IdentityError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io_err)?;
        let book = match std::fs::read_to_string(&path) {
            Ok(text) => {
                let (theirs, id, book) = parse(&text).map_err(|why| IdentityError::Corrupt {
                    path: path.clone(),
                    why,
                })?;
                if theirs != cluster {
                    return Err(IdentityError::OtherCluster {
                        path,
                        theirs,
                        ours: cluster.into(),
                    });
                }
                if id != node.0 {
                    return Err(IdentityError::OtherReplica {
                        path,
                        theirs: id,
                        ours: node.0,
                    });
                }
                book
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let book = PeerBook::new(fresh_incarnation().map_err(io_err)?);
                replace_file(dir, FILE, render(cluster, node, &book).as_bytes()).map_err(io_err)?;
                info!(%node, incarnation = %format!("{:016x}", book.incarnation), "new incarnation");
                book
            }
            Err(e) => return Err(io_err(e)),
        };
        if book.rejoining {
            warn!(%node, "this replica replaced one the cluster knew and has not caught up yet: it does not vote until a leader brings it up to date");
        }
        Ok(ReplicaIdentity {
            path,
            cluster: cluster.into(),
            node,
            rejoin: AtomicBool::new(book.rejoining),
            book: Mutex::new(book),
        })
    }

    /// This replica's incarnation.
    pub fn incarnation(&self) -> u64 {
        self.lock().incarnation
    }

    /// Whether this replica is a replacement that has not caught up yet.
    pub fn is_rejoining(&self) -> bool {
        self.lock().rejoining
    }

    /// Whether the engine must rejoin as a non-voter (once per telling).
    pub fn take_rejoin(&self) -> bool {
        self.rejoin.swap(false, Ordering::AcqRel)
    }

    /// A leader brought this replacement up to date: it votes again, also
    /// after a restart.
    pub fn rejoined(&self) -> io::Result<()> {
        let mut book = self.lock();
        if !book.rejoining {
            return Ok(());
        }
        book.rejoining = false;
        self.save(&book)?;
        info!(node = %self.node, "caught up after replacing an earlier incarnation: voting again");
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PeerBook> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn save(&self, book: &PeerBook) -> io::Result<()> {
        let dir = self
            .path
            .parent()
            .expect("the file is in the data directory");
        replace_file(dir, FILE, render(&self.cluster, self.node, book).as_bytes())
    }
}

impl Identity for ReplicaIdentity {
    fn cluster(&self) -> &str {
        &self.cluster
    }

    fn introduce(&self, peer: NodeId) -> Introduction {
        introduction(&self.lock(), peer)
    }

    fn met(&self, peer: NodeId, theirs: &Introduction) -> io::Result<()> {
        let mut book = self.lock();
        let before = book.clone();
        let m = meet(&mut book, peer, theirs);
        if !m.changed() {
            return Ok(());
        }
        if let Err(e) = self.save(&book) {
            // Unsaved, it did not happen: the connection is refused.
            *book = before;
            return Err(e);
        }
        if m.replaced {
            warn!(
                node = %self.node,
                %peer,
                remembered = %format!("{:016x}", theirs.yours),
                incarnation = %format!("{:016x}", book.incarnation),
                "a peer remembers an earlier incarnation of this replica: its data directory was wiped or replaced; rejoining as a non-voter until caught up"
            );
            self.rejoin.store(true, Ordering::Release);
        }
        Ok(())
    }
}

fn fresh_incarnation() -> io::Result<u64> {
    loop {
        let mut b = [0u8; 8];
        getrandom::fill(&mut b).map_err(|e| io::Error::other(e.to_string()))?;
        let n = u64::from_le_bytes(b);
        if n != 0 {
            return Ok(n);
        }
    }
}

fn render(cluster: &str, node: NodeId, book: &PeerBook) -> String {
    let mut s = format!(
        "{HEADER}\ncluster {cluster}\nnode {}\nincarnation {:016x}\nrejoining {}\n",
        node.0,
        book.incarnation,
        u8::from(book.rejoining)
    );
    for (i, p) in book.peers.iter().enumerate().filter(|(_, p)| **p != 0) {
        let _ = writeln!(s, "peer {i} {p:016x}");
    }
    for old in &book.superseded {
        let _ = writeln!(s, "superseded {old:016x}");
    }
    let crc = crc32c::crc32c(s.as_bytes());
    let _ = writeln!(s, "crc32c {crc:08x}");
    s
}

fn parse(text: &str) -> Result<(String, u8, PeerBook), String> {
    let body_end = text
        .trim_end_matches('\n')
        .rfind('\n')
        .map(|i| i + 1)
        .ok_or("too short")?;
    let (body, last) = text.split_at(body_end);
    let crc = last
        .trim_end()
        .strip_prefix("crc32c ")
        .and_then(|h| u32::from_str_radix(h, 16).ok())
        .ok_or("no checksum line")?;
    if crc32c::crc32c(body.as_bytes()) != crc {
        return Err("checksum mismatch".into());
    }
    let mut lines = body.lines();
    if lines.next() != Some(HEADER) {
        return Err(format!("the first line is not {HEADER:?}"));
    }
    let hex = |v: &str| u64::from_str_radix(v, 16).map_err(|_| format!("{v:?} is not hex"));
    let (mut cluster, mut node, mut inc, mut rejoining) = (None, None, None, false);
    let (mut peers, mut superseded) = ([0u64; MAX_REPLICAS], Vec::new());
    for line in lines {
        let mut w = line.split(' ');
        match (w.next(), w.next(), w.next(), w.next()) {
            (Some("cluster"), Some(c), None, None) => cluster = Some(c.to_string()),
            (Some("node"), Some(n), None, None) => node = n.parse::<u8>().ok(),
            (Some("incarnation"), Some(v), None, None) => inc = Some(hex(v)?),
            (Some("rejoining"), Some(v), None, None) => rejoining = v == "1",
            (Some("peer"), Some(i), Some(v), None) => {
                let i: usize = i.parse().map_err(|_| format!("peer id {i:?}"))?;
                *peers.get_mut(i).ok_or(format!("peer id {i}"))? = hex(v)?;
            }
            (Some("superseded"), Some(v), None, None) if superseded.len() < MAX_SUPERSEDED => {
                superseded.push(hex(v)?);
            }
            _ => return Err(format!("unexpected line {line:?}")),
        }
    }
    let (Some(cluster), Some(node), Some(inc)) = (cluster, node, inc.filter(|i| *i != 0)) else {
        return Err("cluster, node or incarnation missing".into());
    };
    let mut book = PeerBook::new(inc);
    book.rejoining = rejoining;
    book.peers = peers;
    book.superseded = superseded;
    Ok((cluster, node, book))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_directory_gets_an_incarnation_that_survives_a_restart() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("n1");
        let a = ReplicaIdentity::open(&dir, "orders", NodeId(1)).unwrap();
        let inc = a.incarnation();
        a.met(
            NodeId(0),
            &Introduction {
                incarnation: 7,
                yours: 0,
                superseded: vec![],
            },
        )
        .unwrap();
        drop(a);
        let b = ReplicaIdentity::open(&dir, "orders", NodeId(1)).unwrap();
        assert_eq!(b.incarnation(), inc);
        assert_eq!(b.introduce(NodeId(0)).yours, 7, "the peer is remembered");
        assert!(!b.is_rejoining() && !b.take_rejoin());
        // Wiped: a new incarnation.
        std::fs::remove_dir_all(&dir).unwrap();
        let c = ReplicaIdentity::open(&dir, "orders", NodeId(1)).unwrap();
        assert_ne!(c.incarnation(), inc);
    }

    #[test]
    fn a_replacement_stays_rejoining_across_restarts_until_caught_up() {
        let d = tempfile::tempdir().unwrap();
        let a = ReplicaIdentity::open(d.path(), "orders", NodeId(1)).unwrap();
        let told = Introduction {
            incarnation: 7,
            yours: 12345,
            superseded: vec![],
        };
        a.met(NodeId(0), &told).unwrap();
        assert!(a.take_rejoin() && !a.take_rejoin(), "once per telling");
        drop(a);
        let b = ReplicaIdentity::open(d.path(), "orders", NodeId(1)).unwrap();
        assert!(b.is_rejoining() && b.take_rejoin(), "still rejoining");
        b.met(NodeId(0), &told).unwrap();
        assert!(
            !b.take_rejoin(),
            "an incarnation it already knows is superseded"
        );
        b.rejoined().unwrap();
        drop(b);
        let c = ReplicaIdentity::open(d.path(), "orders", NodeId(1)).unwrap();
        assert!(!c.is_rejoining() && !c.take_rejoin());
    }

    #[test]
    fn another_clusters_or_replicas_directory_and_damage_are_refused() {
        let d = tempfile::tempdir().unwrap();
        drop(ReplicaIdentity::open(d.path(), "orders", NodeId(1)).unwrap());
        let e = ReplicaIdentity::open(d.path(), "billing", NodeId(1)).unwrap_err();
        assert!(matches!(e, IdentityError::OtherCluster { .. }), "{e}");
        assert!(e.to_string().contains("\"orders\"") && e.to_string().contains("\"billing\""));
        let e = ReplicaIdentity::open(d.path(), "orders", NodeId(2)).unwrap_err();
        assert!(
            matches!(
                e,
                IdentityError::OtherReplica {
                    theirs: 1,
                    ours: 2,
                    ..
                }
            ),
            "{e}"
        );
        let path = d.path().join(FILE);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replace("node 1", "node 3")).unwrap();
        let e = ReplicaIdentity::open(d.path(), "orders", NodeId(3)).unwrap_err();
        assert!(matches!(e, IdentityError::Corrupt { .. }), "{e}");
        std::fs::write(&path, "").unwrap();
        assert!(matches!(
            ReplicaIdentity::open(d.path(), "orders", NodeId(1)),
            Err(IdentityError::Corrupt { .. })
        ));
    }
}
