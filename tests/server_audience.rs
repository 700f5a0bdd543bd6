//! Audiences and topics end to end (API.md "Audiences and topics"): users in different groups and
//! roles receive exactly the events they may see, in seq order, live, on a resumed Subscribe
//! (replay) and by Poll, checked against the log and the rule (an oracle written here, apart from
//! the server's); topics narrow and never widen; a job outside the caller's audience is NOT_FOUND
//! and absent from ListJobs; every limit answers with its status.
mod support;

use std::collections::BTreeSet;

use orgpulse::proto::{
    Audience, CreateJobRequest, DeleteJobRequest, GetJobRequest, ListJobsRequest, OrgFilter,
    PollRequest, PublishRequest, SendNotificationRequest, UpdateJobRequest,
    event_service_client::EventServiceClient,
};
use prost::Message;
use serde_json::{Value, json};
use support::*;
use tonic::Code;

const ORG: &str = "acme";
const P42: &str = "project:42";
const P7: &str = "project:7";

/// A caller: its user id, its token's groups and roles.
struct Person {
    name: &'static str,
    groups: &'static [&'static str],
    roles: &'static [&'static str],
}

const PEOPLE: [Person; 5] = [
    Person {
        name: "ann",
        groups: &["g42"],
        roles: &["member"],
    },
    Person {
        name: "bob",
        groups: &["g7"],
        roles: &["member"],
    },
    Person {
        name: "cat",
        groups: &[],
        roles: &["admin"],
    },
    Person {
        name: "eve",
        groups: &["g-other"],
        roles: &["viewer", "auditor"],
    },
    Person {
        name: "svc",
        groups: &[],
        roles: &["service"],
    },
];

fn person(name: &str) -> &'static Person {
    PEOPLE.iter().find(|p| p.name == name).unwrap()
}

fn mint(user: &str, extra: Value) -> String {
    token_with(ORG, user, extra)
}

fn token_of(p: &Person) -> String {
    mint(p.name, json!({ "roles": p.roles, "groups": p.groups }))
}

/// The rule of API.md, read off the stored audience: a user id alone, or a JSON object.
fn may_see(p: &Person, stored: Option<&str>) -> bool {
    let Some(text) = stored else { return true };
    if p.roles.contains(&"service") {
        return true;
    }
    if !text.starts_with('{') {
        return text == p.name;
    }
    let a: Value = serde_json::from_str(text).unwrap();
    let names = |key: &str| -> Vec<String> {
        a[key]
            .as_array()
            .map(|l| l.iter().map(|v| v.as_str().unwrap().to_string()).collect())
            .unwrap_or_default()
    };
    names("user_ids").iter().any(|u| u == p.name)
        || names("groups")
            .iter()
            .any(|g| p.groups.contains(&g.as_str()))
        || names("roles").iter().any(|r| p.roles.contains(&r.as_str()))
}

/// The seqs after `after` that `p` may see with the topic filter `topics`, from the log.
fn visible(server: &TestServer, p: &Person, topics: &[&str], after: u64) -> Vec<u64> {
    log_rows(&server.dir, ORG)
        .into_iter()
        .filter(|r| r.seq > after && may_see(p, r.audience.as_deref()))
        .filter(|r| {
            let ev = orgpulse::proto::Event::decode(&*r.data).unwrap();
            topics.is_empty() || ev.topics.iter().any(|t| topics.contains(&t.as_str()))
        })
        .map(|r| r.seq)
        .collect()
}

fn durable_seqs(events: &[orgpulse::proto::Event]) -> Vec<u64> {
    events.iter().filter(|e| e.seq > 0).map(|e| e.seq).collect()
}

fn audience(users: &[&str], groups: &[&str], roles: &[&str]) -> Option<Audience> {
    let v = |l: &[&str]| l.iter().map(|s| s.to_string()).collect();
    Some(Audience {
        user_ids: v(users),
        groups: v(groups),
        roles: v(roles),
    })
}

fn topics(t: &[&str]) -> Vec<String> {
    t.iter().map(|s| s.to_string()).collect()
}

fn entity(id: &str, audience: Option<Audience>, t: &[&str]) -> PublishRequest {
    PublishRequest {
        org_id: ORG.into(),
        entity_type: "doc".into(),
        entity_id: id.into(),
        action: "updated".into(),
        audience,
        topics: topics(t),
        ..Default::default()
    }
}

fn new_job(title: &str, audience: Option<Audience>, t: &[&str]) -> CreateJobRequest {
    CreateJobRequest {
        org_id: ORG.into(),
        title: title.into(),
        audience,
        topics: topics(t),
        ..Default::default()
    }
}

