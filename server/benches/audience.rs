//! `cargo bench -p orgpulse-server --bench audience`: what the one audience predicate
//! (`hub::Filter::sees`) costs per subscriber at fan-out, for the goal of <= 50 ns per
//! subscriber who is NOT a recipient. 10,000 subscribers of one org, each in 1 of 100 groups
//! (every 100th an admin), and an event addressed to one group and the admins; also the same
//! event without an audience. Prints ns per check (the median of 25 rounds of 10,000 checks).
use std::{hint::black_box, sync::Arc, time::Instant};

use bytes::Bytes;
use orgpulse::proto::EventKind;
use orgpulse_server::{
    audience::{Audience, Names, Topics, Viewer},
    hub::{EntityTypes, Filter, Kinds},
    store::CommittedEvent,
};

const SUBSCRIBERS: usize = 10_000;
const GROUPS: usize = 100;
const ROUNDS: usize = 25;

fn filter(i: usize) -> Filter {
    let admin = i % 100 == 99;
    Filter {
        viewer: Arc::new(Viewer {
            user: format!("sub{i}").into(),
            groups: if admin {
                Names::default()
            } else {
                Names::new([format!("g{}", i % GROUPS)])
            },
            roles: Names::new([if admin { "admin" } else { "viewer" }]),
            sees_all: false,
        }),
        kinds: Kinds::from_request(&[]).unwrap(),
        entity_types: EntityTypes::default(),
        topics: Topics::default(),
    }
}

fn event(audience: Option<Audience>) -> CommittedEvent {
    CommittedEvent {
        org: "bench".into(),
        seq: 1,
        kind: EventKind::Job,
        audience: audience.map(Arc::new),
        topics: Names::default(),
        entity_type: None,
        bytes: Bytes::new(),
    }
}

/// Median ns per `sees` over the subscribers, and how many saw the event.
fn measure(subs: &[Filter], ev: &CommittedEvent) -> (f64, usize) {
    let mut rounds = Vec::with_capacity(ROUNDS);
    let mut seen = 0;
    for _ in 0..ROUNDS {
        let t = Instant::now();
        seen = subs
            .iter()
            .filter(|f| black_box(f).sees(black_box(ev)))
            .count();
        rounds.push(t.elapsed().as_nanos() as f64 / subs.len() as f64);
    }
    rounds.sort_by(f64::total_cmp);
    (rounds[ROUNDS / 2], seen)
}

fn main() {
    let subs: Vec<Filter> = (0..SUBSCRIBERS).map(filter).collect();
    let addressed = event(Some(Audience {
        user_ids: vec![],
        groups: vec!["g7".into()],
        roles: vec!["admin".into()],
    }));
    let (ns, seen) = measure(&subs, &addressed);
    println!(
        "audience (1 group + admins): {ns:.1} ns per subscriber checked, {seen} of {SUBSCRIBERS} recipients"
    );
    let (ns, seen) = measure(&subs, &event(None));
    println!(
        "no audience:                 {ns:.1} ns per subscriber checked, {seen} of {SUBSCRIBERS} recipients"
    );
}
