//! Flights (F1–F8 of the contract): one inner call per key, made with the
//! leader's request, kept alive by its waiters, shared with every caller
//! waiting when it ends, and waited for without busy polling.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use futures::future::join_all;
use tokio::time::Instant;
use tokio_test::{assert_pending, assert_ready_err, assert_ready_ok};
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
use tower_singleflight::{Group, OnWaitLimit, Role, SingleflightLayer};

mod support;

use support::{settle, within, Gate, WakeCount};

// --- helpers ---

/// The future of a test's work.
type Call<T> = Pin<Box<dyn Future<Output = io::Result<T>> + Send>>;

/// What became of the calls that a test's work made.
#[derive(Default)]
struct Calls {
    started: AtomicUsize,
    finished: AtomicUsize,
    dropped: AtomicUsize,
    active: AtomicUsize,
    max_active: AtomicUsize,
}

impl Calls {
    /// Work that counts its call and yields `value` once `until` is done.
    fn work<T, F>(self: &Arc<Self>, until: F, value: T) -> impl FnOnce() -> Call<T> + Send
    where
        T: Send + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        let calls = Arc::clone(self);
        move || {
            calls.started.fetch_add(1, SeqCst);
            let live = Live::new(calls);
            Box::pin(async move {
                until.await;
                live.0.finished.fetch_add(1, SeqCst);
                Ok(value)
            })
        }
    }

    fn gated<T: Send + 'static>(
        self: &Arc<Self>,
        gate: &Gate,
        value: T,
    ) -> impl FnOnce() -> Call<T> + Send {
        self.work(gate.wait(), value)
    }

    fn sleeping<T: Send + 'static>(
        self: &Arc<Self>,
        time: Duration,
        value: T,
    ) -> impl FnOnce() -> Call<T> + Send {
        self.work(async move { tokio::time::sleep(time).await }, value)
    }

    fn ready<T: Send + 'static>(self: &Arc<Self>, value: T) -> impl FnOnce() -> Call<T> + Send {
        self.work(async {}, value)
    }

    fn started(&self) -> usize {
        self.started.load(SeqCst)
    }

    fn finished(&self) -> usize {
        self.finished.load(SeqCst)
    }

    fn dropped(&self) -> usize {
        self.dropped.load(SeqCst)
    }
}

/// Marks a call as alive from its start until its future is dropped.
struct Live(Arc<Calls>);

impl Live {
    fn new(calls: Arc<Calls>) -> Self {
        let now = calls.active.fetch_add(1, SeqCst) + 1;
        calls.max_active.fetch_max(now, SeqCst);
        Self(calls)
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, SeqCst);
        self.0.dropped.fetch_add(1, SeqCst);
    }
}

/// A future polled by hand, with its own counting waker.
struct Manual<F> {
    future: Pin<Box<F>>,
    wakes: Arc<WakeCount>,
    polls: usize,
}

impl<F: Future> Manual<F> {
    fn new(future: F) -> Self {
        Self {
            future: Box::pin(future),
            wakes: Arc::default(),
            polls: 0,
        }
    }

    fn poll(&mut self) -> Poll<F::Output> {
        self.polls += 1;
        let waker = Waker::from(Arc::clone(&self.wakes));
        self.future.as_mut().poll(&mut Context::from_waker(&waker))
    }

    fn wakes(&self) -> usize {
        self.wakes.0.load(SeqCst)
    }
}

/// Counts the polls of the future it wraps.
struct CountPolls<F> {
    future: Pin<Box<F>>,
    polls: Arc<AtomicUsize>,
}

impl<F: Future> Future for CountPolls<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.polls.fetch_add(1, SeqCst);
        self.future.as_mut().poll(cx)
    }
}

/// A small deterministic pseudo-random sequence.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, bound: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % bound
    }
}

