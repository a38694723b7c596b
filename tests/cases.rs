//! The coalescing failure cases (C01–C18 of `coalescing-cases.md`): real
//! singleflight bugs from other projects, each replayed as a scenario with
//! its exact expected outcome.
//!
//! Timed scenarios run on a paused clock, so every instant asserted here is
//! virtual milliseconds since the test started. The race scenario runs on
//! four worker threads in real time and asserts counts and values only.

mod support;

use std::error::Error as StdError;
use std::hash::{Hash, Hasher};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::error::Elapsed;
use tokio_test::assert_pending;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_singleflight::{Error, Group, Role, Singleflight, SingleflightLayer};

use support::{Clock, Probe, ProbeError, Req, Resp, Step};

// --- harness ---

/// How long any await may take before the test calls it a hang.
const GUARD: Duration = Duration::from_secs(1);

type Extract<Key> = fn(&Req) -> Key;
type Svc<Key> = Singleflight<Probe, Extract<Key>, Group<Key, Resp>>;

/// The service under test over `probe`, keyed by `extract`, and the group
/// that holds its flights.
fn stack<Key>(probe: &Probe, extract: Extract<Key>) -> (Svc<Key>, Group<Key, Resp>)
where
    Key: Hash + Eq + Send + Sync + 'static,
{
    let group = Group::new();
    let svc = ServiceBuilder::new()
        .layer(SingleflightLayer::new(extract).with_group(group.clone()))
        .service(probe.clone());
    (svc, group)
}

fn by_key(req: &Req) -> String {
    req.key.clone()
}

/// How a spawned caller ended, and when.
#[derive(Debug)]
struct Finished {
    /// `Err(Elapsed)` when the caller's own timeout fired first.
    result: Result<Result<Resp, Error>, Elapsed>,
    /// Time since the test started.
    at: Duration,
}

/// Spawns a caller that sends `req` at `at` ms, with a timeout of
/// `timeout` ms if one is given.
fn spawn_caller<Key>(
    svc: &Svc<Key>,
    clock: Clock,
    at: u64,
    req: Req,
    timeout: Option<u64>,
) -> JoinHandle<Finished>
where
    Key: Hash + Eq + Send + Sync + 'static,
{
    let svc = svc.clone();
    tokio::spawn(async move {
        clock.sleep_until(at).await;
        let call = svc.oneshot(req);
        let result = match timeout {
            Some(ms) => tokio::time::timeout(Duration::from_millis(ms), call).await,
            None => Ok(call.await),
        };
        let at = clock.elapsed();
        Finished { result, at }
    })
}

/// A caller with no timeout of its own.
fn caller<Key>(svc: &Svc<Key>, clock: Clock, at: u64, req: Req) -> JoinHandle<Finished>
where
    Key: Hash + Eq + Send + Sync + 'static,
{
    spawn_caller(svc, clock, at, req, None)
}

/// A caller that gives up after `timeout` ms.
fn impatient<Key>(
    svc: &Svc<Key>,
    clock: Clock,
    at: u64,
    req: Req,
    timeout: u64,
) -> JoinHandle<Finished>
where
    Key: Hash + Eq + Send + Sync + 'static,
{
    spawn_caller(svc, clock, at, req, Some(timeout))
}

/// Waits for a caller's task, within the guard.
async fn finish(handle: JoinHandle<Finished>) -> Finished {
    tokio::time::timeout(GUARD, handle)
        .await
        .expect("caller still pending after the 1 s guard")
        .expect("caller task panicked")
}

/// Waits for every caller's task, in order, within the guard.
async fn finish_all(handles: Vec<JoinHandle<Finished>>) -> Vec<Finished> {
    let mut finished = Vec::with_capacity(handles.len());
    for handle in handles {
        finished.push(finish(handle).await);
    }
    finished
}

