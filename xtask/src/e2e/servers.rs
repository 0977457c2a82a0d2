//! The servers the end-to-end checks run: how to install, prepare, start,
//! probe and digest each, and which process model it has.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use apus_bench::appclient::{AppConn, Protocol};

use super::Binaries;
use crate::tools;

/// The servers the checks know how to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerKind {
    Redis,
    Memcached,
    RespKv,
    /// PostgreSQL 15: a backend process forked per connection.
    Postgres,
    /// OpenLDAP's slapd: daemonizes, one thread pool.
    Slapd,
    /// MariaDB: a thread per connection.
    Mariadb,
    /// nginx with `master_process on`: pre-forked workers accept.
    Nginx,
}

/// The user PostgreSQL runs as (it refuses root).
pub const POSTGRES_USER: &str = "postgres";
/// The LDAP tree the slapd checks use.
pub const LDAP_BASE: &str = "dc=apus,dc=test";
/// Its administrator and password.
pub const LDAP_ADMIN: &str = "cn=admin,dc=apus,dc=test";
pub const LDAP_PASSWORD: &str = "apus-secret";

/// pgbench's tables, digested without `pgbench_history.mtime`: the time of
/// each transaction is the server's clock, which is not replicated input.
const PG_DIGEST: &str = "SELECT md5(concat(\
    (SELECT string_agg(aid||':'||bid||':'||abalance, ',' ORDER BY aid) FROM pgbench_accounts), '|', \
    (SELECT string_agg(bid||':'||bbalance, ',' ORDER BY bid) FROM pgbench_branches), '|', \
    (SELECT string_agg(tid||':'||bid||':'||tbalance, ',' ORDER BY tid) FROM pgbench_tellers), '|', \
    (SELECT string_agg(tid||':'||bid||':'||aid||':'||delta, ',' ORDER BY tid, bid, aid, delta) \
     FROM pgbench_history)))";

