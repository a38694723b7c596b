//! Tower stacks: the layer above and below `Buffer`, `ConcurrencyLimit`,
//! `Timeout`, `RateLimit` and `LoadShed` keeps its contract. Identical
//! concurrent requests make one inner call, followers never take the inner
//! service's capacity (R1), one caller's timeout fails no one else (F6),
//! and the middlewares around the layer behave as tower users expect.
//!
//! Every scenario runs on a paused clock: the instants asserted are virtual
//! milliseconds since the test started.

mod support;

use std::error::Error as StdError;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_test::{assert_pending, assert_ready_ok};
use tower::load_shed::error::Overloaded;
use tower::timeout::error::Elapsed;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
use tower_singleflight::{Group, SingleflightLayer, Stats};

use support::{Clock, Probe, Req, Resp, Step};

// --- harness ---

/// How long any caller may take before the test calls it a hang.
const GUARD: Duration = Duration::from_secs(10);

fn by_key(req: &Req) -> String {
    req.key.clone()
}

type Extract = fn(&Req) -> String;

/// The layer, keyed by `req.key`, with its flights in `group`.
fn layer(group: &Group<String, Resp>) -> SingleflightLayer<Extract, Group<String, Resp>> {
    SingleflightLayer::new(by_key as Extract).with_group(group.clone())
}

/// How a caller ended, and when.
#[derive(Debug)]
struct Finished {
    result: Result<Resp, BoxError>,
    /// Time since the test started.
    at: Duration,
}

/// Spawns a caller that sends a request for `key` through `svc` at `at` ms.
fn caller<S>(svc: &S, clock: Clock, at: u64, key: &str) -> JoinHandle<Finished>
where
    S: Service<Req, Response = Resp> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
{
    let (svc, req) = (svc.clone(), Req::new(key));
    tokio::spawn(async move {
        clock.sleep_until(at).await;
        let result = svc.oneshot(req).await.map_err(Into::into);
        let at = clock.elapsed();
        Finished { result, at }
    })
}

/// Waits for every caller, in order, within the guard.
async fn finish_all(handles: Vec<JoinHandle<Finished>>) -> Vec<Finished> {
    let mut finished = Vec::with_capacity(handles.len());
    for handle in handles {
        let done = tokio::time::timeout(GUARD, handle).await;
        let done = done.expect("a caller still pending after the guard");
        finished.push(done.expect("a caller's task panicked"));
    }
    finished
}

/// The first error of type `E` in `error`'s `source()` chain, itself first.
fn cause<E: StdError + 'static>(error: &BoxError) -> Option<&E> {
    let mut next: Option<&(dyn StdError + 'static)> = Some(&**error);
    while let Some(current) = next {
        if let Some(found) = current.downcast_ref::<E>() {
            return Some(found);
        }
        next = current.source();
    }
    None
}

#[track_caller]
fn assert_value(done: &Finished, value: &str, at: u64) {
    match &done.result {
        Ok(resp) => assert_eq!(resp, &Resp(value.to_owned()), "wrong value"),
        Err(error) => panic!("expected Ok({value:?}), got Err({error:?})"),
    }
    assert_eq!(
        done.at,
        Duration::from_millis(at),
        "resolved at the wrong instant"
    );
}

#[track_caller]
fn assert_failed_with<E: StdError + 'static>(done: &Finished, at: u64) {
    match &done.result {
        Ok(resp) => panic!("expected an error, got Ok({resp:?})"),
        Err(error) => assert!(
            cause::<E>(error).is_some(),
            "expected a {} in {error:?}",
            std::any::type_name::<E>()
        ),
    }
    assert_eq!(
        done.at,
        Duration::from_millis(at),
        "failed at the wrong instant"
    );
}

/// The group's lifetime counters.
#[track_caller]
fn assert_counted(group: &Group<String, Resp>, leaders: u64, followers: u64) {
    let stats = group.stats();
    assert_eq!(
        (stats.leaders, stats.followers),
        (leaders, followers),
        "{stats:?}"
    );
}

/// Everything is over: no inner future alive, no flight, no waiter, and
/// never two inner futures at once for one key.
#[track_caller]
fn assert_quiet(probe: &Probe, group: &Group<String, Resp>) {
    assert_eq!(probe.live(), 0, "inner futures still alive");
    assert_eq!(group.len(), 0, "keys left in the map");
    let Stats {
        flights, waiters, ..
    } = group.stats();
    assert_eq!(
        (flights, waiters),
        (0, 0),
        "flights and waiters still counted"
    );
    assert!(probe.max_live_per_key() <= 1, "two inner calls for one key");
}

