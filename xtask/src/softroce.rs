//! `cargo xtask softroce`: real RDMA verbs on a machine without RDMA.
//!
//! The host kernel here has no InfiniBand support, but Debian's stock
//! kernel ships the Soft-RoCE driver (`rdma_rxe`). This harness installs
//! what it needs (qemu, busybox, the rxe user-space provider), downloads
//! Debian's kernel package once (cached under `target/softroce/cache`),
//! builds an initramfs holding the kernel modules, the verbs provider and
//! the project's test binaries, boots it under qemu, creates `rxe0` on a
//! dummy netdev, and runs the apus-rdma tests inside. A test that prints
//! SKIPPED there fails the run: inside the guest the device must be used.
//!
//! The last line is `softroce: PASS` or `softroce: FAIL <reason>`.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::{cargo, root, tools};

/// Host programs the harness runs, or copies into the guest.
const HOST_PROGRAMS: [&str; 14] = [
    "qemu-system-x86_64",
    "busybox",
    "sh",
    "find",
    "cpio",
    "gzip",
    "depmod",
    "modprobe",
    "xz",
    "zstd",
    "rdma",
    "ip",
    "ibv_devices",
    "ibv_devinfo",
];

/// Installs what the host side needs: the programs, libibverbs and its
/// providers (the guest gets the rxe provider from the host).
fn ensure_host() -> Result<()> {
    tools::ensure(&HOST_PROGRAMS)?;
    tools::ensure_library("libibverbs.so.1")?;
    tools::ensure_packages(&["ibverbs-providers"])?;
    Ok(())
}
/// Kernel modules the guest loads, with their dependencies. `crc32_generic`
/// must be loaded by hand: rxe asks the crypto layer for "crc32", and the
/// guest has no modprobe to load it on demand (`rdma link add` then fails
/// with ENOENT).
const MODULES: [&str; 3] = ["crc32_generic", "rdma_rxe", "dummy"];
/// The whole guest run, boot included, must finish within this.
const GUEST_TIMEOUT: Duration = Duration::from_secs(900);
/// Marker lines the guest prints.
const RESULT: &str = "SOFTROCE_RESULT=";