impl ServerKind {
    pub fn parse(s: &str) -> Result<ServerKind> {
        Ok(match s {
            "redis" => ServerKind::Redis,
            "memcached" => ServerKind::Memcached,
            "resp-kv" => ServerKind::RespKv,
            "postgres" => ServerKind::Postgres,
            "slapd" => ServerKind::Slapd,
            "mariadb" => ServerKind::Mariadb,
            "nginx" => ServerKind::Nginx,
            other => bail!(
                "--server {other:?}: known servers are redis, memcached, resp-kv, postgres, slapd, \
                 mariadb and nginx"
            ),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            ServerKind::Redis => "redis",
            ServerKind::Memcached => "memcached",
            ServerKind::RespKv => "resp-kv",
            ServerKind::Postgres => "postgres",
            ServerKind::Slapd => "slapd",
            ServerKind::Mariadb => "mariadb",
            ServerKind::Nginx => "nginx",
        }
    }

    /// The key-value protocol the harness's own clients speak to it, for
    /// the servers it drives directly.
    pub fn protocol(self) -> Option<Protocol> {
        match self {
            ServerKind::Memcached => Some(Protocol::Memcached),
            ServerKind::Redis | ServerKind::RespKv => Some(Protocol::Resp),
            _ => None,
        }
    }

    /// [`protocol`](Self::protocol), for the harness paths that need it.
    pub fn kv_protocol(self) -> Result<Protocol> {
        self.protocol().with_context(|| {
            format!(
                "the harness's key-value clients do not speak to {}",
                self.name()
            )
        })
    }

    /// The server's command line, listening on 127.0.0.1:`port`, keeping
    /// its data in `dir` (prepared by [`prepare`](Self::prepare)).
    pub fn command(self, bins: &Binaries, port: u16, dir: &Path) -> Result<Vec<String>> {
        let d = dir.display().to_string();
        let port = port.to_string();
        let path = |p: &str| -> Result<String> { Ok(tools::path(p)?.display().to_string()) };
        let v: Vec<String> = match self {
            ServerKind::Redis => [
                "redis-server",
                "--bind",
                "127.0.0.1",
                "--port",
                &port,
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                &d,
                "--enable-debug-command",
                "local",
                "--protected-mode",
                "no",
            ]
            .map(String::from)
            .into(),
            // One worker thread: the order in which a multi-threaded server
            // reads from different connections is not replicated.
            ServerKind::Memcached => {
                let mut v: Vec<String> = [
                    "memcached",
                    "-t",
                    "1",
                    "-U",
                    "0",
                    "-l",
                    "127.0.0.1",
                    "-m",
                    "64",
                    "-p",
                    &port,
                ]
                .map(String::from)
                .into();
                if tools::running_as_root() {
                    v.extend(["-u".into(), "root".into()]);
                }
                v
            }
            ServerKind::RespKv => vec![bins.resp_kv.display().to_string(), "--port".into(), port],
            ServerKind::Postgres => {
                let mut v = as_postgres()?;
                v.extend([path("postgres")?, "-D".into(), d.clone()]);
                for setting in [
                    "listen_addresses=127.0.0.1".to_string(),
                    // Its UNIX socket (not replicated, as the server is
                    // told at start) in the data directory, which a restart
                    // restores: a lock file left beside it by a killed
                    // postmaster whose pid still shows (a zombie nobody
                    // reaped yet) stopped the restarted one in CI.
                    format!("unix_socket_directories={d}"),
                    "autovacuum=off".into(),
                    "fsync=off".into(),
                    "full_page_writes=off".into(),
                    "max_connections=40".into(),
                    "shared_buffers=16MB".into(),
                ] {
                    v.extend(["-c".into(), setting]);
                }
                v.extend(["-p".into(), port]);
                v
            }
            // The listen port is in nginx.conf (see `prepare`).
            // No -d: slapd daemonizes (its default), and replication follows it.
            ServerKind::Slapd => vec![
                path("slapd")?,
                "-f".into(),
                dir.with_extension("conf").display().to_string(),
                "-h".into(),
                format!("ldap://127.0.0.1:{port}/"),
            ],
            ServerKind::Mariadb => vec![
                path("mariadbd")?,
                "--no-defaults".into(),
                format!("--datadir={d}"),
                format!("--socket={}/mariadb-{port}.sock", parent(dir)?),
                format!("--pid-file={}/mariadb-{port}.pid", parent(dir)?),
                "--bind-address=127.0.0.1".into(),
                format!("--port={port}"),
                "--user=root".into(),
                "--skip-log-bin".into(),
                "--innodb-buffer-pool-size=32M".into(),
                "--innodb-flush-log-at-trx-commit=0".into(),
                "--skip-name-resolve".into(),
            ],
            ServerKind::Nginx => vec![
                path("nginx")?,
                "-p".into(),
                d.clone(),
                "-c".into(),
                format!("{d}/nginx.conf"),
                "-g".into(),
                format!("daemon off; pid {d}/nginx.pid;"),
            ],
        };
        Ok(v)
    }

    /// Arguments that keep the bare baseline server in the foreground (the
    /// harness stops it by its pid; under `apus run` it daemonizes).
    pub fn foreground_args(self) -> &'static [&'static str] {
        match self {
            ServerKind::Slapd => &["-d", "0"],
            _ => &[],
        }
    }

    /// The server's digest command for `apus check` (`cluster.digest`).
    pub fn digest(self) -> Result<Option<Vec<String>>> {
        let path = |p: &str| -> Result<String> { Ok(tools::path(p)?.display().to_string()) };
        let shell =
            |cmd: String| -> Result<Vec<String>> { Ok(vec![path("sh")?, "-c".into(), cmd]) };
        Ok(Some(match self {
            ServerKind::Redis => vec![
                path("redis-cli")?,
                "-p".into(),
                "{port}".into(),
                "DEBUG".into(),
                "DIGEST".into(),
            ],
            ServerKind::RespKv => vec![
                path("redis-cli")?,
                "-p".into(),
                "{port}".into(),
                "DIGEST".into(),
            ],
            ServerKind::Postgres => vec![
                path("psql")?,
                "-h".into(),
                "{host}".into(),
                "-p".into(),
                "{port}".into(),
                "-U".into(),
                POSTGRES_USER.into(),
                "-d".into(),
                "postgres".into(),
                "-Atc".into(),
                PG_DIGEST.into(),
            ],
            // Operational attributes (times, CSNs) are left out by -LLL;
            // entries are sorted (one line each), since concurrent adds may
            // get their ids in another order on each replica.
            ServerKind::Slapd => shell(format!(
                "{} -x -H ldap://{{host}}:{{port}} -b {LDAP_BASE} -LLL -o ldif-wrap=no \
                 | {} 'BEGIN {{ RS = \"\" }} {{ gsub(\"\\n\", \"|\"); print }}' | {} | {}",
                path("ldapsearch")?,
                path("awk")?,
                path("sort")?,
                path("md5sum")?
            ))?,
            ServerKind::Mariadb => vec![
                path("mariadb")?,
                "-h".into(),
                "{host}".into(),
                "-P".into(),
                "{port}".into(),
                "-u".into(),
                "root".into(),
                "-N".into(),
                "-e".into(),
                "CHECKSUM TABLE sbtest.sbtest1".into(),
            ],
            // memcached has no digest of its values (the harness reads every
            // key it wrote); nginx serves files and holds no state.
            ServerKind::Memcached | ServerKind::Nginx => return Ok(None),
        }))
    }