// --- Buffer ---

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_buffer_above_the_layer_still_coalesces_identical_requests() {
    let probe = Probe::always(Step::Ok(100));
    let group = Group::new();
    let svc = ServiceBuilder::new()
        .buffer(16)
        .layer(layer(&group))
        .service(probe.clone());
    let clock = Clock::start();

    // Five callers for one key and one for another, all through the buffer.
    let mut handles: Vec<_> = (0..5).map(|_| caller(&svc, clock, 0, "a")).collect();
    handles.push(caller(&svc, clock, 0, "b"));
    let done = finish_all(handles).await;

    // One inner call a key, whose value every caller gets when it ends.
    for a in &done[..5] {
        assert_value(a, "a:v1", 100);
    }
    assert_value(&done[5], "b:v1", 100);
    assert_eq!((probe.calls("a"), probe.calls("b")), (1, 1));
    assert_counted(&group, 2, 4);
    assert_quiet(&probe, &group);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_buffer_below_the_layer_carries_one_request_a_flight() {
    let probe = Probe::always(Step::Ok(100));
    let group = Group::new();
    let svc = ServiceBuilder::new()
        .layer(layer(&group))
        .buffer(1)
        .service(probe.clone());
    let clock = Clock::start();

    // Eight callers for one key and one for another, over a one-slot buffer.
    let mut handles: Vec<_> = (0..8).map(|_| caller(&svc, clock, 0, "a")).collect();
    handles.push(caller(&svc, clock, 0, "b"));
    let done = finish_all(handles).await;

    // Only the leaders' requests went through the buffer.
    for a in &done[..8] {
        assert_value(a, "a:v1", 100);
    }
    assert_value(&done[8], "b:v1", 100);
    assert_eq!(probe.requests(), vec![Req::new("a"), Req::new("b")]);
    assert_counted(&group, 2, 7);
    assert_quiet(&probe, &group);
}

// --- ConcurrencyLimit ---

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn with_a_concurrency_limit_of_one_below_the_layer_followers_never_wait_for_the_slot() {
    let probe = Probe::always(Step::Ok(100));
    let group = Group::new();
    let svc = ServiceBuilder::new()
        .layer(layer(&group))
        .concurrency_limit(1)
        .service(probe.clone());
    let clock = Clock::start();

    // `b` takes the only slot at 0; `a`'s leader queues for it at 10; then
    // followers join both flights at 20.
    let handles = vec![
        caller(&svc, clock, 0, "b"),
        caller(&svc, clock, 10, "a"),
        caller(&svc, clock, 20, "a"),
        caller(&svc, clock, 20, "a"),
        caller(&svc, clock, 20, "b"),
    ];

    // At 25 the inner service has no capacity, yet the layer is ready: a
    // follower reserves nothing.
    clock.sleep_until(25).await;
    let mut task = tokio_test::task::spawn(());
    let mut inner = svc.get_ref().clone();
    assert_pending!(task.enter(|cx, _| inner.poll_ready(cx)));
    drop(inner);
    let mut outer = svc.clone();
    assert_ready_ok!(task.enter(|cx, _| outer.poll_ready(cx)));
    let stats = group.stats();
    assert_eq!((stats.flights, stats.waiters), (2, 5), "{stats:?}");

    // `b`'s follower ends with its leader at 100, while `a`'s leader only
    // then gets the slot; `a`'s followers end with it at 200, not one slot
    // each later.
    let done = finish_all(handles).await;
    assert_value(&done[0], "b:v1", 100);
    assert_value(&done[4], "b:v1", 100);
    for a in &done[1..4] {
        assert_value(a, "a:v1", 200);
    }
    assert_eq!((probe.calls("a"), probe.calls("b")), (1, 1));
    assert_counted(&group, 2, 3);
    assert_quiet(&probe, &group);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_concurrency_limit_above_the_layer_coalesces_the_callers_it_admits_together() {
    let probe = Probe::always(Step::Ok(100));
    let group = Group::new();
    let svc = ServiceBuilder::new()
        .concurrency_limit(2)
        .layer(layer(&group))
        .service(probe.clone());
    let clock = Clock::start();

    // Four callers for one key at once; the limit admits two at a time.
    let handles = (0..4).map(|_| caller(&svc, clock, 0, "a")).collect();
    let mut done = finish_all(handles).await;

    // The first two share a call; the next two, admitted when it ends,
    // share a fresh one.
    done.sort_by_key(|done| done.at);
    assert_value(&done[0], "a:v1", 100);
    assert_value(&done[1], "a:v1", 100);
    assert_value(&done[2], "a:v2", 200);
    assert_value(&done[3], "a:v2", 200);
    assert_eq!(probe.calls("a"), 2);
    assert_counted(&group, 2, 2);
    assert_quiet(&probe, &group);
}

// --- Timeout ---

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_timeout_above_the_layer_fails_only_its_own_caller_leader_or_follower() {
    let probe = Probe::always(Step::Ok(100));
    let group = Group::new();
    let patient = ServiceBuilder::new()
        .layer(layer(&group))
        .service(probe.clone());
    let impatient = ServiceBuilder::new()
        .timeout(Duration::from_millis(10))
        .layer(layer(&group))
        .service(probe.clone());
    let clock = Clock::start();

    // On `a` the impatient caller leads; on `b` it follows.
    let handles = vec![
        caller(&impatient, clock, 0, "a"),
        caller(&patient, clock, 5, "a"),
        caller(&patient, clock, 5, "a"),
        caller(&patient, clock, 0, "b"),
        caller(&impatient, clock, 5, "b"),
        caller(&patient, clock, 20, "b"),
    ];
    let done = finish_all(handles).await;

    // Each impatient caller fails at its own deadline; everyone else gets
    // the one call's value when it ends.
    assert_failed_with::<Elapsed>(&done[0], 10);
    assert_value(&done[1], "a:v1", 100);
    assert_value(&done[2], "a:v1", 100);
    assert_value(&done[3], "b:v1", 100);
    assert_failed_with::<Elapsed>(&done[4], 15);
    assert_value(&done[5], "b:v1", 100);
    assert_eq!((probe.calls("a"), probe.calls("b")), (1, 1));
    assert_counted(&group, 2, 4);
    assert_eq!(group.stats().abandoned, 0, "a flight was dropped");
    assert_quiet(&probe, &group);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_timeout_below_the_layer_fails_the_whole_flight_once_and_frees_the_key() {
    let probe = Probe::always(Step::Ok(100));
    let group = Group::new();
    let svc = ServiceBuilder::new()
        .layer(layer(&group))
        .timeout(Duration::from_millis(50))
        .service(probe.clone());
    let clock = Clock::start();

    // Three callers share a call that times out at 50; a fourth comes at 60.
    let handles = vec![
        caller(&svc, clock, 0, "a"),
        caller(&svc, clock, 0, "a"),
        caller(&svc, clock, 10, "a"),
        caller(&svc, clock, 60, "a"),
    ];
    let done = finish_all(handles).await;

    // The flight's three waiters see the inner timeout, through the layer's
    // error, at 50; the fourth makes a new call, which times out at 110.
    for shared in &done[..3] {
        assert_failed_with::<Elapsed>(shared, 50);
        let error = shared.result.as_ref().expect_err("just checked");
        let error = cause::<tower_singleflight::Error>(error).expect("the layer's error");
        assert!(error.downcast_ref::<Elapsed>().is_some(), "{error:?}");
    }
    assert_failed_with::<Elapsed>(&done[3], 110);
    assert_eq!(probe.calls("a"), 2);
    assert_counted(&group, 2, 2);
    assert_quiet(&probe, &group);
}

// --- RateLimit ---

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_rate_limit_below_the_layer_spends_one_token_a_flight_not_one_a_caller() {
    let probe = Probe::always(Step::Ok(50));
    let group = Group::new();
    // `RateLimit` is not `Clone`; a buffer makes it shareable, as usual.
    let svc = ServiceBuilder::new()
        .layer(layer(&group))
        .buffer(8)
        .rate_limit(1, Duration::from_millis(100))
        .service(probe.clone());
    let clock = Clock::start();

    // Five callers for `a` at 0 spend the period's one token; `b` at 1
    // waits for the next period, at 100.
    let mut handles: Vec<_> = (0..5).map(|_| caller(&svc, clock, 0, "a")).collect();
    handles.push(caller(&svc, clock, 1, "b"));
    let done = finish_all(handles).await;

    // Had each follower spent a token, `b` would wait until 500.
    for a in &done[..5] {
        assert_value(a, "a:v1", 50);
    }
    assert_value(&done[5], "b:v1", 150);
    assert_eq!((probe.calls("a"), probe.calls("b")), (1, 1));
    assert_counted(&group, 2, 4);
    assert_quiet(&probe, &group);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_rate_limit_above_the_layer_admits_callers_over_time_into_the_flight_in_progress() {
    let probe = Probe::always(Step::Ok(250));
    let group = Group::new();
    let svc = ServiceBuilder::new()
        .buffer(8)
        .rate_limit(1, Duration::from_millis(100))
        .layer(layer(&group))
        .service(probe.clone());
    let clock = Clock::start();

    // Three callers at 0; the limit lets them through at 0, 100 and 200,
    // all while the first one's call is in progress.
    let handles = (0..3).map(|_| caller(&svc, clock, 0, "a")).collect();
    let done = finish_all(handles).await;

    // All three share that call.
    for a in &done {
        assert_value(a, "a:v1", 250);
    }
    assert_eq!(probe.calls("a"), 1);
    assert_counted(&group, 1, 2);
    assert_quiet(&probe, &group);
}

// --- LoadShed ---

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn load_shed_above_the_layer_never_sheds_because_the_layer_is_always_ready() {
    let probe = Probe::always(Step::Ok(100));
    let group = Group::new();
    let svc = ServiceBuilder::new()
        .load_shed()
        .layer(layer(&group))
        .concurrency_limit(1)
        .service(probe.clone());
    let clock = Clock::start();

    // `a` takes the only slot at 0; at 10 `b`'s leader and followers of both
    // keys arrive while the inner service has no capacity.
    let handles = vec![
        caller(&svc, clock, 0, "a"),
        caller(&svc, clock, 10, "b"),
        caller(&svc, clock, 10, "a"),
        caller(&svc, clock, 10, "b"),
    ];
    let done = finish_all(handles).await;

    // `LoadShed` sheds only when its inner service reports `Pending` from
    // `poll_ready`. The layer never does (its readiness policy: followers
    // must not wait for the inner service, so leaders wait for a ready clone
    // inside their response future). So nothing is shed: the saturated
    // inner service only makes `b`'s flight slower.
    assert_value(&done[0], "a:v1", 100);
    assert_value(&done[2], "a:v1", 100);
    assert_value(&done[1], "b:v1", 200);
    assert_value(&done[3], "b:v1", 200);
    assert!(done.iter().all(|d| d
        .result
        .as_ref()
        .err()
        .and_then(cause::<Overloaded>)
        .is_none()));
    assert_eq!((probe.calls("a"), probe.calls("b")), (1, 1));
    assert_counted(&group, 2, 2);
    assert_quiet(&probe, &group);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn load_shed_below_the_layer_sheds_a_flight_once_and_every_waiter_of_it_sees_why() {
    let probe = Probe::always(Step::Ok(100));
    let group = Group::new();
    let svc = ServiceBuilder::new()
        .layer(layer(&group))
        .load_shed()
        .concurrency_limit(1)
        .service(probe.clone());
    let clock = Clock::start();

    // `a` takes the only slot at 0; a follower of it comes at 10.
    let handles = vec![caller(&svc, clock, 0, "a"), caller(&svc, clock, 10, "a")];

    // At 10 two callers join one flight for `b` before it is first polled;
    // its leader finds no capacity and the flight is shed.
    clock.sleep_until(10).await;
    let mut sf = svc.clone();
    let (leader, follower) = (sf.call(Req::new("b")), sf.call(Req::new("b")));
    let (leader, follower) = tokio::join!(leader, follower);
    for shed in [leader, follower] {
        let error = shed.expect_err("shed by the inner load shedder");
        assert!(error.downcast_ref::<Overloaded>().is_some(), "{error:?}");
    }
    assert_eq!(clock.elapsed(), Duration::from_millis(10));

    // `a`'s follower is unaffected, and `b` is free again once `a` is done.
    let mut done = finish_all(handles).await;
    done.extend(finish_all(vec![caller(&svc, clock, 110, "b")]).await);
    assert_value(&done[0], "a:v1", 100);
    assert_value(&done[1], "a:v1", 100);
    assert_value(&done[2], "b:v1", 210);
    assert_eq!((probe.calls("a"), probe.calls("b")), (1, 1));
    assert_counted(&group, 3, 2);
    assert_quiet(&probe, &group);
}
