//! The layer on real traffic: an axum service in front of a slow backend,
//! driven over loopback by a real HTTP client, with and without coalescing.
//!
//! Run with `cargo run --release --example demo`; `-- --help` lists the
//! flags that shape the burst. The backend is a lookup that takes tens of
//! milliseconds, serves a bounded number of lookups at once (as a database
//! pool would) and counts its calls. The burst is the same for both runs:
//! many clients at once, most asking for a few hot keys, the rest for many
//! cold ones. At the end a table compares the two runs.

#![allow(clippy::print_stdout, clippy::print_stderr)] // It reports on the terminal.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::Semaphore;
use tower_singleflight::SingleflightLayer;

/// The shape of the burst and of the backend.
#[derive(Parser, Debug)]
#[command(about = "Runs one HTTP burst with and without the singleflight layer")]
struct Args {
    /// Requests in the burst.
    #[arg(long, default_value_t = 6_000)]
    requests: usize,
    /// Clients sending at once, each one request after another.
    #[arg(long, default_value_t = 300)]
    clients: usize,
    /// Keys most requests ask for.
    #[arg(long, default_value_t = 5)]
    hot_keys: usize,
    /// Keys the other requests spread over.
    #[arg(long, default_value_t = 5_000)]
    cold_keys: usize,
    /// Percentage of requests that ask for a hot key.
    #[arg(long, default_value_t = 80, value_parser = clap::value_parser!(u8).range(0..=100))]
    hot_percent: u8,
    /// How long one backend lookup takes, in milliseconds.
    #[arg(long, default_value_t = 40)]
    backend_ms: u64,
    /// Lookups the backend serves at once; the others queue.
    #[arg(long, default_value_t = 64)]
    backend_capacity: usize,
    /// Seed of the burst's key sequence.
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

/// The slow backend: a bounded pool of lookups that counts its calls.
struct Backend {
    calls: AtomicUsize,
    pool: Semaphore,
    delay: Duration,
}

/// What one run measured.
struct Report {
    label: &'static str,
    requests: usize,
    backend_calls: usize,
    errors: usize,
    latencies: Vec<Duration>,
    elapsed: Duration,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let keys = burst(&args);
    eprintln!(
        "burst: {} requests from {} clients; {}% for {} hot keys, the rest over {} cold ones",
        args.requests, args.clients, args.hot_percent, args.hot_keys, args.cold_keys,
    );
    eprintln!(
        "backend: {} ms per lookup, {} at once\n",
        args.backend_ms, args.backend_capacity
    );

