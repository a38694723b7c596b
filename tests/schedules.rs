//! Random schedules over [`Group::run`], checked step by step against a
//! model of the flights (F1–F7, O1–O3, R2–R3 of the contract).
//!
//! proptest draws a schedule: a list of steps over three keys. A step is a
//! burst of one to three operations applied back to back, with no polling
//! in between:
//!
//! - a caller arrives: `Group::run` is called and its future boxed and held
//!   by the test (now and then the leader's work panics before making its
//!   future);
//! - a caller's future is dropped;
//! - a live inner call is told to finish with a value, an error or a panic;
//! - a key is forgotten.
//!
//! After each step the test plays executor: it polls every new caller and
//! every caller whose waker was woken, and goes on until nothing is woken
//! any more. Nothing is polled unless it was woken, so a lost wake-up shows
//! as a caller left pending. One test plays its schedules with no tokio
//! runtime (the group under any executor); the other inside a current-thread
//! runtime the core may spawn tasks on, whose ready tasks the test runs
//! between its rounds of polls.
//!
//! The model kept beside the group knows every flight explicitly, forgotten
//! ones included. After every operation and every step the test checks:
//!
//! - the inner calls alive are exactly the model's flights in progress: one
//!   per flight, made only by leaders, and dropped at once when a flight's
//!   last waiter leaves (default settings, so nothing runs to completion);
//! - each outcome reaches exactly the waiters of its own flight: the value
//!   and the error code are the call's id, and a panic's message names it;
//! - no waiter of a finished flight is left pending, and the call of a flight
//!   in progress is driven by one of that flight's own waiters;
//! - `len()` is the number of keys with a registered flight, and every
//!   counter of `stats()` matches the model;
//! - waiters are woken only for a reason: per flight, wake-ups never exceed
//!   the callers that got its outcome, plus the departures of its driver
//!   and of any waiter while the call waits to be taken up (the core then
//!   wakes another waiter, as the one leaving may be the one it woke), plus
//!   the test's own wake-up of a finished call.
//!
//! The inner futures and the wakers call `Group::len` (which takes every
//! shard lock) when dropped and woken: the core must never do either while
//! it holds a lock. If it does, the test deadlocks, and a watchdog aborts
//! the process after 20 s without a step, saying so.
//!
//! Counts: 2,500 schedules of up to 40 steps in each test by default (the CI
//! count, about 6 s for both in a debug build). For a long run, set
//! `SINGLEFLIGHT_SCHEDULE_CASES` (per test), for example
//! `SINGLEFLIGHT_SCHEDULE_CASES=250000 cargo test --release --test schedules`.
//! A failing schedule is shrunk and printed; nothing is written to disk, so
//! turn a failure worth keeping into a plain test.
//!
//! [`Group::run`]: tower_singleflight::Group::run

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::io::Write;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard, Once, PoisonError};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;
use std::{panic, process, thread};

use proptest::collection::vec;
use proptest::prelude::*;
use tower_singleflight::future::Run;
use tower_singleflight::{Error, Group, Role, Stats, Work};

// --- the schedule ---

/// How many keys the callers pick from.
const KEYS: u8 = 3;

/// The longest schedule, in steps.
const MAX_STEPS: usize = 40;

/// How many schedules each test runs without `SINGLEFLIGHT_SCHEDULE_CASES`.
const CI_CASES: u32 = 2_500;

/// Every scripted panic's message starts with this; the panic hook keeps
/// them quiet.
const PANIC: &str = "scripted panic in call";

/// How long the watchdog waits for a step before it calls it a deadlock.
const STALL: Duration = Duration::from_secs(20);

/// Steps played so far, for the watchdog.
static PROGRESS: AtomicU64 = AtomicU64::new(0);

/// How a live inner call ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Finish {
    Value,
    Error,
    Panic,
}

/// One operation of a step.
#[derive(Clone, Debug)]
enum Op {
    /// A caller arrives for `key`; if it leads, its work panics when
    /// `panics` is set.
    Arrive { key: u8, panics: bool },
    /// One of the waiting callers leaves: the one at this position (modulo
    /// their number) in arrival order.
    Leave(u8),
    /// One of the live, unfinished inner calls finishes: the one at this
    /// position (modulo their number) in order of start.
    Finish(u8, Finish),
    /// The key's flight, if any, is forgotten.
    Forget(u8),
}