pub fn run_softroce(args: &[String]) -> Result<ExitCode> {
    if let Some(a) = args.first() {
        bail!("softroce takes no arguments (got {a})");
    }
    let t0 = Instant::now();
    match softroce(t0) {
        Ok(summary) => {
            println!("softroce: PASS ({summary})");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            println!("softroce: FAIL {e:#}");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// Boots the guest with `programs` (and this xtask) in /usr/bin and runs
/// `script` once rxe0 is up (it may call `fail REASON`); returns the
/// console lines. For work other than the tests, e.g. `cargo xtask bench
/// --softroce`.
pub fn run_in_guest(programs: &[PathBuf], script: &str) -> Result<Vec<String>> {
    let t0 = Instant::now();
    ensure_host()?;
    let dir = crate::e2e::target_dir().join("softroce-run");
    let cache = crate::e2e::target_dir().join("softroce").join("cache");
    std::fs::create_dir_all(&cache)?;
    let (kdir, kver) = kernel(&cache, t0)?;
    let mut programs = programs.to_vec();
    programs.push(std::env::current_exe().context("this xtask's path")?);
    let initrd = initramfs(&dir, &kdir, &kver, &[], &programs, script)?;
    let log = boot_guest(
        &dir,
        &kdir.join(format!("boot/vmlinuz-{kver}")),
        &initrd,
        t0,
    )?;
    match log
        .iter()
        .find_map(|l| l.split_once(RESULT).map(|(_, r)| r))
    {
        Some(r) if r.starts_with("PASS") => Ok(log),
        Some(r) => bail!("in the guest: {r}"),
        None => bail!(
            "the guest ended without a result (console log in {})",
            dir.display()
        ),
    }
}

fn say(t0: Instant, what: &str) {
    println!("[{:6.1}s] {what}", t0.elapsed().as_secs_f64());
}

fn softroce(t0: Instant) -> Result<String> {
    ensure_host()?;
    say(t0, "host tools ready");
    let dir = crate::e2e::target_dir().join("softroce");
    let cache = dir.join("cache");
    std::fs::create_dir_all(&cache)?;
    let (kdir, kver) = kernel(&cache, t0)?;
    say(t0, &format!("kernel {kver} ready"));
    let tests = test_binaries()?;
    say(t0, &format!("{} test binaries built", tests.len()));
    // The cluster tests: this xtask and a release `apus` with verbs.
    let apus = crate::e2e::build_release()?.apus;
    let xtask = std::env::current_exe().context("this xtask's path")?;
    say(t0, "apus (release, with verbs) built");
    let initrd = initramfs(
        &dir,
        &kdir,
        &kver,
        &tests,
        &[apus, xtask],
        &cluster_tests_script(),
    )?;
    say(t0, "initramfs built");
    let boot = Instant::now();
    let log = boot_guest(
        &dir,
        &kdir.join(format!("boot/vmlinuz-{kver}")),
        &initrd,
        t0,
    )?;
    let up = log
        .iter()
        .find_map(|l| l.strip_prefix("=== rxe0 created at "))
        .unwrap_or("?")
        .to_string();
    let skipped: Vec<&String> = log.iter().filter(|l| l.contains("SKIPPED")).collect();
    if let Some(line) = log
        .iter()
        .find_map(|l| l.split_once(RESULT).map(|(_, r)| r))
    {
        if !line.starts_with("PASS") {
            bail!("in the guest: {line}");
        }
    } else {
        bail!(
            "the guest ended without a result (console log in {})",
            dir.display()
        );
    }
    ensure!(
        skipped.is_empty(),
        "tests skipped inside the guest, where the device must be used: {skipped:?}"
    );
    let passed = log.iter().filter(|l| l.contains("test result: ok")).count();
    let clusters: Vec<&str> = log
        .iter()
        .filter_map(|l| {
            l.trim_end()
                .strip_prefix("cluster-test ")?
                .strip_suffix(": PASS")
        })
        .collect();
    ensure!(
        clusters.len() == CLUSTER_TESTS.len(),
        "cluster tests passed in the guest: {clusters:?}, expected {}",
        CLUSTER_TESTS.len()
    );
    Ok(format!(
        "{passed} test binaries and the cluster tests ({}) passed on rxe0; guest up and rxe0 \
         created at {up} guest time, boot and tests {:.1}s wall",
        clusters.join(", "),
        boot.elapsed().as_secs_f64()
    ))
}

/// Downloads (once) and unpacks Debian's kernel package; returns the
/// unpacked tree and the kernel version.
fn kernel(cache: &Path, t0: Instant) -> Result<(PathBuf, String)> {
    let pkg = kernel_package()?;
    let find_deb = || -> Option<PathBuf> {
        std::fs::read_dir(cache)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{pkg}_")) && n.ends_with(".deb"))
            })
    };
    let deb = match find_deb() {
        Some(d) => d,
        None => {
            say(t0, &format!("downloading {pkg}"));
            let download = || {
                tools::command("apt-get").is_ok_and(|mut c| {
                    c.args(["download", "-q", &pkg])
                        .current_dir(cache)
                        .stdout(Stdio::null())
                        .status()
                        .is_ok_and(|s| s.success())
                })
            };
            if !download() {
                tools::apt_update()?;
                ensure!(download(), "apt-get download {pkg} failed");
            }
            find_deb().context("the downloaded kernel package is not in the cache")?
        }
    };
    let kdir = cache.join(format!(
        "kernel-{}",
        deb.file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("unknown")
    ));
    if !kdir.join(".done").exists() {
        let _ = std::fs::remove_dir_all(&kdir);
        std::fs::create_dir_all(&kdir)?;
        crate::run(
            "dpkg-deb -x",
            tools::command("dpkg-deb")?.arg("-x").arg(&deb).arg(&kdir),
        )?;
        let kver = kernel_version(&kdir)?;
        crate::run(
            "depmod",
            tools::command("depmod")?.arg("-b").arg(&kdir).arg(&kver),
        )?;
        std::fs::write(kdir.join(".done"), "")?;
    }
    let kver = kernel_version(&kdir)?;
    Ok((kdir, kver))
}

/// The kernel package Debian's `linux-image-amd64` points to.
fn kernel_package() -> Result<String> {
    let query = || -> Option<String> {
        let out = tools::command("apt-cache")
            .ok()?
            .args(["depends", "linux-image-amd64"])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
            l.trim()
                .strip_prefix("Depends: ")
                .filter(|p| {
                    p.starts_with("linux-image-")
                        && p.as_bytes().get(12).is_some_and(u8::is_ascii_digit)
                })
                .map(str::to_string)
        })
    };
    if let Some(p) = query() {
        return Ok(p);
    }
    tools::apt_update()?;
    query().context("apt-cache knows no linux-image-amd64 kernel package")
}

