//! Outcomes (O1–O5 of the contract): what every waiter of a flight
//! receives, whether the call succeeds, fails or panics, and how each
//! waiter learns its part in the flight.

use std::error::Error as _;
use std::fmt;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::join_all;
use tower::{service_fn, BoxError, Service, ServiceBuilder, ServiceExt};
use tower_singleflight::key::optional;
use tower_singleflight::{Error, Group, OnWaitLimit, Role, SingleflightLayer};

mod support;

use support::{settle, within, Gate};

// --- helpers ---

/// A waiter of any work, so that waiters of different work fit one list.
type Waiter<T> = Pin<Box<dyn Future<Output = Result<T, Error>>>>;

fn waiter<T, F: Future<Output = Result<T, Error>> + 'static>(run: F) -> Waiter<T> {
    Box::pin(run)
}

/// Makes `count` concurrent calls with `req` through `svc`, joining each
/// before any is polled, and returns their outcomes.
async fn fan_out<S, Req>(svc: &mut S, req: Req, count: usize) -> Vec<Result<S::Response, S::Error>>
where
    S: Service<Req>,
    Req: Clone,
{
    let mut calls = Vec::new();
    for _ in 0..count {
        calls.push(
            svc.ready()
                .await
                .ok()
                .expect("always ready")
                .call(req.clone()),
        );
    }
    within(join_all(calls)).await
}

/// An inner service whose `call` panics the first time it is made.
#[derive(Clone)]
struct PanicsOnFirstCall {
    calls: Arc<AtomicUsize>,
}

impl Service<String> for PanicsOnFirstCall {
    type Response = String;
    type Error = io::Error;
    type Future = std::future::Ready<io::Result<String>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: String) -> Self::Future {
        if self.calls.fetch_add(1, SeqCst) == 0 {
            panic!("call exploded");
        }
        std::future::ready(Ok(format!("fresh {req}")))
    }
}

// --- O1: success ---

#[tokio::test(flavor = "current_thread")]
async fn every_waiter_receives_the_response_of_the_one_call() {
    // An inner service that answers with a numbered response.
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&calls);
    let mut svc = ServiceBuilder::new()
        .layer(SingleflightLayer::new(|req: &String| req.clone()))
        .service(service_fn(move |req: String| {
            let n = counter.fetch_add(1, SeqCst);
            async move { Ok::<_, io::Error>(vec![format!("{req} #{n}")]) }
        }));

    // Eight concurrent calls: each gets an equal copy of the one response.
    for response in fan_out(&mut svc, "page".to_owned(), 8).await {
        assert_eq!(response.unwrap(), ["page #0"]);
    }
    assert_eq!(calls.load(SeqCst), 1);
}

// --- O2: failure ---