// --- F1: one inner call per key ---

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn concurrent_requests_for_one_key_make_one_inner_call() {
    // An inner service that counts its calls and waits on a gate.
    let calls = Arc::new(AtomicUsize::new(0));
    let gate = Gate::new();
    let (counter, inner_gate) = (Arc::clone(&calls), gate.clone());
    let svc = ServiceBuilder::new()
        .layer(SingleflightLayer::new(|req: &String| req.clone()))
        .service(service_fn(move |req: String| {
            counter.fetch_add(1, SeqCst);
            let wait = inner_gate.wait();
            async move {
                wait.await;
                Ok::<_, io::Error>(format!("value of {req}"))
            }
        }));

    // Fifty callers for one key, all in progress at once.
    let callers: Vec<_> = (0..50)
        .map(|_| tokio::spawn(svc.clone().oneshot("k".to_owned())))
        .collect();
    settle().await;

    // The call ends: all have the value, from a single inner call.
    gate.open();
    for caller in callers {
        assert_eq!(within(caller).await.unwrap().unwrap(), "value of k");
    }
    assert_eq!(calls.load(SeqCst), 1);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn at_most_one_inner_call_per_key_runs_whatever_the_arrivals_completions_and_cancellations() {
    for run_to_completion in [false, true] {
        let group = Group::<u8, usize>::new().run_to_completion(run_to_completion);
        let per_key: Vec<Arc<Calls>> = (0..3).map(|_| Arc::default()).collect();
        let mut rng = Lcg(0x5eed + u64::from(run_to_completion));

        // Three hundred callers over three keys, arriving at random moments;
        // a third of them give up after a random while, leaders included.
        let mut callers = Vec::new();
        for caller in 0..300 {
            let key = rng.below(3) as u8;
            let arrival = Duration::from_millis(rng.below(1_000));
            let length = Duration::from_millis(20 + rng.below(80));
            let patience = (rng.below(3) == 0).then(|| Duration::from_millis(rng.below(60)));
            let (group, calls) = (group.clone(), Arc::clone(&per_key[usize::from(key)]));
            let waiting = async move {
                tokio::time::sleep(arrival).await;
                let run = group.run(key, calls.sleeping(length, caller));
                match patience {
                    Some(patience) => drop(tokio::time::timeout(patience, run).await),
                    None => drop(run.await.expect("a call that cannot fail")),
                }
            };
            callers.push(tokio::spawn(waiting));
        }
        for caller in callers {
            within(caller).await.unwrap();
        }
        tokio::time::sleep(Duration::from_secs(1)).await;

        // Never two calls of one key alive at once, and coalescing happened.
        let started: usize = per_key.iter().map(|calls| calls.started()).sum();
        for calls in &per_key {
            assert_eq!(calls.max_active.load(SeqCst), 1);
            assert_eq!(calls.active.load(SeqCst), 0);
        }
        assert!(
            (30..200).contains(&started),
            "{started} calls for 300 callers"
        );
        assert_eq!(group.len(), 0);
        assert_eq!((group.stats().flights, group.stats().waiters), (0, 0));
    }
}

// --- F2: the leader's request only ---

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_flight_sends_only_the_leader_request_and_drops_each_follower_request_on_joining() {
    /// A request that counts its drops.
    struct Req {
        caller: usize,
        drops: Arc<AtomicUsize>,
    }
    impl Drop for Req {
        fn drop(&mut self) {
            self.drops.fetch_add(1, SeqCst);
        }
    }

    // An inner service that records which caller's request it received.
    let (seen, drops, gate) = (
        Arc::new(Mutex::new(Vec::new())),
        Arc::default(),
        Gate::new(),
    );
    let (record, inner_gate) = (Arc::clone(&seen), gate.clone());
    let mut svc = ServiceBuilder::new()
        .layer(SingleflightLayer::new(|_: &Req| "one key"))
        .service(service_fn(move |req: Req| {
            record.lock().unwrap().push(req.caller);
            let (wait, caller) = (inner_gate.wait(), req.caller);
            async move {
                wait.await;
                Ok::<_, io::Error>(format!("response to {caller}"))
            }
        }));
    let req = |caller| Req {
        caller,
        drops: Arc::clone(&drops),
    };

    // The leader, then five followers: theirs are dropped as they join.
    let mut calls = vec![svc.ready().await.unwrap().call(req(0))];
    for caller in 1..=5 {
        calls.push(svc.ready().await.unwrap().call(req(caller)));
    }
    assert_eq!(drops.load(SeqCst), 5);

    // The one inner call carries the leader's request; all get its response.
    gate.open();
    for response in within(join_all(calls)).await {
        assert_eq!(response.unwrap(), "response to 0");
    }
    assert_eq!(*seen.lock().unwrap(), [0]);
    assert_eq!(drops.load(SeqCst), 6);
}

// --- F3: the call outlives its leader ---

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn dropping_the_leader_neither_cancels_nor_restarts_the_call_nor_fails_the_followers() {
    let group = Group::<&str, u32>::new();
    let (calls, gate) = (Arc::new(Calls::default()), Gate::new());

    // The leader starts the call, and three followers join it.
    let mut leader = Box::pin(group.run("k", calls.gated(&gate, 7)));
    assert_pending!(futures::poll!(leader.as_mut()));
    let followers: Vec<_> = (0..3)
        .map(|_| tokio::spawn(group.run("k", calls.ready(0))))
        .collect();
    settle().await;

    // The leader leaves while the call is in progress.
    drop(leader);
    settle().await;
    assert_eq!((calls.started(), calls.dropped()), (1, 0));
    assert_eq!(group.len(), 1);

    // The same call finishes, once, for the followers.
    gate.open();
    for follower in followers {
        assert_eq!(within(follower).await.unwrap().unwrap(), 7);
    }
    assert_eq!(
        (calls.started(), calls.finished(), calls.dropped()),
        (1, 1, 1)
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_departing_leader_wakes_no_one_as_the_shared_call_runs_in_its_own_task() {
    let group = Group::<&str, u32>::new();
    let (calls, gate) = (Arc::new(Calls::default()), Gate::new());

    // The leader starts the call; three followers register, and the call,
    // now shared, moves to a task of its own.
    let mut leader = Manual::new(group.run("k", calls.gated(&gate, 7)));
    assert_pending!(leader.poll());
    let mut followers: Vec<_> = (0..3)
        .map(|_| Manual::new(group.run("k", calls.ready(0))))
        .collect();
    for follower in &mut followers {
        assert_pending!(follower.poll());
    }
    settle().await;

    // The leader leaves: nobody is woken, the call goes on.
    drop(leader);
    settle().await;
    assert!(followers.iter().all(|follower| follower.wakes() == 0));
    assert_eq!((calls.started(), calls.dropped()), (1, 0));

    // The call ends: each follower is woken once, by the outcome.
    gate.open();
    settle().await;
    for follower in &mut followers {
        assert_eq!(follower.wakes(), 1);
        assert_eq!(assert_ready_ok!(follower.poll()), 7);
    }
    assert_eq!((calls.started(), calls.finished()), (1, 1));
}

#[test]
fn without_a_runtime_the_last_caller_to_poll_hands_the_call_to_exactly_one_other() {
    let group = Group::<&str, u32>::new();
    let (calls, gate) = (Arc::new(Calls::default()), Gate::new());

    // With no runtime to spawn a task on, the callers drive the call: each
    // poll of a waiting caller polls it, and the last one to do so is the one
    // the call wakes.
    let mut leader = Manual::new(group.run("k", calls.gated(&gate, 7)));
    assert_pending!(leader.poll());
    let mut followers: Vec<_> = (0..3)
        .map(|_| Manual::new(group.run("k", calls.ready(0))))
        .collect();
    for follower in &mut followers {
        assert_pending!(follower.poll());
    }

    // The last to poll leaves: exactly one other caller is woken to take up
    // the call, which goes on without a restart.
    drop(followers.pop());
    let woken: Vec<usize> = followers.iter().map(Manual::wakes).collect();
    assert_eq!((leader.wakes(), woken), (1, vec![0, 0]));
    assert_pending!(leader.poll());
    assert_eq!((calls.started(), calls.dropped()), (1, 0));

    // The call ends: it wakes the one that polled it last, which publishes;
    // every other caller is woken once, by the outcome.
    gate.open();
    assert_eq!(leader.wakes(), 2);
    assert_eq!(assert_ready_ok!(leader.poll()), 7);
    for follower in &mut followers {
        assert_eq!(follower.wakes(), 1);
        assert_eq!(assert_ready_ok!(follower.poll()), 7);
    }
    assert_eq!((calls.started(), calls.finished()), (1, 1));
}

// --- F4: the last waiter out ---

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn the_call_is_dropped_as_soon_as_its_last_waiter_leaves_and_the_key_is_free() {
    let group = Group::<&str, u32>::new();
    let (calls, gate) = (Arc::new(Calls::default()), Gate::new());

    // A leader with two followers; the call waits on a gate that stays shut.
    let mut leader = Box::pin(group.run("k", calls.gated(&gate, 7)));
    assert_pending!(futures::poll!(leader.as_mut()));
    let first = group.run("k", calls.ready(0));
    let mut second = Box::pin(group.run("k", calls.ready(0)));
    assert_pending!(futures::poll!(second.as_mut()));

    // While anyone waits, the call lives.
    drop(first);
    drop(leader);
    assert_eq!((calls.dropped(), group.len()), (0, 1));

    // The last waiter leaves: the call is dropped at once, the key freed.
    drop(second);
    assert_eq!(
        (calls.started(), calls.dropped(), calls.finished()),
        (1, 1, 0)
    );
    assert_eq!(group.len(), 0);
    let stats = group.stats();
    assert_eq!((stats.flights, stats.waiters, stats.abandoned), (0, 0, 1));

    // The next caller leads a new flight.
    let next = group.run("k", calls.ready(8));
    assert_eq!(next.role(), Role::Leader);
    assert_eq!(within(next).await.unwrap(), 8);
    assert_eq!(calls.started(), 2);
}

#[tokio::test(flavor = "current_thread")]
async fn with_run_to_completion_an_abandoned_call_finishes_and_its_outcome_goes_to_no_one() {
    let group = Group::<&str, Arc<str>>::new().run_to_completion(true);
    let (calls, gate) = (Arc::new(Calls::default()), Gate::new());
    let value: Arc<str> = Arc::from("filled the cache");

    // The leader starts the call, then leaves.
    let mut leader = Box::pin(group.run("k", calls.gated(&gate, Arc::clone(&value))));
    assert_pending!(futures::poll!(leader.as_mut()));
    drop(leader);
    settle().await;
    assert_eq!(calls.dropped(), 0);
    assert_eq!(group.len(), 1);
    let stats = group.stats();
    assert_eq!((stats.flights, stats.waiters, stats.abandoned), (1, 0, 0));

    // The call runs on to its end, and nobody keeps its outcome.
    gate.open();
    settle().await;
    assert_eq!(
        (calls.started(), calls.finished(), calls.dropped()),
        (1, 1, 1)
    );
    assert_eq!(Arc::strong_count(&value), 1);
    assert_eq!(group.len(), 0);
    let stats = group.stats();
    assert_eq!((stats.flights, stats.waiters, stats.abandoned), (0, 0, 0));
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_caller_arriving_while_an_abandoned_call_runs_to_completion_joins_it() {
    let group = Group::<&str, u32>::new().run_to_completion(true);
    let (calls, gate) = (Arc::new(Calls::default()), Gate::new());

    // The leader starts the call, then leaves.
    let mut leader = Box::pin(group.run("k", calls.gated(&gate, 7)));
    assert_pending!(futures::poll!(leader.as_mut()));
    drop(leader);
    settle().await;

    // A new caller joins the running call instead of starting another.
    let mut late = Box::pin(group.run("k", calls.ready(8)));
    assert_eq!(late.role(), Role::Follower);
    gate.open();
    assert_eq!(within(late.as_mut()).await.unwrap(), 7);
    assert!(late.is_shared());
    assert_eq!(calls.started(), 1);
    let stats = group.stats();
    assert_eq!((stats.leaders, stats.followers, stats.waiters), (1, 1, 0));
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn the_layer_run_to_completion_lets_an_abandoned_inner_call_finish() {
    // An inner service whose call takes 100 ms and records that it ended.
    let finished = Arc::new(AtomicUsize::new(0));
    let done = Arc::clone(&finished);
    let svc = ServiceBuilder::new()
        .layer(SingleflightLayer::new(|req: &u32| *req).run_to_completion(true))
        .service(service_fn(move |req: u32| {
            let done = Arc::clone(&done);
            async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                done.fetch_add(1, SeqCst);
                Ok::<_, io::Error>(req)
            }
        }));

    // The only caller gives up after 10 ms.
    let gave_up = tokio::time::timeout(Duration::from_millis(10), svc.oneshot(1)).await;
    assert!(gave_up.is_err());

    // The inner call still ends.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(finished.load(SeqCst), 1);
}

// --- F5: the outcome goes to the waiters of the moment, and only to them ---

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_finished_flight_never_hands_its_outcome_to_a_later_caller() {
    let group = Group::<&str, u32>::new();
    let (calls, gate) = (Arc::new(Calls::default()), Gate::new());

    // A leader, and a follower that is not polled before the call ends.
    let leader = group.run("k", calls.gated(&gate, 1));
    let mut idle = Box::pin(group.run("k", calls.ready(0)));

    // The call ends: the key is free at once, though the idle follower has
    // not taken its outcome yet.
    gate.open();
    assert_eq!(within(leader).await.unwrap(), 1);
    assert_eq!(group.len(), 0);

    // A later caller starts a new flight and gets the new call's value.
    let mut later = Box::pin(group.run("k", calls.ready(2)));
    assert_eq!(later.role(), Role::Leader);
    assert_eq!(within(later.as_mut()).await.unwrap(), 2);
    assert!(!later.is_shared());
    assert_eq!(calls.started(), 2);

    // The idle follower still gets the outcome of the flight it joined.
    assert_eq!(within(idle.as_mut()).await.unwrap(), 1);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn an_idle_follower_delays_no_one_else() {
    let group = Group::<&str, u32>::new();
    let (calls, gate) = (Arc::new(Calls::default()), Gate::new());

    // A leader, a follower nobody polls, and three active followers.
    let leader = tokio::spawn(group.run("k", calls.gated(&gate, 7)));
    let idle = group.run("k", calls.ready(0));
    let active: Vec<_> = (0..3)
        .map(|_| tokio::spawn(group.run("k", calls.ready(0))))
        .collect();
    settle().await;

    // The call ends: all but the idle follower are done, and the key is free.
    gate.open();
    assert_eq!(within(leader).await.unwrap().unwrap(), 7);
    for follower in active {
        assert_eq!(within(follower).await.unwrap().unwrap(), 7);
    }
    assert_eq!(group.len(), 0);
    assert_eq!(group.stats().waiters, 1);

    // The idle follower leaves without ever being polled.
    drop(idle);
    assert_eq!(group.stats().waiters, 0);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn an_idle_leader_delays_no_one_else() {
    let group = Group::<&str, u32>::new();
    let calls = Arc::new(Calls::default());

    // A leader whose caller does not poll it yet; its call takes 10 ms.
    let idle_leader = group.run("k", calls.sleeping(Duration::from_millis(10), 7));

    // A follower should have the outcome well within a second.
    let follower = group.run("k", calls.ready(0));
    let outcome = tokio::time::timeout(Duration::from_secs(1), follower).await;
    assert!(outcome.is_ok(), "the follower waited on its idle leader");
    assert_eq!(outcome.unwrap().unwrap(), 7);
    drop(idle_leader);
}

// --- F6: leaving changes nothing for the others ---

#[tokio::test(flavor = "current_thread")]
async fn a_follower_leaving_changes_nothing_for_the_other_waiters() {
    let group = Group::<&str, u32>::new();
    let (calls, gate) = (Arc::new(Calls::default()), Gate::new());

    // A leader and three followers, all waiting.
    let mut leader = Manual::new(group.run("k", calls.gated(&gate, 7)));
    assert_pending!(leader.poll());
    let mut followers: Vec<_> = (0..3)
        .map(|_| Manual::new(group.run("k", calls.ready(0))))
        .collect();
    for follower in &mut followers {
        assert_pending!(follower.poll());
    }
    settle().await;

    // One follower leaves: nobody is woken, the call goes on.
    drop(followers.remove(1));
    assert_eq!(
        leader.wakes() + followers.iter().map(Manual::wakes).sum::<usize>(),
        0
    );
    assert_eq!((calls.dropped(), group.stats().waiters), (0, 3));

    // The others get the outcome of the one call, woken once each.
    gate.open();
    settle().await;
    assert_eq!(leader.wakes(), 1);
    assert_eq!(assert_ready_ok!(leader.poll()), 7);
    for follower in &mut followers {
        assert_eq!(follower.wakes(), 1);
        assert_eq!(assert_ready_ok!(follower.poll()), 7);
    }
    assert_eq!(calls.started(), 1);
}

// --- F7: no busy waiting ---

#[tokio::test(flavor = "current_thread")]
async fn every_waiting_caller_is_woken_once_when_the_outcome_is_ready_and_polled_twice() {
    let group = Group::<&str, u32>::new();

    // The call takes three steps, each a wake-up of whoever polls it.
    let (steps, mut step) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut leader = Manual::new(group.run("k", move || async move {
        for _ in 0..3 {
            step.recv().await;
        }
        Ok::<_, io::Error>(7)
    }));
    assert_pending!(leader.poll());

    // Ten followers poll once, to register; the shared call moves to a task.
    let mut followers: Vec<_> = (0..10)
        .map(|_| Manual::new(group.run("k", || async { Ok::<_, io::Error>(0) })))
        .collect();
    for follower in &mut followers {
        assert_pending!(follower.poll());
    }
    settle().await;

    // Two steps: the task works, every caller sleeps.
    for _ in 0..2 {
        steps.send(()).unwrap();
        settle().await;
    }
    assert_eq!(leader.wakes(), 0);
    assert!(followers.iter().all(|follower| follower.wakes() == 0));

    // The last step: the outcome is ready, and each caller is woken once.
    steps.send(()).unwrap();
    settle().await;
    assert_eq!(assert_ready_ok!(leader.poll()), 7);
    assert_eq!((leader.polls, leader.wakes()), (2, 1));
    for follower in &mut followers {
        assert_eq!(assert_ready_ok!(follower.poll()), 7);
        assert_eq!((follower.polls, follower.wakes()), (2, 1));
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn followers_are_polled_twice_however_many_steps_the_call_takes() {
    let group = Group::<&str, u32>::new();

    // The leader's call wakes its task fifty times before it ends.
    let leader = tokio::spawn(group.run("k", || async {
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok::<_, io::Error>(7)
    }));

    // Ten followers on the runtime, each counting its polls.
    let polls: Vec<Arc<AtomicUsize>> = (0..10).map(|_| Arc::default()).collect();
    let followers: Vec<_> = polls
        .iter()
        .map(|polls| {
            let future = Box::pin(group.run("k", || async { Ok::<_, io::Error>(0) }));
            let polls = Arc::clone(polls);
            tokio::spawn(CountPolls { future, polls })
        })
        .collect();

    // Everyone gets the value; each follower was polled exactly twice.
    assert_eq!(within(leader).await.unwrap().unwrap(), 7);
    for follower in followers {
        assert_eq!(within(follower).await.unwrap().unwrap(), 7);
    }
    for polls in &polls {
        assert_eq!(polls.load(SeqCst), 2);
    }
}

// --- F8: the follower wait limit ---

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_follower_reaching_its_wait_limit_fails_at_that_instant_and_the_flight_goes_on() {
    let group = Group::<&str, u32>::new();
    let impatient = group
        .clone()
        .follower_wait_limit(Duration::from_millis(100), OnWaitLimit::Fail);
    let calls = Arc::new(Calls::default());

    // A leader whose call takes a second, and a follower with no limit.
    let leader = tokio::spawn(group.run("k", calls.sleeping(Duration::from_secs(1), 7)));
    let patient = tokio::spawn(group.run("k", calls.ready(0)));
    settle().await;
    tokio::time::advance(Duration::from_millis(10)).await;

    // A follower with a 100 ms limit joins, 10 ms into the flight.
    let mut follower = tokio_test::task::spawn(impatient.run("k", calls.ready(0)));
    assert_pending!(follower.poll());

    // A millisecond short of its limit, it still waits.
    tokio::time::advance(Duration::from_millis(99)).await;
    assert!(!follower.is_woken());
    assert_pending!(follower.poll());

    // At its limit, it fails with the wait-limit error.
    tokio::time::advance(Duration::from_millis(1)).await;
    assert!(follower.is_woken());
    let error = assert_ready_err!(follower.poll());
    assert!(error.is_wait_limit());
    assert!(!error.is_panic() && error.inner().is_none());

    // The flight and its other waiters go on, untouched.
    assert_eq!((group.len(), group.stats().waiters), (1, 2));
    assert_eq!(within(leader).await.unwrap().unwrap(), 7);
    assert_eq!(within(patient).await.unwrap().unwrap(), 7);
    assert_eq!(calls.started(), 1);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_follower_reaching_its_wait_limit_can_make_an_unshared_call_of_its_own() {
    let group = Group::<&str, u32>::new();
    let own = group
        .clone()
        .follower_wait_limit(Duration::from_millis(100), OnWaitLimit::CallOwn);
    let (calls, gate) = (Arc::new(Calls::default()), Gate::new());

    // A leader whose call waits on a gate, and a follower with a limit.
    let leader = tokio::spawn(group.run("k", calls.gated(&gate, 7)));
    settle().await;
    let mut follower = Box::pin(own.run("k", calls.ready(8)));
    assert_eq!(follower.role(), Role::Follower);

    // At its limit, the follower calls on its own and gets its own value.
    let joined = Instant::now();
    assert_eq!(within(follower.as_mut()).await.unwrap(), 8);
    assert_eq!(joined.elapsed(), Duration::from_millis(100));
    assert_eq!(follower.role(), Role::Fallback);
    assert!(!follower.is_shared());
    assert_eq!(calls.started(), 2);

    // The flight goes on for its leader.
    assert_eq!(group.len(), 1);
    gate.open();
    assert_eq!(within(leader).await.unwrap().unwrap(), 7);
    assert_eq!(calls.started(), 2);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_wait_limit_too_long_to_name_as_an_instant_is_no_limit() {
    let group = Group::<&str, u32>::new();
    let (calls, gate) = (Arc::new(Calls::default()), Gate::new());
    let leader = tokio::spawn(group.run("k", calls.gated(&gate, 7)));
    settle().await;

    // Both ways to act on the limit: the follower joins, and waits on.
    for then in [OnWaitLimit::Fail, OnWaitLimit::CallOwn] {
        let patient = group.clone().follower_wait_limit(Duration::MAX, then);
        let mut follower = tokio_test::task::spawn(patient.run("k", calls.ready(0)));
        assert_pending!(follower.poll());
        tokio::time::advance(Duration::from_secs(100 * 365 * 24 * 3600)).await;
        assert_pending!(follower.poll());
    }
    assert_eq!((calls.started(), group.stats().waiters), (1, 1));
    gate.open();
    assert_eq!(within(leader).await.unwrap().unwrap(), 7);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn through_the_layer_a_follower_past_its_limit_sends_its_own_request() {
    // An inner service that records requests; the first one never ends.
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    let mut svc = ServiceBuilder::new()
        .layer(
            SingleflightLayer::new(|_: &u32| "one key")
                .follower_wait_limit(Duration::from_millis(50), OnWaitLimit::CallOwn),
        )
        .service(service_fn(move |req: u32| {
            record.lock().unwrap().push(req);
            async move {
                if req == 1 {
                    std::future::pending::<()>().await;
                }
                Ok::<_, io::Error>(req * 10)
            }
        }));

    // The leader's request 1 is in flight; request 2 follows.
    let leader = tokio::spawn(svc.ready().await.unwrap().call(1));
    settle().await;
    let mut follower = Box::pin(svc.ready().await.unwrap().call(2));
    assert_eq!(follower.role(), Role::Follower);

    // Past the limit, request 2 reaches the inner service itself.
    assert_eq!(within(follower.as_mut()).await.unwrap(), 20);
    assert_eq!(follower.role(), Role::Fallback);
    assert_eq!(*seen.lock().unwrap(), [1, 2]);
    assert!(!leader.is_finished());
    leader.abort();
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn the_wait_limit_counts_from_the_moment_the_follower_joined() {
    let group = Group::<&str, u32>::new();
    let impatient = group
        .clone()
        .follower_wait_limit(Duration::from_millis(100), OnWaitLimit::Fail);
    let calls = Arc::new(Calls::default());

    // A leader whose call takes a second.
    let leader = tokio::spawn(group.run("k", calls.sleeping(Duration::from_secs(1), 7)));
    settle().await;

    // A follower joins, and is first polled 150 ms later: its limit has passed.
    let mut follower = tokio_test::task::spawn(impatient.run("k", calls.ready(0)));
    tokio::time::advance(Duration::from_millis(150)).await;
    assert!(assert_ready_err!(follower.poll()).is_wait_limit());
    assert_eq!(within(leader).await.unwrap().unwrap(), 7);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_leader_has_no_wait_limit() {
    let group = Group::<&str, u32>::new()
        .follower_wait_limit(Duration::from_millis(100), OnWaitLimit::Fail);
    let calls = Arc::new(Calls::default());

    // A leader of a limited group waits a whole second for its call.
    let joined = Instant::now();
    assert_eq!(
        group
            .run("k", calls.sleeping(Duration::from_secs(1), 7))
            .await
            .unwrap(),
        7
    );
    assert_eq!(joined.elapsed(), Duration::from_secs(1));
}

// --- a call that asks for its own key ---

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_call_that_asks_for_its_own_key_runs_unshared_instead_of_waiting_for_itself() {
    let group = Group::<u8, u32>::new();
    let inner = group.clone();

    // The call for key 1 asks the group for key 1 again, while it runs.
    let outer = group.run(1, move || async move {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let nested = inner.run(1, || async { Ok::<_, io::Error>(41) }).await;
        nested.map(|value| value + 1).map_err(io::Error::other)
    });

    // The nested call makes its own call rather than joining the flight it
    // is part of, and nothing is left behind.
    assert_eq!(within(outer).await.unwrap(), 42);
    assert_eq!(group.len(), 0);
    let stats = group.stats();
    assert_eq!((stats.leaders, stats.followers, stats.flights), (2, 0, 0));
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_call_that_asks_for_its_own_key_while_shared_runs_unshared_too() {
    let group = Group::<u8, u32>::new();
    let inner = group.clone();

    // Shared by two callers, the call runs in a task of its own; from there
    // it asks for its own key.
    let outer = group.run(1, move || async move {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let nested = inner.run(1, || async { Ok::<_, io::Error>(41) }).await;
        nested.map(|value| value + 1).map_err(io::Error::other)
    });
    let follower = group.run(1, || async { Ok::<_, io::Error>(0) });
    let (outer, follower) = tokio::join!(within(outer), within(follower));
    assert_eq!((outer.unwrap(), follower.unwrap()), (42, 42));
    assert_eq!(group.len(), 0);
}

#[test]
fn outside_a_runtime_run_to_completion_drops_an_abandoned_call_as_usual() {
    let group = Group::<&str, u32>::new().run_to_completion(true);
    let (calls, gate) = (Arc::new(Calls::default()), Gate::new());

    // Two callers poll the call by hand, with no runtime to spawn a task on.
    let mut leader = Manual::new(group.run("k", calls.gated(&gate, 7)));
    assert_pending!(leader.poll());
    let mut follower = Manual::new(group.run("k", calls.ready(0)));
    assert_pending!(follower.poll());

    // Both leave: with nothing to run it on, the call is dropped and the key
    // freed, rather than left parked with no one to drive it.
    drop((leader, follower));
    assert_eq!((calls.started(), calls.dropped()), (1, 1));
    assert_eq!(group.len(), 0);
    let stats = group.stats();
    assert_eq!((stats.flights, stats.abandoned), (0, 1));
}