fn kernel_version(kdir: &Path) -> Result<String> {
    std::fs::read_dir(kdir.join("lib/modules"))
        .context("the kernel package has no lib/modules")?
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .next()
        .context("the kernel package has no module tree")
}

/// Builds apus-rdma's test binaries; returns their paths.
fn test_binaries() -> Result<Vec<PathBuf>> {
    let out = cargo()
        .args(["test", "-p", "apus-rdma", "--no-run"])
        .output()
        .context("building apus-rdma's tests")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success(),
        "building apus-rdma's tests failed:\n{stderr}"
    );
    // cargo prints "Executable tests/verbs.rs (target/debug/deps/verbs-...)".
    let bins: Vec<PathBuf> = stderr
        .lines()
        .filter(|l| l.trim_start().starts_with("Executable"))
        .filter_map(|l| {
            let (_, rest) = l.rsplit_once('(')?;
            Some(root().join(rest.trim_end_matches(')')))
        })
        .collect();
    ensure!(!bins.is_empty(), "cargo listed no test binaries:\n{stderr}");
    Ok(bins)
}

/// Copies `file` (dereferenced) to the same path under `root`.
fn copy_into(root: &Path, file: &Path) -> Result<()> {
    let dest = root.join(file.strip_prefix("/").unwrap_or(file));
    if dest.exists() {
        return Ok(());
    }
    std::fs::create_dir_all(dest.parent().expect("absolute path"))?;
    std::fs::copy(file, &dest).with_context(|| format!("copying {}", file.display()))?;
    Ok(())
}

/// Copies a binary and its shared-library closure (as `ldd` lists it).
fn copy_with_libs(root: &Path, bin: &Path) -> Result<()> {
    copy_into(root, bin)?;
    let out = tools::command("ldd")?
        .arg(bin)
        .output()
        .context("running ldd")?;
    for path in String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
    {
        copy_into(root, Path::new(path))?;
    }
    Ok(())
}

