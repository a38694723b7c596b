//! HTTP end to end: axum on loopback, driven by a real HTTP/1.1 client
//! (hyper's pooled client), with and without `SingleflightLayer::http()`.
//!
//! Two workloads, each run against the same router with and without the
//! layer:
//!
//! - all-unique keys over a backend that answers at once: what the layer
//!   costs when it never coalesces;
//! - one hot key over a slow backend that serves 4 calls at a time and takes
//!   10 ms for each: what the layer saves.
//!
//! The server and the client each get a one-worker runtime of their own.
//! Run with `cargo bench --bench http` (add `-- --quick` for a short run).
//! Prints markdown tables.

// A scenario binary: the tables it prints are its output.
#![allow(clippy::print_stdout)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::Path;
use axum::routing::get;
use axum::Router;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::runtime::Runtime;
use tokio::sync::Semaphore;
use tower_singleflight::SingleflightLayer;

/// Concurrent client connections, each sending one request after another.
const CLIENTS: u64 = 32;
/// How long the slow backend takes for each call.
const SLOW_CALL: Duration = Duration::from_millis(10);
/// How many calls the slow backend serves at once.
const SLOW_CAPACITY: usize = 4;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Workload {
    /// Every request has a key of its own; the backend answers at once.
    Unique,
    /// Every request asks for the same item; the backend is slow.
    Hot,
}

/// The router under test.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stack {
    /// No layer (routes made once, with `with_state(())`, like `Layer`).
    Bare,
    /// `Router::layer(SingleflightLayer::http())`, then `with_state(())`, so
    /// that the layer is applied once and every connection shares its group.
    Layer,
    /// `Router::layer(SingleflightLayer::http())` handed to `axum::serve` as
    /// it is: axum applies the layer again for each connection (its
    /// `with_state(())` per connection), so each connection has a group of
    /// its own.
    LayerPerConnection,
}

/// What one trial measured.
struct Trial {
    requests: u64,
    elapsed: Duration,
    latencies: Vec<Duration>,
    backend_calls: u64,
}

fn main() {
    let quick = std::env::args().any(|arg| arg == "--quick");
    let (trials, length) = if quick {
        (2, Duration::from_millis(750))
    } else {
        (5, Duration::from_millis(1_500))
    };
    println!("Mode: {}", if quick { "quick" } else { "full" });

    for (workload, trials) in [(Workload::Unique, trials), (Workload::Hot, 1)] {
        // Alternate the stacks, so drift on a shared machine hits them alike.
        let (mut bare, mut layered, mut per_connection) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..trials {
            // Swap which goes first each round, in case going first matters.
            if round % 2 == 0 {
                bare.push(trial(workload, Stack::Bare, length));
                layered.push(trial(workload, Stack::Layer, length));
            } else {
                layered.push(trial(workload, Stack::Layer, length));
                bare.push(trial(workload, Stack::Bare, length));
            }
            if workload == Workload::Hot {
                per_connection.push(trial(workload, Stack::LayerPerConnection, length));
            }
        }
        report(workload, trials, &bare, &layered, &per_connection);
    }
}

/// Serves the router on loopback and drives it for `length`.
fn trial(workload: Workload, stack: Stack, length: Duration) -> Trial {
    let server = one_worker();
    let calls = Arc::new(AtomicU64::new(0));
    let router = app(workload, stack, Arc::clone(&calls));
    let addr = server.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback port");
        let addr = listener.local_addr().expect("an address");
        tokio::spawn(async move { axum::serve(listener, router).await });
        addr
    });
    let mut trial = one_worker().block_on(drive(addr, workload, length));
    trial.backend_calls = calls.load(Ordering::SeqCst);

    // Dropping the server's runtime ends its connections.
    drop(server);
    trial
}

fn app(workload: Workload, stack: Stack, calls: Arc<AtomicU64>) -> Router {
    let capacity = Arc::new(Semaphore::new(SLOW_CAPACITY));
    let handler = move |Path(id): Path<u64>| {
        let (calls, capacity) = (Arc::clone(&calls), Arc::clone(&capacity));
        async move {
            calls.fetch_add(1, Ordering::Relaxed);
            if workload == Workload::Hot {
                let _permit = capacity.acquire().await.expect("an open semaphore");
                tokio::time::sleep(SLOW_CALL).await;
            }
            format!("item {id}")
        }
    };
    let router = Router::new().route("/item/{id}", get(handler));
    match stack {
        Stack::Bare => router.with_state(()),
        Stack::Layer => router.layer(SingleflightLayer::http()).with_state(()),
        Stack::LayerPerConnection => router.layer(SingleflightLayer::http()),
    }
}

