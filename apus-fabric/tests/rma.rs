//! One-sided writes and reads between two endpoints, per provider, and the
//! errors for what is missing. Needs libfabric (`cargo xtask test` installs
//! it); without it each test prints SKIPPED with the reason.

use std::time::{Duration, Instant};

use apus_fabric::{
    Access, Completion, Endpoint, FabricError, LinkState, MemoryRegion, PeerAddr, Remote,
};

/// Skips (loudly) when libfabric is not installed.
fn open(provider: &str) -> Option<Endpoint> {
    // Tests stay on loopback: the tcp provider's "lo" domain.
    let domain = provider.starts_with("tcp").then_some("lo");
    match Endpoint::open_in(provider, domain) {
        Ok(e) => Some(e),
        Err(FabricError::LibraryMissing(why)) => {
            eprintln!("SKIPPED: {why}");
            None
        }
        Err(e) => panic!("opening a {provider} endpoint: {e}"),
    }
}

/// Polls both endpoints until `a` reports the completion of `context`.
fn wait(a: &mut Endpoint, b: &mut Endpoint, context: u64) -> Completion {
    wait_for(a, b, context, Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no completion for {context}"))
}

fn wait_for(
    a: &mut Endpoint,
    b: &mut Endpoint,
    context: u64,
    within: Duration,
) -> Option<Completion> {
    let deadline = Instant::now() + within;
    let mut done = Vec::new();
    while Instant::now() < deadline {
        a.poll(&mut done).expect("poll a");
        b.poll(&mut Vec::new()).expect("poll b");
        if let Some(at) = done.iter().position(|c| c.context == context) {
            return Some(done.swap_remove(at));
        }
        std::thread::yield_now();
    }
    None
}

/// Posts with `post` until the provider takes it (the first operation to a
/// peer may wait for a connection), polling both sides meanwhile.
fn post(a: &mut Endpoint, b: &mut Endpoint, mut post: impl FnMut(&mut Endpoint) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !post(a) {
        a.poll(&mut Vec::new()).expect("poll a");
        b.poll(&mut Vec::new()).expect("poll b");
        assert!(
            Instant::now() < deadline,
            "the provider never took the operation"
        );
        std::thread::yield_now();
    }
}

struct Side {
    ep: Endpoint,
    mem: Box<[u8]>,
    mr: MemoryRegion,
}

fn side(provider: &str) -> Option<Side> {
    let mut ep = open(provider)?;
    let mut mem = vec![0u8; 1 << 16].into_boxed_slice();
    // SAFETY: `mem` lives in the same Side as the registration and is never
    // reallocated; the endpoint (dropped with it) closes the registration.
    let mr = unsafe { ep.register(mem.as_mut_ptr(), mem.len(), Access::REMOTE_WRITE) }
        .expect("register");
    Some(Side { ep, mem, mr })
}

/// Makes `a` and `b` peers: inserted (datagram providers), or `a` dials
/// `b` with the token `b` awaits (connection-oriented ones) and both wait
/// for the connection. Returns (b as a names it, a as b names it).
fn connect(a: &mut Side, b: &mut Side) -> (PeerAddr, PeerAddr) {
    if !a.ep.connection_oriented() {
        let to_b =
            a.ep.insert_peer(&b.ep.name().expect("name"))
                .expect("insert");
        let to_a =
            b.ep.insert_peer(&a.ep.name().expect("name"))
                .expect("insert");
        return (to_b, to_a);
    }
    let token = 0x5eed_0000_0000_0001;
    let to_a = b.ep.await_peer(token).expect("await");
    let to_b =
        a.ep.dial_peer(&b.ep.name().expect("name"), token)
            .expect("dial");
    poll_until(a, b, "the connection to come up", |a, b| {
        a.ep.link(to_b) == LinkState::Up && b.ep.link(to_a) == LinkState::Up
    });
    (to_b, to_a)
}

/// Polls both sides until `done` holds (10 s at most).
fn poll_until(a: &mut Side, b: &mut Side, what: &str, done: impl Fn(&Side, &Side) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done(a, b) {
        a.ep.poll(&mut Vec::new()).expect("poll a");
        b.ep.poll(&mut Vec::new()).expect("poll b");
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::yield_now();
    }
}

fn write_then_read(provider: &str) {
    let (Some(mut a), Some(mut b)) = (side(provider), side(provider)) else {
        return;
    };
    let (to_b, _to_a) = connect(&mut a, &mut b);
    for (i, x) in a.mem[..4096].iter_mut().enumerate() {
        *x = (i % 251) as u8;
    }
    // Write 4 KiB at offset 1000 of b's region.
    let (src, (base, key)) = (a.mem.as_ptr(), (b.mr.base, b.mr.key));
    let a_mr = &a.mr;
    // SAFETY: the source lies in a's registered memory, alive until the end.
    post(&mut a.ep, &mut b.ep, |ep| unsafe {
        ep.write(
            src,
            4096,
            a_mr,
            Remote {
                peer: to_b,
                addr: base + 1000,
                key,
            },
            7,
        )
        .expect("write")
    });
    let c = wait(&mut a.ep, &mut b.ep, 7);
    assert_eq!(c.result, Ok(()));
    assert_eq!(&b.mem[1000..1000 + 4096], &a.mem[..4096]);
    // Read it back into a different place of a's region.
    // SAFETY: the destination lies in a's registered memory.
    let dst = unsafe { a.mem.as_mut_ptr().add(8192) };
    // SAFETY: as above.
    post(&mut a.ep, &mut b.ep, |ep| unsafe {
        ep.read(
            dst,
            4096,
            a_mr,
            Remote {
                peer: to_b,
                addr: base + 1000,
                key,
            },
            8,
        )
        .expect("read")
    });
    assert_eq!(wait(&mut a.ep, &mut b.ep, 8).result, Ok(()));
    assert_eq!(&a.mem[8192..8192 + 4096], &a.mem[..4096]);
}

#[test]
fn shm_write_and_read() {
    write_then_read("shm");
}

#[test]
fn tcp_rxm_write_and_read() {
    write_then_read("tcp;ofi_rxm");
}

#[test]
fn tcp_connected_write_and_read() {
    write_then_read("tcp");
}

#[test]
fn tcp_connected_revoked_registration_refuses_writes() {
    revoked_registration_refuses_writes("tcp");
}

#[test]
fn shm_revoked_registration_refuses_writes() {
    revoked_registration_refuses_writes("shm");
}

#[test]
fn tcp_rxm_revoked_registration_refuses_writes() {
    revoked_registration_refuses_writes("tcp;ofi_rxm");
}

/// The fencing primitive: once the target closes a registration, a write
/// naming its key fails and changes nothing.
fn revoked_registration_refuses_writes(provider: &str) {
    let (Some(mut a), Some(mut b)) = (side(provider), side(provider)) else {
        return;
    };
    let (to_b, _) = connect(&mut a, &mut b);
    let mut ring = vec![0u8; 4096].into_boxed_slice();
    // SAFETY: `ring` outlives the registration, which is closed just below.
    let ring_mr = unsafe {
        b.ep.register(ring.as_mut_ptr(), ring.len(), Access::REMOTE_WRITE)
    }
    .unwrap();
    let (base, key) = (ring_mr.base, ring_mr.key);
    b.ep.deregister(ring_mr).unwrap();
    a.mem[0] = 0xAB;
    let (src, a_mr) = (a.mem.as_ptr(), &a.mr);
    let mut refused_at_post = None;
    // SAFETY: the source lies in a's registered memory.
    post(&mut a.ep, &mut b.ep, |ep| unsafe {
        match ep.write(
            src,
            64,
            a_mr,
            Remote {
                peer: to_b,
                addr: base,
                key,
            },
            9,
        ) {
            Ok(posted) => posted,
            Err(e) => {
                refused_at_post = Some(e);
                true
            }
        }
    });
    match refused_at_post {
        Some(e) => eprintln!("{provider}: refused when posted: {e}"),
        None => match wait_for(&mut a.ep, &mut b.ep, 9, Duration::from_secs(2)) {
            Some(c) => {
                eprintln!("{provider}: completion {:?}", c.result);
                assert!(c.result.is_err(), "a write with a revoked key completed");
            }
            // shm drops such a write without completing it: it must not
            // land; the transport turns the silence into a failure.
            None => eprintln!("{provider}: no completion within 2 s"),
        },
    }
    assert_eq!(ring[0], 0, "a write with a revoked key landed");
    drop(b);
}

#[test]
fn an_unknown_provider_is_named_with_the_alternatives() {
    match Endpoint::open("no-such-provider") {
        Err(FabricError::LibraryMissing(why)) => eprintln!("SKIPPED: {why}"),
        Err(e @ FabricError::ProviderMissing { .. }) => {
            let text = e.to_string();
            assert!(text.contains("no-such-provider"), "{text}");
            assert!(text.contains("shm"), "the alternatives are listed: {text}");
        }
        other => panic!("expected ProviderMissing, got {other:?}"),
    }
}

#[test]
fn a_provider_without_rma_is_refused() {
    // udp has no RMA: datagrams only.
    match Endpoint::open("udp") {
        Err(FabricError::LibraryMissing(why)) => eprintln!("SKIPPED: {why}"),
        Err(e @ FabricError::NoRma { .. }) => {
            assert!(e.to_string().contains("udp"), "{e}");
        }
        other => panic!("expected NoRma, got {other:?}"),
    }
}

#[test]
fn tcp_endpoints_stay_on_loopback() {
    let Some(ep) = open("tcp;ofi_rxm") else {
        return;
    };
    let name = ep.name().expect("name");
    // FI_SOCKADDR_IN: family, port, then the IPv4 address.
    assert!(name.len() >= 8, "{name:?}");
    assert_eq!(&name[4..8], &[127, 0, 0, 1], "endpoint name {name:?}");
}

#[test]
fn the_plain_tcp_provider_is_connection_oriented() {
    // tcp alone has RMA only on connected (FI_EP_MSG) endpoints.
    let (Some(mut a), Some(mut b)) = (side("tcp"), side("tcp")) else {
        return;
    };
    assert!(a.ep.connection_oriented());
    let name = a.ep.name().expect("name");
    assert_eq!(&name[4..8], &[127, 0, 0, 1], "listening on {name:?}");
    let err = a.ep.insert_peer(&b.ep.name().unwrap()).unwrap_err();
    assert!(err.to_string().contains("connection-oriented"), "{err}");
    // Posting before the connection is up is an error, not a hang.
    let to_b = a.ep.dial_peer(&b.ep.name().unwrap(), 1).expect("dial");
    let (src, a_mr, key) = (a.mem.as_ptr(), &a.mr, b.mr.key);
    // SAFETY: the source lies in a's registered memory.
    let early = unsafe {
        a.ep.write(
            src,
            8,
            a_mr,
            Remote {
                peer: to_b,
                addr: b.mr.base,
                key,
            },
            1,
        )
    };
    assert!(early.is_err(), "posted before the connection was up");
    let _ = &mut b;
}

#[test]
fn a_connection_without_the_awaited_token_is_rejected() {
    let (Some(mut a), Some(mut b)) = (side("tcp"), side("tcp")) else {
        return;
    };
    let awaited = b.ep.await_peer(42).expect("await");
    let to_b = a.ep.dial_peer(&b.ep.name().unwrap(), 43).expect("dial");
    let deadline = Instant::now() + Duration::from_secs(10);
    let why = loop {
        a.ep.poll(&mut Vec::new()).expect("poll a");
        b.ep.poll(&mut Vec::new()).expect("poll b");
        match a.ep.link(to_b) {
            LinkState::Down(why) => break why,
            LinkState::Up => panic!("a connection with the wrong token came up"),
            LinkState::Connecting => {}
        }
        assert!(
            Instant::now() < deadline,
            "the wrong token was not rejected"
        );
        std::thread::yield_now();
    };
    eprintln!("rejected: {why}");
    assert_eq!(b.ep.link(awaited), LinkState::Connecting);
    // The right token still gets in.
    let to_b = a.ep.dial_peer(&b.ep.name().unwrap(), 42).expect("dial");
    poll_until(&mut a, &mut b, "the right token to be accepted", |a, b| {
        a.ep.link(to_b) == LinkState::Up && b.ep.link(awaited) == LinkState::Up
    });
}

#[test]
fn a_closed_connection_goes_down() {
    let (Some(mut a), Some(mut b)) = (side("tcp"), side("tcp")) else {
        return;
    };
    let (to_b, to_a) = connect(&mut a, &mut b);
    b.ep.remove_peer(to_a).expect("remove");
    poll_until(&mut a, &mut b, "the peer's close to be noticed", |a, _| {
        matches!(a.ep.link(to_b), LinkState::Down(_))
    });
}
