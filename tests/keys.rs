//! Keys (K1–K3 of the contract): which requests share a flight, which go
//! straight through, and what the crate lets out about a key.

use std::future::Future;
use std::hash::{Hash, Hasher};
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::join_all;
use tokio::sync::watch;
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
use tower_singleflight::key::optional;
use tower_singleflight::{Group, Role, SingleflightLayer, Stats};

// --- helpers ---

/// Awaits `future`, failing if it is still pending after ten seconds: on
/// the paused clock, a waiter that would hang fails the test at no cost.
async fn within<F: Future>(future: F) -> F::Output {
    let bounded = tokio::time::timeout(Duration::from_secs(10), future);
    bounded.await.expect("still pending after ten seconds")
}

/// A gate that calls wait behind until the test opens it.
#[derive(Clone)]
struct Gate(Arc<watch::Sender<bool>>);

impl Gate {
    fn new() -> Self {
        Self(Arc::new(watch::channel(false).0))
    }

    fn open(&self) {
        self.0.send_replace(true);
    }

    fn wait(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut open = self.0.subscribe();
        async move {
            let _ = open.wait_for(|open| *open).await;
        }
    }
}

/// A key whose hash is the same for every value: only `Eq` tells keys apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Colliding(u32);

impl Hash for Colliding {
    fn hash<H: Hasher>(&self, state: &mut H) {
        0_u8.hash(state);
    }
}

/// A lookup request, which may ask for a fresh answer.
struct Lookup {
    id: u32,
    fresh: bool,
    body: String,
}

/// A key made of text that must never show up in any output of the crate.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Secret(String);

const SECRET: &str = "hunter2-session-token";

