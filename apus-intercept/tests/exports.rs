//! The library interposes every call the issue lists: each name resolves to
//! the library's own definition, not to libc's behind it.

use std::ffi::{CStr, CString};

/// Every libc function the library interposes.
const HOOKED: &[&str] = &[
    "listen",
    "accept",
    "accept4",
    "read",
    "__read_chk",
    "recv",
    "__recv_chk",
    "recvfrom",
    "__recvfrom_chk",
    "readv",
    "recvmsg",
    "recvmmsg",
    "write",
    "send",
    "sendto",
    "writev",
    "sendmsg",
    "sendmmsg",
    "sendfile",
    "splice",
    "close",
    "close_range",
    "closefrom",
    "dup",
    "dup2",
    "dup3",
    "fcntl",
    "fcntl64",
    "shutdown",
];

#[test]
fn every_hook_is_the_librarys_own() {
    let exe = std::env::current_exe().unwrap();
    let lib = exe
        .parent()
        .and_then(|deps| deps.parent())
        .unwrap()
        .join("libapus_intercept.so");
    assert!(
        lib.is_file(),
        "{} is not built: `cargo build -p apus-intercept` first (cargo xtask test does)",
        lib.display()
    );
    let path = CString::new(lib.to_str().unwrap()).unwrap();
    // SAFETY: dlopen of a library built by this workspace; its constructor
    // finds no settings in this environment and does nothing.
    let handle = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    assert!(!handle.is_null(), "dlopen failed");
    for name in HOOKED {
        let c = CString::new(*name).unwrap();
        // SAFETY: a symbol lookup in the handle we opened.
        let sym = unsafe { libc::dlsym(handle, c.as_ptr()) };
        assert!(!sym.is_null(), "{name} is not exported");
        // SAFETY: Dl_info is plain data; zeroes are a valid value.
        let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
        // SAFETY: dladdr fills `info` for an address in a loaded object.
        let found = unsafe { libc::dladdr(sym, &mut info) };
        assert!(found != 0, "dladdr {name}");
        // SAFETY: dli_fname is a NUL-terminated path owned by the loader.
        let file = unsafe { CStr::from_ptr(info.dli_fname) }.to_string_lossy();
        assert!(
            file.ends_with("libapus_intercept.so"),
            "{name} resolves to {file}, not to the library"
        );
    }
}
