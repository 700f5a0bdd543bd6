//! Authentication, roles and org isolation, end to end against the real server.
mod support;

use orgpulse::proto::{
    CreateJobRequest, DeleteJobRequest, GetJobRequest, ListJobsRequest, PollRequest,
    SendNotificationRequest, event::Payload,
};
use support::{keys::*, *};
use tonic::Code;

fn with_claims(
    claims: serde_json::Value,
    key: &jsonwebtoken::EncodingKey,
    alg: jsonwebtoken::Algorithm,
) -> String {
    jsonwebtoken::encode(&jsonwebtoken::Header::new(alg), &claims, key).unwrap()
}

fn hs(claims: serde_json::Value, secret: &[u8]) -> String {
    with_claims(
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
        jsonwebtoken::Algorithm::HS256,
    )
}

#[tokio::test]
async fn bad_tokens_are_unauthenticated() {
    let server = TestServer::start().await;
    let now = now_secs();
    let good =
        serde_json::json!({"sub": "u1", "org": "acme", "roles": ["member"], "exp": now + 600});
    refused(&server, "", "missing authorization").await;
    refused(
        &server,
        &hs(good.clone(), b"some other secret"),
        "signature",
    )
    .await;
    let expired = hs(
        serde_json::json!({"sub": "u1", "org": "acme", "exp": now - 10}),
        SECRET.as_bytes(),
    );
    // Only an expired token carries the marker that tells a client a fresh token fixes it.
    for status in refused(&server, &expired, "expired").await {
        assert_token_expired_marker(&status);
    }
    for status in refused(&server, "not-a-jwt", "malformed").await {
        assert!(
            status.metadata().get(orgpulse::error_marker::KEY).is_none(),
            "{status:?}"
        );
    }
    let early = serde_json::json!({"sub": "u1", "org": "acme", "exp": now + 600, "nbf": now + 300});
    refused(&server, &hs(early, SECRET.as_bytes()), "not yet valid").await;
    // alg none: header {"alg":"none"}, no signature
    use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
    let none = format!(
        "{}.{}.",
        B64.encode(br#"{"alg":"none","typ":"JWT"}"#),
        B64.encode(good.to_string())
    );
    refused(&server, &none, "alg none").await;
    let no_org = serde_json::json!({"sub": "u1", "roles": ["member"], "exp": now + 600});
    refused(&server, &hs(no_org, SECRET.as_bytes()), "org is required").await;
}

/// With an RS256 public key configured, an HS256 token signed with that public key as the secret
/// (algorithm confusion) is refused, and a real RS256 token is accepted.
#[tokio::test]
async fn rs256_key_refuses_algorithm_confusion() {
    let dir = TempDir::new("rsa");
    let (private, public) = keypair(
        &dir.0,
        "rsa",
        &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
    );
    // A server with ONLY the RSA key configured.
    let data = TempDir::new("rsa-server");
    let server = server_with_keys(&data, &["--jwt-public-key".into(), public.clone()]).await;
    let pem_public = std::fs::read(&public).unwrap();
    let claims = serde_json::json!({"sub": "u1", "org": "acme", "exp": now_secs() + 600});
    refused(&server, &hs(claims.clone(), &pem_public), "not accepted").await;
    let rs = with_claims(
        claims,
        &jsonwebtoken::EncodingKey::from_rsa_pem(&std::fs::read(&private).unwrap()).unwrap(),
        jsonwebtoken::Algorithm::RS256,
    );
    server
        .jobs(&rs)
        .await
        .list_jobs(ListJobsRequest::default())
        .await
        .expect("RS256 token accepted");
}

#[tokio::test]
async fn roles_are_enforced() {
    let server = TestServer::start().await;
    let viewer = token("acme", "v1", "viewer");
    let member = token("acme", "m1", "member");
    let service = token("", "backend", "service");
    let err = server
        .jobs(&viewer)
        .await
        .create_job(CreateJobRequest {
            title: "x".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let job = create_job(&server, &member, "", "by member").await;
    let err = server
        .jobs(&member)
        .await
        .delete_job(DeleteJobRequest {
            org_id: "".into(),
            job_id: job.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = server
        .notifications(&member)
        .await
        .send_notification(SendNotificationRequest {
            title: "hi".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    // service: any named org, must name one
    let err = server
        .jobs(&service)
        .await
        .list_jobs(ListJobsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    for org in ["acme", "globex"] {
        let j = create_job(&server, &service, org, "by service").await;
        assert_eq!(j.org_id, org);
        assert_eq!(j.created_by, "backend");
        server
            .jobs(&service)
            .await
            .delete_job(DeleteJobRequest {
                org_id: org.into(),
                job_id: j.id,
            })
            .await
            .expect("service deletes");
        server
            .notifications(&service)
            .await
            .send_notification(SendNotificationRequest {
                org_id: org.into(),
                title: "from service".into(),
                ..Default::default()
            })
            .await
            .expect("service notifies");
    }
    // viewer reads and subscribes
    server
        .jobs(&viewer)
        .await
        .get_job(GetJobRequest {
            org_id: "".into(),
            job_id: job.id,
        })
        .await
        .unwrap();
    let mut sub = Sub::open(&server, &viewer, "", "", &[]).await.unwrap();
    sub.caught_up().await;
}

#[tokio::test]
async fn orgs_are_isolated() {
    let server = TestServer::start().await;
    let a = token("org-a", "alice", "admin");
    let b = token("org-b", "bob", "admin");
    let err = server
        .jobs(&a)
        .await
        .list_jobs(ListJobsRequest {
            org_id: "org-b".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = Sub::open(&server, &a, "org-b", "", &[])
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = server
        .events(&a)
        .await
        .poll(PollRequest {
            org_id: "org-b".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    let mut sub_a = Sub::open(&server, &a, "", "", &[]).await.unwrap();
    let start_a = sub_a.caught_up().await.cursor;
    let mut sub_b = Sub::open(&server, &b, "", "", &[]).await.unwrap();
    sub_b.caught_up().await;
    let b_job = create_job(&server, &b, "", "secret of b").await;
    let err = server
        .jobs(&a)
        .await
        .get_job(GetJobRequest {
            org_id: "".into(),
            job_id: b_job.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "another org's job is NOT_FOUND");
    let err = server
        .jobs(&a)
        .await
        .delete_job(DeleteJobRequest {
            org_id: "".into(),
            job_id: b_job.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    for i in 0..5 {
        create_job(&server, &b, "", &format!("b{i}")).await;
    }
    // b's events flow to b ...
    let got_b = sub_b.durable(6).await;
    assert!(got_b.iter().all(|e| e.org_id == "org-b"));
    // ... and a sees only its own marker, never b's
    let marker = create_job(&server, &a, "", "marker").await;
    let ev = sub_a.until(|e| e.seq > 0).await;
    assert!(
        matches!(&ev.payload, Some(Payload::JobCreated(j)) if j.id == marker.id),
        "{ev:?}"
    );
    let polled = server
        .events(&a)
        .await
        .poll(PollRequest {
            after_cursor: start_a,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(polled.events.len(), 1);
    assert!(polled.events.iter().all(|e| e.org_id == "org-a"));
}
