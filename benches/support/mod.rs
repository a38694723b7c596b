//! What every bench drives: one backend (the work function), and each
//! implementation wrapped so that it calls that backend the same way.
//!
//! A [`Contender`] is one implementation: ours through [`Group`] and through
//! `Service::call`, the five peers, the bare service and the floor. Each
//! task takes a [`Caller`] from it (a clone of a handle, as a real task
//! would hold) and awaits `call(key)`, which resolves to an [`Outcome`].
//! Where a peer's call is a plain future, it is adapted with `map` rather
//! than awaited in an `async` block, which would store it twice.

// Each bench binary uses a part of this module.
#![allow(dead_code)]

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::FutureExt;
use tokio::sync::futures::Notified;
use tokio::sync::Notify;
use tower::{Layer, Service, ServiceExt};
use tower_resilience_coalesce::{CoalesceError, CoalesceLayer, CoalesceService};
use tower_singleflight::{Group, Singleflight, SingleflightLayer};

/// What a caller gets: the value, or a label naming the failure.
pub(crate) type Outcome = Result<u64, &'static str>;

// --- the backend ---

/// How the backend's call behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Returns the key at once; counts nothing, so that it costs nothing.
    Immediate,
    /// Counts the call, yields to the scheduler once, returns the key.
    Yield,
    /// Counts the call, waits for the gate to open, returns the key.
    Gated,
    /// Like `Gated`, but panics instead of returning.
    GatedPanic,
}

/// The work function every implementation calls: a `Copy` handle on state
/// that lives for the whole run, so that calling it bumps no reference count.
#[derive(Clone, Copy)]
pub(crate) struct Backend(&'static Shared);

pub(crate) struct Shared {
    mode: Mode,
    /// Inner calls made (not counted in `Immediate` mode).
    calls: AtomicU64,
    /// Gated calls wait for this.
    gate: Gate,
    /// When the first gated call of the round returned (or panicked).
    returned: Mutex<Option<Instant>>,
    /// Signalled each time a call starts.
    started: Notify,
}

/// The error of the backend's call; `Clone` because two peers need it.
#[derive(Clone, Debug)]
pub(crate) struct Failure;

impl Backend {
    /// A backend for one scenario. Its state is leaked: a few bytes per run.
    pub(crate) fn new(mode: Mode) -> Self {
        let shared = Shared {
            mode,
            calls: AtomicU64::new(0),
            gate: Gate::new(),
            returned: Mutex::new(None),
            started: Notify::new(),
        };
        Self(Box::leak(Box::new(shared)))
    }

    /// The work function: the inner call for `key`.
    pub(crate) fn work(self, key: u64) -> WorkFuture {
        WorkFuture {
            shared: self.0,
            key,
            step: Step::Start,
        }
    }

    pub(crate) fn calls(self) -> u64 {
        self.0.calls.load(Ordering::SeqCst)
    }

    pub(crate) fn gate(self) -> &'static Gate {
        &self.0.gate
    }

    /// Waits until a call has started since the last wait.
    pub(crate) async fn started(self) {
        self.0.started.notified().await;
    }

    /// Takes the instant the first gated call returned, for the next round.
    pub(crate) fn take_returned(self) -> Option<Instant> {
        lock(&self.0.returned).take()
    }
}

/// The backend as a tower service: always ready, calls the work function.
impl Service<u64> for Backend {
    type Response = u64;
    type Error = Failure;
    type Future = WorkFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Failure>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, key: u64) -> WorkFuture {
        self.work(key)
    }
}

/// The future of one inner call; written out by hand so that a service can
/// name it without boxing.
pub(crate) struct WorkFuture {
    shared: &'static Shared,
    key: u64,
    step: Step,
}

enum Step {
    Start,
    Yielded,
    Gated(Pin<Box<Notified<'static>>>),
    Done,
}

impl Future for WorkFuture {
    type Output = Result<u64, Failure>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let shared = this.shared;
        loop {
            match &mut this.step {
                Step::Start => match shared.mode {
                    Mode::Immediate => {
                        this.step = Step::Done;
                        return Poll::Ready(Ok(this.key));
                    }
                    Mode::Yield => {
                        shared.calls.fetch_add(1, Ordering::Relaxed);
                        this.step = Step::Yielded;
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                    Mode::Gated | Mode::GatedPanic => {
                        shared.calls.fetch_add(1, Ordering::SeqCst);
                        shared.started.notify_one();
                        this.step = Step::Gated(Box::pin(shared.gate.notify.notified()));
                    }
                },
                Step::Yielded => {
                    this.step = Step::Done;
                    return Poll::Ready(Ok(this.key));
                }
                Step::Gated(notified) => {
                    // Register before reading the flag, so an opening in
                    // between is not missed.
                    notified.as_mut().enable();
                    if !shared.gate.open.load(Ordering::SeqCst) {
                        if notified.as_mut().poll(cx).is_pending() {
                            return Poll::Pending;
                        }
                        *notified = Box::pin(shared.gate.notify.notified());
                        continue;
                    }
                    lock(&shared.returned).get_or_insert_with(Instant::now);
                    this.step = Step::Done;
                    if shared.mode == Mode::GatedPanic {
                        panic!("the backend panicked");
                    }
                    return Poll::Ready(Ok(this.key));
                }
                Step::Done => panic!("the work future polled after it finished"),
            }
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the backend failed")
    }
}

impl std::error::Error for Failure {}

// --- signals ---

/// A signal that stays raised once raised, until reset.
pub(crate) struct Gate {
    open: AtomicBool,
    notify: Notify,
}

impl Gate {
    pub(crate) fn new() -> Self {
        Self {
            open: AtomicBool::new(false),
            notify: Notify::new(),
        }
    }

