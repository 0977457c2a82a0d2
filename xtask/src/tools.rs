//! Every program outside the project that a harness runs, and the Debian
//! package it comes from.
//!
//! A harness never names a program directly: it asks [`command`] (or
//! [`path`]), which installs the program's package with apt-get when the
//! program is missing, and refuses a program the table does not list. The
//! project's own binaries, built by cargo, start through [`own`]. So a fresh
//! Debian 12 machine with only Rust installed has everything `cargo xtask
//! test` runs, and a test (`every_program_xtask_runs_is_in_the_table`)
//! fails if a harness starts a program some other way.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, ensure};

/// A program and the Debian package that provides it.
#[derive(Clone, Copy, Debug)]
pub struct Tool {
    pub program: &'static str,
    pub package: &'static str,
}

const fn tool(program: &'static str, package: &'static str) -> Tool {
    Tool { program, package }
}

/// The programs the harnesses run. Toolchain programs (cargo, rustup) are
/// not Debian's: the machine has them, and `cargo xtask` needs cargo to run
/// at all.
pub const TOOLS: &[Tool] = &[
    // Package management and the base system.
    tool("apt-get", "apt"),
    tool("apt-cache", "apt"),
    tool("dpkg", "dpkg"),
    tool("dpkg-deb", "dpkg"),
    tool("ldconfig", "libc-bin"),
    tool("ldd", "libc-bin"),
    tool("sh", "dash"),
    tool("date", "coreutils"),
    tool("chown", "coreutils"),
    tool("md5sum", "coreutils"),
    tool("sort", "coreutils"),
    tool("awk", "mawk"),
    tool("setpriv", "util-linux"),
    tool("find", "findutils"),
    tool("gzip", "gzip"),
    tool("taskset", "util-linux"),
    tool("lscpu", "util-linux"),
    tool("rustup", "toolchain"),
    // The Soft-RoCE guest.
    tool("qemu-system-x86_64", "qemu-system-x86"),
    tool("busybox", "busybox-static"),
    tool("cpio", "cpio"),
    tool("depmod", "kmod"),
    tool("modprobe", "kmod"),
    tool("xz", "xz-utils"),
    tool("zstd", "zstd"),
    tool("rdma", "iproute2"),
    tool("ip", "iproute2"),
    tool("tc", "iproute2"),
    tool("ibv_devices", "ibverbs-utils"),
    tool("ibv_devinfo", "ibverbs-utils"),
    // Building the verbs transport (sideway's C shim).
    tool("cmake", "cmake"),
    // Servers and their clients.
    tool("redis-server", "redis-server"),
    tool("redis-benchmark", "redis-tools"),
    tool("redis-cli", "redis-tools"),
    tool("redis-check-rdb", "redis-tools"),
    tool("memcached", "memcached"),
    tool("etcd", "etcd-server"),
    tool("initdb", "postgresql-15"),
    tool("postgres", "postgresql-15"),
    tool("pgbench", "postgresql-15"),
    tool("psql", "postgresql-client-15"),
    tool("pg_isready", "postgresql-client-15"),
    tool("slapd", "slapd"),
    tool("slapadd", "slapd"),
    tool("slapcat", "slapd"),
    tool("ldapadd", "ldap-utils"),
    tool("ldapmodify", "ldap-utils"),
    tool("ldapdelete", "ldap-utils"),
    tool("ldapsearch", "ldap-utils"),
    tool("mariadbd", "mariadb-server"),
    tool("mariadb-install-db", "mariadb-server"),
    tool("mariadb", "mariadb-client"),
    tool("sysbench", "sysbench"),
    tool("nginx", "nginx-light"),
];

/// Shared libraries the harnesses load at run time (by soname), and the
/// package of each.
pub const LIBRARIES: &[(&str, &str)] = &[
    ("libfabric.so.1", "libfabric1"),
    ("libibverbs.so.1", "libibverbs1"),
];

/// Packages the harnesses need that hold no program or soname they look
/// for: headers to build with, and libibverbs' providers (plugins).
pub const PACKAGES: &[&str] = &["libclang-dev", "ibverbs-providers"];

