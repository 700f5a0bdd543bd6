//! Bad input gets its gRPC status (docs/api.md's limits), never a panic: the server keeps serving.
mod support;

use std::collections::HashMap;

use orgpulse::proto::{
    CreateJobRequest, GetJobRequest, JobStatus, ListJobsRequest, ListNotificationsRequest,
    MarkReadRequest, OrgFilter, PollRequest, SendNotificationRequest, UpdateJobRequest,
};
use support::*;
use tonic::Code;

#[tokio::test]
async fn every_bad_input_gets_its_status() {
    let server = TestServer::start().await;
    let admin = token("acme", "alice", "admin");
    let mut jobs = server.jobs(&admin).await;
    let mut notes = server.notifications(&admin).await;
    let mut events = server.events(&admin).await;
    let job = create_job(&server, &admin, "", "ok").await;
    let create = |title: &str, labels: HashMap<String, String>| CreateJobRequest {
        title: title.into(),
        labels,
        ..Default::default()
    };
    let label = |k: &str, v: &str| HashMap::from([(k.to_string(), v.to_string())]);
    let many: HashMap<String, String> = (0..33).map(|i| (format!("k{i}"), "v".into())).collect();
    let update = |f: &dyn Fn(&mut UpdateJobRequest)| {
        let mut r = UpdateJobRequest {
            job_id: job.id.clone(),
            ..Default::default()
        };
        f(&mut r);
        r
    };
    let mut cases: Vec<(&str, Code, Result<(), tonic::Status>)> = vec![];
    macro_rules! case {
        ($name:expr, $code:expr, $call:expr) => {
            cases.push(($name, $code, $call.await.map(|_| ())));
        };
    }
    case!(
        "empty title",
        Code::InvalidArgument,
        jobs.create_job(create("", HashMap::new()))
    );
    case!(
        "title 201",
        Code::InvalidArgument,
        jobs.create_job(create(&"x".repeat(201), HashMap::new()))
    );
    case!(
        "33 labels",
        Code::InvalidArgument,
        jobs.create_job(create("t", many))
    );
    case!(
        "empty label key",
        Code::InvalidArgument,
        jobs.create_job(create("t", label("", "v")))
    );
    case!(
        "label key 65",
        Code::InvalidArgument,
        jobs.create_job(create("t", label(&"k".repeat(65), "v")))
    );
    case!(
        "label value 257",
        Code::InvalidArgument,
        jobs.create_job(create("t", label("k", &"v".repeat(257))))
    );
    case!(
        "progress 101",
        Code::InvalidArgument,
        jobs.update_job(update(&|r| r.progress = Some(101)))
    );
    case!(
        "message 1001",
        Code::InvalidArgument,
        jobs.update_job(update(&|r| r.message = Some("m".repeat(1001))))
    );
    case!(
        "empty title update",
        Code::InvalidArgument,
        jobs.update_job(update(&|r| r.title = Some(String::new())))
    );
    case!(
        "status 99",
        Code::InvalidArgument,
        jobs.update_job(update(&|r| r.status = Some(99)))
    );
    case!(
        "illegal transition",
        Code::FailedPrecondition,
        jobs.update_job(update(&|r| r.status = Some(JobStatus::Succeeded as i32)))
    );
    case!(
        "version mismatch",
        Code::Aborted,
        jobs.update_job(update(&|r| r.expected_version = 7))
    );
    case!(
        "invalid job id",
        Code::InvalidArgument,
        jobs.get_job(GetJobRequest {
            org_id: "".into(),
            job_id: "nope".into()
        })
    );
    case!(
        "unknown job",
        Code::NotFound,
        jobs.get_job(GetJobRequest {
            org_id: "".into(),
            job_id: "01J00000000000000000000000".into()
        })
    );
    case!(
        "invalid org id",
        Code::InvalidArgument,
        jobs.list_jobs(ListJobsRequest {
            org_id: "a b".into(),
            ..Default::default()
        })
    );
    case!(
        "page_size 501",
        Code::InvalidArgument,
        jobs.list_jobs(ListJobsRequest {
            page_size: 501,
            ..Default::default()
        })
    );
    case!(
        "negative page_size",
        Code::InvalidArgument,
        jobs.list_jobs(ListJobsRequest {
            page_size: -1,
            ..Default::default()
        })
    );
    case!(
        "bad page token",
        Code::InvalidArgument,
        jobs.list_jobs(ListJobsRequest {
            page_token: "zzz".into(),
            ..Default::default()
        })
    );
    case!(
        "status filter 42",
        Code::InvalidArgument,
        jobs.list_jobs(ListJobsRequest {
            statuses: vec![42],
            ..Default::default()
        })
    );
    case!(
        "body 4001",
        Code::InvalidArgument,
        notes.send_notification(SendNotificationRequest {
            title: "t".into(),
            body: "b".repeat(4001),
            ..Default::default()
        })
    );
    case!(
        "bad user id",
        Code::InvalidArgument,
        notes.send_notification(SendNotificationRequest {
            title: "t".into(),
            user_id: "no spaces".into(),
            ..Default::default()
        })
    );
    case!(
        "severity 9",
        Code::InvalidArgument,
        notes.send_notification(SendNotificationRequest {
            title: "t".into(),
            severity: 9,
            ..Default::default()
        })
    );
    case!(
        "notification page_size 501",
        Code::InvalidArgument,
        notes.list_notifications(ListNotificationsRequest {
            page_size: 501,
            ..Default::default()
        })
    );
    case!(
        "mark unknown",
        Code::NotFound,
        notes.mark_read(MarkReadRequest {
            org_id: "".into(),
            notification_ids: vec!["01J00000000000000000000000".into()]
        })
    );
    case!(
        "mark invalid id",
        Code::InvalidArgument,
        notes.mark_read(MarkReadRequest {
            org_id: "".into(),
            notification_ids: vec!["x".into()]
        })
    );
    case!(
        "poll bad cursor",
        Code::InvalidArgument,
        events.poll(PollRequest {
            after_cursor: "%%".into(),
            ..Default::default()
        })
    );
    case!(
        "poll bad kind",
        Code::InvalidArgument,
        events.poll(PollRequest {
            kinds: vec![7],
            ..Default::default()
        })
    );
    case!(
        "subscribe bad kind",
        Code::InvalidArgument,
        events.subscribe(OrgFilter {
            kinds: vec![0],
            ..Default::default()
        })
    );
    case!(
        "request over 1 MiB",
        Code::ResourceExhausted,
        jobs.create_job(create("big", label("k", &"v".repeat(1_100_000))))
    );
    for (name, code, got) in cases {
        match got {
            Err(s) => {
                assert_eq!(s.code(), code, "{name}: {s:?}");
                assert!(!s.message().is_empty(), "{name}: a clear message");
            }
            Ok(()) => panic!("{name}: expected {code:?}, got OK"),
        }
    }
    // Still serving, nothing lost: the one good job is there and the log has exactly its event.
    let list = jobs
        .list_jobs(ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.jobs.len(), 1);
    assert_eq!(log_of(&server.dir, "acme").len(), 1);
    let health = reqwest::get(format!("{}/healthz", server.url))
        .await
        .unwrap();
    assert!(health.status().is_success());
}

