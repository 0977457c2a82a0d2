//! Incarnations (issue 15 item 5): a replica whose data directory was wiped
//! rejoins as a non-voter until a leader has brought it up to date, so it
//! and a lagging replica cannot elect a leader missing committed entries.

mod common;

use std::time::{Duration, Instant};

use apus::Node;
use apus_core::NodeId;
use common::{Log, config, leader, propose, until};

fn start(cfg: &apus::ClusterConfig, i: usize, log: &Log) -> Node {
    Node::start(cfg, NodeId(i as u8), log.clone()).unwrap()
}

#[test]
fn a_wiped_replica_and_a_lagging_one_elect_nobody_and_no_commit_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "durable");
    let logs: Vec<Log> = (0..3).map(|_| Log::default()).collect();
    let mut nodes: Vec<Option<Node>> = (0..3).map(|i| Some(start(&cfg, i, &logs[i]))).collect();
    until("a leader", || leader(&nodes).is_some());
    for i in 0..50u32 {
        propose(&nodes, format!("all {i}").as_bytes());
    }
    until("everyone to apply", || {
        logs.iter().all(|l| l.0.lock().unwrap().len() >= 50)
    });

    // n2 stops; 50 more commit on n0 and n1 alone: n2 lags.
    nodes[2].take().unwrap().shutdown();
    for i in 0..50u32 {
        propose(&nodes, format!("majority {i}").as_bytes());
    }
    until("n0 and n1 to apply", || {
        logs[..2].iter().all(|l| l.0.lock().unwrap().len() >= 100)
    });
    let committed = logs[0].0.lock().unwrap().clone();
    assert_eq!(committed.len(), 100);

    // n0 and n1 stop; n1's data directory is wiped; n1 and the lagging n2
    // start. Together they are a majority, but n1 no longer holds the
    // entries it acknowledged: they must not elect anybody.
    nodes[0].take().unwrap().shutdown();
    nodes[1].take().unwrap().shutdown();
    let n1_dir = &cfg.replicas[1].data_dir;
    std::fs::remove_dir_all(n1_dir).unwrap();
    let fresh: Vec<Log> = (0..3).map(|_| Log::default()).collect();
    nodes[1] = Some(start(&cfg, 1, &fresh[1]));
    nodes[2] = Some(start(&cfg, 2, &fresh[2]));
    // A safety check over a window, not a timing assertion: with 40 ms
    // election timeouts a leader would be elected many times over in it.
    let window = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < window {
        assert_eq!(
            leader(&nodes),
            None,
            "a wiped replica and a lagging one elected a leader"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        nodes[1].as_ref().unwrap().status().recovering,
        "the wiped replica does not know it is rejoining"
    );

    // n0 returns: it leads, brings n1 back, and nothing committed is lost.
    nodes[0] = Some(start(&cfg, 0, &fresh[0]));
    until("a leader", || leader(&nodes).is_some());
    propose(&nodes, b"after");
    for (i, l) in fresh.iter().enumerate() {
        until("every replica to apply everything", || {
            l.0.lock().unwrap().len() >= 101
        });
        let got = l.0.lock().unwrap().clone();
        assert_eq!(&got[..100], &committed[..], "replica {i} lost a commit");
    }
    until("the wiped replica to vote again", || {
        !nodes[1].as_ref().unwrap().status().recovering
    });
    for n in nodes.into_iter().flatten() {
        n.shutdown();
    }
}