/// Directories searched for a program: `PATH`, then sbin (Debian keeps
/// administrative programs there); PostgreSQL's programs only in their
/// versioned directory (/usr/bin has perl wrappers of some).
fn search_dirs(program: &str) -> Vec<PathBuf> {
    if matches!(
        program,
        "initdb" | "postgres" | "pgbench" | "psql" | "pg_isready"
    ) {
        // Only there: /usr/bin's wrappers stay when the server is removed.
        return vec![PathBuf::from("/usr/lib/postgresql/15/bin")];
    }
    let mut dirs = Vec::new();
    let path = std::env::var_os("PATH").unwrap_or_default();
    dirs.extend(std::env::split_paths(&path));
    dirs.extend([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")]);
    dirs
}

/// The table's row for `program`.
pub fn lookup(program: &str) -> Result<&'static Tool> {
    TOOLS.iter().find(|t| t.program == program).with_context(|| {
        format!("{program} is not in xtask's table of external programs (xtask/src/tools.rs): add it with its Debian package")
    })
}

/// Where `program` is, if installed.
pub fn find(program: &str) -> Option<PathBuf> {
    search_dirs(program)
        .into_iter()
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// The path of `program`, installing its package first if it is missing.
pub fn path(program: &str) -> Result<PathBuf> {
    let t = lookup(program)?;
    if let Some(p) = find(program) {
        return Ok(p);
    }
    ensure!(
        t.package != "toolchain",
        "{program} is missing: it comes with the Rust toolchain (rustup)"
    );
    install(&[t.package])?;
    find(program)
        .with_context(|| format!("{program} is still missing after installing {}", t.package))
}

/// A command for `program`, installed first if it is missing.
pub fn command(program: &str) -> Result<Command> {
    Ok(Command::new(path(program)?))
}

/// Installs the packages of every program in `programs` that is missing (one
/// apt-get run); returns whether it installed anything.
pub fn ensure(programs: &[&str]) -> Result<bool> {
    let mut missing = Vec::new();
    for p in programs {
        let t = lookup(p)?;
        if find(p).is_none() && !missing.contains(&t.package) {
            missing.push(t.package);
        }
    }
    if missing.is_empty() {
        return Ok(false);
    }
    install(&missing)?;
    for p in programs {
        ensure!(
            find(p).is_some(),
            "{p} is still missing after installing {missing:?}"
        );
    }
    Ok(true)
}

/// Installs the package of `soname` if the dynamic linker does not know it;
/// returns whether it installed it.
pub fn ensure_library(soname: &str) -> Result<bool> {
    let (_, package) = LIBRARIES
        .iter()
        .find(|(s, _)| *s == soname)
        .with_context(|| format!("{soname} is not in xtask's table of libraries"))?;
    let known = command("ldconfig")?
        .arg("-p")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(soname));
    if known {
        return Ok(false);
    }
    install(&[package])?;
    Ok(true)
}

/// Installs whichever of `packages` dpkg does not list as installed; each
/// must be in one of the tables. Returns whether it installed any.
pub fn ensure_packages(packages: &[&str]) -> Result<bool> {
    let mut missing = Vec::new();
    for p in packages {
        let listed = PACKAGES.contains(p)
            || TOOLS.iter().any(|t| t.package == *p)
            || LIBRARIES.iter().any(|(_, pkg)| pkg == p);
        ensure!(
            listed,
            "{p} is not in xtask's tables of packages (tools.rs)"
        );
        if !installed(p)? {
            missing.push(*p);
        }
    }
    if missing.is_empty() {
        return Ok(false);
    }
    install(&missing)?;
    Ok(true)
}

fn installed(package: &str) -> Result<bool> {
    Ok(command("dpkg")?
        .args(["-s", package])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success()))
}

fn install(packages: &[&str]) -> Result<()> {
    println!("    installing {} with apt-get", packages.join(" "));
    ensure!(
        running_as_root(),
        "{} missing and not running as root: install them (apt-get install {})",
        packages.join(", "),
        packages.join(" ")
    );
    let apt = find("apt-get").context("apt-get not found: this harness needs Debian's apt")?;
    // Servers are installed to be started by the harnesses, not as system
    // services: policy-rc.d keeps their packages from starting them.
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let placed = !policy.exists()
        && std::fs::write(policy, "#!/bin/sh\nexit 101\n").is_ok()
        && std::fs::set_permissions(policy, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .is_ok();
    let result = apt_install(&apt, packages);
    if placed {
        let _ = std::fs::remove_file(policy);
    }
    result
}

fn apt_install(apt: &Path, packages: &[&str]) -> Result<()> {
    let install = || {
        Command::new(apt)
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status()
    };
    if install().is_ok_and(|s| s.success()) {
        return Ok(());
    }
    apt_update()?;
    let status = install().context("running apt-get")?;
    ensure!(
        status.success(),
        "apt-get install {} failed ({status})",
        packages.join(" ")
    );
    Ok(())
}

/// Refreshes apt's package index (the index of a fresh machine may be stale
/// or empty).
pub fn apt_update() -> Result<()> {
    crate::run(
        "apt-get update",
        command("apt-get")?
            .args(["update", "-q"])
            .stdout(Stdio::null()),
    )
}

pub fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A cargo command in the workspace root (the cargo running this xtask).
pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(crate::root());
    c
}