fn initramfs(
    dir: &Path,
    kdir: &Path,
    kver: &str,
    tests: &[PathBuf],
    programs: &[PathBuf],
    script: &str,
) -> Result<PathBuf> {
    let r = dir.join("root");
    let _ = std::fs::remove_dir_all(&r);
    for d in [
        "usr/bin",
        "usr/sbin",
        "usr/lib",
        "usr/lib64",
        "proc",
        "sys",
        "dev",
        "tmp",
        "etc",
        "modules",
        "tests",
    ] {
        std::fs::create_dir_all(r.join(d))?;
    }
    for d in ["bin", "sbin", "lib", "lib64"] {
        std::os::unix::fs::symlink(format!("usr/{d}"), r.join(d))?;
    }
    std::fs::copy(tools::path("busybox")?, r.join("usr/bin/busybox")).context("busybox-static")?;
    for tool in ["rdma", "ip", "ibv_devices", "ibv_devinfo"] {
        copy_with_libs(&r, &tools::path(tool)?)?;
    }
    // The rxe user-space provider is dlopen()ed by libibverbs.
    let providers = Path::new("/usr/lib/x86_64-linux-gnu/libibverbs");
    let mut found = false;
    for e in std::fs::read_dir(providers)
        .context("the libibverbs provider directory")?
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("librxe-") {
            copy_with_libs(&r, &e.path())?;
            found = true;
        }
    }
    ensure!(found, "no rxe provider in {}", providers.display());
    // libibverbs itself: the test binaries dlopen it (through sideway).
    for e in std::fs::read_dir("/usr/lib/x86_64-linux-gnu")?.flatten() {
        if e.file_name().to_string_lossy().starts_with("libibverbs.so") {
            copy_into(&r, &e.path())?;
        }
    }
    std::fs::create_dir_all(r.join("etc/libibverbs.d"))?;
    std::fs::write(r.join("etc/libibverbs.d/rxe.driver"), "driver rxe\n")?;
    std::fs::write(r.join("etc/hosts"), "127.0.0.1 localhost\n")?;
    let mut names = Vec::new();
    for (i, t) in tests.iter().enumerate() {
        copy_with_libs(&r, t)?;
        let name = format!(
            "t{i}-{}",
            t.file_name().and_then(|n| n.to_str()).unwrap_or("test")
        );
        std::fs::copy(t, r.join("tests").join(&name))?;
        names.push(name);
    }
    for p in programs {
        copy_with_libs(&r, p)?;
        let name = p.file_name().context("a program without a name")?;
        std::fs::copy(p, r.join("usr/bin").join(name))?;
    }
    // Modules, dependencies first, decompressed (busybox insmod wants .ko).
    let mut order: Vec<String> = Vec::new();
    for m in MODULES {
        let out = tools::command("modprobe")?
            .arg("-d")
            .arg(kdir)
            .args(["-S", kver, "--show-depends", m])
            .output()
            .context("modprobe --show-depends")?;
        ensure!(
            out.status.success(),
            "modprobe cannot resolve {m}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for l in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(path) = l.strip_prefix("insmod ") {
                let path = path.split_whitespace().next().unwrap_or(path).to_string();
                if !order.contains(&path) {
                    order.push(path);
                }
            }
        }
    }
    let mut load = String::new();
    for ko in &order {
        let p = Path::new(ko);
        let base = p.file_name().and_then(|n| n.to_str()).unwrap_or("m.ko");
        let (plain, tool): (&str, Option<&str>) = if let Some(b) = base.strip_suffix(".xz") {
            (b, Some("xz"))
        } else if let Some(b) = base.strip_suffix(".zst") {
            (b, Some("zstd"))
        } else if let Some(b) = base.strip_suffix(".gz") {
            (b, Some("gzip"))
        } else {
            (base, None)
        };
        let dest = r.join("modules").join(plain);
        match tool {
            None => {
                std::fs::copy(p, &dest)?;
            }
            Some(t) => {
                let out = tools::command(t)?.args(["-dc"]).arg(p).output()?;
                ensure!(out.status.success(), "{t} -dc {ko} failed");
                std::fs::write(&dest, out.stdout)?;
            }
        }
        load.push_str(plain);
        load.push('\n');
    }
    std::fs::write(r.join("modules/load.list"), load)?;
    let init = r.join("init");
    std::fs::write(&init, guest_init(&names, script))?;
    std::fs::set_permissions(&init, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let initrd = dir.join("initrd.img");
    let status = tools::command("sh")?
        .arg("-c")
        .arg("find . -print0 | cpio --null -o -H newc --quiet | gzip -1 > \"$0\"")
        .arg(&initrd)
        .current_dir(&r)
        .status()?;
    ensure!(status.success(), "packing the initramfs failed");
    Ok(initrd)
}

/// The guest's /init: modules, the dummy netdev and rxe0, then the tests,
/// then `script`.
fn guest_init(tests: &[String], script: &str) -> String {
    let mut s = String::from(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin 2>/dev/null
export PATH=/usr/bin:/usr/sbin:/bin:/sbin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs dev /dev
echo "=== guest up at $(cut -d' ' -f1 /proc/uptime)s"
fail() { dmesg | tail -20; echo "=== SOFTROCE_RESULT=FAIL $*"; poweroff -f; }
for ko in $(cat /modules/load.list); do
  case $ko in dummy.ko) insmod /modules/$ko numdummies=0 ;; *) insmod /modules/$ko ;; esac || fail "insmod $ko"