/// A burst of operations, then polling until quiescent, in ascending or
/// (`reverse`) descending caller order.
#[derive(Clone, Debug)]
struct Step {
    ops: Vec<Op>,
    reverse: bool,
}

fn op() -> impl Strategy<Value = Op> {
    let finish = prop_oneof![
        Just(Finish::Value),
        Just(Finish::Error),
        Just(Finish::Panic)
    ];
    prop_oneof![
        5 => (0..KEYS, prop::bool::weighted(1.0 / 16.0))
            .prop_map(|(key, panics)| Op::Arrive { key, panics }),
        3 => any::<u8>().prop_map(Op::Leave),
        3 => (any::<u8>(), finish).prop_map(|(pick, how)| Op::Finish(pick, how)),
        1 => (0..KEYS).prop_map(Op::Forget),
    ]
}

fn schedule() -> impl Strategy<Value = Vec<Step>> {
    let step = (vec(op(), 1..=3), any::<bool>()).prop_map(|(ops, reverse)| Step { ops, reverse });
    vec(step, 1..=MAX_STEPS)
}

fn cases() -> u32 {
    match std::env::var("SINGLEFLIGHT_SCHEDULE_CASES") {
        Ok(cases) => cases
            .parse()
            .expect("SINGLEFLIGHT_SCHEDULE_CASES is a number of schedules"),
        Err(_) => CI_CASES,
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn every_random_schedule_on_a_tokio_runtime_keeps_flights_deliveries_and_counters_exact(
        steps in schedule(),
    ) {
        play(&steps, true);
    }

    #[test]
    fn every_random_schedule_with_no_runtime_keeps_flights_deliveries_and_counters_exact(
        steps in schedule(),
    ) {
        play(&steps, false);
    }
}

/// Plays a schedule, with or without a tokio runtime to spawn tasks on.
fn play(steps: &[Step], runtime: bool) {
    quiet_scripted_panics();
    watch_for_deadlocks();
    let mut lab = Lab::new(runtime);
    for step in steps {
        lab.step(step);
    }
    lab.close();
}

/// Keeps the scripted panics out of the test output; any other panic is
/// reported as usual.
fn quiet_scripted_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let report = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            let payload = info.payload();
            let message = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied());
            if !message.is_some_and(|message| message.starts_with(PANIC)) {
                report(info);
            }
        }));
    });
}

/// Aborts the process, saying why, when no step ends for [`STALL`]: the
/// core has deadlocked, most likely by dropping a call or waking a waiter
/// while it held a lock.
fn watch_for_deadlocks() {
    static WATCHDOG: Once = Once::new();
    WATCHDOG.call_once(|| {
        thread::spawn(|| {
            let mut seen = PROGRESS.load(SeqCst);
            loop {
                thread::sleep(STALL);
                let now = PROGRESS.load(SeqCst);
                if now == seen {
                    let mut stderr = std::io::stderr();
                    let _ = writeln!(
                        stderr,
                        "schedules: no step for {STALL:?}: deadlock (a call dropped or a waiter \
                         woken under a lock?)"
                    );
                    process::abort();
                }
                seen = now;
            }
        });
    });
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

// --- the scripted inner call ---

/// The error of a call that was told to fail, naming the call.
#[derive(Debug, PartialEq, Eq)]
struct CallError {
    call: usize,
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "call {} failed", self.call)
    }
}

impl StdError for CallError {}

/// What the test knows of one inner call, shared with its future.
struct CallCell {
    /// How the call ends, once the test has said so.
    finish: Mutex<Option<Finish>>,
    /// The waker of the last poll, for the test to wake when it finishes.
    waker: Mutex<Option<Waker>>,
    /// The caller whose task polled the call last, or [`TASK`] for a task
    /// of the runtime.
    driver: Mutex<Option<usize>>,
    alive: AtomicBool,
}

/// Stands for a task of the runtime as the driver of a call.
const TASK: usize = usize::MAX;

thread_local! {
    /// The id of the caller being polled; `None` outside a poll.
    static POLLING: Cell<Option<usize>> = const { Cell::new(None) };
}

/// A leader's work: makes the inner call, or panics first.
struct Make {
    call: usize,
    panics: bool,
    cells: Arc<Mutex<BTreeMap<usize, Arc<CallCell>>>>,
    group: Group<u8, usize>,
}

impl Work<usize> for Make {
    type Error = CallError;
    type Future = Scripted;