/// A command for one of the project's own binaries (built by cargo).
pub fn own(binary: impl AsRef<OsStr>) -> Command {
    let binary = binary.as_ref();
    debug_assert!(
        Path::new(binary).is_absolute(),
        "own binaries are started by path"
    );
    Command::new(binary)
}

/// A command for a server's `argv[0]`: an own binary by absolute path, or a
/// program from the table.
pub fn server(argv0: &str) -> Result<Command> {
    if Path::new(argv0).is_absolute() {
        if TOOLS
            .iter()
            .any(|t| find(t.program).is_some_and(|p| p == Path::new(argv0)))
        {
            return Ok(Command::new(argv0));
        }
        ensure!(
            Path::new(argv0).starts_with(crate::e2e::target_dir()),
            "{argv0} is neither a program of the table nor built by this project"
        );
        return Ok(own(argv0));
    }
    command(argv0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The programs a source file names in `tools::command("...")`,
    /// `tools::path("...")` and `tools::ensure(&["...", ...])`.
    fn named_programs(src: &str) -> Vec<String> {
        let mut out = Vec::new();
        for call in ["command(\"", "path(\"", "server(\""] {
            let mut rest = src;
            while let Some(i) = rest.find(call) {
                rest = &rest[i + call.len()..];
                if let Some(end) = rest.find('"') {
                    out.push(rest[..end].to_string());
                }
            }
        }
        let mut rest = src;
        while let Some(i) = rest.find("tools::ensure(&[") {
            rest = &rest[i + "tools::ensure(&[".len()..];
            let end = rest.find(']').unwrap_or(rest.len());
            out.extend(
                rest[..end]
                    .split(',')
                    .map(|s| s.trim().trim_matches('"').to_string())
                    .filter(|s| !s.is_empty()),
            );
        }
        out
    }

    #[test]
    fn every_program_xtask_runs_is_in_the_table() {
        let mut files = Vec::new();
        let mut dirs = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("src")];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    dirs.push(p);
                } else if p.extension().is_some_and(|x| x == "rs") {
                    files.push(p);
                }
            }
        }
        let mut checked = 0;
        for p in files {
            let text = std::fs::read_to_string(&p).unwrap();
            // Test code may name programs that must be refused.
            let src = text.split("#[cfg(test)]").next().unwrap_or_default();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            if name != "tools.rs" {
                assert!(
                    !src.contains("Command::new("),
                    "{name} starts a program with Command::new: use tools::command (external) \
                     or tools::own (built here), so the program is installed when missing"
                );
            }
            for program in named_programs(src) {
                assert!(
                    lookup(&program).is_ok(),
                    "{name} runs {program}, which the table in tools.rs does not list"
                );
                checked += 1;
            }
        }
        assert!(
            checked > 10,
            "found only {checked} program names: is the scan broken?"
        );
    }

    #[test]
    fn an_unlisted_program_is_refused() {
        let e = command("surely-not-a-listed-program").unwrap_err();
        assert!(e.to_string().contains("not in xtask's table"), "{e}");
        assert!(lookup("redis-server").is_ok());
        let e = ensure_packages(&["not-a-listed-package"]).unwrap_err();
        assert!(e.to_string().contains("not in xtask's tables"), "{e}");
    }

    #[test]
    fn every_package_is_named_once_per_program() {
        for (i, t) in TOOLS.iter().enumerate() {
            assert!(!t.package.is_empty());
            assert!(
                TOOLS[i + 1..].iter().all(|o| o.program != t.program),
                "{} is listed twice",
                t.program
            );
        }
    }
}
