//! The `orgs` scenario: what idle orgs cost the server. N orgs (`--orgs`), one subscriber each,
//! each org its own user and token; the streams are multiplexed over a few HTTP/2 connections (one
//! per subscriber could not reach 20,000 within this sandbox's descriptor limit). Once all are
//! caught up and the settle pause is over, nothing is published for `--seconds` and the server's
//! CPU over that window is reported as a share of one core, with its RSS and open streams. On
//! PostgreSQL (`--postgres`, and the `idle-pg` scenario, where each org first gets one job so
//! that its log is not empty), also the transactions the store's database ran per second over
//! that window (`pg_stat_database`): what idle orgs cost the database.
use std::{sync::atomic::Ordering::Relaxed, time::Duration};

use clap::ValueEnum;

use futures::StreamExt;
use serde_json::{Value, json};

use super::{BenchArgs, Scenario, Shape, mb, round2, timed};
use crate::{
    bench::{
        database::{self, Database},
        server::{self, Target},
        subscriber::{self, Counted, Dial, Placement, Subscriber, Tally, Via},
        writer::Writer,
    },
    error::CliError,
    mint::{Signer, mint},
};

/// Streams opened on one HTTP/2 connection (the server allows `--max-concurrent-streams`, by
/// default 100, at a time).
pub const STREAMS_PER_CONNECTION: usize = 100;

/// The org of the `i`-th subscriber.
fn org_name(prefix: &str, i: usize) -> String {
    format!("{prefix}-{i}")
}

/// Opens one idle subscriber per org, then measures the server doing nothing for `--seconds`.
pub async fn measure(
    args: &BenchArgs,
    shape: &Shape,
    target: &Target,
    store: Option<&Database>,
) -> Result<Value, CliError> {
    let orgs: Vec<String> = (0..shape.subscribers)
        .map(|i| org_name(&args.org, i))
        .collect();
    let token = |i: usize, role: &str| {
        mint(
            Signer::Secret(&target.secret_file),
            Some(&orgs[i]),
            &format!("sub{i}"),
            vec![role.into()],
            vec![],
            Duration::from_secs(3600),
        )
    };
    let tokens: Vec<String> = (0..orgs.len())
        .map(|i| token(i, "viewer"))
        .collect::<Result<_, _>>()?;
    let written = match args.scenario {
        Scenario::IdlePg => {
            let url = target.url();
            let writers = futures::stream::iter(0..orgs.len())
                .map(|i| {
                    let (url, org) = (&url, &orgs[i]);
                    let token = token(i, "member");
                    async move { Writer::new(url, &token?, org, i, None).await.map(drop) }
                })
                .buffer_unordered(args.connect_concurrency.max(1))
                .collect::<Vec<_>>();
            timed(args, async { Ok(writers.await) })
                .await?
                .into_iter()
                .collect::<Result<Vec<()>, _>>()?
                .len()
        }
        _ => 0,
    };
    let tally = Tally::new();
    let before = target.usage().await?;
    let client_cpu0 = server::self_cpu_s();
    let t_connect = std::time::Instant::now();
    let sources = args.source_addrs.unwrap_or(1).max(1);
    let mut conns = Vec::new();
    for c in 0..orgs.len().div_ceil(STREAMS_PER_CONNECTION) {
        let conn = subscriber::connect(target.addr, subscriber::source(c, sources));
        conns.push(conn.await.map_err(server::fail)?);
    }
    let opened: Vec<Result<Subscriber, String>> = timed(args, async {
        Ok(futures::stream::iter(orgs.iter().zip(&tokens).enumerate())
            .map(|(i, (org, token))| {
                let dial = Dial {
                    server: target.addr,
                    token,
                    org,
                    after_cursor: String::new(),
                    counted: Counted::Jobs,
                    placement: Placement::default(),
                };
                Subscriber::open(
                    Via::Shared(conns[i / STREAMS_PER_CONNECTION].clone()),
                    dial,
                    &tally,
                )
            })
            .buffer_unordered(args.connect_concurrency.max(1))
            .collect()
            .await)
    })
    .await?;
    let connect_elapsed = t_connect.elapsed();
    let mut tasks = Vec::new();
    for sub in opened {
        match sub {
            Ok(s) => tasks.push(tokio::spawn(s.run(tally.clone()))),
            Err(e) => {
                tally.first_error.lock().unwrap().get_or_insert(e);
            }
        }
    }
    let connected = tasks.len() as u64;
    tokio::time::sleep(shape.settle).await;
    let idle0 = target.usage().await?;
    let pg0 = transactions(args, store).await?;
    let t_idle = std::time::Instant::now();
    tokio::time::sleep(args.idle_window()).await;
    let idle1 = target.usage().await?;
    let pg1 = transactions(args, store).await?;
    let window = t_idle.elapsed().as_secs_f64();
    let cpu = idle1.cpu_s - idle0.cpu_s;
    let mut out = json!({
        "label": args.scenario.to_possible_value().map(|v| v.get_name().to_string()),
        "jobsWritten": written,
        "server": if args.secret_file.is_some() { target.url() } else { "started".into() },
        "orgs": orgs.len(),
        "connections": conns.len(),
        "sourceAddrs": sources,
        "connected": connected,
        "connectFailures": orgs.len() as u64 - connected,
        "connectWallMs": connect_elapsed.as_millis() as u64,
        "idleSeconds": round2(window),
        "serverCpuS": round2(cpu),
        "serverCpuPctOfCore": round2(cpu / window * 100.0),
        "streamsOpen": idle1.open_streams,
        "serverRssMB": {
            "beforeConnect": mb(before.rss),
            "afterConnect": mb(idle0.rss),
            "afterIdle": mb(idle1.rss),
        },
        "rssPerOrgKB": if connected > 0 {
            round2((idle1.rss as f64 - before.rss as f64) / connected as f64 / 1024.0).into()
        } else {
            Value::Null
        },
        "lost": 0,
        "outOfOrder": tally.out_of_order.load(Relaxed),
        "brokenStreams": tally.broken.load(Relaxed),
        "clientCpuS": round2(server::self_cpu_s() - client_cpu0),
    });
    if let (Some(t0), Some(t1)) = (pg0, pg1) {
        out["pgTransactions"] = (t1 - t0).into();
        out["pgTransactionsPerSec"] = round2((t1 - t0) as f64 / window).into();
    }
    if let Some(e) = tally.first_error.lock().unwrap().take() {
        out["firstError"] = e.into();
    }
    for t in tasks {
        t.abort();
    }
    Ok(out)
}

/// The transactions the store's database committed or rolled back so far (`pg_stat_database`,
/// read from the admin database so the reading is not counted); `None` without PostgreSQL. A
/// backend reports its counts when a transaction ends, at most once a second, and an idle one
/// within 10 s: a window of 20 s or more keeps that error small.
async fn transactions(args: &BenchArgs, store: Option<&Database>) -> Result<Option<i64>, CliError> {
    let Some(db) = store else { return Ok(None) };
    let admin = database::connect(&args.pg_admin_url).await?;
    let row = admin
        .query_one(
            "SELECT (xact_commit + xact_rollback)::int8 FROM pg_stat_database WHERE datname = $1",
            &[&db.name],
        )
        .await
        .map_err(database::sql_error("reading pg_stat_database"))?;
    Ok(Some(row.get(0)))
}