    pub(crate) fn open(&self) {
        self.open.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    /// Closes the gate; only while nobody waits at it.
    pub(crate) fn close(&self) {
        self.open.store(false, Ordering::SeqCst);
    }

    pub(crate) async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.open.load(Ordering::SeqCst) {
                return;
            }
            notified.await;
        }
    }
}

/// Counts callers whose future has been polled once, and wakes the driver
/// when all of them have.
pub(crate) struct Arrivals {
    count: AtomicUsize,
    expected: usize,
    all: Notify,
}

impl Arrivals {
    pub(crate) fn new(expected: usize) -> Arc<Self> {
        Arc::new(Self {
            count: AtomicUsize::new(0),
            expected,
            all: Notify::new(),
        })
    }

    pub(crate) fn arrive(&self) {
        if self.count.fetch_add(1, Ordering::SeqCst) + 1 == self.expected {
            self.all.notify_one();
        }
    }

    pub(crate) async fn all(&self) {
        if self.count.load(Ordering::SeqCst) < self.expected {
            self.all.notified().await;
        }
    }
}

/// Polls `fut` to the end, announcing the caller's arrival after its first
/// poll: by then every implementation has joined its flight (or, for the
/// lazy ones, at least tried to).
pub(crate) async fn announced<F: Future>(fut: F, arrivals: &Arrivals) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    let mut first = true;
    std::future::poll_fn(|cx| {
        let polled = fut.as_mut().poll(cx);
        if std::mem::take(&mut first) {
            arrivals.arrive();
        }
        polled
    })
    .await
}

// --- measuring ---

/// CPU time used so far by every live thread of this process, in
/// nanoseconds, from `/proc/self/task/*/schedstat`.
pub(crate) fn cpu_time() -> Duration {
    let mut total = 0;
    let tasks = std::fs::read_dir("/proc/self/task").expect("a Linux /proc");
    for task in tasks.flatten() {
        let Ok(text) = std::fs::read_to_string(task.path().join("schedstat")) else {
            continue;
        };
        let first = text.split_whitespace().next().unwrap_or("0");
        total += first.parse::<u64>().unwrap_or(0);
    }
    Duration::from_nanos(total)
}

/// The median of `values`, which must not be empty.
pub(crate) fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// A runtime with `workers` worker threads.
pub(crate) fn runtime(workers: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

// --- the contenders ---

/// One implementation, driven through the backend.
pub(crate) trait Contender: Send + Sync + Sized + 'static {
    /// Its column in the tables.
    const NAME: &'static str;
    /// What one task holds to make calls.
    type Caller: Caller;

    fn new(backend: Backend) -> Self;
    fn caller(&self) -> Self::Caller;
}

/// A task's handle on a contender.
pub(crate) trait Caller: Send + 'static {
    /// Calls the backend for `key`, coalesced with other calls for `key`.
    fn call(&mut self, key: u64) -> impl Future<Output = Outcome> + Send + '_;
}

type KeyFn = fn(&u64) -> u64;

fn key_of(key: &u64) -> u64 {
    *key
}

fn ours_error(error: &tower_singleflight::Error) -> &'static str {
    if error.is_panic() {
        "panic error"
    } else if error.downcast_ref::<Failure>().is_some() {
        "inner error"
    } else {
        "error"
    }
}

/// Ours, through [`Group::run`].
#[derive(Clone)]
pub(crate) struct OursGroup {
    group: Group<u64, u64>,
    backend: Backend,
}

impl Contender for OursGroup {
    const NAME: &'static str = "ours (Group)";
    type Caller = Self;

    fn new(backend: Backend) -> Self {
        Self {
            group: Group::new(),
            backend,
        }
    }

    fn caller(&self) -> Self {
        self.clone()
    }
}

impl Caller for OursGroup {
    fn call(&mut self, key: u64) -> impl Future<Output = Outcome> + Send + '_ {
        let backend = self.backend;
        let run = self.group.run(key, move || backend.work(key));
        run.map(|outcome| outcome.map_err(|error| ours_error(&error)))
    }
}

