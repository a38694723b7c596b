//! Shared support for the integration tests: a scriptable, counting inner
//! service ([`Probe`]), a clock for virtual-time scenarios ([`Clock`]), and a
//! tracing initialiser ([`trace_init`]).
//!
//! Include it from a test file with `mod support;`. Not every test file uses
//! every item, hence the module-wide `dead_code` allowance.

#![allow(dead_code)]

use std::collections::HashMap;
use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Wake};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tower::Service;

/// Installs a `tracing` subscriber that writes through the test harness, so
/// its output shows only for failing tests. Filtered by `RUST_LOG`; safe to
/// call from every test.
pub(crate) fn trace_init() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

// --- requests, responses, errors ---

/// The request every test sends.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Req {
    /// The main key; the probe counts calls and numbers them per `key`.
    pub(crate) key: String,
    /// The caller's identity, if any.
    pub(crate) auth: Option<String>,
    /// The upstream the request is meant for, if any.
    pub(crate) target: Option<String>,
    /// A free field for tests that need requests with equal keys to differ.
    pub(crate) hop: u8,
}

impl Req {
    /// A request for `key`, anonymous, with no target.
    pub(crate) fn new(key: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            ..Self::default()
        }
    }

    /// This request, made by `auth`.
    pub(crate) fn auth(mut self, auth: &str) -> Self {
        self.auth = Some(auth.to_owned());
        self
    }

    /// This request, sent to `target`.
    pub(crate) fn target(mut self, target: &str) -> Self {
        self.target = Some(target.to_owned());
        self
    }
}

/// The probe's response. `Default` on purpose: a layer that hands out a zero
/// value instead of the real one shows up as `Resp("")`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Resp(pub(crate) String);

/// The probe's error. Not `Clone` on purpose: a layer must share it without
/// copying it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ProbeError {
    /// A status-like code chosen by the script.
    pub(crate) code: u16,
}

impl fmt::Display for ProbeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "probe failed with {}", self.code)
    }
}

impl StdError for ProbeError {}

// --- scripts ---

/// What one call of the probe does. Delays are in milliseconds, counted from
/// the moment `call` ran, on tokio's clock (virtual when it is paused).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Waits, then returns `Resp("{key}:v{n}")`, `n` being the call's
    /// ordinal for its key, from 1.
    Ok(u64),
    /// Waits, then returns `Resp("{key}:{auth}")`, with `anon` for no auth.
    Echo(u64),
    /// Waits, then fails with `ProbeError { code }`.
    Err(u64, u16),
    /// Waits, then panics with the message `"boom"`.
    Panic(u64),
    /// Never finishes.
    Never,
}

type Script = dyn Fn(&Req, u64) -> Step + Send + Sync;

/// Names the flight a request belongs to, for [`Probe::max_live_per_key`].
type FlightOf = fn(&Req) -> String;

// --- the probe ---

/// A scriptable inner service that counts what it does.
///
/// Each call is scripted by its request and its ordinal `n` for `req.key`
/// (1 for the first call with that key). The probe records how many calls
/// ran per key, how many of its futures are alive (created by `call`, not yet
/// dropped), and the most that were ever alive at once for one flight.
///
/// A flight is named by `req.key` unless [`flights_by`](Probe::flights_by)
/// says otherwise: a test whose extractor keys on more than `key` names its
/// flights the same way, so that `max_live_per_key() <= 1` keeps its meaning.
#[derive(Clone)]
pub(crate) struct Probe {
    shared: Arc<Shared>,
}

struct Shared {
    script: Box<Script>,
    flight_of: FlightOf,
    /// Live futures over all keys; raised in `call`, lowered in their `Drop`.
    live: AtomicUsize,
    books: Mutex<Books>,
}

#[derive(Default)]
struct Books {
    calls: HashMap<String, u64>,
    live: HashMap<String, usize>,
    max_live: usize,
    requests: Vec<Req>,
}

impl Probe {
    /// A probe whose calls follow `script(req, n)`.
    pub(crate) fn new(script: impl Fn(&Req, u64) -> Step + Send + Sync + 'static) -> Self {
        let shared = Shared {
            script: Box::new(script),
            flight_of: |req| req.key.clone(),
            live: AtomicUsize::new(0),
            books: Mutex::default(),
        };
        Self {
            shared: Arc::new(shared),
        }
    }

    /// A probe whose call `n`, for every key, follows `steps[n - 1]`; calls
    /// past the end repeat the last step.
    ///
    /// # Panics
    ///
    /// When `steps` is empty.
    pub(crate) fn per_call<const N: usize>(steps: [Step; N]) -> Self {
        assert!(N > 0, "a script needs at least one step");
        Self::new(move |_, n| {
            let index = usize::try_from(n - 1).unwrap_or(usize::MAX).min(N - 1);
            steps[index]
        })
    }

    /// A probe whose every call follows `step`.
    pub(crate) fn always(step: Step) -> Self {
        Self::new(move |_, _| step)
    }

    /// Names each request's flight with `flight_of` rather than `req.key`.
    ///
    /// # Panics
    ///
    /// When the probe has been cloned already.
    pub(crate) fn flights_by(mut self, flight_of: FlightOf) -> Self {
        let shared = Arc::get_mut(&mut self.shared).expect("name flights before cloning the probe");
        shared.flight_of = flight_of;
        self
    }

    /// How many times `call` ran with `req.key == key`.
    pub(crate) fn calls(&self, key: &str) -> u64 {
        self.books().calls.get(key).copied().unwrap_or(0)
    }