/// `CLIENTS` connections sending requests back to back until `length` is up.
async fn drive(addr: SocketAddr, workload: Workload, length: Duration) -> Trial {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let start = Instant::now();
    let deadline = start + length;
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|task| {
            let client = client.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut id = task;
                while Instant::now() < deadline {
                    let item = if workload == Workload::Hot { 1 } else { id };
                    id += CLIENTS;
                    let uri = format!("http://{addr}/item/{item}").parse().expect("a uri");
                    let sent = Instant::now();
                    let response = client.get(uri).await.expect("a response");
                    assert!(response.status().is_success(), "{}", response.status());
                    let body = response.into_body().collect().await.expect("a body");
                    assert_eq!(body.to_bytes(), format!("item {item}").as_bytes());
                    latencies.push(sent.elapsed());
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.expect("a client task"));
    }
    Trial {
        requests: latencies.len() as u64,
        elapsed: start.elapsed(),
        latencies,
        backend_calls: 0,
    }
}

fn report(
    workload: Workload,
    trials: usize,
    bare: &[Trial],
    layered: &[Trial],
    per_connection: &[Trial],
) {
    let title = match workload {
        Workload::Unique => format!(
            "HTTP, all-unique keys, backend answers at once ({CLIENTS} connections, \
             median of {trials} trials)"
        ),
        Workload::Hot => format!(
            "HTTP, one hot key, backend takes {} ms and serves {SLOW_CAPACITY} at a time \
             ({CLIENTS} connections)",
            SLOW_CALL.as_millis()
        ),
    };
    let (bare_rps, layered_rps) = (rps(bare), rps(layered));
    let mut columns = vec![("without the layer", bare), ("with the layer", layered)];
    if !per_connection.is_empty() {
        columns.push(("with the layer, a group per connection", per_connection));
    }
    let names: Vec<&str> = columns.iter().map(|(name, _)| *name).collect();
    let row = |metric: fn(&[Trial]) -> String| -> String {
        let cells: Vec<String> = columns.iter().map(|(_, trials)| metric(trials)).collect();
        cells.join(" | ")
    };
    println!("\n#### {title}\n");
    println!("| | {} |", names.join(" | "));
    println!("|---|{}", "---:|".repeat(names.len()));
    println!(
        "| requests per second | {} |",
        row(|t| format!("{:.0}", rps(t)))
    );
    println!(
        "| p99 latency, µs | {} |",
        row(|t| format!("{:.0}", p99(t)))
    );
    println!(
        "| backend calls per request | {} |",
        row(|t| format!("{:.3}", calls(t)))
    );
    let target = match workload {
        Workload::Unique => format!(
            "the layer costs {:.1} % of requests per second (target < 3 %)",
            (1.0 - layered_rps / bare_rps) * 100.0
        ),
        Workload::Hot => format!(
            "the layer serves {:.1}x the requests per second (target ≥ 5x)",
            layered_rps / bare_rps
        ),
    };
    println!("\n- {target}");
}

/// Requests per second, median over trials.
fn rps(trials: &[Trial]) -> f64 {
    median(
        trials
            .iter()
            .map(|t| t.requests as f64 / t.elapsed.as_secs_f64()),
    )
}

/// The 99th percentile latency in microseconds, median over trials.
fn p99(trials: &[Trial]) -> f64 {
    median(trials.iter().map(|t| {
        let mut latencies = t.latencies.clone();
        latencies.sort();
        latencies[latencies.len() * 99 / 100].as_secs_f64() * 1e6
    }))
}

/// Backend calls per request, median over trials.
fn calls(trials: &[Trial]) -> f64 {
    median(
        trials
            .iter()
            .map(|t| t.backend_calls as f64 / t.requests as f64),
    )
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.collect();
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn one_worker() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}
