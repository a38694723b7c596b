//! A burst of concurrent callers in front of a slow, counting loader.
//!
//! Run with `cargo run --example basic`. It prints how many callers there
//! were and how many calls reached the loader, without and with the layer.

#![allow(clippy::print_stdout)] // An example reports on standard output.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use tower::{service_fn, BoxError, ServiceBuilder, ServiceExt};
use tower_singleflight::SingleflightLayer;

const CALLERS: usize = 1_000;
const KEYS: usize = 10;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    for coalesce in [false, true] {
        // The backend: a lookup that takes 50 ms and counts its calls.
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&calls);
        let loader = service_fn(move |key: usize| {
            counter.fetch_add(1, Ordering::Relaxed);
            async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok::<_, BoxError>(format!("value-{key}"))
            }
        });

        // The stack: coalesce on the key itself, or not at all.
        let extractor = move |key: &usize| coalesce.then_some(*key);
        let svc = ServiceBuilder::new()
            .layer(SingleflightLayer::new(tower_singleflight::key::optional(
                extractor,
            )))
            .service(loader);

        // A burst: every caller at once, over a few hot keys.
        let started = Instant::now();
        let burst = (0..CALLERS).map(|i| svc.clone().oneshot(i % KEYS));
        let results = join_all(burst).await;
        let failed = results.iter().filter(|r| r.is_err()).count();

        let label = if coalesce {
            "with the layer"
        } else {
            "without it"
        };
        println!(
            "{label:>15}: {CALLERS} callers, {} loader calls, {failed} errors, {:?}",
            calls.load(Ordering::Relaxed),
            started.elapsed(),
        );
    }
    Ok(())
}