    /// How many times `call` ran, over all keys.
    pub(crate) fn total_calls(&self) -> u64 {
        self.books().calls.values().sum()
    }

    /// Inner futures created and not yet dropped, over all keys.
    pub(crate) fn live(&self) -> usize {
        self.shared.live.load(Ordering::SeqCst)
    }

    /// The most inner futures ever alive at once for one flight.
    pub(crate) fn max_live_per_key(&self) -> usize {
        self.books().max_live
    }

    /// Every request `call` received, in order.
    pub(crate) fn requests(&self) -> Vec<Req> {
        self.books().requests.clone()
    }

    fn books(&self) -> MutexGuard<'_, Books> {
        self.shared
            .books
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl Service<Req> for Probe {
    type Response = Resp;
    type Error = ProbeError;
    type Future = ProbeFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProbeError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> ProbeFuture {
        // Count the call and the future it makes.
        let flight = (self.shared.flight_of)(&req);
        let n = {
            let mut books = self.books();
            let n = books.calls.entry(req.key.clone()).or_default();
            *n += 1;
            let n = *n;
            let live = books.live.entry(flight.clone()).or_default();
            *live += 1;
            let live = *live;
            books.max_live = books.max_live.max(live);
            books.requests.push(req.clone());
            n
        };
        self.shared.live.fetch_add(1, Ordering::SeqCst);

        // Build what the script asks for.
        let step = (self.shared.script)(&req, n);
        let call = perform(step, &req, n);
        ProbeFuture {
            shared: Arc::clone(&self.shared),
            flight,
            call,
        }
    }
}

type Outcome = Result<Resp, ProbeError>;

fn perform(step: Step, req: &Req, n: u64) -> Pin<Box<dyn Future<Output = Outcome> + Send>> {
    let after = |ms: u64| tokio::time::sleep_until(Instant::now() + Duration::from_millis(ms));
    match step {
        Step::Ok(ms) => {
            let (delay, value) = (after(ms), format!("{}:v{n}", req.key));
            Box::pin(async move {
                delay.await;
                Ok(Resp(value))
            })
        }
        Step::Echo(ms) => {
            let who = req.auth.as_deref().unwrap_or("anon");
            let (delay, value) = (after(ms), format!("{}:{who}", req.key));
            Box::pin(async move {
                delay.await;
                Ok(Resp(value))
            })
        }
        Step::Err(ms, code) => {
            let delay = after(ms);
            Box::pin(async move {
                delay.await;
                Err(ProbeError { code })
            })
        }
        Step::Panic(ms) => {
            let delay = after(ms);
            Box::pin(async move {
                delay.await;
                panic!("boom")
            })
        }
        Step::Never => Box::pin(std::future::pending()),
    }
}

/// The future of one probe call. Dropping it, finished or not, lowers the
/// live counts.
pub(crate) struct ProbeFuture {
    shared: Arc<Shared>,
    flight: String,
    call: Pin<Box<dyn Future<Output = Outcome> + Send>>,
}

impl Future for ProbeFuture {
    type Output = Outcome;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
        self.call.as_mut().poll(cx)
    }
}

impl Drop for ProbeFuture {
    fn drop(&mut self) {
        self.shared.live.fetch_sub(1, Ordering::SeqCst);
        let mut books = self
            .shared
            .books
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(live) = books.live.get_mut(&self.flight) {
            *live -= 1;
        }
    }
}

impl fmt::Debug for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Probe")
            .field("live", &self.live())
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for ProbeFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProbeFuture")
            .field("flight", &self.flight)
            .finish_non_exhaustive()
    }
}

// --- virtual time ---

/// Time since a test started, on tokio's clock.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Clock {
    start: Instant,
}

impl Clock {
    /// Starts counting now.
    pub(crate) fn start() -> Self {
        Self {
            start: Instant::now(),
        }
    }

    /// The instant `ms` milliseconds after the start.
    pub(crate) fn at(&self, ms: u64) -> Instant {
        self.start + Duration::from_millis(ms)
    }

    /// Sleeps until `ms` milliseconds after the start.
    pub(crate) async fn sleep_until(&self, ms: u64) {
        tokio::time::sleep_until(self.at(ms)).await;
    }

    /// Time since the start.
    pub(crate) fn elapsed(&self) -> Duration {
        Instant::now() - self.start
    }
}

// --- small tools for waiting and counting ---

/// A gate that calls wait behind until the test opens it.
#[derive(Clone)]
pub(crate) struct Gate(Arc<watch::Sender<bool>>);

impl Gate {
    pub(crate) fn new() -> Self {
        Self(Arc::new(watch::channel(false).0))
    }

    pub(crate) fn open(&self) {
        self.0.send_replace(true);
    }

    pub(crate) fn wait(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut open = self.0.subscribe();
        async move {
            let _ = open.wait_for(|open| *open).await;
        }
    }
}

/// Awaits `future`, failing if it is still pending after ten seconds: on
/// the paused clock, a waiter that would hang fails the test at no cost.
pub(crate) async fn within<F: Future>(future: F) -> F::Output {
    let bounded = tokio::time::timeout(Duration::from_secs(10), future);
    bounded.await.expect("still pending after ten seconds")
}

/// Lets every other task run until it waits.
pub(crate) async fn settle() {
    for _ in 0..16 {
        tokio::task::yield_now().await;
    }
}

/// A waker that counts its wake-ups.
#[derive(Default)]
pub(crate) struct WakeCount(pub(crate) AtomicUsize);

impl Wake for WakeCount {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}