    fn start(self) -> Scripted {
        assert!(!self.panics, "{PANIC} {}", self.call);
        let cell = Arc::new(CallCell {
            finish: Mutex::new(None),
            waker: Mutex::new(None),
            driver: Mutex::new(None),
            alive: AtomicBool::new(true),
        });
        let before = lock(&self.cells).insert(self.call, Arc::clone(&cell));
        assert!(before.is_none(), "call {} started twice", self.call);
        Scripted {
            call: self.call,
            cell,
            group: self.group,
        }
    }
}

/// The inner call: pending until the test says how it finishes.
struct Scripted {
    call: usize,
    cell: Arc<CallCell>,
    group: Group<u8, usize>,
}

impl Future for Scripted {
    type Output = Result<usize, CallError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // Note whose task drives the call: a caller's, or one of its own.
        let caller = POLLING.with(Cell::get).unwrap_or(TASK);
        *lock(&self.cell.driver) = Some(caller);

        // Then do what the test said, if it said anything yet.
        let finish = *lock(&self.cell.finish);
        match finish {
            None => {
                *lock(&self.cell.waker) = Some(cx.waker().clone());
                Poll::Pending
            }
            Some(Finish::Value) => Poll::Ready(Ok(self.call)),
            Some(Finish::Error) => Poll::Ready(Err(CallError { call: self.call })),
            Some(Finish::Panic) => panic!("{PANIC} {}", self.call),
        }
    }
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.cell.alive.store(false, SeqCst);
        // Deadlocks if the core drops a call while it holds a lock.
        let _ = self.group.len();
    }
}

// --- the callers ---

/// A caller's waker: counts its wake-ups and marks the caller for polling.
struct Flag {
    woken: AtomicBool,
    wakes: AtomicUsize,
    group: Group<u8, usize>,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.wakes.fetch_add(1, SeqCst);
        self.woken.store(true, SeqCst);
        // Deadlocks if the core wakes a waiter while it holds a lock.
        let _ = self.group.len();
    }
}

/// A caller's future, while it waits.
type Pending = Pin<Box<Run<u8, usize, Make>>>;

struct Caller {
    run: Option<Pending>,
    flag: Arc<Flag>,
    /// Not polled yet; polled at the end of the step it arrived in.
    fresh: bool,
}

// --- the model ---

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// The call is in progress (finished or not, its outcome is unpublished).
    Running,
    /// Published to its waiters.
    Delivered,
    /// Every waiter left first; the call was dropped.
    Abandoned,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    Waiting,
    Resolved,
    Left,
}

struct ModelFlight {
    key: u8,
    phase: Phase,
    /// How the call ends, once said; a work that panicked ends at once.
    finish: Option<Finish>,
    /// The leader's work panicked: there is no inner future.
    doomed: bool,
    /// Every caller that joined, leader first.
    callers: Vec<usize>,
    followers: usize,
    /// Callers that received the outcome.
    receivers: usize,
    /// Departures of the call's driver, and of any waiter while the call is
    /// parked (its driver gone, no one polled since): each may wake one
    /// other waiter to take the call up. A waiter leaving while the call is
    /// parked may be the one woken for it, so the core wakes another.
    departures: usize,
    /// Its driver left during the current step.
    parked: bool,
    /// The test woke the call's driver when it finished the call.
    finish_wakes: usize,
}

struct ModelCaller {
    flight: usize,
    role: Role,
    fate: Fate,
}

#[derive(Default)]
struct Model {
    flights: Vec<ModelFlight>,
    callers: Vec<ModelCaller>,
    /// The flight new callers of each key join.
    registered: [Option<usize>; KEYS as usize],
    leaders: u64,
    followers: u64,
    panics: u64,
    abandoned: u64,
}

impl Model {
    fn stats(&self) -> Stats {
        let mut stats = Stats::default();
        let running = self.flights.iter().filter(|f| f.phase == Phase::Running);
        stats.flights = running.count() as u64;
        let waiting = self.callers.iter().filter(|c| c.fate == Fate::Waiting);
        stats.waiters = waiting.count() as u64;
        stats.leaders = self.leaders;
        stats.followers = self.followers;
        stats.panics = self.panics;
        stats.abandoned = self.abandoned;
        stats
    }