// --- K1: the extractor may decline ---

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_declined_request_goes_straight_to_the_inner_service_untouched_and_uncounted() {
    // Fresh lookups are declined; the inner service records what it gets.
    let group = Group::<u32, String>::new();
    let (seen, gate) = (Arc::new(Mutex::new(Vec::new())), Gate::new());
    let (record, inner_gate) = (Arc::clone(&seen), gate.clone());
    let mut svc = ServiceBuilder::new()
        .layer(
            SingleflightLayer::new(optional(|req: &Lookup| (!req.fresh).then_some(req.id)))
                .with_group(group.clone()),
        )
        .service(service_fn(move |req: Lookup| {
            record
                .lock()
                .unwrap()
                .push((req.id, req.fresh, req.body.clone()));
            let wait = inner_gate.wait();
            async move {
                wait.await;
                Ok::<_, io::Error>(req.body)
            }
        }));

    // Two fresh lookups for one id: both reach the inner service as sent.
    let mut calls = Vec::new();
    for body in ["first", "second"] {
        let req = Lookup {
            id: 7,
            fresh: true,
            body: body.to_owned(),
        };
        calls.push(Box::pin(svc.ready().await.unwrap().call(req)));
    }
    assert!(calls.iter().all(|call| call.role() == Role::Bypass));
    for call in &mut calls {
        assert!(futures::poll!(call.as_mut()).is_pending());
    }
    let sent = [
        (7, true, "first".to_owned()),
        (7, true, "second".to_owned()),
    ];
    assert_eq!(*seen.lock().unwrap(), sent);

    // They are no flight and no waiters, in progress or after.
    assert_eq!((group.len(), group.stats()), (0, Stats::default()));
    gate.open();
    for (call, body) in calls.iter_mut().zip(["first", "second"]) {
        assert_eq!(within(call.as_mut()).await.unwrap(), body);
        assert!(!call.is_shared());
    }
    assert_eq!((group.len(), group.stats()), (0, Stats::default()));
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_declined_request_never_joins_a_flight_for_the_same_id() {
    // Fresh lookups are declined; the inner service counts its calls.
    let group = Group::<u32, String>::new();
    let (calls, gate) = (Arc::new(AtomicUsize::new(0)), Gate::new());
    let (counter, inner_gate) = (Arc::clone(&calls), gate.clone());
    let mut svc = ServiceBuilder::new()
        .layer(
            SingleflightLayer::new(optional(|req: &Lookup| (!req.fresh).then_some(req.id)))
                .with_group(group.clone()),
        )
        .service(service_fn(move |req: Lookup| {
            counter.fetch_add(1, SeqCst);
            let wait = inner_gate.wait();
            async move {
                wait.await;
                Ok::<_, io::Error>(req.body)
            }
        }));
    let lookup = |fresh, body: &str| Lookup {
        id: 7,
        fresh,
        body: body.to_owned(),
    };

    // A flight for id 7 is in progress.
    let mut cached = Box::pin(svc.ready().await.unwrap().call(lookup(false, "cached")));
    assert!(futures::poll!(cached.as_mut()).is_pending());

    // A fresh lookup for id 7 makes its own call beside it.
    let mut fresh = Box::pin(svc.ready().await.unwrap().call(lookup(true, "fresh")));
    assert_eq!(fresh.role(), Role::Bypass);
    assert!(futures::poll!(fresh.as_mut()).is_pending());
    assert_eq!(calls.load(SeqCst), 2);
    let stats = group.stats();
    assert_eq!((stats.leaders, stats.followers, stats.waiters), (1, 0, 1));

    // Each gets its own response.
    gate.open();
    assert_eq!(within(cached.as_mut()).await.unwrap(), "cached");
    assert_eq!(within(fresh.as_mut()).await.unwrap(), "fresh");
}

// --- K2: equal keys, not equal hashes ---

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn keys_with_equal_hashes_share_a_flight_only_when_they_are_equal() {
    let group = Group::<Colliding, u32>::new();
    let (calls, gate) = (Arc::new(AtomicUsize::new(0)), Gate::new());

    // Ten keys that all hash alike, three callers each.
    let mut waiters = Vec::new();
    for caller in 0..30 {
        let id = caller % 10;
        let (counter, wait) = (Arc::clone(&calls), gate.wait());
        let run = group.run(Colliding(id), move || {
            counter.fetch_add(1, SeqCst);
            async move {
                wait.await;
                Ok::<_, io::Error>(id * 100)
            }
        });
        assert_eq!(run.role() == Role::Leader, caller < 10);
        waiters.push((id, run));
    }
    assert_eq!(group.len(), 10);
    let stats = group.stats();
    assert_eq!(
        (stats.flights, stats.leaders, stats.followers),
        (10, 10, 20)
    );

    // Each caller gets the value of its own key, from one call per key.
    gate.open();
    let (ids, runs): (Vec<_>, Vec<_>) = waiters.into_iter().unzip();
    for (id, outcome) in ids.into_iter().zip(within(join_all(runs)).await) {
        assert_eq!(outcome.unwrap(), id * 100);
    }
    assert_eq!(calls.load(SeqCst), 10);
    assert_eq!(group.len(), 0);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn colliding_keys_end_forget_and_restart_independently() {
    let group = Group::<Colliding, u32>::new();
    let gates: Vec<Gate> = (0..3).map(|_| Gate::new()).collect();
    let work = |id: u32| {
        let wait = gates[id as usize].wait();
        move || async move {
            wait.await;
            Ok::<_, io::Error>(id)
        }
    };

    // Three colliding keys in flight.
    let mut flights: Vec<_> = (0..3)
        .map(|id| Box::pin(group.run(Colliding(id), work(id))))
        .collect();
    for flight in &mut flights {
        assert!(futures::poll!(flight.as_mut()).is_pending());
    }

    // Forgetting the middle one leaves the other two joinable.
    assert!(group.forget(&Colliding(1)));
    assert!(!group.forget(&Colliding(1)));
    assert_eq!(group.len(), 2);
    assert_eq!(group.run(Colliding(0), work(0)).role(), Role::Follower);
    assert_eq!(group.run(Colliding(2), work(2)).role(), Role::Follower);

    // The first one ends; the last one is still joinable.
    gates[0].open();
    assert_eq!(within(flights[0].as_mut()).await.unwrap(), 0);
    assert_eq!(group.len(), 1);
    assert_eq!(group.run(Colliding(0), work(0)).role(), Role::Leader);
    assert_eq!(group.run(Colliding(2), work(2)).role(), Role::Follower);

    // The rest end, and the map is empty.
    gates[1].open();
    gates[2].open();
    assert_eq!(within(flights[1].as_mut()).await.unwrap(), 1);
    assert_eq!(within(flights[2].as_mut()).await.unwrap(), 2);
    assert_eq!(group.len(), 0);
}

// --- K3: keys stay private ---

#[tokio::test(flavor = "current_thread")]
async fn no_debug_or_display_output_of_the_crate_shows_a_key() {
    let group = Group::<Secret, u32>::new();
    let key = || Secret(SECRET.to_owned());

    // A leader, a follower, a failure and the layer's types around the key.
    let leader = group.run(key(), || async { Ok::<_, io::Error>(1) });
    let follower = group.run(key(), || async { Ok::<_, io::Error>(1) });
    let layer = SingleflightLayer::new(|req: &Secret| req.clone()).with_group(group.clone());
    let mut svc = ServiceBuilder::new()
        .layer(layer.clone())
        .service(service_fn(|_: Secret| async { Ok::<u32, io::Error>(1) }));
    let response = svc.ready().await.unwrap().call(key());
    let mut outputs = vec![
        format!("{group:?} {leader:?} {follower:?} {:?}", group.stats()),
        format!("{layer:?} {svc:?} {response:?}"),
    ];
    drop((leader, follower, response));
    let failure = Group::<Secret, u32>::new()
        .run(key(), || async { Err::<u32, _>(io::Error::other("no")) })
        .await
        .unwrap_err();
    outputs.push(format!("{failure} {failure:?}"));

    // None of it names the key.
    for output in outputs {
        assert!(!output.contains(SECRET), "{output}");
    }
}