    // The same burst, against a fresh server and backend each time.
    let mut reports = Vec::new();
    for (label, coalesce) in [("without the layer", false), ("with the layer", true)] {
        reports.push(run(label, coalesce, &args, &keys).await);
    }
    print_table(&reports);
}

/// The key of every request in the burst, drawn once so both runs match.
fn burst(args: &Args) -> Arc<Vec<String>> {
    let mut rng = XorShift(args.seed.max(1));
    let keys = (0..args.requests).map(|_| {
        let hot = rng.below(100) < u64::from(args.hot_percent);
        match hot && args.hot_keys > 0 {
            true => format!("hot-{}", rng.below(args.hot_keys as u64)),
            false => format!("cold-{}", rng.below(args.cold_keys.max(1) as u64)),
        }
    });
    Arc::new(keys.collect())
}

/// Serves the app on loopback, drives the burst at it, and measures.
async fn run(label: &'static str, coalesce: bool, args: &Args, keys: &Arc<Vec<String>>) -> Report {
    // The service: a lookup route, behind the layer or not.
    let backend = Arc::new(Backend {
        calls: AtomicUsize::new(0),
        pool: Semaphore::new(args.backend_capacity.max(1)),
        delay: Duration::from_millis(args.backend_ms),
    });
    let mut app = Router::new().route("/items/{key}", get(lookup));
    if coalesce {
        app = app.layer(SingleflightLayer::http());
    }
    let addr = serve(app.with_state(Arc::clone(&backend))).await;

    // The clients: each takes the next request of the burst until none is left.
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let next = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let progress = tokio::spawn(show_progress(label, Arc::clone(&next), keys.len()));
    let clients = (0..args.clients.max(1)).map(|_| {
        let (client, keys) = (client.clone(), Arc::clone(keys));
        let (next, errors) = (Arc::clone(&next), Arc::clone(&errors));
        tokio::spawn(async move {
            let mut latencies = Vec::new();
            while let Some(key) = keys.get(next.fetch_add(1, Ordering::Relaxed)) {
                let sent = Instant::now();
                if !fetch(&client, addr, key).await {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                latencies.push(sent.elapsed());
            }
            latencies
        })
    });
    let mut latencies = Vec::with_capacity(keys.len());
    for client in futures::future::join_all(clients).await {
        latencies.extend(client.expect("a client task finished"));
    }
    let elapsed = started.elapsed();
    progress.abort();
    eprintln!(
        "\r{label:>18}: {0}/{0} requests in {elapsed:.1?}",
        keys.len()
    );

    Report {
        label,
        requests: keys.len(),
        backend_calls: backend.calls.load(Ordering::Relaxed),
        errors: errors.load(Ordering::Relaxed),
        latencies,
        elapsed,
    }
}

/// The handler: one backend lookup.
async fn lookup(State(backend): State<Arc<Backend>>, Path(key): Path<String>) -> String {
    backend.calls.fetch_add(1, Ordering::Relaxed);
    let _permit = backend.pool.acquire().await.expect("the pool stays open");
    tokio::time::sleep(backend.delay).await;
    format!("{{\"key\":\"{key}\",\"value\":\"the value of {key}\"}}")
}

/// Sends one GET and reads its body; says whether it succeeded.
async fn fetch(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>,
    addr: SocketAddr,
    key: &str,
) -> bool {
    let uri = format!("http://{addr}/items/{key}");
    let Ok(res) = client.get(uri.parse().expect("a valid URI")).await else {
        return false;
    };
    let ok = res.status() == StatusCode::OK;
    ok && res.into_body().collect().await.is_ok()
}

async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a port");
    let addr = listener.local_addr().expect("a bound port");
    tokio::spawn(async move { axum::serve(listener, app).await.expect("the server runs") });
    addr
}

/// Rewrites one status line on standard error as the burst goes.
async fn show_progress(label: &str, next: Arc<AtomicUsize>, total: usize) {
    loop {
        let sent = next.load(Ordering::Relaxed).min(total);
        eprint!("\r{label:>18}: {sent}/{total} requests sent");
        let _ = std::io::stderr().flush();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn print_table(reports: &[Report]) {
    println!();
    println!(
        "{:<18} {:>9} {:>14} {:>7} {:>10} {:>10} {:>10}",
        "", "requests", "backend calls", "errors", "p50", "p99", "req/s"
    );
    for report in reports {
        let mut latencies = report.latencies.clone();
        latencies.sort_unstable();
        let rate = report.requests as f64 / report.elapsed.as_secs_f64();
        println!(
            "{:<18} {:>9} {:>14} {:>7} {:>10} {:>10} {:>10.0}",
            report.label,
            report.requests,
            report.backend_calls,
            report.errors,
            format!("{:.1?}", percentile(&latencies, 50)),
            format!("{:.1?}", percentile(&latencies, 99)),
            rate,
        );
    }

    // The point of it all, in one line.
    if let [without, with] = reports {
        let saved = 100.0 * (1.0 - with.backend_calls as f64 / without.backend_calls.max(1) as f64);
        println!(
            "\nthe layer served the same {} requests with {saved:.0}% fewer backend calls",
            with.requests
        );
    }
}

/// The `p`th percentile of sorted latencies (nearest rank).
fn percentile(sorted: &[Duration], p: usize) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (sorted.len() * p).div_ceil(100).max(1);
    sorted[rank - 1]
}

/// A tiny deterministic generator: enough to draw keys, no dependency.
struct XorShift(u64);

impl XorShift {
    fn below(&mut self, bound: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % bound.max(1)
    }
}