const fn ms(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

/// The `ProbeError` code reachable from `error`, checked two ways: walking
/// the `source()` chain and the typed accessor must agree.
fn probe_code(error: &Error) -> Option<u16> {
    let mut cause: Option<&(dyn StdError + 'static)> = Some(error);
    let mut by_chain = None;
    while let Some(current) = cause {
        if let Some(probe) = current.downcast_ref::<ProbeError>() {
            by_chain = Some(probe.code);
            break;
        }
        cause = current.source();
    }
    let by_accessor = error.downcast_ref::<ProbeError>().map(|probe| probe.code);
    assert_eq!(by_chain, by_accessor, "source() and downcast_ref disagree");
    by_chain
}

#[track_caller]
fn assert_value(done: &Finished, value: &str, at: u64) {
    match &done.result {
        Ok(Ok(resp)) => assert_eq!(resp, &Resp(value.to_owned()), "wrong value"),
        other => panic!("expected Ok({value:?}), got {other:?}"),
    }
    assert_eq!(done.at, ms(at), "resolved at the wrong instant");
}

#[track_caller]
fn assert_elapsed(done: &Finished, at: u64) {
    assert!(
        done.result.is_err(),
        "expected the caller's timeout, got {:?}",
        done.result
    );
    assert_eq!(done.at, ms(at), "timed out at the wrong instant");
}

#[track_caller]
fn assert_probe_error(done: &Finished, code: u16, at: u64) {
    match &done.result {
        Ok(Err(error)) => {
            assert_eq!(probe_code(error), Some(code), "cause lost in {error:?}");
            assert!(!error.is_panic() && !error.is_wait_limit(), "{error:?}");
        }
        other => panic!("expected Err({code}), got {other:?}"),
    }
    assert_eq!(done.at, ms(at), "failed at the wrong instant");
}

#[track_caller]
fn assert_panicked(done: &Finished, at: u64) {
    match &done.result {
        Ok(Err(error)) => {
            assert!(error.is_panic(), "expected a panic error, got {error:?}");
            assert_eq!(error.panic_message(), Some("boom"));
            assert_eq!(probe_code(error), None);
        }
        other => panic!("expected a panic error, got {other:?}"),
    }
    assert_eq!(done.at, ms(at), "failed at the wrong instant");
}

/// Everything is over: no inner future alive, no flight in the map, no
/// waiter counted, and never two inner futures at once for one key.
#[track_caller]
fn assert_quiet<Key>(probe: &Probe, group: &Group<Key, Resp>)
where
    Key: Hash + Eq + Send + Sync + 'static,
{
    assert_eq!(probe.live(), 0, "inner futures still alive");
    assert_eq!(group.len(), 0, "keys left in the map");
    let stats = group.stats();
    assert_eq!(stats.flights, 0, "flights still counted: {stats:?}");
    assert_eq!(stats.waiters, 0, "waiters still counted: {stats:?}");
    assert!(probe.max_live_per_key() <= 1, "two inner calls for one key");
}

/// Samples `probe.live()` every millisecond from `from` to `to` inclusive.
fn watch_live(probe: &Probe, clock: Clock, from: u64, to: u64) -> JoinHandle<Vec<(u64, usize)>> {
    let probe = probe.clone();
    tokio::spawn(async move {
        let mut samples = Vec::new();
        for t in from..=to {
            clock.sleep_until(t).await;
            samples.push((t, probe.live()));
        }
        samples
    })
}

#[track_caller]
fn assert_always(samples: &[(u64, usize)], live: usize) {
    let wrong: Vec<_> = samples.iter().filter(|(_, n)| *n != live).collect();
    assert!(
        wrong.is_empty(),
        "live() != {live} at (t, live) = {wrong:?}"
    );
}

// --- C01: a panic in the shared call ---

#[tokio::test(start_paused = true)]
async fn panic_in_shared_call_reaches_every_waiter_and_frees_the_key() {
    let clock = Clock::start();
    let probe = Probe::new(|req, n| match (req.key.as_str(), n) {
        ("k", 1) => Step::Panic(50),
        ("k", _) => Step::Ok(10),
        _ => Step::Ok(70),
    });
    let (svc, group) = stack(&probe, by_key);

    // A leader and two followers share the call that panics; a bystander on
    // another key runs alongside.
    let waiters = vec![
        caller(&svc, clock, 0, Req::new("k")),
        caller(&svc, clock, 10, Req::new("k")),
        caller(&svc, clock, 20, Req::new("k")),
    ];
    let bystander = caller(&svc, clock, 0, Req::new("other"));

    // All three get the panic as an error the moment it happens.
    for done in finish_all(waiters).await {
        assert_panicked(&done, 50);
    }
    clock.sleep_until(60).await;
    assert_eq!(probe.calls("k"), 1);
    assert_eq!(group.stats().panics, 1);

    // The bystander is untouched.
    assert_value(&finish(bystander).await, "other:v1", 70);

    // The key is free: a later caller starts a new call and gets its value.
    let later = caller(&svc, clock, 100, Req::new("k"));
    assert_value(&finish(later).await, "k:v2", 110);
    assert_eq!(probe.calls("k"), 2);
    assert_quiet(&probe, &group);
}

// --- C02: the leader leaves, or everyone does ---

#[tokio::test(start_paused = true)]
async fn followers_get_the_value_when_the_leader_times_out() {
    let clock = Clock::start();
    let probe = Probe::per_call([Step::Ok(100)]);
    let (svc, group) = stack(&probe, by_key);

    // The leader gives up at t=30; two followers stay.
    let leader = impatient(&svc, clock, 0, Req::new("k"), 30);
    let followers = vec![
        caller(&svc, clock, 10, Req::new("k")),
        caller(&svc, clock, 20, Req::new("k")),
    ];
    let watch = watch_live(&probe, clock, 30, 99);

    // The leader times out; the call goes on for the followers.
    assert_elapsed(&finish(leader).await, 30);
    for done in finish_all(followers).await {
        assert_value(&done, "k:v1", 100);
    }
    assert_always(&watch.await.expect("watcher panicked"), 1);

    // One call, continued rather than restarted.
    assert_eq!(probe.calls("k"), 1);
    let stats = group.stats();
    assert_eq!((stats.leaders, stats.followers, stats.abandoned), (1, 2, 0));
    assert_quiet(&probe, &group);
}

#[tokio::test(start_paused = true)]
async fn call_is_dropped_when_every_caller_has_left_and_the_next_caller_starts_afresh() {
    let clock = Clock::start();
    let probe = Probe::per_call([Step::Ok(100)]);
    let (svc, group) = stack(&probe, by_key);

    // Three callers, each giving up 30 ms after arriving.
    let leader = impatient(&svc, clock, 0, Req::new("k"), 30);
    let first = impatient(&svc, clock, 10, Req::new("k"), 30);
    let second = impatient(&svc, clock, 20, Req::new("k"), 30);

    // While anyone waits, the call lives on.
    assert_elapsed(&finish(leader).await, 30);
    assert_eq!(probe.live(), 1);
    assert_elapsed(&finish(first).await, 40);
    assert_eq!(probe.live(), 1);

    // The last one out drops the call at once and frees the key.
    assert_elapsed(&finish(second).await, 50);
    assert_eq!(clock.elapsed(), ms(50));
    assert_eq!(probe.live(), 0);
    assert_eq!(group.len(), 0);
    assert_eq!(group.stats().abandoned, 1);
    assert_eq!(probe.calls("k"), 1);

    // A later caller starts call #2 and waits it out.
    let later = caller(&svc, clock, 60, Req::new("k"));
    assert_value(&finish(later).await, "k:v2", 160);
    assert_eq!(probe.calls("k"), 2);
    assert_quiet(&probe, &group);
}

// --- C03: re-election after the leader drops is exclusive (race) ---

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_one_follower_takes_over_from_a_timed_out_leader() {
    let probe = Probe::always(Step::Ok(60));
    let (svc, group) = stack(&probe, by_key);

    // 200 iterations with fresh keys, 20 at a time.
    for round in 0..10 {
        let iterations: Vec<_> = (0..20)
            .map(|i| tokio::spawn(take_over(svc.clone(), probe.clone(), round * 20 + i)))
            .collect();
        for iteration in iterations {
            iteration.await.expect("iteration failed");
        }

        // Every flight of the round is gone.
        assert_eq!(group.len(), 0, "keys left after round {round}");
        assert_eq!(group.stats().flights, 0, "flights left after round {round}");
    }

    // One call per key, never two at once.
    assert_eq!(probe.total_calls(), 200);
    assert_quiet(&probe, &group);
}

/// One iteration of the race: a leader that leaves at 20 ms, and five
/// followers that joined before it left.
async fn take_over(svc: Svc<String>, probe: Probe, i: u32) {
    let key = format!("k{i}");

    // The leader gives up after 20 ms of a 60 ms call.
    let call = svc.clone().oneshot(Req::new(&key));
    let leader = tokio::spawn(tokio::time::timeout(ms(20), call));

    // Once its call has started, five followers join.
    let deadline = tokio::time::Instant::now() + GUARD;
    while probe.calls(&key) == 0 {
        assert!(tokio::time::Instant::now() < deadline, "{key}: no call");
        tokio::time::sleep(ms(1)).await;
    }
    let mut followers = Vec::new();
    for _ in 0..5 {
        let mut svc = svc.clone();
        let ready = svc.ready().await.expect("always ready");
        let call = ready.call(Req::new(&key));
        assert_eq!(call.role(), Role::Follower, "{key}: joined too late");
        followers.push(tokio::spawn(tokio::time::timeout(ms(200), call)));
    }

    // The leader leaves; all five get the one call's value.
    let left = leader.await.expect("leader task panicked");
    assert!(left.is_err(), "{key}: leader did not time out: {left:?}");
    for follower in followers {
        let got = follower.await.expect("follower task panicked");
        let value = got
            .expect("follower waited over 200 ms")
            .expect("follower failed");
        assert_eq!(value, Resp(format!("{key}:v1")));
    }
    assert_eq!(probe.calls(&key), 1, "{key}: the call ran again");
}

// --- C04: a cancelled sole leader ---

#[tokio::test(start_paused = true)]
async fn timed_out_sole_leader_frees_the_key_for_the_next_caller() {
    let clock = Clock::start();
    let probe = Probe::per_call([Step::Never, Step::Ok(20)]);
    let (svc, group) = stack(&probe, by_key);

    // The only caller gives up on a call that never ends.
    let leader = impatient(&svc, clock, 0, Req::new("k"), 30);
    assert_elapsed(&finish(leader).await, 30);

    // The call is dropped with it, and the key freed.
    assert_eq!(clock.elapsed(), ms(30));
    assert_eq!(probe.live(), 0);
    assert_eq!(group.len(), 0);
    assert_eq!(group.stats().abandoned, 1);

    // The next caller starts call #2 rather than waiting on a dead entry.
    let next = caller(&svc, clock, 50, Req::new("k"));
    assert_value(&finish(next).await, "k:v2", 70);
    assert_eq!(probe.calls("k"), 2);
    assert_quiet(&probe, &group);
}

#[tokio::test(start_paused = true)]
async fn aborted_sole_leader_frees_the_key_for_the_next_caller() {
    let clock = Clock::start();
    let probe = Probe::per_call([Step::Never, Step::Ok(20)]);
    let (svc, group) = stack(&probe, by_key);

    // The only caller's task is aborted at t=30.
    let leader = caller(&svc, clock, 0, Req::new("k"));
    clock.sleep_until(30).await;
    assert_eq!(probe.live(), 1);
    leader.abort();
    let aborted = tokio::time::timeout(GUARD, leader)
        .await
        .expect("aborted task still pending")
        .expect_err("aborted task finished");
    assert!(aborted.is_cancelled());

    // The call is dropped with it, and the key freed.
    assert_eq!(clock.elapsed(), ms(30));
    assert_eq!(probe.live(), 0);
    assert_eq!(group.len(), 0);
    assert_eq!(group.stats().abandoned, 1);

    // The next caller starts call #2, neither hanging nor panicking.
    let next = caller(&svc, clock, 50, Req::new("k"));
    assert_value(&finish(next).await, "k:v2", 70);
    assert_eq!(probe.calls("k"), 2);
    assert_quiet(&probe, &group);
}

// --- C05: an abandoned flight's outcome does not stick ---

#[tokio::test(start_paused = true)]
async fn abandoned_flight_leaves_no_outcome_behind_for_later_callers() {
    let clock = Clock::start();
    let probe = Probe::new(move |_, _| {
        // An outage until t=200: calls started before then are slow.
        if clock.elapsed() < ms(200) {
            Step::Ok(500)
        } else {
            Step::Ok(5)
        }
    });
    let (svc, group) = stack(&probe, by_key);

    // Wave 1: both callers give up during the outage.
    let wave = vec![
        impatient(&svc, clock, 0, Req::new("registry"), 100),
        impatient(&svc, clock, 0, Req::new("registry"), 100),
    ];
    for done in finish_all(wave).await {
        assert_elapsed(&done, 100);
    }
    assert_eq!(clock.elapsed(), ms(100));
    assert_eq!(probe.live(), 0);
    assert_eq!(probe.calls("registry"), 1);

    // Wave 2: after recovery, a caller gets a fresh value.
    let c = impatient(&svc, clock, 250, Req::new("registry"), 1000);
    assert_value(&finish(c).await, "registry:v2", 255);
    assert_eq!(probe.calls("registry"), 2);

    // Wave 3: two callers share one more fresh call.
    let wave = vec![
        caller(&svc, clock, 300, Req::new("registry")),
        caller(&svc, clock, 300, Req::new("registry")),
    ];
    for done in finish_all(wave).await {
        assert_value(&done, "registry:v3", 305);
    }
    assert_eq!(probe.calls("registry"), 3);
    assert_eq!(group.stats().abandoned, 1);
    assert_quiet(&probe, &group);
}

// --- C06: a follower leaving does not evict the key ---

#[tokio::test(start_paused = true)]
async fn follower_timing_out_does_not_evict_the_key() {
    let clock = Clock::start();
    let probe = Probe::per_call([Step::Ok(200)]);
    let (svc, group) = stack(&probe, by_key);

    // A leader, a follower that leaves at t=40, and two later followers.
    let leader = caller(&svc, clock, 0, Req::new("k"));
    let leaving = impatient(&svc, clock, 10, Req::new("k"), 30);
    let late = vec![
        caller(&svc, clock, 60, Req::new("k")),
        caller(&svc, clock, 150, Req::new("k")),
    ];
    let watch = watch_live(&probe, clock, 1, 199);

    // The leaving follower times out alone.
    assert_elapsed(&finish(leaving).await, 40);
    assert_eq!(group.len(), 1);

    // Everyone else shares the one call.
    assert_value(&finish(leader).await, "k:v1", 200);
    for done in finish_all(late).await {
        assert_value(&done, "k:v1", 200);
    }
    assert_always(&watch.await.expect("watcher panicked"), 1);
    assert_eq!(probe.calls("k"), 1);
    assert_eq!(probe.max_live_per_key(), 1);
    let stats = group.stats();
    assert_eq!((stats.leaders, stats.followers, stats.abandoned), (1, 3, 0));
    assert_quiet(&probe, &group);
}

#[tokio::test(start_paused = true)]
async fn many_short_lived_followers_never_start_a_second_call() {
    let clock = Clock::start();
    let probe = Probe::per_call([Step::Ok(200)]);
    let (svc, group) = stack(&probe, by_key);

    // A leader, and ten followers arriving every 10 ms that each leave after
    // 5 ms.
    let leader = caller(&svc, clock, 0, Req::new("k"));
    let followers: Vec<_> = (1..=10)
        .map(|i| impatient(&svc, clock, 10 * i, Req::new("k"), 5))
        .collect();

    // Each follower leaves on its own; the call goes on.
    for (i, done) in (1..=10).zip(finish_all(followers).await) {
        assert_elapsed(&done, 10 * i + 5);
    }
    assert_eq!(probe.calls("k"), 1);
    assert_eq!(probe.live(), 1);

    // The leader gets the one call's value.
    assert_value(&finish(leader).await, "k:v1", 200);
    assert_eq!(probe.calls("k"), 1);
    assert_quiet(&probe, &group);
}

// --- C09: the inner error reaches every waiter ---

#[tokio::test(start_paused = true)]
async fn inner_error_reaches_every_waiter_with_its_cause() {
    let clock = Clock::start();
    let probe = Probe::per_call([Step::Err(50, 503)]);
    let (svc, group) = stack(&probe, by_key);

    // Eight callers, one per millisecond, share a call that fails.
    let callers: Vec<_> = (0..8)
        .map(|t| caller(&svc, clock, t, Req::new("k")))
        .collect();

    // Every one of them sees the inner error itself.
    for done in finish_all(callers).await {
        assert_probe_error(&done, 503, 50);
    }
    assert_eq!(probe.calls("k"), 1);
    assert_quiet(&probe, &group);
}

// --- C11: an error frees the key ---

#[tokio::test(start_paused = true)]
async fn error_frees_the_key_for_the_next_caller() {
    let clock = Clock::start();
    let probe = Probe::per_call([Step::Err(30, 500), Step::Ok(30)]);
    let (svc, group) = stack(&probe, by_key);

    // Two callers share a call that fails.
    let callers = vec![
        caller(&svc, clock, 0, Req::new("k")),
        caller(&svc, clock, 10, Req::new("k")),
    ];
    for done in finish_all(callers).await {
        assert_probe_error(&done, 500, 30);
    }
    assert_eq!(group.len(), 0);

    // A later caller starts call #2.
    let later = caller(&svc, clock, 40, Req::new("k"));
    assert_value(&finish(later).await, "k:v2", 70);
    assert_eq!(probe.calls("k"), 2);
    assert_quiet(&probe, &group);
}

#[tokio::test(start_paused = true)]
async fn caller_retrying_at_once_after_an_error_starts_a_new_call() {
    let clock = Clock::start();
    let probe = Probe::per_call([Step::Err(30, 500), Step::Ok(30)]);
    let (svc, group) = stack(&probe, by_key);

    // The leader retries in its own task, with no pause, on failure.
    let retrying = {
        let svc = svc.clone();
        tokio::spawn(async move {
            let first = svc.clone().oneshot(Req::new("k")).await;
            let first = Finished {
                result: Ok(first),
                at: clock.elapsed(),
            };
            let retry = svc.oneshot(Req::new("k")).await;
            let retry = Finished {
                result: Ok(retry),
                at: clock.elapsed(),
            };
            (first, retry)
        })
    };
    let follower = caller(&svc, clock, 10, Req::new("k"));

    // Both see the error; the retry runs call #2 instead of meeting it again.
    let (first, retry) = tokio::time::timeout(GUARD, retrying)
        .await
        .expect("retrying caller still pending after the 1 s guard")
        .expect("retrying caller panicked");
    assert_probe_error(&first, 500, 30);
    assert_probe_error(&finish(follower).await, 500, 30);
    assert_value(&retry, "k:v2", 60);
    assert_eq!(probe.calls("k"), 2);
    assert_quiet(&probe, &group);
}

// --- C12: no retry storm after a failure ---

#[tokio::test(start_paused = true)]
async fn waiters_of_a_failed_call_do_not_retry_on_their_own() {
    let clock = Clock::start();
    let probe = Probe::per_call([Step::Err(40, 503), Step::Ok(40)]);
    let (svc, group) = stack(&probe, by_key);

    // Twenty callers, one per millisecond, share a call that fails.
    let burst: Vec<_> = (0..20)
        .map(|t| caller(&svc, clock, t, Req::new("k")))
        .collect();
    for done in finish_all(burst).await {
        assert_probe_error(&done, 503, 40);
    }

    // Nobody calls again on their behalf.
    clock.sleep_until(41).await;
    assert_eq!(probe.calls("k"), 1);
    clock.sleep_until(99).await;
    assert_eq!(probe.calls("k"), 1);

    // A second burst makes exactly one new call.
    let burst: Vec<_> = (0..20)
        .map(|_| caller(&svc, clock, 100, Req::new("k")))
        .collect();
    for done in finish_all(burst).await {
        assert_value(&done, "k:v2", 140);
    }
    assert_eq!(probe.calls("k"), 2);
    let stats = group.stats();
    assert_eq!((stats.leaders, stats.followers), (2, 38));
    assert_quiet(&probe, &group);
}

// --- C13: followers keep their own deadlines ---

#[tokio::test(start_paused = true)]
async fn followers_leave_on_their_own_deadlines_while_the_leader_waits() {
    let clock = Clock::start();
    let probe = Probe::per_call([Step::Ok(300)]);
    let (svc, group) = stack(&probe, by_key);

    // A patient leader, four followers with 50 ms each, one patient follower.
    let leader = caller(&svc, clock, 0, Req::new("k"));
    let impatient_ones: Vec<_> = (1..=4)
        .map(|i| impatient(&svc, clock, 10 * i, Req::new("k"), 50))
        .collect();
    let patient = caller(&svc, clock, 50, Req::new("k"));
    let watch = watch_live(&probe, clock, 1, 299);

    // Each impatient follower leaves at its own deadline.
    for (i, done) in (1..=4).zip(finish_all(impatient_ones).await) {
        assert_elapsed(&done, 10 * i + 50);
    }

    // The leader and the patient follower get the value when it is ready.
    assert_value(&finish(leader).await, "k:v1", 300);
    assert_value(&finish(patient).await, "k:v1", 300);
    assert_always(&watch.await.expect("watcher panicked"), 1);
    assert_eq!(probe.calls("k"), 1);
    assert_quiet(&probe, &group);
}

// --- C15: a key must hold every dimension that changes the answer ---

#[tokio::test(start_paused = true)]
async fn callers_with_different_identities_never_share_a_value() {
    let clock = Clock::start();
    let probe =
        Probe::always(Step::Echo(50)).flights_by(|req| format!("{}|{:?}", req.key, req.auth));
    let (svc, group) = stack(&probe, |req| (req.key.clone(), req.auth.clone()));

    // Alice, Bob and an anonymous caller, then Alice and anonymous again.
    let alice = vec![
        caller(&svc, clock, 0, Req::new("k").auth("alice")),
        caller(&svc, clock, 10, Req::new("k").auth("alice")),
    ];
    let bob = caller(&svc, clock, 0, Req::new("k").auth("bob"));
    let anon = vec![
        caller(&svc, clock, 0, Req::new("k")),
        caller(&svc, clock, 10, Req::new("k")),
    ];

    // One call per identity, and each caller gets its own identity's value.
    for done in finish_all(alice).await {
        assert_value(&done, "k:alice", 50);
    }
    assert_value(&finish(bob).await, "k:bob", 50);
    for done in finish_all(anon).await {
        assert_value(&done, "k:anon", 50);
    }
    assert_eq!(probe.calls("k"), 3);
    let mut seen: Vec<_> = probe.requests().into_iter().map(|req| req.auth).collect();
    seen.sort();
    assert_eq!(seen, [None, Some("alice".into()), Some("bob".into())]);
    assert_quiet(&probe, &group);
}

/// A key whose hash is the same for every value, while `Eq` compares the
/// value itself.
#[derive(Debug, PartialEq, Eq)]
struct Colliding(String);

impl Hash for Colliding {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u8(0);
    }
}

#[tokio::test(start_paused = true)]
async fn keys_with_equal_hashes_but_unequal_values_do_not_coalesce() {
    let clock = Clock::start();
    let probe = Probe::always(Step::Ok(50));
    let (svc, group) = stack(&probe, |req| Colliding(req.key.clone()));

    // Two keys with one hash, in flight together.
    let x = caller(&svc, clock, 0, Req::new("x"));
    let y = caller(&svc, clock, 0, Req::new("y"));
    clock.sleep_until(1).await;
    assert_eq!(group.len(), 2);

    // An equal key still finds its own flight among them.
    let x_again = caller(&svc, clock, 10, Req::new("x"));

    // Each key ran once and got its own value.
    assert_value(&finish(x).await, "x:v1", 50);
    assert_value(&finish(y).await, "y:v1", 50);
    assert_value(&finish(x_again).await, "x:v1", 50);
    assert_eq!((probe.calls("x"), probe.calls("y")), (1, 1));
    assert_quiet(&probe, &group);
}

#[tokio::test(start_paused = true)]
async fn request_to_a_dead_target_does_not_hold_up_another_target() {
    let clock = Clock::start();
    let probe = Probe::new(|req, _| match req.target.as_deref() {
        Some("a") => Step::Never,
        _ => Step::Ok(10),
    })
    .flights_by(|req| format!("{}|{:?}", req.key, req.target));
    let (svc, group) = stack(&probe, |req| (req.key.clone(), req.target.clone()));

    // A held caller asks the dead target `a`.
    let mut to_a = Box::pin(svc.clone().oneshot(Req::new("q").target("a")));
    assert_pending!(futures::poll!(to_a.as_mut()));
    assert_eq!(probe.calls("q"), 1);

    // A caller for target `b` is served on its own.
    let to_b = caller(&svc, clock, 1, Req::new("q").target("b"));
    assert_value(&finish(to_b).await, "q:v2", 11);
    assert_eq!(probe.calls("q"), 2);
    assert_pending!(futures::poll!(to_a.as_mut()));
    assert_eq!((probe.live(), group.len()), (1, 1));

    // Dropping the held caller drops its call.
    drop(to_a);
    assert_quiet(&probe, &group);
}

// --- C18: cancelled work leaves no entries behind ---

/// Keys `{prefix}0` to `{prefix}999`.
fn thousand_keys(prefix: &str) -> Vec<String> {
    (0..1000).map(|i| format!("{prefix}{i}")).collect()
}

#[tokio::test(start_paused = true)]
async fn timed_out_callers_leave_no_entries_behind() {
    let clock = Clock::start();
    let probe = Probe::always(Step::Ok(50));
    let (svc, group) = stack(&probe, by_key);

    // A thousand distinct keys, each caller giving up after 5 ms.
    let callers: Vec<_> = thousand_keys("k")
        .into_iter()
        .map(|key| impatient(&svc, clock, 0, Req::new(key), 5))
        .collect();
    for done in finish_all(callers).await {
        assert_elapsed(&done, 5);
    }

    // By t=10 every call is dropped and every entry gone.
    clock.sleep_until(10).await;
    assert_eq!(probe.total_calls(), 1000);
    assert_eq!(group.stats().abandoned, 1000);
    assert_quiet(&probe, &group);
}

/// Spawns one caller per key at t=0, aborts them all at t=5, and checks at
/// t=10 that nothing is left.
async fn abort_round(svc: &Svc<String>, probe: &Probe, group: &Group<String, Resp>, prefix: &str) {
    let clock = Clock::start();

    // One caller per key, all aborted at t=5.
    let callers: Vec<_> = thousand_keys(prefix)
        .into_iter()
        .map(|key| caller(svc, clock, 0, Req::new(key)))
        .collect();
    clock.sleep_until(5).await;
    for caller in &callers {
        caller.abort();
    }

    // By t=10 every call is dropped and every entry gone.
    clock.sleep_until(10).await;
    assert_quiet(probe, group);
    for caller in callers {
        let aborted = caller.await.expect_err("aborted caller finished");
        assert!(aborted.is_cancelled());
    }
}

#[tokio::test(start_paused = true)]
async fn aborted_callers_leave_no_entries_behind() {
    let probe = Probe::always(Step::Ok(50));
    let (svc, group) = stack(&probe, by_key);

    // A thousand distinct keys, each caller aborted mid-call.
    abort_round(&svc, &probe, &group, "k").await;
    assert_eq!(probe.total_calls(), 1000);
    assert_eq!(group.stats().abandoned, 1000);
}

#[tokio::test(start_paused = true)]
async fn panicking_calls_leave_no_entries_behind() {
    let clock = Clock::start();
    let probe = Probe::always(Step::Panic(1));
    let (svc, group) = stack(&probe, by_key);

    // A thousand distinct keys, each call panicking after 1 ms.
    let callers: Vec<_> = thousand_keys("k")
        .into_iter()
        .map(|key| caller(&svc, clock, 0, Req::new(key)))
        .collect();
    for done in finish_all(callers).await {
        assert_panicked(&done, 1);
    }

    // By t=10 every entry is gone.
    clock.sleep_until(10).await;
    assert_eq!(group.stats().panics, 1000);
    assert_quiet(&probe, &group);
}

#[tokio::test(start_paused = true)]
async fn repeated_aborts_never_grow_the_map() {
    let probe = Probe::always(Step::Ok(50));
    let (svc, group) = stack(&probe, by_key);

    // A hundred rounds of a thousand aborted callers, with fresh keys.
    for round in 0..100 {
        abort_round(&svc, &probe, &group, &format!("r{round}k")).await;
    }
    assert_eq!(probe.total_calls(), 100_000);
    assert_eq!(group.stats().abandoned, 100_000);
}