    /// A command that succeeds once the server is ready (`cluster.ready`),
    /// for servers that listen before they are.
    pub fn ready_command(self) -> Result<Option<Vec<String>>> {
        Ok(match self {
            ServerKind::Postgres => Some(vec![
                tools::path("pg_isready")?.display().to_string(),
                "-q".into(),
                "-h".into(),
                "{host}".into(),
                "-p".into(),
                "{port}".into(),
                "-U".into(),
                POSTGRES_USER.into(),
            ]),
            _ => None,
        })
    }

    /// The programs the checks run for this server.
    fn programs(self) -> &'static [&'static str] {
        match self {
            ServerKind::Redis => &[
                "redis-server",
                "redis-benchmark",
                "redis-check-rdb",
                "redis-cli",
            ],
            ServerKind::Memcached => &["memcached"],
            ServerKind::RespKv => &["redis-cli"],
            ServerKind::Postgres => &[
                "initdb",
                "postgres",
                "pgbench",
                "psql",
                "pg_isready",
                "setpriv",
            ],
            ServerKind::Slapd => &[
                "slapd",
                "slapadd",
                "ldapadd",
                "ldapmodify",
                "ldapdelete",
                "ldapsearch",
                "sh",
                "awk",
                "sort",
                "md5sum",
            ],
            ServerKind::Mariadb => &["mariadbd", "mariadb-install-db", "mariadb", "sysbench"],
            ServerKind::Nginx => &["nginx"],
        }
    }

    /// Installs Debian's packages for the server and its clients when they
    /// are missing.
    pub fn ensure_installed(self) -> Result<()> {
        tools::ensure(self.programs())?;
        Ok(())
    }

    /// Makes `dir` what the server expects at its first start (for
    /// PostgreSQL an initialised cluster); `apus run` keeps that as the
    /// pristine state every start begins from.
    pub fn prepare(self, dir: &Path, port: u16) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        match self {
            ServerKind::Redis | ServerKind::Memcached | ServerKind::RespKv => {}
            ServerKind::Postgres => {
                chown_postgres(parent_path(dir)?)?;
                chown_postgres(dir)?;
                let mut c = tools::command("setpriv")?;
                c.args(&as_postgres()?[1..])
                    .arg(tools::path("initdb")?)
                    .args(["-D"])
                    .arg(dir)
                    .args([
                        "-A",
                        "trust",
                        "-U",
                        POSTGRES_USER,
                        "--no-sync",
                        "-E",
                        "UTF8",
                        "--locale=C",
                    ])
                    .stdout(std::process::Stdio::null());
                crate::run("initdb", &mut c)?;
            }
            ServerKind::Slapd => {
                let conf = format!(
                    "include /etc/ldap/schema/core.schema\n\
                     include /etc/ldap/schema/cosine.schema\n\
                     include /etc/ldap/schema/inetorgperson.schema\n\
                     pidfile {d}/slapd.pid\n\
                     modulepath /usr/lib/ldap\n\
                     moduleload back_mdb\n\
                     database mdb\n\
                     maxsize 67108864\n\
                     suffix \"{LDAP_BASE}\"\n\
                     rootdn \"{LDAP_ADMIN}\"\n\
                     rootpw {LDAP_PASSWORD}\n\
                     directory {d}\n",
                    d = dir.display()
                );
                std::fs::write(dir.with_extension("conf"), conf)?;
                let base = format!(
                    "dn: {LDAP_BASE}\nobjectClass: dcObject\nobjectClass: organization\no: apus\ndc: apus\n\n\
                     dn: ou=people,{LDAP_BASE}\nobjectClass: organizationalUnit\nou: people\n"
                );
                let ldif = dir.with_extension("ldif");
                std::fs::write(&ldif, base)?;
                let mut c = tools::command("slapadd")?;
                c.arg("-f")
                    .arg(dir.with_extension("conf"))
                    .arg("-l")
                    .arg(&ldif);
                crate::run("slapadd", &mut c)?;
            }
            ServerKind::Mariadb => {
                let mut c = tools::command("mariadb-install-db")?;
                c.arg("--no-defaults")
                    .arg(format!("--datadir={}", dir.display()))
                    .args([
                        "--user=root",
                        "--auth-root-authentication-method=normal",
                        "--skip-test-db",
                    ])
                    .stdout(std::process::Stdio::null());
                crate::run("mariadb-install-db", &mut c)?;
            }
            ServerKind::Nginx => {
                std::fs::create_dir_all(dir.join("html"))?;
                std::fs::create_dir_all(dir.join("logs"))?;
                for i in 0..16 {
                    let body: String = (0..(i + 1) * 256)
                        .map(|n| char::from(b'a' + (n % 26) as u8))
                        .collect();
                    std::fs::write(dir.join(format!("html/file{i}.txt")), body)?;
                }
                let conf = format!(
                    "worker_processes 2;\n\
                     master_process on;\n\
                     error_log logs/error.log;\n\
                     events {{ worker_connections 256; }}\n\
                     http {{\n\
                       access_log off;\n\
                       sendfile on;\n\
                       tcp_nopush on;\n\
                       server {{\n\
                         listen 127.0.0.1:{port};\n\
                         root html;\n\
                       }}\n\
                     }}\n"
                );
                std::fs::write(dir.join("nginx.conf"), conf)?;
            }
        }
        Ok(())
    }

    /// Whether the server at `addr` answers requests.
    pub fn ready(self, addr: SocketAddr) -> bool {
        let t = Duration::from_millis(300);
        match self.protocol() {
            Some(p) => AppConn::connect(p, addr, t)
                .and_then(|mut c| c.get("ready-probe"))
                .is_ok(),
            None if self == ServerKind::Postgres => {
                psql(addr, "SELECT 1").is_ok_and(|o| o.trim() == "1")
            }
            // A leader taking over accepts and then turns clients away: a
            // connect alone said "ready" too early (CI: the load after an
            // election was reset).
            None if self == ServerKind::Nginx => super::nginx::fetch(addr, 1).is_ok(),
            None => std::net::TcpStream::connect_timeout(&addr, t).is_ok(),
        }
    }
}

