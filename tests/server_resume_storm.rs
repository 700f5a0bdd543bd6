//! A reconnect storm against one org: many subscribers resuming at once from nearby cursors are
//! served from a few shared reads of the log (the server's count of replay store reads in
//! `/metrics`), each still receiving every event it may see exactly once, in seq order.
mod support;

use futures::StreamExt;
use support::*;

const ORG: &str = "acme";
/// Subscribers resuming together.
const SUBSCRIBERS: usize = 100;

/// The server's count of store reads made for replays.
async fn replay_reads(server: &TestServer) -> u64 {
    let text = get_text(server, "/metrics").await;
    text.lines()
        .find_map(|l| l.strip_prefix("orgpulse_replay_store_reads_total "))
        .expect("/metrics counts replay store reads")
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn many_subscribers_resuming_together_share_few_store_reads_exactly_once() {
    let server = TestServer::start().await;
    let admin = token(ORG, "writer", "admin");
    let start = snapshot(&server, &admin).await.cursor;
    // 300 events: jobs for everyone and, every 10th, a notification for one subscriber only.
    for i in 0..300 {
        if i % 10 == 9 {
            notify(&server, &admin, &format!("sub{}", i % 7), "for one").await;
        } else {
            create_job(&server, &admin, "", &format!("job {i}")).await;
        }
    }
    let log = log_of(&server.dir, ORG);
    assert_eq!(log.len(), 300);
    let before = replay_reads(&server).await;

    // Every subscriber resumes from a cursor between seq 100 and 112, all at once; every third
    // one asks for job events only.
    let channel = server.channel().await;
    let resumed: Vec<(usize, Sub)> = futures::stream::iter(0..SUBSCRIBERS)
        .map(|i| {
            let channel = channel.clone();
            let cursor = cursor_at(&start, 100 + (i as u64 * 7) % 13);
            async move {
                let kinds: &[i32] = if i % 3 == 0 { &[1] } else { &[] };
                let t = token(ORG, &format!("sub{i}"), "member");
                let mut sub = Sub::open_on(channel, &t, "", &cursor, kinds).await.unwrap();
                sub.caught_up().await;
                (i, sub)
            }
        })
        .buffer_unordered(SUBSCRIBERS)
        .collect()
        .await;
    let reads = replay_reads(&server).await - before;
    assert!(
        reads <= 5,
        "{SUBSCRIBERS} subscribers resuming together made {reads} store reads"
    );

    // Live after the replay: one more event each, nothing twice.
    create_job(&server, &admin, "", "live").await;
    let log = log_of(&server.dir, ORG);
    for (i, mut sub) in resumed {
        sub.until(|e| e.seq == 301).await;
        let from = 100 + (i as u64 * 7) % 13;
        let kinds: &[i32] = if i % 3 == 0 { &[1] } else { &[] };
        let replayed: Vec<_> = sub.seen.into_iter().filter(|e| e.seq > 0).collect();
        assert_exactly_once(&replayed, &log, from + 1..=301, &format!("sub{i}"), kinds);
    }
}