    fn waiting(&self, flight: usize) -> impl Iterator<Item = usize> + '_ {
        let callers = self.flights[flight].callers.iter().copied();
        callers.filter(|&c| self.callers[c].fate == Fate::Waiting)
    }

    /// The caller joins the key's flight or starts one; returns its role
    /// and flight.
    fn arrive(&mut self, key: u8, panics: bool) -> (Role, usize) {
        let caller = self.callers.len();
        let (role, flight) = match self.registered[usize::from(key)] {
            Some(flight) => {
                self.flights[flight].followers += 1;
                self.followers += 1;
                (Role::Follower, flight)
            }
            None => {
                let flight = self.flights.len();
                self.flights.push(ModelFlight {
                    key,
                    phase: Phase::Running,
                    finish: panics.then_some(Finish::Panic),
                    doomed: panics,
                    callers: Vec::new(),
                    followers: 0,
                    receivers: 0,
                    departures: 0,
                    parked: false,
                    finish_wakes: 0,
                });
                self.registered[usize::from(key)] = Some(flight);
                self.leaders += 1;
                self.panics += u64::from(panics);
                (Role::Leader, flight)
            }
        };
        self.flights[flight].callers.push(caller);
        let fate = Fate::Waiting;
        self.callers.push(ModelCaller { flight, role, fate });
        (role, flight)
    }

    /// The caller leaves; its flight is abandoned if it was the last waiter.
    fn leave(&mut self, caller: usize) {
        self.callers[caller].fate = Fate::Left;
        let flight = self.callers[caller].flight;
        if self.flights[flight].phase == Phase::Running && self.waiting(flight).next().is_none() {
            self.flights[flight].phase = Phase::Abandoned;
            self.abandoned += 1;
            self.unregister(flight);
        }
    }

    fn unregister(&mut self, flight: usize) {
        let slot = &mut self.registered[usize::from(self.flights[flight].key)];
        if *slot == Some(flight) {
            *slot = None;
        }
    }

    /// Checks an outcome a caller received and records it.
    #[track_caller]
    fn resolve(&mut self, caller: usize, outcome: &Result<usize, Error>, shared: bool) {
        let ModelCaller { flight, role, fate } = self.callers[caller];
        assert_eq!(fate, Fate::Waiting, "caller {caller} resolved twice");
        let theirs = &self.flights[flight];
        assert_eq!(
            theirs.phase,
            Phase::Running,
            "caller {caller} got the outcome of flight {flight}, which was over"
        );
        let Some(finish) = theirs.finish else {
            panic!("caller {caller} resolved before call {flight} finished: {outcome:?}");
        };

        // The outcome is its own flight's, whatever its kind.
        match (finish, outcome) {
            (Finish::Value, Ok(value)) => {
                assert_eq!(*value, flight, "caller {caller} got another call's value");
            }
            (Finish::Error, Err(error)) => {
                let cause = error.downcast_ref::<CallError>();
                let expected = CallError { call: flight };
                assert_eq!(cause, Some(&expected), "caller {caller}: {error:?}");
                let source = error.source().and_then(|s| s.downcast_ref::<CallError>());
                assert_eq!(
                    source,
                    Some(&expected),
                    "caller {caller}: source of {error:?}"
                );
            }
            (Finish::Panic, Err(error)) => {
                assert!(error.is_panic(), "caller {caller}: {error:?}");
                let message = format!("{PANIC} {flight}");
                assert_eq!(error.panic_message(), Some(message.as_str()));
            }
            _ => panic!("caller {caller} of flight {flight} ({finish:?}) got {outcome:?}"),
        }
        let expected = role == Role::Follower || theirs.followers > 0;
        assert_eq!(shared, expected, "caller {caller} ({role:?}): is_shared");

        self.callers[caller].fate = Fate::Resolved;
        self.flights[flight].receivers += 1;
    }
}

// --- the lab: the group, its callers, and the model beside them ---

struct Lab {
    /// Where the core spawns its tasks, if anywhere.
    runtime: Option<tokio::runtime::Runtime>,
    group: Group<u8, usize>,
    cells: Arc<Mutex<BTreeMap<usize, Arc<CallCell>>>>,
    callers: Vec<Caller>,
    model: Model,
}

impl Lab {
    fn new(runtime: bool) -> Self {
        let runtime = runtime.then(|| {
            let runtime = tokio::runtime::Builder::new_current_thread().build();
            runtime.expect("a runtime")
        });
        Self {
            runtime,
            group: Group::new(),
            cells: Arc::default(),
            callers: Vec::new(),
            model: Model::default(),
        }
    }