#[tokio::test(flavor = "current_thread")]
async fn a_non_clone_io_error_reaches_every_waiter_by_source_and_by_type() {
    // An inner service that fails with an `io::Error`, which is not `Clone`.
    let mut svc = ServiceBuilder::new()
        .layer(SingleflightLayer::new(|req: &u32| *req))
        .service(service_fn(|_: u32| async {
            tokio::task::yield_now().await;
            Err::<String, _>(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                "backend down",
            ))
        }));

    // Five waiters: each reaches the same inner error both ways.
    let outcomes = fan_out(&mut svc, 1, 5).await;
    assert_eq!(outcomes.len(), 5);
    for outcome in outcomes {
        let error = outcome.unwrap_err();
        let typed = error.downcast_ref::<io::Error>().expect("typed access");
        assert_eq!(
            (typed.kind(), typed.to_string()),
            (io::ErrorKind::ConnectionRefused, "backend down".to_owned())
        );
        let source = error
            .source()
            .expect("a source")
            .downcast_ref::<io::Error>()
            .unwrap();
        assert_eq!(source.kind(), io::ErrorKind::ConnectionRefused);
        assert!(error.inner().is_some());
        assert!(!error.is_panic() && !error.is_wait_limit());
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_boxed_error_reaches_every_waiter_with_its_concrete_type() {
    // An inner service failing with tower's `BoxError` around an `io::Error`.
    let mut svc = ServiceBuilder::new()
        .layer(SingleflightLayer::new(|req: &u32| *req))
        .service(service_fn(|_: u32| async {
            tokio::task::yield_now().await;
            let error: BoxError = Box::new(io::Error::new(io::ErrorKind::TimedOut, "too slow"));
            Err::<String, _>(error)
        }));

    // Five waiters: the `io::Error` is found through the box, both ways.
    for outcome in fan_out(&mut svc, 1, 5).await {
        let error = outcome.unwrap_err();
        assert_eq!(
            error.downcast_ref::<io::Error>().unwrap().kind(),
            io::ErrorKind::TimedOut
        );
        let source = error.source().unwrap();
        assert_eq!(
            source.downcast_ref::<io::Error>().unwrap().to_string(),
            "too slow"
        );
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_failed_call_error_is_shared_once_and_freed_with_its_last_waiter() {
    /// An error type of our own that is not `Clone` and counts its drops.
    #[derive(Debug)]
    struct Outage(Arc<AtomicUsize>);
    impl fmt::Display for Outage {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("outage")
        }
    }
    impl std::error::Error for Outage {}
    impl Drop for Outage {
        fn drop(&mut self) {
            self.0.fetch_add(1, SeqCst);
        }
    }

    // A leader and four followers of a call that fails with an `Outage`.
    let group = Group::<&str, u32>::new();
    let (drops, gate) = (Arc::new(AtomicUsize::new(0)), Gate::new());
    let (error_drops, wait) = (Arc::clone(&drops), gate.wait());
    let mut waiters = vec![waiter(group.run("k", move || async move {
        wait.await;
        Err::<u32, _>(Outage(error_drops))
    }))];
    for _ in 0..4 {
        waiters.push(waiter(group.run("k", || async { Ok::<_, Outage>(0) })));
    }
    gate.open();
    let errors: Vec<Error> = join_all(waiters)
        .await
        .into_iter()
        .map(Result::unwrap_err)
        .collect();

    // Every waiter reaches the one `Outage`; it is freed with the last error.
    for error in &errors {
        assert!(error.downcast_ref::<Outage>().is_some());
    }
    assert_eq!(drops.load(SeqCst), 0);
    drop(errors);
    assert_eq!(drops.load(SeqCst), 1);
}

// --- O3: panics ---

#[tokio::test(flavor = "current_thread")]
async fn a_panic_in_the_inner_service_call_reaches_every_waiter_and_frees_the_key() {
    // A shared group, so the test can read its counters.
    let group = Group::<String, String>::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let mut svc = ServiceBuilder::new()
        .layer(SingleflightLayer::new(|req: &String| req.clone()).with_group(group.clone()))
        .service(PanicsOnFirstCall {
            calls: Arc::clone(&calls),
        });

    // Five waiters of a call whose `call` panics: each gets a panic error.
    for outcome in fan_out(&mut svc, "k".to_owned(), 5).await {
        let error = outcome.unwrap_err();
        assert!(error.is_panic());
        assert_eq!(error.panic_message(), Some("call exploded"));
        assert!(error.to_string().contains("panicked"));
        assert!(error.inner().is_none());
    }

    // The key is free, and the next request starts a fresh flight.
    assert_eq!(group.len(), 0);
    let stats = group.stats();
    assert_eq!((stats.panics, stats.flights, stats.waiters), (1, 0, 0));
    let next = svc.ready().await.unwrap().call("k".to_owned());
    assert_eq!(next.role(), Role::Leader);
    assert_eq!(next.await.unwrap(), "fresh k");
    assert_eq!(calls.load(SeqCst), 2);
}

#[tokio::test(flavor = "current_thread")]
async fn a_panic_in_the_inner_future_reaches_every_waiter_with_its_message() {
    // An inner service whose first future panics with a formatted message.
    let group = Group::<u32, u32>::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&calls);
    let mut svc = ServiceBuilder::new()
        .layer(SingleflightLayer::new(|req: &u32| *req).with_group(group.clone()))
        .service(service_fn(move |req: u32| {
            let n = counter.fetch_add(1, SeqCst);
            async move {
                tokio::task::yield_now().await;
                if n == 0 {
                    panic!("future exploded on request {req}");
                }
                Ok::<_, io::Error>(req)
            }
        }));

    // Five waiters: each gets the panic and its message.
    for outcome in fan_out(&mut svc, 3, 5).await {
        let error = outcome.unwrap_err();
        assert!(error.is_panic());
        assert_eq!(error.panic_message(), Some("future exploded on request 3"));
    }

    // The key is free, and the next request starts a fresh flight.
    assert_eq!((group.len(), group.stats().panics), (0, 1));
    assert_eq!(svc.ready().await.unwrap().call(3).await.unwrap(), 3);
    assert_eq!(calls.load(SeqCst), 2);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_panic_with_a_payload_that_is_not_a_string_still_reaches_every_waiter() {
    let group = Group::<&str, u32>::new();

    // A call that panics with a number, and two followers.
    let leader = group.run("k", || async {
        tokio::task::yield_now().await;
        panic::panic_any(42_u32);
        #[allow(unreachable_code)]
        Ok::<u32, io::Error>(0)
    });
    let followers = (0..2).map(|_| waiter(group.run("k", || async { Ok::<_, io::Error>(0) })));
    let mut waiters = vec![waiter(leader)];
    waiters.extend(followers);

    // Each gets a panic error without a message.
    for outcome in within(join_all(waiters)).await {
        let error = outcome.unwrap_err();
        assert!(error.is_panic());
        assert_eq!(error.panic_message(), None);
    }
    assert_eq!((group.len(), group.stats().panics), (0, 1));
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_panic_while_making_the_call_reaches_every_waiter() {
    let group = Group::<&str, u32>::new();

    // The leader's work panics as it is started, before any future exists.
    let leader = group.run("k", || -> std::future::Ready<io::Result<u32>> {
        panic!("could not even start");
    });
    let follower = group.run("k", || async { Ok::<_, io::Error>(0) });

    // Both get the panic, and the key is free for a fresh flight.
    for outcome in within(join_all([waiter(leader), waiter(follower)])).await {
        assert_eq!(
            outcome.unwrap_err().panic_message(),
            Some("could not even start")
        );
    }
    assert_eq!((group.len(), group.stats().panics), (0, 1));
    assert_eq!(
        group
            .run("k", || async { Ok::<_, io::Error>(5) })
            .await
            .unwrap(),
        5
    );
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_panic_in_a_fallback_call_reaches_only_that_follower() {
    let group = Group::<&str, u32>::new();
    let own = group
        .clone()
        .follower_wait_limit(Duration::from_millis(10), OnWaitLimit::CallOwn);
    let gate = Gate::new();

    // A leader waits on a gate; a follower will call on its own and panic.
    let wait = gate.wait();
    let leader = tokio::spawn(group.run("k", move || async move {
        wait.await;
        Ok::<_, io::Error>(7)
    }));
    settle().await;
    let follower = own.run("k", || async {
        panic!("own call exploded");
        #[allow(unreachable_code)]
        Ok::<u32, io::Error>(0)
    });

    // The follower gets its panic; the leader its value.
    assert_eq!(
        within(follower).await.unwrap_err().panic_message(),
        Some("own call exploded")
    );
    gate.open();
    assert_eq!(within(leader).await.unwrap().unwrap(), 7);
    assert_eq!(group.len(), 0);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_key_whose_eq_panics_poisons_no_lock_and_leaves_the_group_usable() {
    /// A key whose `Eq` panics when asked about an `exploding` key.
    #[derive(Debug)]
    struct Key {
        id: u32,
        exploding: bool,
    }
    impl PartialEq for Key {
        fn eq(&self, other: &Self) -> bool {
            assert!(!self.exploding && !other.exploding, "eq exploded");
            self.id == other.id
        }
    }
    impl Eq for Key {}
    impl Hash for Key {
        fn hash<H: Hasher>(&self, state: &mut H) {
            self.id.hash(state);
        }
    }
    let key = |exploding| Key { id: 1, exploding };

    // A flight is in progress when a caller's key panics inside the lookup.
    let group = Group::<Key, u32>::new();
    let gate = Gate::new();
    let wait = gate.wait();
    let mut leader = Box::pin(group.run(key(false), move || async move {
        wait.await;
        Ok::<_, io::Error>(7)
    }));
    assert!(futures::poll!(leader.as_mut()).is_pending());
    let work = || async { Ok::<_, io::Error>(0) };
    let panicked = panic::catch_unwind(AssertUnwindSafe(|| group.run(key(true), work)));
    assert!(panicked.is_err());

    // The group still works: a follower joins, the flight ends, counters read.
    let follower = group.run(key(false), || async { Ok::<_, io::Error>(0) });
    assert_eq!(follower.role(), Role::Follower);
    gate.open();
    assert_eq!(within(leader).await.unwrap(), 7);
    assert_eq!(within(follower).await.unwrap(), 7);
    assert_eq!((group.len(), group.stats().waiters), (0, 0));
    assert_eq!(
        group
            .run(key(false), || async { Ok::<_, io::Error>(8) })
            .await
            .unwrap(),
        8
    );
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn the_crate_own_failures_are_distinct_errors_and_never_a_generic_cancellation() {
    let group = Group::<&str, u32>::new();
    let impatient = group
        .clone()
        .follower_wait_limit(Duration::from_millis(10), OnWaitLimit::Fail);

    // A wait-limit error: recognisable, with no inner error and no panic.
    let leader = tokio::spawn(group.run("k", || async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        Ok::<_, io::Error>(7)
    }));
    let waited = impatient
        .run("k", || async { Ok::<_, io::Error>(0) })
        .await
        .unwrap_err();
    assert!(waited.is_wait_limit() && !waited.is_panic());
    assert!(waited.inner().is_none() && waited.source().is_none());
    assert!(waited.downcast_ref::<io::Error>().is_none());
    assert_eq!(within(leader).await.unwrap().unwrap(), 7);

    // A panic error: recognisable, and neither of the others.
    let panicked = group
        .run("p", || async {
            panic!("boom");
            #[allow(unreachable_code)]
            Ok::<u32, io::Error>(0)
        })
        .await
        .unwrap_err();
    assert!(panicked.is_panic() && !panicked.is_wait_limit() && panicked.inner().is_none());

    // An inner error: neither a panic nor a wait limit.
    let failed = group
        .run("e", || async { Err::<u32, _>(io::Error::other("no")) })
        .await
        .unwrap_err();
    assert!(!failed.is_panic() && !failed.is_wait_limit() && failed.inner().is_some());

    // Their messages are distinct lowercase phrases, none a "cancelled".
    let messages = [waited.to_string(), panicked.to_string(), failed.to_string()];
    for message in &messages {
        assert!(!message.to_lowercase().contains("cancel"), "{message}");
        assert!(message.starts_with(char::is_lowercase) && !message.ends_with('.'));
    }
    assert!(messages[0] != messages[1] && messages[1] != messages[2] && messages[0] != messages[2]);
}

// --- O5: role and sharing ---

#[tokio::test(flavor = "current_thread")]
async fn a_lone_leader_learns_that_it_led_and_did_not_share() {
    let group = Group::<&str, u32>::new();

    // One caller alone leads, and its outcome went to no one else.
    let mut alone = Box::pin(group.run("k", || async { Ok::<_, io::Error>(7) }));
    assert_eq!(alone.role(), Role::Leader);
    assert_eq!(alone.as_mut().await.unwrap(), 7);
    assert_eq!(alone.role(), Role::Leader);
    assert!(!alone.is_shared());
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_leader_and_its_followers_learn_their_roles_and_that_they_shared() {
    let group = Group::<&str, u32>::new();
    let gate = Gate::new();

    // A leader and two followers.
    let wait = gate.wait();
    let mut leader = Box::pin(group.run("k", move || async move {
        wait.await;
        Ok::<_, io::Error>(7)
    }));
    let mut followers: Vec<_> = (0..2)
        .map(|_| Box::pin(group.run("k", || async { Ok::<_, io::Error>(0) })))
        .collect();
    assert_eq!(leader.role(), Role::Leader);
    assert!(followers
        .iter()
        .all(|follower| follower.role() == Role::Follower));

    // After the call, each knows its outcome was shared.
    gate.open();
    assert_eq!(within(leader.as_mut()).await.unwrap(), 7);
    assert!(leader.is_shared());
    for follower in &mut followers {
        assert_eq!(within(follower.as_mut()).await.unwrap(), 7);
        assert!(follower.is_shared());
        assert_eq!(follower.role(), Role::Follower);
    }
}

#[test]
fn a_leader_whose_follower_left_before_the_outcome_still_shared_its_flight() {
    // With a runtime, a task drives the shared call and the leader takes
    // the outcome it published; without one, the leader drives and
    // publishes it itself. Both ways, its flight had a follower.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    for in_runtime in [true, false] {
        let _entered = in_runtime.then(|| runtime.enter());
        let group = Group::<&str, u32>::new();
        let (open, gate) = futures::channel::oneshot::channel::<()>();

        // A follower joins once the leader's call is under way, then leaves.
        let mut leader = Box::pin(group.run("k", move || async move {
            gate.await.unwrap();
            Ok::<_, io::Error>(7)
        }));
        let mut follower = Box::pin(group.run("k", || async { Ok::<_, io::Error>(0) }));
        assert_eq!(follower.role(), Role::Follower);
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(leader.as_mut().poll(&mut cx).is_pending());
        assert!(follower.as_mut().poll(&mut cx).is_pending());
        drop(follower);

        // The outcome reaches the leader alone, but its flight was shared.
        open.send(()).unwrap();
        let out = if in_runtime {
            runtime.block_on(within(leader.as_mut()))
        } else {
            // Nothing else runs the call: a few polls of the leader end it.
            (0..3)
                .find_map(|_| match leader.as_mut().poll(&mut cx) {
                    Poll::Ready(out) => Some(out),
                    Poll::Pending => None,
                })
                .expect("the leader drives its call to the end")
        };
        assert_eq!(out.unwrap(), 7);
        assert!(leader.is_shared(), "in a runtime: {in_runtime}");
        assert!(group.is_empty());
    }
}
#[tokio::test(flavor = "current_thread")]
async fn layer_response_futures_tell_leader_follower_and_bypass_and_keep_the_response_type() {
    // Requests with key 0 decline coalescing.
    let gate = Gate::new();
    let inner_gate = gate.clone();
    let mut svc = ServiceBuilder::new()
        .layer(SingleflightLayer::new(optional(|req: &u32| {
            (*req != 0).then_some(*req)
        })))
        .service(service_fn(move |req: u32| {
            let wait = inner_gate.wait();
            async move {
                wait.await;
                Ok::<_, io::Error>(format!("response {req}"))
            }
        }));

    // A lone leader, a leader with a follower, and a bypass.
    let mut lone = Box::pin(svc.ready().await.unwrap().call(1));
    let mut leader = Box::pin(svc.ready().await.unwrap().call(2));
    let mut follower = Box::pin(svc.ready().await.unwrap().call(2));
    let mut bypass = Box::pin(svc.ready().await.unwrap().call(0));
    let roles = [lone.role(), leader.role(), follower.role(), bypass.role()];
    assert_eq!(
        roles,
        [Role::Leader, Role::Leader, Role::Follower, Role::Bypass]
    );

    // The responses are plain `String`s; sharing is read off the futures.
    gate.open();
    let response: String = lone.as_mut().await.unwrap();
    assert_eq!(response, "response 1");
    assert_eq!(leader.as_mut().await.unwrap(), "response 2");
    assert_eq!(follower.as_mut().await.unwrap(), "response 2");
    assert_eq!(bypass.as_mut().await.unwrap(), "response 0");
    let shared = [
        lone.is_shared(),
        leader.is_shared(),
        follower.is_shared(),
        bypass.is_shared(),
    ];
    assert_eq!(shared, [false, true, true, false]);
}