/// Ours, through `Service::call` on [`SingleflightLayer`] over the backend.
#[derive(Clone)]
pub(crate) struct OursService(Singleflight<Backend, KeyFn>);

impl Contender for OursService {
    const NAME: &'static str = "ours (Service)";
    type Caller = Self;

    fn new(backend: Backend) -> Self {
        Self(SingleflightLayer::new(key_of as KeyFn).layer(backend))
    }

    fn caller(&self) -> Self {
        self.clone()
    }
}

impl Caller for OursService {
    async fn call(&mut self, key: u64) -> Outcome {
        let svc = self.0.ready().await.map_err(|error| ours_error(&error))?;
        svc.call(key).await.map_err(|error| ours_error(&error))
    }
}

/// `tower-resilience-coalesce`, the other tower layer, over the backend.
#[derive(Clone)]
pub(crate) struct Resilience(CoalesceService<Backend, u64, u64, KeyFn>);

impl Contender for Resilience {
    const NAME: &'static str = "tower-resilience-coalesce";
    type Caller = Self;

    fn new(backend: Backend) -> Self {
        Self(CoalesceLayer::new(key_of as KeyFn).layer(backend))
    }

    fn caller(&self) -> Self {
        self.clone()
    }
}

impl Caller for Resilience {
    fn call(&mut self, key: u64) -> impl Future<Output = Outcome> + Send + '_ {
        let label = |error: CoalesceError<Failure>| match error {
            CoalesceError::Service(_) => "inner error",
            CoalesceError::LeaderCancelled => "leader cancelled error",
            CoalesceError::RecvError => "receive error",
        };
        async move {
            let svc = self.0.ready().await.map_err(label)?;
            svc.call(key).await.map_err(label)
        }
    }
}

/// `uniflight`'s `Merger`.
#[derive(Clone)]
pub(crate) struct Uniflight {
    merger: uniflight::Merger<u64, Result<u64, Failure>>,
    backend: Backend,
}

impl Contender for Uniflight {
    const NAME: &'static str = "uniflight";
    type Caller = Self;

    fn new(backend: Backend) -> Self {
        Self {
            merger: uniflight::Merger::new(),
            backend,
        }
    }

    fn caller(&self) -> Self {
        self.clone()
    }
}

impl Caller for Uniflight {
    fn call(&mut self, key: u64) -> impl Future<Output = Outcome> + Send + '_ {
        let backend = self.backend;
        let run = self.merger.execute(&key, move || backend.work(key));
        run.map(|outcome| match outcome {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(Failure)) => Err("inner error"),
            Err(_) => Err("panic error"),
        })
    }
}

/// `rs-singleflight`'s `Group`, through `do_call` (values cloned out).
#[derive(Clone)]
pub(crate) struct RsSingleflight {
    group: rs_singleflight::Group<u64, u64, Failure>,
    backend: Backend,
}

impl Contender for RsSingleflight {
    const NAME: &'static str = "rs-singleflight";
    type Caller = Self;

    fn new(backend: Backend) -> Self {
        Self {
            group: rs_singleflight::Group::new(),
            backend,
        }
    }

    fn caller(&self) -> Self {
        self.clone()
    }
}

impl Caller for RsSingleflight {
    fn call(&mut self, key: u64) -> impl Future<Output = Outcome> + Send + '_ {
        let backend = self.backend;
        async move {
            let run = self.group.do_call(key, move || backend.work(key));
            run.await.map_err(|Failure| "inner error")
        }
    }
}

/// `singleflight-async`'s `SingleFlight`.
#[derive(Clone)]
pub(crate) struct SingleflightAsync {
    flights: Arc<singleflight_async::SingleFlight<u64, Result<u64, Failure>>>,
    backend: Backend,
}

impl Contender for SingleflightAsync {
    const NAME: &'static str = "singleflight-async";
    type Caller = Self;

    fn new(backend: Backend) -> Self {
        Self {
            flights: Arc::new(singleflight_async::SingleFlight::new()),
            backend,
        }
    }

    fn caller(&self) -> Self {
        self.clone()
    }
}

impl Caller for SingleflightAsync {
    fn call(&mut self, key: u64) -> impl Future<Output = Outcome> + Send + '_ {
        let backend = self.backend;
        let run = self.flights.work(key, move || backend.work(key));
        run.map(|outcome| outcome.map_err(|Failure| "inner error"))
    }
}

/// `async_singleflight`'s `Group`, through `work` (retries when its leader
/// is dropped).
#[derive(Clone)]
pub(crate) struct AsyncSingleflight {
    group: Arc<async_singleflight::Group<u64, u64, Failure>>,
    backend: Backend,
}