    fn step(&mut self, step: &Step) {
        let runtime = self
            .runtime
            .as_ref()
            .map(|runtime| runtime.handle().clone());
        let _context = runtime.as_ref().map(tokio::runtime::Handle::enter);
        for op in &step.ops {
            self.apply(op);
            self.check_now();
        }
        self.settle(step.reverse);
        self.check_settled();
        self.check_now();
        PROGRESS.fetch_add(1, SeqCst);
    }

    /// Every caller still waiting leaves; nothing may remain.
    fn close(&mut self) {
        let runtime = self
            .runtime
            .as_ref()
            .map(|runtime| runtime.handle().clone());
        let _context = runtime.as_ref().map(tokio::runtime::Handle::enter);
        let waiting = (0..self.callers.len()).filter(|&c| self.callers[c].run.is_some());
        for caller in waiting.collect::<Vec<_>>() {
            self.leave(caller);
            self.check_now();
        }
        self.settle(false);
        self.check_settled();
        self.check_now();
        assert!(self.group.is_empty(), "keys left in the map");
        assert_eq!(self.group.stats().flights, 0, "flights left");
        assert_eq!(self.group.stats().waiters, 0, "waiters left");
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Arrive { key, panics } => self.arrive(key, panics),
            Op::Leave(pick) => {
                let waiting: Vec<usize> = (0..self.callers.len())
                    .filter(|&c| self.callers[c].run.is_some())
                    .collect();
                if !waiting.is_empty() {
                    self.leave(waiting[usize::from(pick) % waiting.len()]);
                }
            }
            Op::Finish(pick, how) => {
                let unfinished: Vec<usize> = (0..self.model.flights.len())
                    .filter(|&f| {
                        let flight = &self.model.flights[f];
                        flight.phase == Phase::Running && flight.finish.is_none()
                    })
                    .collect();
                if !unfinished.is_empty() {
                    self.finish_call(unfinished[usize::from(pick) % unfinished.len()], how);
                }
            }
            Op::Forget(key) => {
                let expected = self.model.registered[usize::from(key)].take().is_some();
                assert_eq!(self.group.forget(&key), expected, "forget({key})");
            }
        }
    }

    fn arrive(&mut self, key: u8, panics: bool) {
        // The model says whether the caller leads, and so which call it makes.
        let (role, flight) = self.model.arrive(key, panics);
        let make = Make {
            call: flight,
            panics,
            cells: Arc::clone(&self.cells),
            group: self.group.clone(),
        };
        let run = Box::pin(self.group.run(key, make));
        let caller = self.callers.len();
        assert_eq!(run.role(), role, "caller {caller} for key {key}");

        let flag = Arc::new(Flag {
            woken: AtomicBool::new(false),
            wakes: AtomicUsize::new(0),
            group: self.group.clone(),
        });
        self.callers.push(Caller {
            run: Some(run),
            flag,
            fresh: true,
        });
    }

    fn leave(&mut self, caller: usize) {
        // A driver, or any waiter while the call is parked, may wake another.
        let flight = self.model.callers[caller].flight;
        let driver = match lock(&self.cells).get(&flight) {
            Some(cell) => match *lock(&cell.driver) {
                Some(driver) => driver == caller,
                None => self.model.callers[caller].role == Role::Leader,
            },
            None => self.model.callers[caller].role == Role::Leader,
        };
        let theirs = &mut self.model.flights[flight];
        if driver || theirs.parked {
            theirs.departures += 1;
            theirs.parked = true;
        }

        // Then it leaves, in the model and for real.
        self.model.leave(caller);
        let run = self.callers[caller].run.take();
        drop(run.expect("only a waiting caller leaves"));
    }

    fn finish_call(&mut self, flight: usize, how: Finish) {
        self.model.flights[flight].finish = Some(how);
        let cell = Arc::clone(&lock(&self.cells)[&flight]);
        *lock(&cell.finish) = Some(how);
        let waker = lock(&cell.waker).take();
        if let Some(waker) = waker {
            self.model.flights[flight].finish_wakes += 1;
            waker.wake();
        }
    }

    /// Polls new and woken callers, and runs the runtime's tasks, until
    /// nothing is woken any more.
    fn settle(&mut self, reverse: bool) {
        for round in 0.. {
            self.run_tasks();
            let mut due: Vec<usize> = (0..self.callers.len())
                .filter(|&c| {
                    let caller = &mut self.callers[c];
                    let woken = caller.flag.woken.swap(false, SeqCst);
                    caller.run.is_some() && (std::mem::take(&mut caller.fresh) || woken)
                })
                .collect();
            if due.is_empty() {
                return;
            }
            assert!(
                round < 32,
                "still waking callers after 32 rounds: busy polling"
            );
            if reverse {
                due.reverse();
            }
            for caller in due {
                self.poll(caller);
            }
        }
    }

    /// Runs every task the runtime has ready, twice over.
    fn run_tasks(&self) {
        let Some(runtime) = &self.runtime else {
            return;
        };
        for _ in 0..2 {
            runtime.block_on(tokio::task::yield_now());
        }
    }

    fn poll(&mut self, caller: usize) {
        let waker = Waker::from(Arc::clone(&self.callers[caller].flag));
        let Some(run) = self.callers[caller].run.as_mut() else {
            return;
        };
        POLLING.with(|polling| polling.set(Some(caller)));
        let polled = run.as_mut().poll(&mut Context::from_waker(&waker));
        POLLING.with(|polling| polling.set(None));
        if let Poll::Ready(outcome) = polled {
            let shared = run.is_shared();
            self.callers[caller].run = None;
            self.model.resolve(caller, &outcome, shared);
        }
    }

    /// After polling: finished flights delivered to all their waiters, the
    /// others driven by one of theirs, and no waiter woken without cause.
    #[track_caller]
    fn check_settled(&mut self) {
        for flight in 0..self.model.flights.len() {
            // A finished call has reached every waiter of its flight.
            let theirs = &self.model.flights[flight];
            if theirs.phase == Phase::Running && theirs.finish.is_some() {
                let pending: Vec<usize> = self.model.waiting(flight).collect();
                assert!(
                    pending.is_empty(),
                    "flight {flight} over, {pending:?} pending"
                );
                let (doomed, finish) = (theirs.doomed, theirs.finish);
                self.model.flights[flight].phase = Phase::Delivered;
                self.model.unregister(flight);
                if !doomed && finish == Some(Finish::Panic) {
                    self.model.panics += 1;
                }
            }

            // A call in progress is driven by a waiter of its own flight, or
            // by a task of the runtime.
            self.model.flights[flight].parked = false;
            let theirs = &self.model.flights[flight];
            if theirs.phase == Phase::Running {
                let cell = Arc::clone(&lock(&self.cells)[&flight]);
                let driver = *lock(&cell.driver);
                let driver = driver.expect("a call in progress has been polled");
                let by_task = driver == TASK && self.runtime.is_some();
                let by_waiter = theirs.callers.contains(&driver)
                    && self.model.callers[driver].fate == Fate::Waiting;
                assert!(
                    by_task || by_waiter,
                    "call {flight} driven by {driver}, neither a task nor one of its waiters"
                );
            }

            // Waiters are woken for the outcome, a handover or a finish only.
            let wakes: usize = theirs
                .callers
                .iter()
                .map(|&c| self.callers[c].flag.wakes.load(SeqCst))
                .sum();
            let allowed = theirs.receivers + theirs.departures + theirs.finish_wakes;
            assert!(
                wakes <= allowed,
                "flight {flight}: {wakes} wake-ups for {} receivers, {} departures, {} finish",
                theirs.receivers,
                theirs.departures,
                theirs.finish_wakes,
            );
        }
    }

    /// What holds after every operation: the calls alive, the map and the
    /// counters are the model's.
    #[track_caller]
    fn check_now(&self) {
        // Exactly the leaders' calls were made, and exactly those of flights
        // in progress are alive.
        let cells = lock(&self.cells);
        let made: BTreeSet<usize> = cells.keys().copied().collect();
        let leaders = self.model.flights.iter().enumerate();
        let expected: BTreeSet<usize> =
            leaders.filter(|(_, f)| !f.doomed).map(|(i, _)| i).collect();
        assert_eq!(made, expected, "calls made");
        for (&call, cell) in cells.iter() {
            let phase = self.model.flights[call].phase;
            let alive = cell.alive.load(SeqCst);
            assert_eq!(
                alive,
                phase == Phase::Running,
                "call {call} alive, flight {phase:?}"
            );
        }
        drop(cells);

        // The map holds the registered flights; the counters match.
        let registered = self.model.registered.iter().flatten().count();
        assert_eq!(self.group.len(), registered, "keys in the map");
        assert_eq!(self.group.stats(), self.model.stats(), "stats");
    }
}
