//! Readiness and resources (R1–R3 of the contract): followers never touch
//! the inner service's capacity, nothing outlives the calls, and a handle
//! forgets keys and counts flights. Also the layer inside tower stacks.

use std::collections::BTreeSet;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio_test::{assert_pending, assert_ready_ok};
use tower::limit::ConcurrencyLimitLayer;
use tower::timeout::error::Elapsed;
use tower::timeout::TimeoutLayer;
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
use tower_singleflight::key::optional;
use tower_singleflight::{Group, OnWaitLimit, Role, SingleflightLayer, Stats};

mod support;

use support::{settle, within, Gate, WakeCount};

// --- helpers ---

/// What a [`Probe`] and its clones saw.
#[derive(Default)]
struct ProbeLog {
    clones: AtomicUsize,
    /// The clone id of every `poll_ready`.
    ready_polls: Mutex<Vec<usize>>,
    calls: AtomicUsize,
}

/// Wraps a service and records which clone polled it for readiness.
struct Probe<S> {
    inner: S,
    id: usize,
    log: Arc<ProbeLog>,
}

impl<S: Clone> Clone for Probe<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            id: self.log.clones.fetch_add(1, SeqCst) + 1,
            log: Arc::clone(&self.log),
        }
    }
}

impl<S: Service<Req>, Req> Service<Req> for Probe<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.log.ready_polls.lock().unwrap().push(self.id);
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> S::Future {
        self.log.calls.fetch_add(1, SeqCst);
        self.inner.call(req)
    }
}

/// Work for a group: waits on `gate`, then yields `value`.
fn gated(
    gate: &Gate,
    value: &'static str,
) -> impl FnOnce() -> Pin<Box<dyn Future<Output = io::Result<&'static str>> + Send>> {
    let wait = gate.wait();
    move || {
        Box::pin(async move {
            wait.await;
            Ok(value)
        })
    }
}