/// `setpriv` arguments that run what follows as the PostgreSQL user.
fn as_postgres() -> Result<Vec<String>> {
    Ok(vec![
        tools::path("setpriv")?.display().to_string(),
        format!("--reuid={POSTGRES_USER}"),
        format!("--regid={POSTGRES_USER}"),
        "--clear-groups".into(),
        "--".into(),
    ])
}

fn parent_path(dir: &Path) -> Result<&Path> {
    dir.parent().context("the server directory has a parent")
}

fn parent(dir: &Path) -> Result<String> {
    Ok(parent_path(dir)?.display().to_string())
}

/// Gives `path` to the PostgreSQL user (the server and the replication
/// node inside it write there).
pub fn chown_postgres(path: &Path) -> Result<()> {
    let out = tools::command("chown")?
        .args(["-R", &format!("{POSTGRES_USER}:{POSTGRES_USER}")])
        .arg(path)
        .output()?;
    ensure!(
        out.status.success(),
        "chown {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Runs one query with psql against `addr`; its unaligned output.
pub fn psql(addr: SocketAddr, query: &str) -> Result<String> {
    let out = tools::command("psql")?
        .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args(["-U", POSTGRES_USER, "-d", "postgres", "-Atc", query])
        .env("PGCONNECT_TIMEOUT", "2")
        .output()
        .context("running psql")?;
    ensure!(
        out.status.success(),
        "psql: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