impl Contender for AsyncSingleflight {
    const NAME: &'static str = "async_singleflight";
    type Caller = Self;

    fn new(backend: Backend) -> Self {
        Self {
            group: Arc::new(async_singleflight::Group::new()),
            backend,
        }
    }

    fn caller(&self) -> Self {
        self.clone()
    }
}

impl Caller for AsyncSingleflight {
    fn call(&mut self, key: u64) -> impl Future<Output = Outcome> + Send + '_ {
        let work = self.backend.work(key);
        async move {
            let outcome = self.group.work(&key, work).await;
            outcome.map_err(|error| match error {
                Some(Failure) => "inner error",
                None => "leader failed error",
            })
        }
    }
}

/// The backend as a plain tower service, with no coalescing.
#[derive(Clone)]
pub(crate) struct Bare(Backend);

impl Contender for Bare {
    const NAME: &'static str = "bare service";
    type Caller = Self;

    fn new(backend: Backend) -> Self {
        Self(backend)
    }

    fn caller(&self) -> Self {
        self.clone()
    }
}

impl Caller for Bare {
    async fn call(&mut self, key: u64) -> Outcome {
        let svc = self.0.ready().await.map_err(|Failure| "inner error")?;
        svc.call(key).await.map_err(|Failure| "inner error")
    }
}

/// The cheapest miss path a coalescer could have: hash the key once, insert
/// it into a mutex-guarded map shard, make the call, remove the key.
#[derive(Clone)]
pub(crate) struct Floor(Arc<FloorState>);

pub(crate) struct FloorState {
    hasher: RandomState,
    shards: Box<[FloorShard]>,
    backend: Backend,
}

impl Contender for Floor {
    const NAME: &'static str = "floor";
    type Caller = Self;

    fn new(backend: Backend) -> Self {
        // As many shards as ours.
        let cores = std::thread::available_parallelism().map_or(4, usize::from);
        let shards = (0..(cores * 4).next_power_of_two())
            .map(|_| Mutex::default())
            .collect();
        Self(Arc::new(FloorState {
            hasher: RandomState::new(),
            shards,
            backend,
        }))
    }

    fn caller(&self) -> Self {
        self.clone()
    }
}

impl Caller for Floor {
    fn call(&mut self, key: u64) -> impl Future<Output = Outcome> + Send + '_ {
        let state = &*self.0;
        let hash = state.hasher.hash_one(key);
        let shard = &state.shards[(hash >> 32) as usize & (state.shards.len() - 1)];
        lock(shard).insert(hash, key);
        state.backend.work(key).map(move |outcome| {
            lock(shard).remove(&hash);
            outcome.map_err(|Failure| "inner error")
        })
    }
}

/// Key hashes (hashed by the floor itself) to keys.
type FloorShard = Mutex<HashMap<u64, u64, BuildHasherDefault<Prehashed>>>;

/// A hasher for keys that are hashes already.
#[derive(Default)]
pub(crate) struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(byte);
        }
    }

    fn write_u64(&mut self, hash: u64) {
        self.0 = hash;
    }
}

/// Runs `$f::<C>($args)` for each coalescing contender, then for the bare
/// service (`with bare`) and the floor (`with baselines`: both) if asked,
/// and collects `(name, result)` pairs.
macro_rules! each_contender {
    ($f:ident($($arg:expr),*)) => {
        vec![
            (OursGroup::NAME, $f::<OursGroup>($($arg),*)),
            (OursService::NAME, $f::<OursService>($($arg),*)),
            (Resilience::NAME, $f::<Resilience>($($arg),*)),
            (Uniflight::NAME, $f::<Uniflight>($($arg),*)),
            (RsSingleflight::NAME, $f::<RsSingleflight>($($arg),*)),
            (SingleflightAsync::NAME, $f::<SingleflightAsync>($($arg),*)),
            (AsyncSingleflight::NAME, $f::<AsyncSingleflight>($($arg),*)),
        ]
    };
    ($f:ident($($arg:expr),*), with bare) => {{
        let mut all = each_contender!($f($($arg),*));
        all.push((Bare::NAME, $f::<Bare>($($arg),*)));
        all
    }};
    ($f:ident($($arg:expr),*), with baselines) => {{
        let mut all = each_contender!($f($($arg),*));
        all.push((Bare::NAME, $f::<Bare>($($arg),*)));
        all.push((Floor::NAME, $f::<Floor>($($arg),*)));
        all
    }};
}

/// Prints a markdown table: one row per metric, one column per contender.
pub(crate) fn print_table(title: &str, names: &[&str], rows: &[(String, Vec<String>)]) {
    println!("\n#### {title}\n");
    println!("| | {} |", names.join(" | "));
    println!("|---|{}", "---:|".repeat(names.len()));
    for (metric, cells) in rows {
        println!("| {metric} | {} |", cells.join(" | "));
    }
}