done
ip link set lo up
ip link add dummy0 type dummy || fail "creating dummy0"
ip link set dummy0 address 02:00:00:00:00:01
ip addr add 10.0.0.1/24 dev dummy0
ip link set dummy0 up
rdma link add rxe0 type rxe netdev dummy0 || fail "rdma link add rxe0"
[ -c /dev/infiniband/uverbs0 ] || fail "no /dev/infiniband/uverbs0"
echo "=== rxe0 created at $(cut -d' ' -f1 /proc/uptime)s"
ibv_devices
cd /tmp
"#,
    );
    for t in tests {
        s.push_str(&format!(
            "echo \"=== running {t}\"\n\
             RUST_BACKTRACE=1 /tests/{t} --test-threads=1 --nocapture 2>&1 || fail \"{t}\"\n"
        ));
    }
    s.push_str(script);
    s.push_str(
        "echo \"=== SOFTROCE_RESULT=PASS at $(cut -d' ' -f1 /proc/uptime)s\"\npoweroff -f\n",
    );
    s
}

/// The script that runs the cluster tests in the guest.
fn cluster_tests_script() -> String {
    let mut s = String::from("export CARGO_TARGET_DIR=/tmp/target\n");
    for args in CLUSTER_TESTS {
        s.push_str(&format!(
            "echo \"=== running cluster-test {args}\"\n\
             RUST_BACKTRACE=1 /usr/bin/xtask cluster-test {args} --apus-bin /usr/bin/apus 2>&1 \
             || {{ for f in /tmp/target/cluster-test/*/n*.log; do echo \"--- $f\"; \
             grep -E 'panicked|ERROR|WARN|stopp' $f | tail -15; tail -8 $f; done; \
             fail \"cluster-test {args}\"; }}\n"
        ));
    }
    s
}

/// The cluster tests run inside the guest (with `--apus-bin`): three
/// replicas over verbs with a leader kill and a deposed leader, and `auto`
/// settling on verbs. Sized for an emulated CPU.
const CLUSTER_TESTS: [&str; 2] = [
    "--transport verbs --proposals 3000 --proposers 4",
    "--transport auto --expect-transport verbs --proposals 1000 --proposers 4",
];

/// Boots the guest; returns its console lines (also echoed, and kept in
/// `console.log`).
fn boot_guest(dir: &Path, vmlinuz: &Path, initrd: &Path, t0: Instant) -> Result<Vec<String>> {
    let kvm = std::fs::metadata("/dev/kvm").is_ok()
        && std::fs::read_to_string("/proc/cpuinfo")
            .is_ok_and(|c| c.split_whitespace().any(|w| w == "vmx" || w == "svm"));
    let (accel, cpu) = if kvm { ("kvm", "host") } else { ("tcg", "max") };
    say(
        t0,
        &format!(
            "booting qemu ({accel}), console in {}",
            dir.join("console.log").display()
        ),
    );
    let mut child = tools::command("qemu-system-x86_64")?
        .args(["-accel", accel, "-cpu", cpu, "-m", "1G", "-smp", "2"])
        .args(["-nographic", "-no-reboot", "-nic", "none"])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet loglevel=3 edd=off"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line.trim_end_matches('\r').to_string()).is_err() {
                break;
            }
        }
    });
    let mut log = Vec::new();
    let mut file = std::fs::File::create(dir.join("console.log"))?;
    let deadline = Instant::now() + GUEST_TIMEOUT;
    let timed_out = loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                writeln!(file, "{line}")?;
                if let Some(m) = line.strip_prefix("=== ") {
                    say(t0, m);
                } else {
                    println!("  | {line}");
                }
                log.push(line);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break false,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if Instant::now() > deadline {
            break true;
        }
    };
    if timed_out {
        let _ = child.kill();
    }
    let _ = child.wait();
    let _ = reader.join();
    ensure!(
        !timed_out,
        "timeout: the guest ran longer than {GUEST_TIMEOUT:?}"
    );
    Ok(log)
}