#[tokio::test]
async fn request_id_makes_creates_idempotent() {
    let server = TestServer::start().await;
    let admin = token("acme", "alice", "admin");
    let mut jobs = server.jobs(&admin).await;
    let req = CreateJobRequest {
        title: "once".into(),
        request_id: "req-1".into(),
        ..Default::default()
    };
    let a = jobs.create_job(req.clone()).await.unwrap().into_inner();
    let b = jobs.create_job(req).await.unwrap().into_inner();
    assert_eq!(a, b);
    let mut notes = server.notifications(&admin).await;
    let n = SendNotificationRequest {
        title: "once".into(),
        request_id: "req-1".into(),
        ..Default::default()
    };
    let x = notes
        .send_notification(n.clone())
        .await
        .unwrap()
        .into_inner();
    let y = notes.send_notification(n).await.unwrap().into_inner();
    assert_eq!(x.id, y.id);
    assert_eq!(
        log_of(&server.dir, "acme").len(),
        2,
        "a retry adds no event"
    );
    // Same id in another org is another request.
    let service = token("", "svc", "service");
    let other = server
        .jobs(&service)
        .await
        .create_job(CreateJobRequest {
            org_id: "globex".into(),
            title: "once".into(),
            request_id: "req-1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(other.id, a.id);
}

#[tokio::test]
async fn pagination_and_notification_read_state() {
    let server = TestServer::start().await;
    let admin = token("acme", "alice", "admin");
    let bob = token("acme", "bob", "member");
    for i in 0..7 {
        create_job(&server, &admin, "", &format!("j{i}")).await;
    }
    let mut jobs = server.jobs(&admin).await;
    let mut seen = vec![];
    let mut token_ = String::new();
    loop {
        let page = jobs
            .list_jobs(ListJobsRequest {
                page_size: 3,
                page_token: token_.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!page.cursor.is_empty());
        seen.extend(page.jobs.into_iter().map(|j| j.title));
        if page.next_page_token.is_empty() {
            break;
        }
        token_ = page.next_page_token;
    }
    assert_eq!(
        seen,
        ["j6", "j5", "j4", "j3", "j2", "j1", "j0"],
        "newest first, each once"
    );
    let mut notes = server.notifications(&admin).await;
    for (user, title) in [("bob", "to bob"), ("", "to all"), ("carol", "to carol")] {
        notes
            .send_notification(SendNotificationRequest {
                user_id: user.into(),
                title: title.into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let mut bob_notes = server.notifications(&bob).await;
    let list = bob_notes
        .list_notifications(ListNotificationsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let titles: Vec<&str> = list
        .notifications
        .iter()
        .map(|n| n.title.as_str())
        .collect();
    assert_eq!(titles, ["to all", "to bob"]);
    assert_eq!(list.unread_count, 2);
    let carol_id = notes
        .list_notifications(ListNotificationsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .notifications
        .iter()
        .find(|n| n.title == "to all")
        .map(|n| n.id.clone())
        .unwrap();
    let r = bob_notes
        .mark_read(MarkReadRequest {
            org_id: "".into(),
            notification_ids: vec![list.notifications[0].id.clone()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.unread_count, 1);
    let unread = bob_notes
        .list_notifications(ListNotificationsRequest {
            unread_only: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unread.notifications.len(), 1);
    assert_eq!(unread.notifications[0].title, "to bob");
    // Read state is per user: alice still has "to all" unread.
    let alice_list = notes
        .list_notifications(ListNotificationsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(
        alice_list
            .notifications
            .iter()
            .any(|n| n.id == carol_id && !n.read)
    );
    // Bob cannot see or mark carol's notification.
    let carols = server
        .notifications(&token("acme", "carol", "member"))
        .await
        .list_notifications(ListNotificationsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let carol_only = carols
        .notifications
        .iter()
        .find(|n| n.title == "to carol")
        .unwrap()
        .id
        .clone();
    let err = bob_notes
        .mark_read(MarkReadRequest {
            org_id: "".into(),
            notification_ids: vec![carol_only],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // Viewers cannot mark read.
    let err = server
        .notifications(&token("acme", "vic", "viewer"))
        .await
        .mark_read(MarkReadRequest {
            org_id: "".into(),
            notification_ids: vec![carol_id],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
}

/// A request body that is not the message it should be: INVALID_ARGUMENT, and the server goes on.
#[tokio::test]
async fn undecodable_requests_are_invalid_argument() {
    let server = TestServer::start().await;
    let t = token("acme", "alice", "admin");
    let call = |body: Vec<u8>| {
        reqwest::Client::new()
            .post(format!("{}/orgpulse.v1.JobService/CreateJob", server.url))
            .header("content-type", "application/grpc-web+proto")
            .header("x-grpc-web", "1")
            .header("authorization", format!("Bearer {t}"))
            .body(body)
            .send()
    };
    // a frame whose payload is not protobuf, and a body with no frame at all
    let garbage = vec![0u8, 0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff];
    for body in [garbage, vec![]] {
        let res = call(body).await.unwrap();
        assert_eq!(res.headers()["grpc-status"], "3", "{:?}", res.headers());
    }
    assert_eq!(get_text(&server, "/healthz").await.trim(), "ok");
    create_job(&server, &t, "", "still serving").await;
}

/// A validly signed token whose `exp` is near u64::MAX (with a leeway configured), and a ListJobs
/// with 500,000 repeated status values (inside the 1 MiB request limit): each is answered, the
/// server keeps serving, and nothing panicked.
#[tokio::test]
async fn extreme_exp_and_repeated_statuses_do_not_panic() {
    let mut server = TestServer::start_with(ServerOpts {
        extra_args: vec!["--jwt-leeway".into(), "60s".into()],
        capture_stderr: true,
        ..Default::default()
    })
    .await;
    let far = |user: &str, exp: u64| {
        mint_claims(&Claims {
            sub: user.into(),
            org: Some("acme".into()),
            roles: vec!["admin".into()],
            exp,
            nbf: None,
        })
    };
    // `exp` plus the leeway does not fit in a u64.
    let wraps = far("alice", u64::MAX - 5);
    let job = create_job(&server, &wraps, "", "far future").await;
    let mut sub = Sub::open(&server, &wraps, "", "", &[])
        .await
        .expect("subscribe");
    sub.caught_up().await;
    // `exp` plus the leeway fits, but the time left does not fit in an Instant.
    let huge = far("bob", u64::MAX - 3600);
    let mut sub = Sub::open(&server, &huge, "", "", &[])
        .await
        .expect("subscribe");
    sub.caught_up().await;

    let admin = token("acme", "carol", "admin");
    let statuses: Vec<i32> = (0..500_000).map(|i| 1 + i % 5).collect();
    let t0 = std::time::Instant::now();
    let listed = server
        .jobs(&admin)
        .await
        .list_jobs(ListJobsRequest {
            statuses,
            ..Default::default()
        })
        .await
        .expect("500k repeated statuses are answered")
        .into_inner();
    eprintln!("ListJobs with 500,000 statuses took {:?}", t0.elapsed());
    assert_eq!(listed.jobs.len(), 1);
    assert_eq!(listed.jobs[0].id, job.id);

    // Still serving.
    create_job(&server, &admin, "", "after").await;
    let log = log_of(&server.dir, "acme");
    assert_eq!(log.len(), 2);
    let stderr = server.stop_and_read_stderr().await;
    assert!(
        !stderr.contains("panicked"),
        "the server panicked:\n{stderr}"
    );
}

/// `--max-streams-per-user`: a user (same `sub` and org) holds at most that many open Subscribe
/// streams; the next is RESOURCE_EXHAUSTED, other users and the same user in another org are not
/// affected, and a stream that ends (closed by the client or by the server) frees its slot.
#[tokio::test]
async fn streams_per_user_are_limited() {
    let server = TestServer::start_args(&["--max-streams-per-user", "3"]).await;
    let alice = token("acme", "alice", "viewer");
    let mut open = vec![];
    for _ in 0..2 {
        let mut sub = Sub::open(&server, &alice, "", "", &[]).await.unwrap();
        sub.caught_up().await;
        open.push(sub);
    }
    // The third one ends by itself when its token expires.
    let mut expiring = Sub::open(
        &server,
        &token_ttl("acme", "alice", "viewer", 2),
        "",
        "",
        &[],
    )
    .await
    .unwrap();
    expiring.caught_up().await;
    let refused = Sub::open(&server, &alice, "", "", &[])
        .await
        .err()
        .expect("a fourth stream of alice is refused");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert_eq!(refused.message(), "too many streams for this user");
    // Others are unaffected: another user, and the same sub in another org.
    for other in [
        token("acme", "bob", "viewer"),
        token("globex", "alice", "viewer"),
    ] {
        let mut sub = Sub::open(&server, &other, "", "", &[]).await.unwrap();
        sub.caught_up().await;
    }
    // A stream the server ended frees its slot...
    assert_eq!(expiring.error().await.code(), Code::Unauthenticated);
    let mut third = open_when_a_slot_frees(&server, &alice).await;
    third.caught_up().await;
    // ... and so does one the client closed.
    drop(open.pop());
    let mut fourth = open_when_a_slot_frees(&server, &alice).await;
    fourth.caught_up().await;
    let err = Sub::open(&server, &alice, "", "", &[]).await.err().unwrap();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
}

/// Opens a stream for `token`, retrying while the server still counts a stream that just ended
/// (the server notices a client's close a moment after it happened).
async fn open_when_a_slot_frees(server: &TestServer, token: &str) -> Sub {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match Sub::open(server, token, "", "", &[]).await {
            Ok(sub) => return sub,
            Err(s) if s.code() == Code::ResourceExhausted => {
                assert!(tokio::time::Instant::now() < deadline, "slot never freed");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(s) => panic!("{s:?}"),
        }
    }
}
