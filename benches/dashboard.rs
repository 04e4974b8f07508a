//! Dashboard benchmarks (prints the figures of BENCHMARKS.md, "Dashboard"):
//! `/healthz` latency on a worker's Unix socket and through the supervisor
//! dashboard's proxy (a new connection per request, as the original was
//! measured), and events per second from one worker's event bus to a
//! WebSocket reader of `/ws?repo=__all__` through the supervisor.
//!
//! The worker runs in process: a real `RepoRuntime` (local forge, a demo
//! repository in a temp dir) served by `dashboard::worker::serve`; events
//! are published straight onto its bus (written to `events.jsonl` too).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use http_body_util::BodyExt as _;
use hydraflow::agent::runner::ProcessRunner;
use hydraflow::cli::TargetArgs;
use hydraflow::dashboard::{self, supervisor::StaticRepos};
use hydraflow::forge::local::LocalForge;
use hydraflow::runtime::{RepoRuntime, RepoRuntimeRegistry};
use hydraflow::store::events::EventType;
use hyper_util::rt::TokioIo;
use serde_json::json;

const REQUESTS: usize = 3000;

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

fn report(what: &str, mut samples: Vec<Duration>) -> (f64, f64) {
    samples.sort();
    let (p50, p99) = (percentile(&samples, 0.5), percentile(&samples, 0.99));
    println!(
        "{what}: p50 {p50:.3} ms, p99 {p99:.3} ms ({} requests)",
        samples.len()
    );
    (p50, p99)
}

async fn tcp_get(addr: std::net::SocketAddr, path: &str) -> http::StatusCode {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header("host", "localhost")
        .body(axum::body::Body::empty())
        .expect("request");
    let resp = tx.send_request(req).await.expect("response");
    let status = resp.status();
    let _ = resp.into_body().collect().await.expect("body");
    status
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run());
}

async fn run() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let repo = tmp.path().join("bench-repo");
    hydraflow::demo::make_repository(&repo).expect("demo repository");
    let config = tmp.path().join("hydraflow.toml");
    std::fs::write(
        &config,
        "poll_interval = 30\ndata_poll_interval = 300\n[events]\nmax_bytes = 0\n",
    )
    .expect("config");
    let target = TargetArgs {
        instance: None,
        repo: Some(repo.display().to_string()),
    };
    let resolved = hydraflow::cli::target::resolve(&config, &target).expect("resolve");
    let forge = LocalForge::open(&resolved.layout, &resolved.repo_path).expect("forge");
    let runtime = RepoRuntime::create(
        resolved,
        Arc::new(forge),
        Arc::new(ProcessRunner::default()),
        Vec::new(),
    )
    .expect("runtime");
    runtime.start().await;
    let registry = Arc::new(RepoRuntimeRegistry::new());
    registry.register(Arc::clone(&runtime));
    let slug = runtime.slug().to_string();
    let socket: PathBuf = dashboard::worker_socket_path(runtime.layout());
    let listener = dashboard::bind_private_socket(&socket).expect("bind");
    tokio::spawn(dashboard::worker::serve(
        listener,
        Arc::clone(&registry),
        std::future::pending(),
    ));
    let tcp = dashboard::bind_tcp("127.0.0.1:0", None).await.expect("tcp");
    let addr = tcp.local_addr().expect("addr");
    tokio::spawn(dashboard::supervisor::serve(
        tcp,
        Arc::new(StaticRepos(vec![(slug.clone(), socket.clone())])),
        dashboard::auth::Guard {
            token: None,
            access: Arc::new(hydraflow::access::Access::groups("", "")),
        },
        std::future::pending(),
    ));

    // /healthz on the worker's socket.
    let mut direct = Vec::with_capacity(REQUESTS);
    for i in 0..REQUESTS + 200 {
        let t = Instant::now();
        let (status, _) = dashboard::client::json(
            &socket,
            http::Method::GET,
            "/healthz",
            None,
            Duration::from_secs(5),
        )
        .await
        .expect("healthz");
        assert!(status.is_success());
        if i >= 200 {
            direct.push(t.elapsed());
        }
    }
    let (_, d99) = report("worker /healthz over its Unix socket", direct);

    // /healthz through the supervisor's proxy (TCP to the supervisor, Unix socket to the worker).
    let path = format!("/repos/{slug}/healthz");
    let mut proxied = Vec::with_capacity(REQUESTS);
    for i in 0..REQUESTS + 200 {
        let t = Instant::now();
        assert!(tcp_get(addr, &path).await.is_success());
        if i >= 200 {
            proxied.push(t.elapsed());
        }
    }
    let (_, p99) = report("worker /healthz through the supervisor proxy", proxied);
    let mut baseline = Vec::with_capacity(REQUESTS);
    for _ in 0..REQUESTS {
        let t = Instant::now();
        let _ = tcp_get(addr, "/no-such-route").await;
        baseline.push(t.elapsed());
    }
    let (_, b99) = report("supervisor TCP baseline (a 404, no proxy)", baseline);
    println!(
        "proxy overhead at p99 over the TCP baseline: {:.3} ms",
        p99 - b99
    );
    println!("proxied minus direct at p99: {:.3} ms", p99 - d99);

    // Events: one worker -> supervisor fan-in -> one WebSocket reader.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws?repo=__all__"))
        .await
        .expect("ws");
    // Let the fan-in connect to the worker, then drain what was seeded.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let events = Arc::clone(runtime.events());
    for (label, total, rate) in [
        ("paced 20,000/s", 40_000u64, Some(20_000u64)),
        ("as fast as published", 100_000, None),
    ] {
        let first = events.next_id();
        let last = first + total - 1;
        let bus = Arc::clone(&events);
        let publisher = tokio::task::spawn_blocking(move || {
            let start = Instant::now();
            for n in 0..total {
                if let Some(rate) = rate {
                    let due = start + Duration::from_secs_f64(n as f64 / rate as f64);
                    while Instant::now() < due {
                        std::hint::spin_loop();
                    }
                }
                bus.publish(
                    EventType::AgentActivity,
                    json!({"n": n, "line": "benchmark event"}),
                );
            }
            start.elapsed()
        });
        let started = Instant::now();
        let (mut received, mut dropped) = (0u64, 0u64);
        loop {
            let Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t)))) =
                tokio::time::timeout(Duration::from_secs(10), ws.next()).await
            else {
                println!("events: the stream stopped");
                break;
            };
            let f: serde_json::Value = serde_json::from_str(&t).expect("frame");
            if f["type"] == "dropped" || f["event"]["type"] == "dropped" {
                dropped += f["count"]
                    .as_u64()
                    .or(f["event"]["count"].as_u64())
                    .unwrap_or(0);
                continue;
            }
            let Some(id) = f["event"]["id"].as_u64() else {
                continue;
            };
            if id >= first {
                received += 1;
            }
            if id >= last {
                break;
            }
        }
        let elapsed = started.elapsed();
        let published_in = publisher.await.expect("publisher");
        println!(
            "events {label}: {received} of {total} received in {:.2} s = {:.0} events/s to the browser (published in {:.2} s), {dropped} dropped",
            elapsed.as_secs_f64(),
            received as f64 / elapsed.as_secs_f64(),
            published_in.as_secs_f64()
        );
    }
    runtime.stop(Duration::from_secs(5)).await;
}
