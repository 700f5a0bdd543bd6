//! TLS on the one port (`--tls-cert`, `--tls-key`): native gRPC over HTTP/2 with TLS streams
//! events; a plaintext client gets nowhere.
mod support;

use orgpulse::proto::{
    CreateJobRequest, OrgFilter, event::Payload, event_service_client::EventServiceClient,
    job_service_client::JobServiceClient,
};
use support::*;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

#[tokio::test]
async fn grpc_over_tls() {
    let dir = TempDir::new("tls");
    let (cert, key) = self_signed_cert(&dir.0);
    std::fs::write(dir.0.join("jwt-secret"), SECRET).unwrap();
    let server = TestServer::spawn(
        [
            "--listen",
            "127.0.0.1:0",
            "--database",
            &database_url(&dir.0),
            "--jwt-secret-file",
            &dir.0.join("jwt-secret").display().to_string(),
            "--tls-cert",
            &cert.display().to_string(),
            "--tls-key",
            &key.display().to_string(),
        ]
        .map(String::from)
        .to_vec(),
        dir.0.clone(),
    )
    .await;
    assert!(server.url.starts_with("https://"), "{}", server.url);
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(&cert).unwrap()))
        .domain_name("localhost");
    let channel = Endpoint::from_shared(server.url.clone())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .expect("TLS connect");
    let t = token("acme", "alice", "member");
    let mut events = EventServiceClient::with_interceptor(channel.clone(), Auth::new(&t));
    let mut stream = events
        .subscribe(OrgFilter {
            kinds: vec![1],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert!(matches!(first.payload, Some(Payload::CaughtUp(_))));
    let job = JobServiceClient::with_interceptor(channel, Auth::new(&t))
        .create_job(CreateJobRequest {
            title: "over tls".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let ev = tokio::time::timeout(WAIT, stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(&ev.payload, Some(Payload::JobCreated(j)) if j.id == job.id));
    // The CLI (the client library) talks https:// with --ca-cert.
    let out = tokio::process::Command::new(workspace_bin("orgpulse"))
        .args(["--server", &server.url, "--token", &t, "--ca-cert"])
        .arg(&cert)
        .args(["jobs", "get", &job.id])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("over tls"));
    // Plaintext HTTP/2 to the TLS port fails.
    let plain = Endpoint::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await;
    let refused = match plain {
        Err(_) => true,
        Ok(ch) => EventServiceClient::with_interceptor(ch, Auth::new(&t))
            .list_online(orgpulse::proto::ListOnlineRequest::default())
            .await
            .is_err(),
    };
    assert!(refused, "plaintext must not be served on a TLS port");
}