async fn poll_all(
    server: &TestServer,
    token: &str,
    after: &str,
    t: &[&str],
) -> Result<Vec<orgpulse::proto::Event>, tonic::Status> {
    let mut c = EventServiceClient::with_interceptor(server.channel().await, Auth::new(token));
    let resp = c
        .poll(PollRequest {
            org_id: ORG.into(),
            after_cursor: after.into(),
            max_events: 1000,
            topics: topics(t),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert!(!resp.resync);
    Ok(resp.events)
}

async fn subscribe(server: &TestServer, token: &str, after: &str, t: &[&str]) -> Sub {
    let filter = OrgFilter {
        org_id: ORG.into(),
        after_cursor: after.into(),
        topics: topics(t),
        ..Default::default()
    };
    Sub::open_filter(server.channel().await, token, filter)
        .await
        .unwrap()
}

/// Every job id `token` lists (optionally with `t`), page by page with `page_size`.
async fn list_ids(server: &TestServer, token: &str, t: &[&str], page_size: i32) -> Vec<String> {
    let mut jobs = server.jobs(token).await;
    let mut ids = vec![];
    let mut req = ListJobsRequest {
        org_id: ORG.into(),
        page_size,
        topics: topics(t),
        ..Default::default()
    };
    loop {
        let page = jobs.list_jobs(req.clone()).await.unwrap().into_inner();
        ids.extend(page.jobs.into_iter().map(|j| j.id));
        if page.next_page_token.is_empty() {
            return ids;
        }
        req.page_token = page.next_page_token;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_member_receives_exactly_what_its_audience_and_topics_allow_live_replay_and_poll() {
    let server = TestServer::start().await;
    let svc = token_of(person("svc"));
    let start = server
        .jobs(&svc)
        .await
        .list_jobs(ListJobsRequest {
            org_id: ORG.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .cursor;
    let filters: [&[&str]; 2] = [&[], &[P42]];
    let mut live = vec![];
    for p in &PEOPLE {
        for t in filters {
            let mut sub = subscribe(&server, &token_of(p), "", t).await;
            sub.caught_up().await;
            live.push((p, t, sub));
        }
    }

    let mut jobs = server.jobs(&svc).await;
    let mut events = EventServiceClient::with_interceptor(server.channel().await, Auth::new(&svc));
    let j42 = jobs
        .create_job(new_job("private 42", audience(&[], &["g42"], &[]), &[P42]))
        .await
        .unwrap()
        .into_inner();
    let j7 = jobs
        .create_job(new_job("private 7", audience(&[], &["g7"], &[]), &[P7]))
        .await
        .unwrap()
        .into_inner();
    jobs.create_job(new_job("public", None, &[P42]))
        .await
        .unwrap();
    events
        .publish(entity("to-bob", audience(&["bob"], &[], &[]), &[]))
        .await
        .unwrap();
    events
        .publish(entity("auditors", audience(&[], &[], &["auditor"]), &[P7]))
        .await
        .unwrap();
    let mut widened = entity("g7-and-ann", audience(&[], &["g7"], &[]), &[P42]);
    widened.user_id = "ann".into();
    events.publish(widened).await.unwrap();
    server
        .notifications(&svc)
        .await
        .send_notification(SendNotificationRequest {
            org_id: ORG.into(),
            user_id: "cat".into(),
            title: "for cat".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let update = |id: &str| UpdateJobRequest {
        org_id: ORG.into(),
        job_id: id.into(),
        progress: Some(50),
        ..Default::default()
    };
    jobs.update_job(update(&j42.id)).await.unwrap();
    jobs.update_job(update(&j7.id)).await.unwrap();
    jobs.delete_job(DeleteJobRequest {
        org_id: ORG.into(),
        job_id: j7.id.clone(),
    })
    .await
    .unwrap();
    events
        .publish(entity("everyone", None, &[P7]))
        .await
        .unwrap();
    events
        .publish(entity("admins", audience(&[], &[], &["admin"]), &[]))
        .await
        .unwrap();
    let marker = events
        .publish(entity("marker", None, &[P42, P7]))
        .await
        .unwrap()
        .into_inner()
        .seq;

    let mut saw_private = 0;
    for (p, t, sub) in &mut live {
        sub.until(|e| e.seq == marker).await;
        let want = visible(&server, p, t, 0);
        assert_eq!(
            durable_seqs(&sub.seen),
            want,
            "{} live with topics {t:?}",
            p.name
        );
        saw_private += usize::from(want.len() < marker as usize);
    }
    assert!(
        saw_private >= 8,
        "most subscribers are narrowed by the audience"
    );
    // Distinct people see distinct sets: the matrix is not trivially everything.
    let sets: BTreeSet<Vec<u64>> = PEOPLE.iter().map(|p| visible(&server, p, &[], 0)).collect();
    assert_eq!(sets.len(), PEOPLE.len());

    for p in &PEOPLE {
        for t in filters {
            let token = token_of(p);
            let mut replay = subscribe(&server, &token, &start, t).await;
            replay.caught_up().await;
            let want = visible(&server, p, t, 0);
            assert_eq!(
                durable_seqs(&replay.seen),
                want,
                "{} replay with topics {t:?}",
                p.name
            );
            let polled = poll_all(&server, &token, &start, t).await.unwrap();
            assert_eq!(
                durable_seqs(&polled),
                want,
                "{} poll with topics {t:?}",
                p.name
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_outside_the_callers_audience_is_not_found_and_absent_from_list_jobs() {
    let server = TestServer::start().await;
    let (ann, bob, cat, svc) = (
        token_of(person("ann")),
        token_of(person("bob")),
        token_of(person("cat")),
        token_of(person("svc")),
    );
    let mut svc_jobs = server.jobs(&svc).await;
    let mut private = vec![];
    let mut public = vec![];
    for i in 0..5 {
        let p = svc_jobs
            .create_job(new_job(
                &format!("p{i}"),
                audience(&[], &["g42"], &[]),
                &[P42],
            ))
            .await
            .unwrap();
        private.push(p.into_inner().id);
        let o = svc_jobs
            .create_job(new_job(&format!("o{i}"), None, &[P7]))
            .await
            .unwrap();
        public.push(o.into_inner().id);
    }
    let newest_first = |mut ids: Vec<String>| {
        ids.sort();
        ids.reverse();
        ids
    };
    let all = newest_first(private.iter().chain(&public).cloned().collect());
    // Walked one job per page: every page token continues exactly after the last job shown.
    for page_size in [1, 2, 50] {
        assert_eq!(list_ids(&server, &ann, &[], page_size).await, all);
        assert_eq!(
            list_ids(&server, &bob, &[], page_size).await,
            newest_first(public.clone())
        );
        assert_eq!(list_ids(&server, &svc, &[], page_size).await, all);
    }
    // Topics narrow the list and never widen it.
    assert_eq!(
        list_ids(&server, &ann, &[P42], 2).await,
        newest_first(private.clone())
    );
    assert_eq!(
        list_ids(&server, &bob, &[P42], 2).await,
        Vec::<String>::new()
    );

    let get = |token: &str, id: &str| {
        let (token, id) = (token.to_string(), id.to_string());
        let server = &server;
        async move {
            server
                .jobs(&token)
                .await
                .get_job(GetJobRequest {
                    org_id: ORG.into(),
                    job_id: id,
                })
                .await
        }
    };
    let job = &private[0];
    assert_eq!(get(&ann, job).await.unwrap().into_inner().topics, [P42]);
    assert_eq!(get(&svc, job).await.unwrap().into_inner().id, *job);
    for outsider in [&bob, &cat] {
        let status = get(outsider, job).await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
        assert_eq!(status.message(), format!("job {job} not found"));
    }
    let update = UpdateJobRequest {
        org_id: ORG.into(),
        job_id: job.clone(),
        progress: Some(10),
        ..Default::default()
    };
    let refused = server
        .jobs(&bob)
        .await
        .update_job(update.clone())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::NotFound);
    let delete = DeleteJobRequest {
        org_id: ORG.into(),
        job_id: job.clone(),
    };
    let refused = server
        .jobs(&cat)
        .await
        .delete_job(delete.clone())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::NotFound);
    // Nothing was written by the refused calls; the member inside the audience may update it.
    let head = log_of(&server.dir, ORG).len();
    assert_eq!(head, 10);
    let updated = server
        .jobs(&ann)
        .await
        .update_job(update)
        .await
        .unwrap()
        .into_inner();
    assert_eq!((updated.version, updated.topics), (2, topics(&[P42])));
    server.jobs(&svc).await.delete_job(delete).await.unwrap();
    let log = log_rows(&server.dir, ORG);
    assert_eq!(log.len(), 12);
    // The job's audience is on every one of its events, as stored.
    for row in &log {
        let ev = orgpulse::proto::Event::decode(&*row.data).unwrap();
        if ev.topics == [P42] {
            assert_eq!(row.audience.as_deref(), Some(r#"{"groups":["g42"]}"#));
        }
    }
}

#[tokio::test]
async fn groups_come_from_the_configured_claim_and_a_token_with_too_many_is_refused() {
    let server = TestServer::start_args(&["--jwt-groups-claim", "app.teams"]).await;
    let svc = token_of(person("svc"));
    let ann = mint(
        "ann",
        json!({ "roles": ["member"], "app": { "teams": "g1 g42" } }),
    );
    let bob = mint("bob", json!({ "roles": ["member"], "groups": ["g42"] }));
    let mut ann_sub = subscribe(&server, &ann, "", &[]).await;
    ann_sub.caught_up().await;
    let mut bob_sub = subscribe(&server, &bob, "", &[]).await;
    bob_sub.caught_up().await;
    let mut events = EventServiceClient::with_interceptor(server.channel().await, Auth::new(&svc));
    let private = events
        .publish(entity("x", audience(&[], &["g42"], &[]), &[]))
        .await
        .unwrap()
        .into_inner()
        .seq;
    let public = events
        .publish(entity("y", None, &[]))
        .await
        .unwrap()
        .into_inner()
        .seq;
    ann_sub.until(|e| e.seq == public).await;
    bob_sub.until(|e| e.seq == public).await;
    assert_eq!(durable_seqs(&ann_sub.seen), [private, public]);
    // The `groups` claim is not read when another claim is configured.
    assert_eq!(durable_seqs(&bob_sub.seen), [public]);

    let many = |n: usize| -> Vec<String> { (0..n).map(|i| format!("g{i}")).collect() };
    let at_limit = mint(
        "ann",
        json!({ "roles": ["member"], "app": { "teams": many(256) } }),
    );
    assert!(poll_all(&server, &at_limit, "", &[]).await.is_ok());
    let over = mint(
        "ann",
        json!({ "roles": ["member"], "app": { "teams": many(257) } }),
    );
    let status = poll_all(&server, &over, "", &[]).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(status.message().contains("too many groups"), "{status:?}");
}

#[tokio::test]
async fn audience_and_topic_limits_answer_invalid_argument() {
    let server = TestServer::start().await;
    let svc = token_of(person("svc"));
    let many = |n: usize, prefix: &str| -> Vec<String> {
        (0..n).map(|i| format!("{prefix}{i}")).collect()
    };
    let with = |a: Audience, t: Vec<String>| {
        let mut r = entity("x", Some(a), &[]);
        r.topics = t;
        r
    };
    let cases: Vec<(PublishRequest, &str)> = vec![
        (
            with(
                Audience {
                    user_ids: many(101, "u"),
                    ..Default::default()
                },
                vec![],
            ),
            "audience.user_ids",
        ),
        (
            with(
                Audience {
                    groups: many(33, "g"),
                    ..Default::default()
                },
                vec![],
            ),
            "audience.groups",
        ),
        (
            with(
                Audience {
                    roles: many(9, "r"),
                    ..Default::default()
                },
                vec![],
            ),
            "audience.roles",
        ),
        (
            with(
                Audience {
                    groups: vec!["has space".into()],
                    ..Default::default()
                },
                vec![],
            ),
            "audience.groups",
        ),
        (
            with(
                Audience {
                    groups: vec!["g".repeat(129)],
                    ..Default::default()
                },
                vec![],
            ),
            "audience.groups",
        ),
        (
            with(
                Audience {
                    user_ids: vec!["bad/id".into()],
                    ..Default::default()
                },
                vec![],
            ),
            "audience.user_ids",
        ),
        (with(Audience::default(), many(9, "t")), "topics"),
        (
            with(Audience::default(), vec!["no spaces".into()]),
            "topics",
        ),
        (with(Audience::default(), vec![String::new()]), "topics"),
    ];
    let mut events = EventServiceClient::with_interceptor(server.channel().await, Auth::new(&svc));
    for (req, field) in cases {
        let status = events.publish(req).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().starts_with(field), "{field}: {status:?}");
    }
    // At the limits: accepted.
    let ok = with(
        Audience {
            user_ids: many(100, "u"),
            groups: many(32, "g"),
            roles: many(8, "r"),
        },
        many(8, "project:"),
    );
    events.publish(ok).await.unwrap();
    let mut jobs = server.jobs(&svc).await;
    let status = jobs
        .create_job(new_job("t", audience(&[], &["a b"], &[]), &[]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = jobs
        .create_job(new_job("t", None, &["x y"]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let listed = jobs
        .list_jobs(ListJobsRequest {
            org_id: ORG.into(),
            topics: vec!["x y".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(listed.code(), Code::InvalidArgument);
    // Subscribe and Poll filters: at most 100 topics, each a valid name.
    let mut c = EventServiceClient::with_interceptor(server.channel().await, Auth::new(&svc));
    for t in [many(101, "t"), vec!["x y".into()]] {
        let filter = OrgFilter {
            org_id: ORG.into(),
            topics: t.clone(),
            ..Default::default()
        };
        let status = c.subscribe(filter).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        let poll = PollRequest {
            org_id: ORG.into(),
            topics: t,
            ..Default::default()
        };
        assert_eq!(
            c.poll(poll).await.unwrap_err().code(),
            Code::InvalidArgument
        );
    }
}
