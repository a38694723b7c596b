//! Overhead of the layer against the bare service: N calls on distinct keys,
//! and N concurrent calls on one key.
//!
//! Run with `cargo bench --bench coalescing`.

use std::convert::Infallible;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use futures::future::join_all;
use tower::{service_fn, Service, ServiceExt};
use tower_layer::Layer;
use tower_singleflight::{Group, SingleflightLayer};

const CALLS: u64 = 1_000;

fn bare() -> impl Service<u64, Response = u64, Error = Infallible, Future: Send> + Clone {
    service_fn(|key: u64| async move {
        tokio::task::yield_now().await;
        Ok::<_, Infallible>(key)
    })
}

fn layered(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    let mut group = c.benchmark_group("1000 calls");

    group.bench_function(BenchmarkId::new("bare", "distinct keys"), |b| {
        b.to_async(&runtime).iter(|| async {
            let svc = bare();
            join_all((0..CALLS).map(|key| svc.clone().oneshot(key))).await
        });
    });
    group.bench_function(BenchmarkId::new("layer", "distinct keys"), |b| {
        b.to_async(&runtime).iter(|| async {
            let svc = SingleflightLayer::new(|key: &u64| *key).layer(bare());
            join_all((0..CALLS).map(|key| svc.clone().oneshot(key))).await
        });
    });
    group.bench_function(BenchmarkId::new("layer", "one key"), |b| {
        b.to_async(&runtime).iter(|| async {
            let svc = SingleflightLayer::new(|key: &u64| *key).layer(bare());
            join_all((0..CALLS).map(|_| svc.clone().oneshot(7))).await
        });
    });
    group.bench_function(BenchmarkId::new("group", "one key"), |b| {
        b.to_async(&runtime).iter(|| async {
            let flights: Group<u64, u64> = Group::new();
            let load = || async {
                tokio::task::yield_now().await;
                Ok::<_, Infallible>(7)
            };
            join_all((0..CALLS).map(|_| flights.run(7, load))).await
        });
    });
    group.finish();
}

// The macros generate undocumented items.
#[allow(missing_docs)]
mod harness {
    use super::*;
    criterion_group!(benches, layered);
}
criterion_main!(harness::benches);