// --- R1: followers never touch the inner service's readiness ---

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn twenty_requests_for_one_key_through_a_concurrency_limit_of_one_make_one_inner_call() {
    // A concurrency limit of one below the layer, over a slow counting service.
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&calls);
    let svc = ServiceBuilder::new()
        .layer(SingleflightLayer::new(|req: &String| req.clone()))
        .layer(ConcurrencyLimitLayer::new(1))
        .service(service_fn(move |req: String| {
            counter.fetch_add(1, SeqCst);
            async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok::<_, io::Error>(req.len())
            }
        }));

    // Twenty concurrent requests: all answered, by one inner call.
    let callers: Vec<_> = (0..20)
        .map(|_| tokio::spawn(svc.clone().oneshot("same".to_owned())))
        .collect();
    for caller in callers {
        assert_eq!(within(caller).await.unwrap().unwrap(), 4);
    }
    assert_eq!(calls.load(SeqCst), 1);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn followers_complete_while_another_key_holds_the_only_inner_slot() {
    // A concurrency limit of one over a service whose calls wait on a gate
    // per key, and which records the order in which calls start.
    let (gate_a, gate_b) = (Gate::new(), Gate::new());
    let started = Arc::new(Mutex::new(Vec::new()));
    let (log, inner_a, inner_b) = (Arc::clone(&started), gate_a.clone(), gate_b.clone());
    let svc = ServiceBuilder::new()
        .layer(SingleflightLayer::new(|req: &&'static str| *req))
        .layer(ConcurrencyLimitLayer::new(1))
        .service(service_fn(move |req: &'static str| {
            log.lock().unwrap().push(req);
            let wait = if req == "a" {
                inner_a.wait()
            } else {
                inner_b.wait()
            };
            async move {
                wait.await;
                Ok::<_, io::Error>(req)
            }
        }));

    // The leader for "b" takes the only slot.
    let b_leader = tokio::spawn(svc.clone().oneshot("b"));
    settle().await;
    assert_eq!(*started.lock().unwrap(), ["b"]);

    // A request for "a" queues for the slot.
    let a = tokio::spawn(svc.clone().oneshot("a"));
    settle().await;
    assert_eq!(*started.lock().unwrap(), ["b"]);

    // Five followers of "b" join, behind "a" in the slot's queue if they
    // were ever to ask for it.
    let b_followers: Vec<_> = (0..5)
        .map(|_| tokio::spawn(svc.clone().oneshot("b")))
        .collect();
    settle().await;

    // The call for "b" ends; "a" takes the slot and keeps it.
    gate_b.open();
    assert_eq!(within(b_leader).await.unwrap().unwrap(), "b");
    settle().await;
    assert_eq!(*started.lock().unwrap(), ["b", "a"]);

    // The followers of "b" complete while "a" holds the slot.
    for follower in b_followers {
        let outcome = tokio::time::timeout(Duration::from_secs(1), follower).await;
        assert_eq!(
            outcome
                .expect("a follower waited for the slot")
                .unwrap()
                .unwrap(),
            "b"
        );
    }
    assert!(!a.is_finished());
    assert_eq!(*started.lock().unwrap(), ["b", "a"]);

    // "a" ends in its turn.
    gate_a.open();
    assert_eq!(within(a).await.unwrap().unwrap(), "a");
}

#[tokio::test(flavor = "current_thread")]
async fn followers_never_poll_the_inner_service_for_readiness() {
    // A mock inner service with no capacity yet, probed for readiness polls.
    let (mock, mut handle) = tower_test::mock::pair::<String, String>();
    handle.allow(0);
    let probe = Arc::new(ProbeLog::default());
    let inner = Probe {
        inner: mock,
        id: 0,
        log: Arc::clone(&probe),
    };
    let mut svc = ServiceBuilder::new()
        .layer(SingleflightLayer::new(|req: &String| req.clone()))
        .service(inner);

    // The service is ready although the inner one is not.
    assert_ready_ok!(tokio_test::task::spawn(svc.ready()).poll());

    // The leader waits for the inner service inside its response future.
    let mut leader = tokio_test::task::spawn(svc.call("k".to_owned()));
    assert_pending!(leader.poll());
    let leader_polls = probe.ready_polls.lock().unwrap().clone();
    assert_eq!(leader_polls.len(), 1);

    // Five followers get through `poll_ready` and join, polling nothing.
    let mut followers = Vec::new();
    for _ in 0..5 {
        assert_ready_ok!(tokio_test::task::spawn(svc.ready()).poll());
        let mut follower = tokio_test::task::spawn(svc.call("k".to_owned()));
        assert_pending!(follower.poll());
        followers.push(follower);
    }
    assert_eq!(*probe.ready_polls.lock().unwrap(), leader_polls);

    // Capacity comes: the flight's one request reaches the mock. Shared, the
    // call is driven by a task of its own, which runs as this test awaits.
    handle.allow(1);
    let (request, respond) = handle.next_request().await.unwrap();
    assert_eq!(request, "k");
    respond.send_response("v".to_owned());
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert!(leader.is_woken());
    assert_eq!(assert_ready_ok!(leader.poll()), "v");
    for follower in &mut followers {
        assert!(follower.is_woken());
        assert_eq!(assert_ready_ok!(follower.poll()), "v");
    }

    // Only the leader's clone was ever polled, and only one request was sent.
    let pollers: BTreeSet<usize> = probe.ready_polls.lock().unwrap().iter().copied().collect();
    assert_eq!(pollers.len(), 1);
    assert_eq!(probe.calls.load(SeqCst), 1);
    drop((svc, leader, followers));
    assert!(handle.next_request().await.is_none());
}

#[tokio::test(flavor = "current_thread")]
async fn a_declined_request_waits_for_inner_readiness_in_its_response_future() {
    // A mock inner service with no capacity yet; every request is declined.
    let (mock, mut handle) = tower_test::mock::pair::<u32, u32>();
    handle.allow(0);
    let mut svc = ServiceBuilder::new()
        .layer(SingleflightLayer::new(optional(|_: &u32| None::<u32>)))
        .service(mock);

    // `poll_ready` is ready; the response future waits for capacity.
    assert_ready_ok!(tokio_test::task::spawn(svc.ready()).poll());
    let bypass = svc.call(3);
    assert_eq!(bypass.role(), Role::Bypass);
    let mut bypass = tokio_test::task::spawn(bypass);
    assert_pending!(bypass.poll());

    // Capacity comes: the request goes through as it was.
    handle.allow(1);
    assert_pending!(bypass.poll());
    let (request, respond) = handle.next_request().await.unwrap();
    assert_eq!(request, 3);
    respond.send_response(30);
    assert_eq!(assert_ready_ok!(bypass.poll()), 30);
}

// --- R2: memory follows the calls in progress ---

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn no_entry_survives_a_success_a_failure_a_panic_a_cancellation_or_a_wait_limit() {
    let group = Group::<&str, u32>::new();
    let impatient = group
        .clone()
        .follower_wait_limit(Duration::from_millis(10), OnWaitLimit::Fail);
    let fallback = group
        .clone()
        .follower_wait_limit(Duration::from_millis(10), OnWaitLimit::CallOwn);
    let slow = || async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        Ok::<_, io::Error>(1)
    };

    // A success, a failure and a panic, each with a follower.
    let ok = tokio::join!(group.run("ok", slow), group.run("ok", slow));
    assert!(ok.0.is_ok() && ok.1.is_ok());
    let failing = || async { Err::<u32, _>(io::Error::other("no")) };
    let failed = tokio::join!(group.run("err", failing), group.run("err", failing));
    assert!(failed.0.is_err() && failed.1.is_err());
    let panicking = || async {
        panic!("boom");
        #[allow(unreachable_code)]
        Ok::<u32, io::Error>(0)
    };
    let panicked = tokio::join!(group.run("panic", panicking), group.run("panic", panicking));
    assert!(panicked.0.unwrap_err().is_panic() && panicked.1.unwrap_err().is_panic());

    // A flight whose every waiter gives up.
    let gave_up = tokio::join!(
        tokio::time::timeout(Duration::from_millis(5), group.run("cancel", slow)),
        tokio::time::timeout(Duration::from_millis(5), group.run("cancel", slow)),
    );
    assert!(gave_up.0.is_err() && gave_up.1.is_err());

    // Followers past their wait limit, failing or calling on their own.
    let limited = tokio::join!(
        group.run("limit", slow),
        impatient.run("limit", slow),
        fallback.run("limit", slow),
    );
    assert!(limited.0.is_ok() && limited.1.unwrap_err().is_wait_limit() && limited.2.is_ok());

    // Nothing is left: no key, no flight, no waiter.
    assert_eq!(group.len(), 0);
    let stats = group.stats();
    assert_eq!((stats.flights, stats.waiters), (0, 0));
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_finished_flight_keeps_no_copy_of_its_outcome_once_its_waiters_are_gone() {
    let group = Group::<&str, Arc<str>>::new();
    let gate = Gate::new();
    let value: Arc<str> = Arc::from("big response");

    // A leader, a follower that takes the outcome and one that never does.
    let (wait, outcome) = (gate.wait(), Arc::clone(&value));
    let leader = group.run("k", move || async move {
        wait.await;
        Ok::<_, io::Error>(outcome)
    });
    let taker = group.run("k", || async { Ok::<_, io::Error>(Arc::from("")) });
    let idle = group.run("k", || async { Ok::<_, io::Error>(Arc::from("")) });

    // The call ends; the leader and the taker get their copies.
    gate.open();
    let copies = [within(leader).await.unwrap(), within(taker).await.unwrap()];
    assert!(copies.iter().all(|copy| Arc::ptr_eq(copy, &value)));

    // Once every copy and the idle waiter are gone, nothing holds the value.
    drop(copies);
    drop(idle);
    assert_eq!(Arc::strong_count(&value), 1);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_follower_polled_with_many_wakers_is_kept_with_only_the_last() {
    let group = Group::<&str, u32>::new();
    let gate = Gate::new();

    // A flight in progress, and a follower polled with fifty distinct wakers.
    let wait = gate.wait();
    let mut leader = Box::pin(group.run("k", move || async move {
        wait.await;
        Ok::<_, io::Error>(7)
    }));
    assert_pending!(futures::poll!(leader.as_mut()));
    let mut follower = Box::pin(group.run("k", || async { Ok::<_, io::Error>(0) }));
    let wakers: Vec<Arc<WakeCount>> = (0..50).map(|_| Arc::default()).collect();
    for count in &wakers {
        let waker = Waker::from(Arc::clone(count));
        let polled = follower.as_mut().poll(&mut Context::from_waker(&waker));
        assert!(polled.is_pending());
    }

    // The flight holds the last waker only.
    let held: Vec<usize> = wakers
        .iter()
        .map(|count| Arc::strong_count(count) - 1)
        .collect();
    assert_eq!(held[..49], [0; 49]);
    assert_eq!(held[49], 1);

    // When the follower leaves, the flight lets go of that one too.
    drop(follower);
    assert_eq!(Arc::strong_count(&wakers[49]), 1);
    gate.open();
    assert_eq!(within(leader).await.unwrap(), 7);
}

// --- R3: forget and counters ---

/// Every counter of `group`, in the order of the fields of [`Stats`].
fn counters<K, T>(group: &Group<K, T>) -> [u64; 6]
where
    K: std::hash::Hash + Eq + Send + Sync + 'static,
    T: Clone + Send + 'static,
{
    let stats = group.stats();
    let gauges = [stats.flights, stats.waiters];
    let totals = [
        stats.leaders,
        stats.followers,
        stats.panics,
        stats.abandoned,
    ];
    [
        gauges[0], gauges[1], totals[0], totals[1], totals[2], totals[3],
    ]
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn forget_lets_new_callers_start_a_new_flight_while_current_waiters_get_the_old_outcome() {
    let group = Group::<&str, &str>::new();
    let (old_gate, new_gate) = (Gate::new(), Gate::new());

    // A flight with a leader and a follower.
    let mut old_leader = Box::pin(group.run("k", gated(&old_gate, "old")));
    assert_pending!(futures::poll!(old_leader.as_mut()));
    let old_follower = group.run("k", gated(&old_gate, "unused"));

    // Forgotten: the next callers lead and follow a new flight.
    assert!(group.forget(&"k"));
    assert_eq!(group.len(), 0);
    let mut new_leader = Box::pin(group.run("k", gated(&new_gate, "new")));
    assert_eq!(new_leader.role(), Role::Leader);
    assert_pending!(futures::poll!(new_leader.as_mut()));
    let new_follower = group.run("k", gated(&new_gate, "unused"));
    assert_eq!(new_follower.role(), Role::Follower);

    // The old call ends: its waiters get the old outcome, and the new
    // flight is still the one new callers join.
    old_gate.open();
    assert_eq!(within(old_leader.as_mut()).await.unwrap(), "old");
    assert_eq!(within(old_follower).await.unwrap(), "old");
    assert_eq!(group.len(), 1);
    let late = group.run("k", gated(&new_gate, "unused"));
    assert_eq!(late.role(), Role::Follower);

    // The new call ends for the new waiters.
    new_gate.open();
    assert_eq!(within(new_leader.as_mut()).await.unwrap(), "new");
    assert_eq!(within(new_follower).await.unwrap(), "new");
    assert_eq!(within(late).await.unwrap(), "new");
    assert!(!group.forget(&"k"));
    assert_eq!(group.stats().leaders, 2);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn the_counters_follow_a_scripted_scenario_exactly() {
    let group = Group::<&str, &str>::new();
    let (gate_a, gate_b) = (Gate::new(), Gate::new());
    assert_eq!(group.stats(), Stats::default());

    // "a": a leader and two followers.
    let mut a_leader = Box::pin(group.run("a", gated(&gate_a, "a")));
    assert_pending!(futures::poll!(a_leader.as_mut()));
    let a_first = group.run("a", gated(&gate_a, "a"));
    let mut a_second = Box::pin(group.run("a", gated(&gate_a, "a")));
    assert_eq!(counters(&group), [1, 3, 1, 2, 0, 0]);

    // "b": a lone leader.
    let mut b_leader = Box::pin(group.run("b", gated(&gate_b, "b")));
    assert_pending!(futures::poll!(b_leader.as_mut()));
    assert_eq!(counters(&group), [2, 4, 2, 2, 0, 0]);

    // A follower of "a" leaves.
    drop(a_first);
    assert_eq!(counters(&group), [2, 3, 2, 2, 0, 0]);

    // "a" ends: the leader is done; the follower waits until it takes it.
    gate_a.open();
    assert_eq!(within(a_leader.as_mut()).await.unwrap(), "a");
    assert_eq!(counters(&group), [1, 2, 2, 2, 0, 0]);
    assert_eq!(within(a_second.as_mut()).await.unwrap(), "a");
    assert_eq!(counters(&group), [1, 1, 2, 2, 0, 0]);

    // "b" is abandoned by its only waiter.
    drop(b_leader);
    assert_eq!(counters(&group), [0, 0, 2, 2, 0, 1]);

    // "c" panics.
    let panicked = group
        .run("c", || async {
            panic!("boom");
            #[allow(unreachable_code)]
            Ok::<&str, io::Error>("c")
        })
        .await;
    assert!(panicked.unwrap_err().is_panic());
    assert_eq!(counters(&group), [0, 0, 3, 2, 1, 1]);
    gate_b.open();
}

// --- the layer in tower stacks ---

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_timeout_above_the_layer_fails_only_the_caller_that_timed_out() {
    // A 100 ms timeout above the layer, over a call that takes 150 ms.
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&calls);
    let svc = ServiceBuilder::new()
        .layer(TimeoutLayer::new(Duration::from_millis(100)))
        .layer(SingleflightLayer::new(|req: &u32| *req))
        .service(service_fn(move |req: u32| {
            counter.fetch_add(1, SeqCst);
            async move {
                tokio::time::sleep(Duration::from_millis(150)).await;
                Ok::<_, io::Error>(req * 2)
            }
        }));

    // The leader arrives at 0 ms, a follower at 60 ms.
    let leader = tokio::spawn(svc.clone().oneshot(21));
    tokio::time::sleep(Duration::from_millis(60)).await;
    let follower = tokio::spawn(svc.clone().oneshot(21));

    // The leader times out; the follower gets the value at 150 ms.
    let timed_out = within(leader).await.unwrap().unwrap_err();
    assert!(timed_out.downcast_ref::<Elapsed>().is_some());
    assert_eq!(within(follower).await.unwrap().unwrap(), 42);
    assert_eq!(calls.load(SeqCst), 1);
}
