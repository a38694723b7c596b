//! The lone/shared transitions of a flight, through the public API only.
//!
//! A flight starts lone (its leader's entry holds the call between polls)
//! and turns shared when the first follower joins. These tests make a
//! follower join at each point of the leader's life (before its call is
//! made, before its first poll, while it is inside a poll of the call, after
//! it parked a pending call), then drop, poll or finish the leader, forget
//! the key, panic, and re-enter the group from inside the call, with no
//! runtime, on a current-thread runtime and on a multi-thread runtime.
//!
//! Every scenario ends with the group empty, its gauges at zero, the exact
//! number of inner calls made, and every waiter holding its outcome.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{mpsc, Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use futures::channel::oneshot;
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
use tower_singleflight::future::Run;
use tower_singleflight::{Error, Group, OnWaitLimit, Role, SingleflightLayer, Stats, Work};

/// How long anything may take before the test calls it a hang.
const WAIT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------
// Outcomes
// ---------------------------------------------------------------------------

#[derive(Debug, PartialEq, Eq)]
struct Fail(u16);

impl fmt::Display for Fail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "failed with {}", self.0)
    }
}

impl std::error::Error for Fail {}

type Out = Result<u32, Fail>;

/// What a controlled call does next.
#[derive(Debug, Clone, Copy)]
enum Cmd {
    Pending,
    Ok(u32),
    Err(u16),
    Panic,
}

impl Cmd {
    /// What a poll told `self` returns; a finished call counts in `finished`.
    fn outcome(self, finished: &AtomicUsize) -> Poll<Out> {
        let out = match self {
            Cmd::Pending => return Poll::Pending,
            Cmd::Ok(v) => Ok(v),
            Cmd::Err(code) => Err(Fail(code)),
            Cmd::Panic => panic!("poll boom"),
        };
        finished.fetch_add(1, SeqCst);
        Poll::Ready(out)
    }
}

#[track_caller]
fn ok(out: &Result<u32, Error>) -> u32 {
    match out {
        Ok(v) => *v,
        Err(e) => panic!("expected a value, got the error {e:?}"),
    }
}

#[track_caller]
fn assert_panic(out: &Result<u32, Error>, message: &str) {
    match out {
        Err(e) if e.is_panic() => assert_eq!(e.panic_message(), Some(message), "{e:?}"),
        other => panic!("expected a panic error, got {other:?}"),
    }
}

#[track_caller]
fn assert_inner(out: &Result<u32, Error>, code: u16) {
    match out {
        Err(e) => assert_eq!(e.downcast_ref::<Fail>(), Some(&Fail(code)), "{e:?}"),
        other => panic!("expected the inner error {code}, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// Controlled calls: gated ones, resolved by the test with or without a
// runtime, and scripted ones
// ---------------------------------------------------------------------------

/// How many calls a source made, finished, and still holds alive.
#[derive(Default)]
struct Counts {
    started: AtomicUsize,
    finished: AtomicUsize,
    live: AtomicUsize,
}

impl Counts {
    fn start(&self) {
        self.started.fetch_add(1, SeqCst);
        self.live.fetch_add(1, SeqCst);
    }

    fn started(&self) -> usize {
        self.started.load(SeqCst)
    }

    fn finished(&self) -> usize {
        self.finished.load(SeqCst)
    }

    fn live(&self) -> usize {
        self.live.load(SeqCst)
    }
}

/// The work of one controlled call: `make` makes it from its source.
struct WorkOf<S, C> {
    source: Arc<S>,
    make: fn(&Arc<S>) -> C,
}

impl<S, C: Future<Output = Out> + Send + 'static> Work<u32> for WorkOf<S, C> {
    type Error = Fail;
    type Future = C;

    fn start(self) -> C {
        (self.make)(&self.source)
    }
}

/// Counts the calls made through `work`, and resolves them one by one.
#[derive(Default)]
struct Calls {
    counts: Counts,
    polls: AtomicUsize,
    gates: Mutex<Vec<Option<oneshot::Sender<Cmd>>>>,
}

impl Calls {
    fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Work whose call waits for `resolve(n, ..)`, `n` being its start order.
    fn work(self: &Arc<Self>) -> WorkOf<Self, Gated> {
        WorkOf {
            source: Arc::clone(self),
            make: Self::gated,
        }
    }

    fn gated(self: &Arc<Self>) -> Gated {
        let (tx, rx) = oneshot::channel();
        self.gates.lock().unwrap().push(Some(tx));
        self.start();
        Gated {
            rx,
            calls: Arc::clone(self),
        }
    }

    #[track_caller]
    fn resolve(&self, index: usize, cmd: Cmd) {
        let tx = self.gates.lock().unwrap()[index]
            .take()
            .expect("call resolved twice");
        tx.send(cmd)
            .expect("the call was dropped before it was resolved");
    }
}

impl std::ops::Deref for Calls {
    type Target = Counts;

    fn deref(&self) -> &Counts {
        &self.counts
    }
}

struct Gated {
    rx: oneshot::Receiver<Cmd>,
    calls: Arc<Calls>,
}

impl Future for Gated {
    type Output = Out;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Out> {
        self.calls.polls.fetch_add(1, SeqCst);
        let cmd = match Pin::new(&mut self.rx).poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(cmd)) => cmd,
            Poll::Ready(Err(_)) => Cmd::Err(0),
        };
        cmd.outcome(&self.calls.finished)
    }
}

impl Drop for Gated {
    fn drop(&mut self) {
        self.calls.live.fetch_sub(1, SeqCst);
    }
}

/// Work that panics while making its call.
fn panicking_make() -> impl FnOnce() -> Gated + Send + 'static {
    || panic!("make boom")
}

/// Work that must never be started (a follower's).
fn never(counter: &Arc<AtomicUsize>) -> impl FnOnce() -> std::future::Ready<Out> + Send + 'static {
    let counter = Arc::clone(counter);
    move || {
        counter.fetch_add(1, SeqCst);
        std::future::ready(Ok(999_999))
    }
}

/// A channel the script keeps both ends of.
struct Chan<T> {
    tx: Mutex<mpsc::Sender<T>>,
    rx: Mutex<mpsc::Receiver<T>>,
}

impl<T> Default for Chan<T> {
    fn default() -> Self {
        let (tx, rx) = mpsc::channel();
        Self {
            tx: Mutex::new(tx),
            rx: Mutex::new(rx),
        }
    }
}

impl<T> Chan<T> {
    fn send(&self, value: T) {
        self.tx.lock().unwrap().send(value).unwrap();
    }

    /// The next value, if one comes within `WAIT`.
    fn recv(&self) -> Option<T> {
        self.rx.lock().unwrap().recv_timeout(WAIT).ok()
    }
}

/// Scripted calls: every poll blocks its thread until the test says what
/// it returns. For a multi-thread runtime or plain threads only.
#[derive(Default)]
struct Script {
    /// A poll has begun.
    entered: Chan<()>,
    /// What the poll in progress returns.
    cmds: Chan<Cmd>,
    /// A make has begun.
    made: Chan<()>,
    /// Whether the make in progress returns its call (or panics).
    make: Chan<bool>,
    waker: Mutex<Option<Waker>>,
    counts: Counts,
}

impl Script {
    fn new() -> Arc<Self> {
        Arc::default()
    }

    fn scripted(self: &Arc<Self>) -> Scripted {
        self.start();
        Scripted {
            script: Arc::clone(self),
        }
    }

    fn work(self: &Arc<Self>) -> WorkOf<Self, Scripted> {
        WorkOf {
            source: Arc::clone(self),
            make: Self::scripted,
        }
    }

    /// Work whose making blocks until `release_make`.
    fn blocking_make(self: &Arc<Self>) -> impl FnOnce() -> Scripted + Send + 'static {
        let script = Arc::clone(self);
        move || {
            script.made.send(());
            let go = (script.make.recv()).expect("the test never released the make");
            if !go {
                panic!("make boom");
            }
            script.scripted()
        }
    }

    /// Waits until some thread is inside the making of the call.
    #[track_caller]
    fn making(&self) {
        self.made.recv().expect("the call was not made");
    }

    /// Lets the make in progress return its call (`go`) or panic.
    fn release_make(&self, go: bool) {
        self.make.send(go);
    }

    /// Waits until some thread is inside a poll of the call.
    #[track_caller]
    fn entered(&self) {
        self.entered.recv().expect("the call was not polled");
    }

    /// Tells the poll in progress what to return.
    fn send(&self, cmd: Cmd) {
        self.cmds.send(cmd);
    }

    /// Waits for the next poll and tells it what to return.
    #[track_caller]
    fn step(&self, cmd: Cmd) {
        self.entered();
        self.send(cmd);
    }

    /// Wakes whoever the call last returned `Pending` to.
    #[track_caller]
    fn wake(&self) {
        self.waker
            .lock()
            .unwrap()
            .take()
            .expect("the call never returned Pending")
            .wake();
    }
}

impl std::ops::Deref for Script {
    type Target = Counts;

    fn deref(&self) -> &Counts {
        &self.counts
    }
}

struct Scripted {
    script: Arc<Script>,
}

impl Future for Scripted {
    type Output = Out;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Out> {
        let script = &self.script;
        // Store the waker first, so that a `wake` after `Pending` always
        // finds the one this poll leaves.
        *script.waker.lock().unwrap() = Some(cx.waker().clone());
        script.entered.send(());
        let cmd = script.cmds.recv().unwrap_or(Cmd::Err(999));
        cmd.outcome(&script.finished)
    }
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.script.live.fetch_sub(1, SeqCst);
    }
}

// ---------------------------------------------------------------------------
// Polling by hand, with a waker that counts
// ---------------------------------------------------------------------------

#[derive(Default)]
struct WakeCount(AtomicUsize);

impl Wake for WakeCount {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, SeqCst);
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.fetch_add(1, SeqCst);
    }
}

/// A future polled by hand: remembers its outcome and whether it was woken
/// since its last poll.
struct Polled<F: Future> {
    fut: Pin<Box<F>>,
    out: Option<F::Output>,
    wakes: Arc<WakeCount>,
    seen: usize,
    polls: usize,
}

impl<F: Future> Polled<F> {
    fn new(fut: F) -> Self {
        Self {
            fut: Box::pin(fut),
            out: None,
            wakes: Arc::default(),
            seen: 0,
            polls: 0,
        }
    }

    /// Polls it (unless finished); returns whether it has finished.
    fn poll(&mut self) -> bool {
        if self.out.is_some() {
            return true;
        }
        self.seen = self.wakes.0.load(SeqCst);
        self.polls += 1;
        let waker = Waker::from(Arc::clone(&self.wakes));
        let mut cx = Context::from_waker(&waker);
        if let Poll::Ready(out) = self.fut.as_mut().poll(&mut cx) {
            self.out = Some(out);
        }
        self.out.is_some()
    }

    fn woken(&self) -> bool {
        self.wakes.0.load(SeqCst) > self.seen
    }

    fn done(&self) -> bool {
        self.out.is_some()
    }

    #[track_caller]
    fn out(&self) -> &F::Output {
        self.out.as_ref().expect("still pending")
    }

    /// Polls it once, which must leave it pending.
    #[track_caller]
    fn parked(mut self) -> Self {
        assert!(!self.poll(), "finished at its first poll");
        self
    }
}

impl<K, T, W> Polled<Run<K, T, W>>
where
    T: Clone,
    W: tower_singleflight::Work<T>,
    W::Error: Into<tower_singleflight::BoxError>,
{
    fn role(&self) -> Role {
        self.fut.role()
    }

    fn is_shared(&self) -> bool {
        self.fut.is_shared()
    }
}

/// Something a hand-made executor can poll when it is woken.
trait Step {
    /// Polls if woken and unfinished; returns whether it polled.
    fn step(&mut self) -> bool;
}

impl<F: Future> Step for Polled<F> {
    fn step(&mut self) -> bool {
        if self.done() || !self.woken() {
            return false;
        }
        self.poll();
        true
    }
}

/// Polls every woken future until none is woken: what an executor would do.
fn run_woken(futures: &mut [&mut dyn Step]) {
    for _ in 0..10_000 {
        let mut any = false;
        for future in futures.iter_mut() {
            any |= future.step();
        }
        if !any {
            return;
        }
    }
    panic!("futures kept waking each other");
}

// ---------------------------------------------------------------------------
// Checks at the end
// ---------------------------------------------------------------------------

/// Waits up to `WAIT` until `problem` finds none; panics with the last it
/// found.
#[track_caller]
fn until_none(problem: impl Fn() -> Option<String>) {
    let deadline = Instant::now() + WAIT;
    while let Some(problem) = problem() {
        assert!(Instant::now() < deadline, "{problem}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The same, letting the current runtime's tasks run meanwhile.
async fn until_none_async(problem: impl Fn() -> Option<String>) {
    let deadline = Instant::now() + WAIT;
    while let Some(problem) = problem() {
        assert!(Instant::now() < deadline, "{problem}");
        settle().await;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn idle_problem<K, T>(group: &Group<K, T>) -> Option<String>
where
    K: std::hash::Hash + Eq + Send + Sync + 'static,
    T: Clone + Send + 'static,
{
    let (len, stats) = (group.len(), group.stats());
    (len != 0 || stats.flights != 0 || stats.waiters != 0)
        .then(|| format!("the group never became idle: len {len}, stats {stats:?}"))
}

/// The group is empty with zero gauges, now or within `WAIT` (drop tasks
/// may still be finishing on other threads).
#[track_caller]
fn assert_idle<K, T>(group: &Group<K, T>)
where
    K: std::hash::Hash + Eq + Send + Sync + 'static,
    T: Clone + Send + 'static,
{
    until_none(|| idle_problem(group));
}

/// The same, letting the current runtime's tasks run meanwhile.
async fn idle<K, T>(group: &Group<K, T>)
where
    K: std::hash::Hash + Eq + Send + Sync + 'static,
    T: Clone + Send + 'static,
{
    until_none_async(|| idle_problem(group)).await;
}

fn never_happened(what: &str, happened: bool) -> Option<String> {
    (!happened).then(|| format!("never happened: {what}"))
}

/// Waits up to `WAIT` for `cond` on another thread's behalf.
#[track_caller]
fn eventually(what: &str, cond: impl Fn() -> bool) {
    until_none(|| never_happened(what, cond()));
}

async fn eventually_async(what: &str, cond: impl Fn() -> bool) {
    until_none_async(|| never_happened(what, cond())).await;
}

async fn settle() {
    for _ in 0..32 {
        tokio::task::yield_now().await;
    }
}

fn gauges(stats: Stats) -> (u64, u64) {
    (stats.flights, stats.waiters)
}

fn mt_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

type Handle = tokio::task::JoinHandle<(Result<u32, Error>, bool)>;

/// Spawns a caller's future; the task returns its outcome and `is_shared`.
fn spawn_run<W>(rt: &tokio::runtime::Runtime, run: Run<u32, u32, W>) -> Handle
where
    W: tower_singleflight::Work<u32> + Send + 'static,
    W::Error: Into<tower_singleflight::BoxError>,
    Run<u32, u32, W>: Send + 'static,
{
    rt.spawn(async move {
        let mut run = Box::pin(run);
        let out = run.as_mut().await;
        (out, run.is_shared())
    })
}

#[track_caller]
fn wait<T: Send + 'static>(rt: &tokio::runtime::Runtime, handle: tokio::task::JoinHandle<T>) -> T {
    rt.block_on(async {
        tokio::time::timeout(WAIT, handle)
            .await
            .expect("a waiter hung")
            .expect("a waiter's task failed")
    })
}

/// Runs `f` on a thread of its own, with no runtime, and hands back its
/// result; `None` if it has not finished within `WAIT`.
fn thread<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> mpsc::Receiver<R> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx
}

#[track_caller]
fn joined<R>(rx: &mpsc::Receiver<R>) -> R {
    rx.recv_timeout(WAIT).expect("a waiter hung")
}

/// A future that reports its first poll's return on `tx`.
fn noting<F: Future + Unpin>(mut fut: F, tx: mpsc::Sender<()>) -> impl Future<Output = F::Output> {
    let mut tx = Some(tx);
    std::future::poll_fn(move |cx| {
        let polled = Pin::new(&mut fut).poll(cx);
        if let Some(tx) = tx.take() {
            let _ = tx.send(());
        }
        polled
    })
}

/// Runs `check` once for each case; a failure names its case.
fn for_each_case<C: fmt::Debug + Copy>(cases: &[C], check: impl Fn(C)) {
    for &case in cases {
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(case)));
        if let Err(panic) = run {
            let message = (panic.downcast_ref::<String>().map(String::as_str))
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("(no message)");
            panic!("case {case:?} failed: {message}");
        }
    }
}

fn current_thread_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

// ---------------------------------------------------------------------------
// Callers of key 1 with gated calls, polled by hand
// ---------------------------------------------------------------------------

type Caller = Polled<Run<u32, u32, WorkOf<Calls, Gated>>>;

/// A group, and the gated calls its callers of key 1 make.
struct Callers {
    group: Group<u32, u32>,
    calls: Arc<Calls>,
}

impl Callers {
    fn new() -> Self {
        Self::of(Group::new())
    }

    fn running_to_completion() -> Self {
        Self::of(Group::new().run_to_completion(true))
    }

    fn of(group: Group<u32, u32>) -> Self {
        Self {
            group,
            calls: Calls::new(),
        }
    }

    /// A new caller, not polled yet.
    fn caller(&self) -> Caller {
        Polled::new(self.group.run(1, self.calls.work()))
    }

    /// A new caller that must lead a flight.
    #[track_caller]
    fn leader(&self) -> Caller {
        let leader = self.caller();
        assert_eq!(leader.role(), Role::Leader);
        leader
    }

    /// A new caller that must join a flight in progress.
    #[track_caller]
    fn follower(&self) -> Caller {
        let follower = self.caller();
        assert_eq!(follower.role(), Role::Follower);
        follower
    }

    /// A leader polled once, then a follower polled once: a shared flight
    /// that turned shared after its leader parked the call.
    #[track_caller]
    fn parked_pair(&self) -> (Caller, Caller) {
        let leader = self.leader().parked();
        (leader, self.follower().parked())
    }

    /// Resolves call `index` with `value`, runs the woken callers, and
    /// checks that each of them got the value.
    #[track_caller]
    fn deliver(&self, index: usize, value: u32, callers: &mut [&mut Caller]) {
        self.calls.resolve(index, Cmd::Ok(value));
        let mut steps: Vec<&mut dyn Step> = callers.iter_mut().map(|c| &mut **c as _).collect();
        run_woken(&mut steps);
        for (i, caller) in callers.iter().enumerate() {
            assert!(caller.done(), "caller {i} was never woken");
            assert_eq!(ok(caller.out()), value, "caller {i}");
        }
    }

    /// The end of a scenario: `started` calls made, none left alive, the
    /// group empty with zero gauges.
    #[track_caller]
    fn ended(&self, started: usize) {
        assert_eq!(self.calls.started(), started, "calls made");
        assert_eq!(self.calls.live(), 0, "a call outlived its callers");
        assert_idle(&self.group);
    }

    /// The same on a current-thread runtime, whose tasks may still be
    /// dropping the call.
    async fn ended_on_runtime(&self, started: usize) {
        eventually_async("the call is dropped", || self.calls.live() == 0).await;
        idle(&self.group).await;
        assert_eq!(self.calls.started(), started, "calls made");
    }
}

/// Every caller holds the value `value`.
#[track_caller]
fn assert_values<F>(callers: &[&Polled<F>], value: u32)
where
    F: Future<Output = Result<u32, Error>>,
{
    for (i, caller) in callers.iter().enumerate() {
        assert!(caller.done(), "caller {i} is still pending");
        assert_eq!(ok(caller.out()), value, "caller {i}");
    }
}

// ---------------------------------------------------------------------------
// A multi-thread runtime with scripted calls on key 1
// ---------------------------------------------------------------------------

/// Where a multi-thread test holds its leader while a follower comes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    /// Inside a poll of its call.
    InPoll,
    /// Inside the making of its call, before the call exists.
    InMake,
}

/// A multi-thread runtime, its group, and the script of the calls.
struct Mt {
    rt: tokio::runtime::Runtime,
    group: Group<u32, u32>,
    s: Arc<Script>,
}

/// Runs `test` inside a fresh two-worker runtime, which the test thread
/// enters (so that callers it drops or makes may hand calls to tasks).
fn multi_thread(group: Group<u32, u32>, test: impl FnOnce(&Mt)) {
    let t = Mt {
        rt: mt_runtime(),
        group,
        s: Script::new(),
    };
    let _entered = t.rt.enter();
    test(&t);
}

impl Mt {
    fn spawn<W>(&self, run: Run<u32, u32, W>) -> Handle
    where
        W: Work<u32> + Send + 'static,
        W::Error: Into<tower_singleflight::BoxError>,
        Run<u32, u32, W>: Send + 'static,
    {
        spawn_run(&self.rt, run)
    }

    #[track_caller]
    fn wait<T: Send + 'static>(&self, handle: tokio::task::JoinHandle<T>) -> T {
        wait(&self.rt, handle)
    }

    /// Waits for a caller's task and returns the value it got.
    #[track_caller]
    fn value(&self, handle: Handle) -> u32 {
        ok(&self.wait(handle).0)
    }

    /// Spawns a leader of key 1 and waits until it is held at `at`.
    #[track_caller]
    fn leader(&self, at: Held) -> Handle {
        match at {
            Held::InPoll => {
                let leader = self.spawn(self.group.run(1, self.s.work()));
                self.s.entered();
                leader
            }
            Held::InMake => {
                // The leader's work is made at `run`: on the leader's task.
                let (group, work) = (self.group.clone(), self.s.blocking_make());
                let leader = self.rt.spawn(async move {
                    let mut run = Box::pin(group.run(1, work));
                    let out = run.as_mut().await;
                    (out, run.is_shared())
                });
                self.s.making();
                leader
            }
        }
    }

    /// A new caller of key 1 that must join the flight in progress.
    #[track_caller]
    fn follower(&self) -> Run<u32, u32, WorkOf<Script, Scripted>> {
        let started = self.s.started();
        let follower = self.group.run(1, self.s.work());
        assert_eq!(follower.role(), Role::Follower);
        assert_eq!(self.s.started(), started, "a follower's work was started");
        follower
    }

    /// A leader held at `at`, and a follower that joined it meanwhile, each
    /// on a task of its own.
    #[track_caller]
    fn joined_while_held(&self, at: Held) -> (Handle, Handle) {
        let leader = self.leader(at);
        (leader, self.spawn(self.follower()))
    }

    /// Lets the leader held at `at` go on: its poll returns `cmd`, or its
    /// make returns the call, whose next poll returns `cmd`.
    #[track_caller]
    fn let_go(&self, at: Held, cmd: Cmd) {
        match at {
            Held::InPoll => self.s.send(cmd),
            Held::InMake => {
                self.s.release_make(true);
                self.s.step(cmd);
            }
        }
    }

    /// Lets the leader held at `at` go on with a pending call, then wakes
    /// whoever the call returned `Pending` to; the next poll returns `value`.
    #[track_caller]
    fn let_go_pending_then(&self, at: Held, value: u32) {
        self.let_go(at, Cmd::Pending);
        self.s.wake();
        self.s.step(Cmd::Ok(value));
    }

    /// Makes the leader held at `at` panic; returns the panic's message.
    fn let_go_panicking(&self, at: Held) -> &'static str {
        match at {
            Held::InPoll => {
                self.s.send(Cmd::Panic);
                "poll boom"
            }
            Held::InMake => {
                self.s.release_make(false);
                "make boom"
            }
        }
    }

    /// Spawns a leader of a new flight for key 1, whose call (scripted on its
    /// own) returns `value` at its first poll.
    #[track_caller]
    fn fresh_leader(&self, value: u32) -> Handle {
        let s = Script::new();
        let leader = self.group.run(1, s.work());
        assert_eq!(leader.role(), Role::Leader);
        let leader = self.spawn(leader);
        s.step(Cmd::Ok(value));
        eventually("the new call is dropped", || s.live() == 0);
        assert_eq!(s.started(), 1);
        leader
    }

    /// Waits for a leader and a follower, which must share `value`.
    #[track_caller]
    fn shared_value(&self, leader: Handle, follower: Handle, value: u32) {
        let (l, l_shared) = self.wait(leader);
        let (f, f_shared) = self.wait(follower);
        assert_eq!((ok(&l), ok(&f)), (value, value));
        assert!(l_shared, "a follower joined: the leader's flight is shared");
        assert!(f_shared, "a follower's flight is shared");
    }

    /// Waits for a caller's task, which must have been cancelled.
    #[track_caller]
    fn cancelled(&self, handle: Handle) {
        let out = self
            .rt
            .block_on(async { tokio::time::timeout(WAIT, handle).await });
        let err = out.expect("a cancelled caller hung").unwrap_err();
        assert!(err.is_cancelled(), "{err:?}");
    }

    /// The end of a scenario: `started` calls made, none left alive (now or
    /// soon: a task may still hold one), the group idle.
    #[track_caller]
    fn ended(&self, started: usize) {
        assert_eq!(self.s.started(), started, "calls made");
        eventually("the call is dropped", || self.s.live() == 0);
        assert_idle(&self.group);
    }
}

/// Runs a caller on a thread of its own, with no runtime.
fn on_thread<F>(caller: F) -> mpsc::Receiver<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    thread(move || futures::executor::block_on(caller))
}

// ===========================================================================
// A. No runtime, one thread, polled by hand
// ===========================================================================

#[test]
fn no_runtime_follower_before_first_poll_then_both_poll_and_share_the_outcome() {
    let t = Callers::new();
    let mut leader = t.leader();
    assert_eq!(t.calls.started(), 1, "a leader's work is started at `run`");
    let mut follower = t.follower();
    assert_eq!(t.group.len(), 1);
    let stats = t.group.stats();
    assert_eq!(
        (stats.flights, stats.waiters, stats.leaders, stats.followers),
        (1, 2, 1, 1)
    );

    assert!(!follower.poll());
    assert!(!leader.poll());
    t.deliver(0, 7, &mut [&mut leader, &mut follower]);
    assert!(leader.is_shared() && follower.is_shared());
    t.ended(1);
}

#[test]
fn no_runtime_follower_before_first_poll_leader_never_polled_then_dropped() {
    let t = Callers::new();
    let leader = t.leader();
    let mut follower = t.follower();
    drop(leader);
    assert_eq!(t.group.len(), 1, "the follower still waits for the flight");
    assert!(!follower.poll());
    t.deliver(0, 3, &mut [&mut follower]);
    assert_eq!(t.group.stats().abandoned, 0);
    t.ended(1);
}

#[test]
fn no_runtime_follower_after_leader_parked_then_leader_dropped_before_follower_polls() {
    let t = Callers::new();
    let leader = t.leader().parked();
    let mut follower = t.follower();
    drop(leader);
    assert_eq!(t.calls.live(), 1, "the call survives its leader");
    assert!(!follower.poll());
    t.deliver(0, 5, &mut [&mut follower]);
    t.ended(1);
}

#[test]
fn no_runtime_leader_that_polled_last_hands_the_call_to_the_follower_when_dropped() {
    let t = Callers::new();
    let (mut leader, mut follower) = t.parked_pair();
    // The leader polls the call after the follower: the call now wakes it.
    assert!(!leader.poll());
    drop(leader);
    run_woken(&mut [&mut follower]);
    // The follower must be woken to take the call up.
    t.deliver(0, 6, &mut [&mut follower]);
    t.ended(1);
}

#[test]
fn no_runtime_follower_after_leader_parked_then_leader_finishes() {
    let t = Callers::new();
    let (mut leader, mut follower) = t.parked_pair();
    t.calls.resolve(0, Cmd::Err(42));
    run_woken(&mut [&mut leader, &mut follower]);
    assert_inner(leader.out(), 42);
    assert_inner(follower.out(), 42);
    assert!(leader.is_shared());
    t.ended(1);
}

#[test]
fn no_runtime_a_lone_leader_is_not_shared() {
    let t = Callers::new();
    let mut leader = t.leader().parked();
    t.deliver(0, 1, &mut [&mut leader]);
    assert!(!leader.is_shared());
    t.ended(1);
}

#[test]
fn no_runtime_forget_a_lone_flight_then_a_new_caller_starts_a_fresh_one() {
    let t = Callers::new();
    let mut first = t.leader().parked();
    assert!(t.group.forget(&1));
    assert!(!t.group.forget(&1), "a forgotten flight is not found again");
    assert_eq!(t.group.len(), 0);
    assert_eq!(
        t.group.stats().flights,
        1,
        "the forgotten flight is still in progress"
    );

    let mut second = t.leader();
    assert_eq!(t.calls.started(), 2);
    let mut third = t.follower();
    assert!(!second.poll());
    assert!(!third.poll());

    t.calls.resolve(1, Cmd::Ok(2));
    t.calls.resolve(0, Cmd::Ok(1));
    run_woken(&mut [&mut first, &mut second, &mut third]);
    assert_values(&[&first], 1);
    assert_values(&[&second, &third], 2);
    assert!(!first.is_shared());
    t.ended(2);
}

#[test]
fn no_runtime_forget_before_the_first_poll_then_leader_dropped() {
    let t = Callers::new();
    let first = t.leader();
    assert!(t.group.forget(&1));
    let mut second = t.leader();
    drop(first);
    assert_eq!(
        t.calls.live(),
        1,
        "only the forgotten flight's call is dropped"
    );
    assert_eq!(t.group.stats().abandoned, 1);
    assert!(!second.poll());
    t.deliver(1, 2, &mut [&mut second]);
    t.ended(2);
}

#[test]
fn no_runtime_forget_a_shared_flight_its_leader_has_not_noticed() {
    let t = Callers::new();
    let mut leader = t.leader().parked();
    let mut follower = t.follower();
    assert!(t.group.forget(&1));
    assert!(!t.group.forget(&1));
    assert_eq!(t.group.len(), 0);

    let mut fresh = t.leader();
    let mut fresh_follower = t.follower();
    for p in [&mut leader, &mut follower, &mut fresh, &mut fresh_follower] {
        assert!(!p.poll());
    }
    t.calls.resolve(0, Cmd::Ok(1));
    t.calls.resolve(1, Cmd::Ok(2));
    run_woken(&mut [&mut leader, &mut follower, &mut fresh, &mut fresh_follower]);
    assert_values(&[&leader, &follower], 1);
    assert_values(&[&fresh, &fresh_follower], 2);
    let stats = t.group.stats();
    assert_eq!((stats.leaders, stats.followers), (2, 2));
    t.ended(2);
}

#[test]
fn no_runtime_a_forgotten_shared_flight_leaves_the_chain_when_its_leader_comes() {
    let t = Callers::new();

    // Flight 0: shared, then forgotten before its leader noticed.
    let mut l0 = t.leader().parked();
    let mut f0 = t.follower();
    assert!(t.group.forget(&1));
    // Flight 1: lone, forgotten.
    let mut l1 = t.leader().parked();
    assert!(t.group.forget(&1));
    // Flight 2: visible.
    let mut l2 = t.leader().parked();
    assert_eq!(t.calls.started(), 3);

    // The oldest entry leaves first (its leader picks the flight up); flight
    // 2 must still be found.
    assert!(!l0.poll());
    let mut f2 = t.follower().parked();

    // Then the middle one.
    t.deliver(1, 11, &mut [&mut l1]);
    let mut f2b = t.follower().parked();
    assert_eq!(t.group.len(), 1);

    t.calls.resolve(0, Cmd::Ok(10));
    assert!(!f0.poll() || ok(f0.out()) == 10);
    run_woken(&mut [&mut l0, &mut f0]);
    assert_values(&[&l0, &f0], 10);

    t.deliver(2, 12, &mut [&mut l2, &mut f2, &mut f2b]);
    t.ended(3);

    // And the key works as new.
    let mut again = t.leader();
    t.calls.resolve(3, Cmd::Ok(13));
    assert!(again.poll());
    assert_values(&[&again], 13);
    t.ended(4);
}

#[test]
fn no_runtime_chain_of_forgotten_lone_flights_finishing_out_of_order() {
    let t = Callers::new();
    let mut l0 = t.leader().parked();
    assert!(t.group.forget(&1));
    let mut l1 = t.leader().parked();
    assert!(t.group.forget(&1));
    let mut l2 = t.leader().parked();
    let mut f2 = t.follower().parked();

    t.deliver(1, 1, &mut [&mut l1]);
    let mut f2b = t.follower().parked();
    t.deliver(0, 0, &mut [&mut l0]);
    let mut f2c = t.follower().parked();
    t.deliver(2, 2, &mut [&mut l2, &mut f2, &mut f2b, &mut f2c]);
    t.ended(3);
}

#[test]
fn no_runtime_panic_while_making_the_call_reaches_a_follower_that_joined_before_the_first_poll() {
    let t = Callers::new();
    let unexpected = Arc::new(AtomicUsize::new(0));

    let mut leader = Polled::new(t.group.run(1, panicking_make()));
    let mut follower = Polled::new(t.group.run(1, never(&unexpected)));
    assert_eq!(follower.role(), Role::Follower);
    assert!(follower.poll() || leader.poll());
    run_woken(&mut [&mut leader, &mut follower]);
    leader.poll();
    follower.poll();
    assert_panic(leader.out(), "make boom");
    assert_panic(follower.out(), "make boom");
    assert_eq!(unexpected.load(SeqCst), 0);
    assert_eq!(t.group.stats().panics, 1);
    assert_idle(&t.group);

    // The key is free after a panic.
    let mut next = t.leader();
    t.calls.resolve(0, Cmd::Ok(1));
    assert!(next.poll());
    t.ended(1);
}

#[test]
fn no_runtime_panic_in_the_call_after_it_turned_shared() {
    let t = Callers::new();
    let (mut leader, mut follower) = t.parked_pair();
    t.calls.resolve(0, Cmd::Panic);
    run_woken(&mut [&mut leader, &mut follower]);
    assert_panic(leader.out(), "poll boom");
    assert_panic(follower.out(), "poll boom");
    assert_eq!(t.group.stats().panics, 1);
    t.ended(1);
}

#[test]
fn no_runtime_run_to_completion_drops_an_abandoned_lone_call() {
    let t = Callers::running_to_completion();
    drop(t.leader().parked());
    assert_eq!(
        t.calls.live(),
        0,
        "outside a runtime the call is dropped as usual"
    );
    assert_eq!(t.group.stats().abandoned, 1);
    t.ended(1);
}

#[test]
fn no_runtime_run_to_completion_drops_an_abandoned_shared_call() {
    let t = Callers::running_to_completion();
    let (leader, follower) = t.parked_pair();
    drop(leader);
    assert_eq!(t.calls.live(), 1);
    drop(follower);
    assert_eq!(t.calls.live(), 0);
    assert_eq!(t.group.stats().abandoned, 1);
    t.ended(1);
}

#[test]
fn no_runtime_run_to_completion_forgotten_lone_leader_dropped() {
    let t = Callers::running_to_completion();
    let leader = t.leader().parked();
    assert!(t.group.forget(&1));
    let mut fresh = t.leader();
    drop(leader);
    assert_eq!(t.calls.live(), 1);
    assert!(!fresh.poll());
    t.deliver(1, 2, &mut [&mut fresh]);
    t.ended(2);
}

#[test]
fn no_runtime_abandoned_shared_flight_before_the_leader_noticed() {
    let t = Callers::new();
    let (mut leader, follower) = t.parked_pair();
    drop(follower);
    assert_eq!(t.calls.live(), 1);
    // The leader goes on alone, woken by its own call.
    t.deliver(0, 9, &mut [&mut leader]);
    t.ended(1);
}

/// A call that, once its gate opens, asks the group for its own key.
fn reentrant(
    t: &Callers,
    inner: &Arc<AtomicUsize>,
) -> impl FnOnce() -> Pin<Box<dyn Future<Output = Out> + Send>> + Send + 'static {
    let (group, calls, inner) = (t.group.clone(), Arc::clone(&t.calls), Arc::clone(inner));
    move || {
        let gate = calls.gated();
        Box::pin(async move {
            let first = gate.await?;
            let inner_work = {
                let inner = Arc::clone(&inner);
                move || {
                    inner.fetch_add(1, SeqCst);
                    async { Ok::<u32, Fail>(40) }
                }
            };
            let again = group.run(1, inner_work);
            if again.role() != Role::Leader {
                return Err(Fail(501));
            }
            let v = again.await.map_err(|_| Fail(500))?;
            Ok(first + v)
        })
    }
}

#[test]
fn no_runtime_a_call_asking_for_its_own_key_does_not_wait_for_itself() {
    let t = Callers::new();
    let inner = Arc::new(AtomicUsize::new(0));
    let caller = || Polled::new(t.group.run(1, reentrant(&t, &inner)));

    // Lone.
    let mut leader = caller().parked();
    t.calls.resolve(0, Cmd::Ok(2));
    run_woken(&mut [&mut leader]);
    assert!(leader.done(), "the call waits for itself");
    assert_values(&[&leader], 42);
    assert_eq!(inner.load(SeqCst), 1);
    t.ended(1);

    // Shared, the follower polling the call last.
    let mut leader = caller().parked();
    let mut follower = caller().parked();
    t.calls.resolve(1, Cmd::Ok(2));
    run_woken(&mut [&mut follower, &mut leader]);
    assert!(
        leader.done() && follower.done(),
        "the call waits for itself"
    );
    assert_values(&[&leader, &follower], 42);
    assert_eq!(inner.load(SeqCst), 2);
    t.ended(2);
}
#[test]
fn no_runtime_making_a_call_that_asks_for_its_own_key() {
    let group: Group<u32, u32> = Group::new();
    let inner = Arc::new(AtomicUsize::new(0));
    let work = {
        let (group, inner) = (group.clone(), Arc::clone(&inner));
        move || {
            // Asked while the call is being made, before it exists.
            let again = group.run(1, move || {
                inner.fetch_add(1, SeqCst);
                async { Ok::<u32, Fail>(40) }
            });
            let role = again.role();
            async move {
                if role != Role::Leader {
                    return Err(Fail(501));
                }
                again.await.map(|v| v + 2).map_err(|_| Fail(500))
            }
        }
    };
    let mut leader = Polled::new(group.run(1, work));
    let unexpected = Arc::new(AtomicUsize::new(0));
    let mut follower = Polled::new(group.run(1, never(&unexpected)));
    leader.poll();
    follower.poll();
    run_woken(&mut [&mut leader, &mut follower]);
    assert_eq!(ok(leader.out()), 42);
    assert_eq!(ok(follower.out()), 42);
    assert_eq!(inner.load(SeqCst), 1);
    assert_eq!(unexpected.load(SeqCst), 0);
    assert_idle(&group);
}

/// A call whose destructor asks the group for its own key.
struct AsksOnDrop {
    group: Group<u32, u32>,
    gate: Gated,
    asked: Arc<AtomicUsize>,
}

impl Future for AsksOnDrop {
    type Output = Out;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Out> {
        Pin::new(&mut self.gate).poll(cx)
    }
}

impl Drop for AsksOnDrop {
    fn drop(&mut self) {
        let mut again = Polled::new(self.group.run(1, || async { Ok::<u32, Fail>(1) }));
        if again.poll() {
            self.asked.fetch_add(1, SeqCst);
        }
    }
}

#[test]
fn no_runtime_a_call_whose_destructor_asks_for_its_own_key_does_not_deadlock() {
    let group: Group<u32, u32> = Group::new();
    let calls = Calls::new();
    let asked = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = mpsc::channel();
    let (group2, calls2, asked2) = (group.clone(), Arc::clone(&calls), Arc::clone(&asked));
    std::thread::spawn(move || {
        let (group, calls, asked) = (group2, calls2, asked2);
        let work = || {
            let (g, c, a) = (group.clone(), Arc::clone(&calls), Arc::clone(&asked));
            move || AsksOnDrop {
                group: g,
                gate: c.gated(),
                asked: a,
            }
        };
        // Lone, abandoned.
        let mut l = Polled::new(group.run(1, work()));
        l.poll();
        drop(l);
        // Lone, finished.
        let mut l = Polled::new(group.run(1, work()));
        l.poll();
        calls.resolve(1, Cmd::Ok(1));
        run_woken(&mut [&mut l]);
        // Shared, abandoned.
        let mut l = Polled::new(group.run(1, work()));
        l.poll();
        let mut f = Polled::new(group.run(1, work()));
        f.poll();
        drop(l);
        drop(f);
        // Shared, finished.
        let mut l = Polled::new(group.run(1, work()));
        l.poll();
        let mut f = Polled::new(group.run(1, work()));
        f.poll();
        calls.resolve(3, Cmd::Ok(1));
        run_woken(&mut [&mut l, &mut f]);
        let _ = tx.send((l.done(), f.done()));
    });
    let done = rx
        .recv_timeout(WAIT)
        .expect("deadlocked: a call's destructor ran under a lock");
    assert_eq!(done, (true, true));
    assert_eq!(
        asked.load(SeqCst),
        4,
        "the key was not free when the call was dropped"
    );
    assert_eq!(calls.live(), 0);
    assert_idle(&group);
}

// ===========================================================================
// B. Current-thread runtime, polled by hand (tasks run on `settle`)
// ===========================================================================

#[tokio::test(flavor = "current_thread")]
async fn current_thread_follower_before_first_poll_task_drives_and_the_leader_collects_later() {
    let t = Callers::new();
    let mut leader = t.leader();
    let mut follower = t.follower();
    assert!(!follower.poll());
    settle().await;
    assert!(
        t.calls.polls.load(SeqCst) > 0,
        "no task drives the shared call"
    );
    t.calls.resolve(0, Cmd::Ok(7));
    settle().await;
    assert!(follower.woken());
    assert!(follower.poll());
    assert_values(&[&follower], 7);

    // Published: the key is free, the leader still holds its share.
    assert_eq!(t.group.len(), 0);
    assert_eq!(gauges(t.group.stats()), (0, 1));
    let mut late = t.caller();
    assert_eq!(
        late.role(),
        Role::Leader,
        "a finished flight is never joined"
    );
    assert_eq!(t.calls.started(), 2);

    assert!(leader.poll());
    assert_values(&[&leader], 7);
    assert!(leader.is_shared());

    t.calls.resolve(1, Cmd::Ok(8));
    assert!(late.poll());
    assert_values(&[&late], 8);
    t.ended_on_runtime(2).await;
}

#[tokio::test(flavor = "current_thread")]
async fn current_thread_published_flight_whose_leader_never_polled_is_dropped_cleanly() {
    let t = Callers::new();
    let leader = t.leader();
    let mut follower = t.follower();
    assert!(!follower.poll());
    settle().await;
    t.calls.resolve(0, Cmd::Ok(7));
    settle().await;
    assert!(follower.poll());
    assert_eq!(gauges(t.group.stats()), (0, 1));
    drop(leader);
    assert_eq!(t.calls.live(), 0);
    t.ended_on_runtime(1).await;
}

#[tokio::test(flavor = "current_thread")]
async fn current_thread_follower_after_leader_parked_then_leader_dropped() {
    let t = Callers::new();
    let (leader, mut follower) = t.parked_pair();
    settle().await;
    drop(leader);
    settle().await;
    assert_eq!(t.calls.live(), 1);
    t.calls.resolve(0, Cmd::Ok(4));
    settle().await;
    assert!(follower.woken());
    assert!(follower.poll());
    assert_values(&[&follower], 4);
    assert_eq!(t.group.stats().abandoned, 0);
    t.ended_on_runtime(1).await;
}

#[tokio::test(flavor = "current_thread")]
async fn current_thread_follower_after_leader_parked_then_leader_finishes_through_the_task() {
    let t = Callers::new();
    let mut leader = t.leader().parked();
    let mut follower = t.follower();
    // The leader is not polled again before the outcome: its waker from
    // the lone poll must be the one woken.
    settle().await;
    t.calls.resolve(0, Cmd::Ok(4));
    settle().await;
    assert!(
        leader.woken(),
        "the leader's waker from its lone poll was lost"
    );
    assert!(leader.poll());
    assert!(follower.poll());
    assert_values(&[&leader, &follower], 4);
    assert!(leader.is_shared());
    t.ended_on_runtime(1).await;
}

#[tokio::test(flavor = "current_thread")]
async fn current_thread_everyone_leaves_a_shared_flight_and_the_call_is_dropped() {
    let t = Callers::new();
    let (leader, follower) = t.parked_pair();
    settle().await;
    drop(follower);
    drop(leader);
    t.ended_on_runtime(1).await;
    assert_eq!(t.group.stats().abandoned, 1);
    t.leader();
}

#[tokio::test(flavor = "current_thread")]
async fn current_thread_everyone_leaves_before_the_leader_ever_polled() {
    let t = Callers::new();
    let leader = t.leader();
    drop(t.follower());
    settle().await;
    drop(leader);
    t.ended_on_runtime(1).await;
    assert_eq!(t.group.stats().abandoned, 1);
}

#[tokio::test(flavor = "current_thread")]
async fn current_thread_forget_while_lone_then_the_leader_is_joined_by_no_one() {
    let t = Callers::new();
    let mut old = t.leader().parked();
    assert!(t.group.forget(&1));
    let mut fresh = t.leader();
    let mut follower = t.follower();
    assert!(!fresh.poll());
    assert!(!follower.poll());
    settle().await;
    t.calls.resolve(0, Cmd::Ok(1));
    settle().await;
    assert!(old.poll());
    assert_values(&[&old], 1);
    assert!(!old.is_shared());
    assert_eq!(t.group.len(), 1);
    t.calls.resolve(1, Cmd::Ok(2));
    settle().await;
    assert!(fresh.poll() && follower.poll());
    assert_values(&[&fresh, &follower], 2);
    t.ended_on_runtime(2).await;
}

#[tokio::test(flavor = "current_thread")]
async fn current_thread_run_to_completion_lone_leader_dropped_a_late_caller_joins() {
    let t = Callers::running_to_completion();
    drop(t.leader().parked());
    settle().await;
    assert_eq!(t.calls.live(), 1, "the call runs on");
    assert_eq!(t.group.len(), 1);
    assert_eq!(gauges(t.group.stats()), (1, 0));
    let mut late = t.follower().parked();
    t.calls.resolve(0, Cmd::Ok(3));
    settle().await;
    assert!(late.poll());
    assert_values(&[&late], 3);
    assert_eq!(t.calls.finished(), 1);
    assert_eq!(t.group.stats().abandoned, 0);
    t.ended_on_runtime(1).await;
}

#[tokio::test(flavor = "current_thread")]
async fn current_thread_run_to_completion_leader_dropped_before_its_first_poll() {
    let t = Callers::running_to_completion();
    drop(t.leader());
    settle().await;
    assert_eq!(t.calls.live(), 1);
    t.calls.resolve(0, Cmd::Ok(3));
    eventually_async("the call finishes", || t.calls.finished() == 1).await;
    t.ended_on_runtime(1).await;
}

#[tokio::test(flavor = "current_thread")]
async fn current_thread_run_to_completion_forgotten_lone_leader_dropped() {
    let t = Callers::running_to_completion();
    let leader = t.leader().parked();
    assert!(t.group.forget(&1));
    drop(leader);
    settle().await;
    assert_eq!(
        t.calls.live(),
        1,
        "a forgotten call still runs to completion"
    );
    assert_eq!(t.group.len(), 0);
    let mut fresh = t.leader().parked();
    t.calls.resolve(0, Cmd::Ok(1));
    t.calls.resolve(1, Cmd::Ok(2));
    settle().await;
    assert!(fresh.poll());
    assert_values(&[&fresh], 2);
    eventually_async("both calls finish", || t.calls.finished() == 2).await;
    t.ended_on_runtime(2).await;
}

#[tokio::test(flavor = "current_thread")]
async fn current_thread_run_to_completion_shared_everyone_dropped() {
    let t = Callers::running_to_completion();
    let (leader, follower) = t.parked_pair();
    settle().await;
    drop(leader);
    drop(follower);
    settle().await;
    assert_eq!(t.calls.live(), 1);
    assert_eq!(t.group.len(), 1);
    t.calls.resolve(0, Cmd::Ok(1));
    eventually_async("the call finishes", || t.calls.finished() == 1).await;
    assert_eq!(t.group.stats().abandoned, 0);
    t.ended_on_runtime(1).await;
}

#[tokio::test(flavor = "current_thread")]
async fn current_thread_run_to_completion_forgotten_shared_everyone_dropped() {
    let t = Callers::running_to_completion();
    let leader = t.leader().parked();
    let follower = t.follower();
    assert!(t.group.forget(&1));
    drop(follower);
    drop(leader);
    settle().await;
    assert_eq!(t.calls.live(), 1);
    assert_eq!(t.group.len(), 0);
    t.calls.resolve(0, Cmd::Ok(1));
    eventually_async("the call finishes", || t.calls.finished() == 1).await;
    t.ended_on_runtime(1).await;
}

#[tokio::test(flavor = "current_thread")]
async fn current_thread_a_task_driven_call_asking_for_its_own_key() {
    let t = Callers::new();
    let inner = Arc::new(AtomicUsize::new(0));
    let mut leader = Polled::new(t.group.run(1, reentrant(&t, &inner))).parked();
    let mut follower = Polled::new(t.group.run(1, reentrant(&t, &inner))).parked();
    settle().await;
    t.calls.resolve(0, Cmd::Ok(2));
    settle().await;
    assert!(
        leader.poll() && follower.poll(),
        "the call waits for itself"
    );
    assert_values(&[&leader, &follower], 42);
    assert_eq!(inner.load(SeqCst), 1);
    t.ended_on_runtime(1).await;
}

#[tokio::test(flavor = "current_thread")]
async fn current_thread_follower_past_its_wait_limit_calls_its_own_while_the_leader_is_lone_parked()
{
    let t = Callers::new();
    let limited = t
        .group
        .clone()
        .follower_wait_limit(Duration::from_millis(20), OnWaitLimit::CallOwn);

    let mut leader = t.leader().parked();
    let follower = limited.run(1, t.calls.work());
    assert_eq!(follower.role(), Role::Follower);
    let follower = tokio::spawn(async move {
        let mut follower = Box::pin(follower);
        let out = follower.as_mut().await;
        (out, follower.role())
    });
    eventually_async("the follower makes its own call", || t.calls.started() == 2).await;
    t.calls.resolve(1, Cmd::Ok(9));
    let (out, role) = tokio::time::timeout(WAIT, follower).await.unwrap().unwrap();
    assert_eq!(ok(&out), 9);
    assert_eq!(role, Role::Fallback);
    t.calls.resolve(0, Cmd::Ok(7));
    settle().await;
    assert!(leader.poll());
    assert_values(&[&leader], 7);
    t.ended_on_runtime(2).await;
}

#[tokio::test(flavor = "current_thread")]
async fn current_thread_the_layer_shares_a_call_whose_leader_left_before_polling() {
    let t = Callers::new();
    let inner = {
        let calls = Arc::clone(&t.calls);
        service_fn(move |_: u32| calls.gated())
    };
    let mut svc = ServiceBuilder::new()
        .layer(SingleflightLayer::new(|r: &u32| *r).with_group(t.group.clone()))
        .service(inner);

    let leader = svc.ready().await.unwrap().call(1);
    assert_eq!(leader.role(), Role::Leader);
    let mut follower = Polled::new(svc.ready().await.unwrap().call(1));
    assert_eq!(follower.fut.role(), Role::Follower);
    assert!(!follower.poll());
    drop(leader);
    settle().await;
    assert_eq!(t.calls.started(), 1);
    t.calls.resolve(0, Cmd::Ok(5));
    settle().await;
    assert!(follower.poll());
    match follower.out() {
        Ok(v) => assert_eq!(*v, 5),
        Err(e) => panic!("{e:?}"),
    }
    t.ended_on_runtime(1).await;
}

// ===========================================================================
// C. Multi-thread runtime: the leader held inside its poll or its make
// ===========================================================================

#[test]
fn multi_thread_follower_joins_while_the_leader_is_inside_its_poll_then_the_call_pends() {
    multi_thread(Group::new(), |t| {
        let (leader, follower) = t.joined_while_held(Held::InPoll);
        t.s.send(Cmd::Pending);
        // Someone (a task) polls it on; it finishes there.
        t.s.step(Cmd::Ok(7));
        t.shared_value(leader, follower, 7);
        t.ended(1);
    });
}

#[test]
fn multi_thread_follower_joins_while_the_leader_makes_its_call_then_the_call_pends() {
    multi_thread(Group::new(), |t| {
        let (leader, follower) = t.joined_while_held(Held::InMake);
        t.let_go_pending_then(Held::InMake, 5);
        t.shared_value(leader, follower, 5);
        t.ended(1);
    });
}

#[test]
fn multi_thread_follower_joins_while_the_leader_is_held_then_the_call_finishes() {
    for_each_case(&[Held::InPoll, Held::InMake], |at| {
        multi_thread(Group::new(), |t| {
            let (leader, follower) = t.joined_while_held(at);
            t.let_go(at, Cmd::Ok(7));
            t.shared_value(leader, follower, 7);
            t.ended(1);
        });
    });
}

#[test]
fn multi_thread_follower_joins_while_the_leader_is_held_then_it_panics() {
    for_each_case(&[Held::InPoll, Held::InMake], |at| {
        multi_thread(Group::new(), |t| {
            let (leader, follower) = t.joined_while_held(at);
            let message = t.let_go_panicking(at);
            assert_panic(&t.wait(leader).0, message);
            assert_panic(&t.wait(follower).0, message);
            assert_eq!(t.group.stats().panics, 1);
            t.ended(usize::from(at == Held::InPoll));

            // The key is free after a panic.
            let next = t.fresh_leader(1);
            assert_eq!(t.value(next), 1);
            assert_idle(&t.group);
        });
    });
}

#[test]
fn multi_thread_follower_joins_and_leaves_while_the_leader_is_held() {
    for_each_case(&[Held::InPoll, Held::InMake], |at| {
        multi_thread(Group::new(), |t| {
            let leader = t.leader(at);
            drop(t.follower());
            // The leader is the only waiter: the call wakes it, it polls again.
            t.let_go_pending_then(at, 8);
            assert_eq!(t.value(leader), 8);
            t.ended(1);
        });
    });
}

#[test]
fn multi_thread_forget_a_lone_flight_while_its_leader_is_held() {
    // Whether the forgotten call pends once before it finishes.
    let cases = [
        (Held::InPoll, true),
        (Held::InPoll, false),
        (Held::InMake, true),
        (Held::InMake, false),
    ];
    for_each_case(&cases, |(at, pends)| {
        multi_thread(Group::new(), |t| {
            let old = t.leader(at);
            assert!(t.group.forget(&1));
            assert_eq!(t.group.len(), 0);
            let fresh = t.fresh_leader(2);
            assert_eq!(t.value(fresh), 2);
            if pends {
                t.let_go_pending_then(at, 1);
            } else {
                t.let_go(at, Cmd::Ok(1));
            }
            let (o, shared) = t.wait(old);
            assert_eq!(ok(&o), 1);
            assert!(!shared);
            t.ended(1);
        });
    });
}

#[test]
fn multi_thread_forget_after_a_follower_joined_while_the_leader_is_inside_its_poll() {
    multi_thread(Group::new(), |t| {
        let (leader, follower) = t.joined_while_held(Held::InPoll);
        assert!(t.group.forget(&1));
        assert!(!t.group.forget(&1));
        assert_eq!(t.group.len(), 0);
        let fresh = t.fresh_leader(2);
        t.s.send(Cmd::Pending);
        t.s.step(Cmd::Ok(1));
        t.shared_value(leader, follower, 1);
        assert_eq!(t.value(fresh), 2);
        t.ended(1);
    });
}

#[test]
fn multi_thread_leader_aborted_after_the_flight_turned_shared_inside_its_poll() {
    multi_thread(Group::new(), |t| {
        let (leader, follower) = t.joined_while_held(Held::InPoll);
        t.s.send(Cmd::Pending);
        // A task takes the call up at once.
        t.s.step(Cmd::Pending);
        leader.abort();
        t.cancelled(leader);
        assert_eq!(t.s.live(), 1, "the call survives its leader");
        t.s.wake();
        t.s.step(Cmd::Ok(3));
        assert_eq!(t.value(follower), 3);
        t.ended(1);
    });
}

#[test]
fn multi_thread_leader_aborted_while_inside_its_poll_after_a_follower_joined() {
    multi_thread(Group::new(), |t| {
        let (leader, follower) = t.joined_while_held(Held::InPoll);
        // Cancelled while it polls: it leaves as soon as the poll returns.
        leader.abort();
        t.s.send(Cmd::Pending);
        t.cancelled(leader);
        // Whoever drives it now polls it.
        t.s.step(Cmd::Ok(3));
        assert_eq!(t.value(follower), 3);
        t.ended(1);
    });
}

#[test]
fn multi_thread_many_followers_join_while_the_leader_is_inside_its_poll() {
    multi_thread(Group::new(), |t| {
        let leader = t.leader(Held::InPoll);
        let mut followers = Vec::new();
        for i in 0..8 {
            let run = t.follower();
            if i % 3 == 2 {
                drop(run);
            } else {
                followers.push(t.spawn(run));
            }
        }
        t.s.send(Cmd::Pending);
        t.s.step(Cmd::Pending);
        leader.abort();
        t.s.wake();
        t.s.step(Cmd::Ok(9));
        for f in followers {
            assert_eq!(t.value(f), 9);
        }
        let stats = t.group.stats();
        assert_eq!((stats.leaders, stats.followers), (1, 8));
        t.ended(1);
    });
}

#[test]
fn multi_thread_run_to_completion_leader_cancelled_while_lone_inside_its_poll() {
    multi_thread(Group::new().run_to_completion(true), |t| {
        let leader = t.leader(Held::InPoll);
        leader.abort();
        t.s.send(Cmd::Pending);
        t.cancelled(leader);
        // A task polls it on.
        t.s.step(Cmd::Ok(1));
        eventually("the call finishes", || t.s.finished() == 1);
        t.ended(1);
    });
}

#[test]
fn multi_thread_run_to_completion_everyone_cancelled_after_the_flight_turned_shared() {
    multi_thread(Group::new().run_to_completion(true), |t| {
        let (leader, follower) = t.joined_while_held(Held::InPoll);
        t.s.send(Cmd::Pending);
        t.s.step(Cmd::Pending);
        leader.abort();
        follower.abort();
        t.cancelled(leader);
        t.cancelled(follower);
        assert_eq!(t.s.live(), 1);
        // The running call can still be joined.
        let late = t.spawn(t.follower());
        t.s.wake();
        t.s.step(Cmd::Ok(4));
        assert_eq!(t.value(late), 4);
        t.ended(1);
    });
}

#[test]
fn multi_thread_leader_never_polled_while_the_task_finishes_the_call() {
    multi_thread(Group::new(), |t| {
        let mut leader = Polled::new(t.group.run(1, t.s.work()));
        assert_eq!(leader.role(), Role::Leader);
        let follower = t.spawn(t.follower());
        t.s.step(Cmd::Ok(6));
        assert_eq!(t.value(follower), 6);
        assert_eq!(t.group.len(), 0);
        assert_eq!(gauges(t.group.stats()), (0, 1));
        assert!(leader.poll());
        assert_eq!(ok(leader.out()), 6);
        assert!(leader.is_shared());
        t.ended(1);
    });
}

/// Work that counts its calls in `inner` and returns 40.
fn forty(inner: &Arc<AtomicUsize>) -> impl FnOnce() -> std::future::Ready<Out> + Send + 'static {
    let inner = Arc::clone(inner);
    move || {
        inner.fetch_add(1, SeqCst);
        std::future::ready(Ok(40))
    }
}

/// Spawns a leader whose scripted call, once it returns, runs `then` with
/// the group and the value and finishes with what `then` returns; waits
/// until the call is polled, then makes a follower join whose work must
/// never start (its count is returned).
fn leader_calling_then_a_follower<F, Fut>(t: &Mt, then: F) -> (Handle, Handle, Arc<AtomicUsize>)
where
    F: FnOnce(Group<u32, u32>, u32) -> Fut + Send + 'static,
    Fut: Future<Output = Out> + Send + 'static,
{
    let work = {
        let (group, s) = (t.group.clone(), Arc::clone(&t.s));
        move || {
            let first = s.scripted();
            async move { then(group, first.await?).await }
        }
    };
    let leader = t.spawn(t.group.run(1, work));
    t.s.entered();
    let unexpected = Arc::new(AtomicUsize::new(0));
    let follower = t.spawn(t.group.run(1, never(&unexpected)));
    (leader, follower, unexpected)
}

#[test]
fn multi_thread_a_call_asking_for_its_own_key_inside_a_poll_after_a_follower_joined() {
    multi_thread(Group::new(), |t| {
        let inner = Arc::new(AtomicUsize::new(0));
        let asks = forty(&inner);
        let (leader, follower, unexpected) =
            leader_calling_then_a_follower(t, move |group, first| async move {
                let again = group.run(1, asks);
                if again.role() != Role::Leader {
                    return Err(Fail(501));
                }
                Ok(first + again.await.map_err(|_| Fail(500))?)
            });
        t.s.send(Cmd::Pending);
        t.s.step(Cmd::Ok(2));
        t.shared_value(leader, follower, 42);
        assert_eq!(inner.load(SeqCst), 1);
        assert_eq!(unexpected.load(SeqCst), 0);
        assert_idle(&t.group);
    });
}

#[test]
fn multi_thread_a_call_forgets_its_key_after_a_follower_joined_then_asks_for_it() {
    multi_thread(Group::new(), |t| {
        let inner = Arc::new(AtomicUsize::new(0));
        let asks = forty(&inner);
        let (leader, follower, unexpected) =
            leader_calling_then_a_follower(t, move |group, first| async move {
                if !group.forget(&1) {
                    return Err(Fail(502));
                }
                Ok(first + group.run(1, asks).await.map_err(|_| Fail(500))?)
            });
        t.s.send(Cmd::Ok(2));
        t.shared_value(leader, follower, 42);
        assert_eq!(inner.load(SeqCst), 1);
        assert_eq!(unexpected.load(SeqCst), 0);
        assert_idle(&t.group);
    });
}

#[test]
fn multi_thread_a_lone_leaders_call_drops_a_follower_that_joined_during_its_poll() {
    multi_thread(Group::new(), |t| {
        let parked: Parked = Arc::default();
        // The leader's call: one scripted step, then drop whoever is parked,
        // then one more scripted step.
        let work = {
            let (s, parked) = (Arc::clone(&t.s), Arc::clone(&parked));
            move || {
                let (first, second) = (s.scripted(), s.scripted());
                async move {
                    first.await?;
                    drop(std::mem::take(&mut *parked.lock().unwrap()));
                    second.await
                }
            }
        };
        let leader = t.spawn(t.group.run(1, work));
        t.s.entered();
        parked.lock().unwrap().push(Box::new(t.follower()));
        t.s.send(Cmd::Ok(0));
        t.s.step(Cmd::Pending);
        t.s.wake();
        t.s.step(Cmd::Ok(5));
        assert_eq!(t.value(leader), 5);
        // Two scripted steps, one call.
        t.ended(2);
    });
}

// ===========================================================================
// D. No runtime, several threads: block_on
// ===========================================================================

/// Runs a caller on a thread of its own, with no runtime, and waits until
/// its first poll has returned.
fn polled_on_thread<F>(caller: F) -> mpsc::Receiver<F::Output>
where
    F: Future + Unpin + Send + 'static,
    F::Output: Send + 'static,
{
    let (polled_tx, polled_rx) = mpsc::channel();
    let caller = on_thread(noting(caller, polled_tx));
    polled_rx
        .recv_timeout(WAIT)
        .expect("the follower was not polled");
    caller
}

/// A group and scripted calls on key 1, for callers on plain threads.
struct Threads {
    group: Group<u32, u32>,
    s: Arc<Script>,
}

impl Threads {
    fn new() -> Self {
        Self {
            group: Group::new(),
            s: Script::new(),
        }
    }

    /// A new caller of key 1 that must join the flight in progress.
    #[track_caller]
    fn follower(&self) -> Run<u32, u32, WorkOf<Script, Scripted>> {
        let follower = self.group.run(1, self.s.work());
        assert_eq!(follower.role(), Role::Follower);
        follower
    }

    /// A leader on a thread of its own, held inside the making of its call.
    fn leader_in_make(&self) -> mpsc::Receiver<Result<u32, Error>> {
        let (group, work) = (self.group.clone(), self.s.blocking_make());
        let leader = thread(move || futures::executor::block_on(group.run(1, work)));
        self.s.making();
        leader
    }
}

#[test]
fn no_runtime_threads_follower_joins_while_the_leader_is_inside_its_poll() {
    let t = Threads::new();
    let leader = t.group.run(1, t.s.work());
    let leader = thread(move || {
        let mut leader = Box::pin(leader);
        let out = futures::executor::block_on(leader.as_mut());
        (out, leader.is_shared())
    });
    t.s.entered();
    let follower = polled_on_thread(Box::pin(t.follower()));
    t.s.send(Cmd::Pending);
    t.s.wake();
    t.s.step(Cmd::Ok(7));
    let (l, l_shared) = joined(&leader);
    let f = joined(&follower);
    assert_eq!((ok(&l), ok(&f)), (7, 7));
    assert!(l_shared);
    assert_eq!(t.s.started(), 1);
    assert_idle(&t.group);
}

#[test]
fn no_runtime_threads_leader_leaves_after_the_flight_turned_shared_inside_its_poll() {
    let t = Threads::new();
    let (leave_tx, leave_rx) = oneshot::channel::<()>();
    let leader = t.group.run(1, t.s.work());
    let leader = thread(move || {
        let leader = Box::pin(leader);
        match futures::executor::block_on(futures::future::select(leave_rx, leader)) {
            futures::future::Either::Left(_) => None,
            futures::future::Either::Right((out, _)) => Some(out),
        }
    });
    t.s.entered();
    let follower = polled_on_thread(Box::pin(t.follower()));
    t.s.send(Cmd::Pending);
    leave_tx.send(()).unwrap();
    assert!(joined(&leader).is_none(), "the leader left");
    assert_eq!(t.s.live(), 1, "the call survives its leader");
    // The follower must be handed the call: it polls it next.
    t.s.step(Cmd::Ok(7));
    assert_eq!(ok(&joined(&follower)), 7);
    assert_eq!(t.s.started(), 1);
    assert_idle(&t.group);
}

#[test]
fn no_runtime_threads_forget_while_the_leader_is_inside_its_poll() {
    let t = Threads::new();
    let old = on_thread(t.group.run(1, t.s.work()));
    t.s.entered();
    assert!(t.group.forget(&1));
    let s2 = Script::new();
    let fresh = t.group.run(1, s2.work());
    assert_eq!(fresh.role(), Role::Leader);
    let follower = t.group.run(1, s2.work());
    assert_eq!(follower.role(), Role::Follower);
    let fresh = on_thread(fresh);
    let follower = on_thread(follower);
    s2.step(Cmd::Ok(2));
    t.s.send(Cmd::Ok(1));
    assert_eq!(ok(&joined(&old)), 1);
    assert_eq!(ok(&joined(&fresh)), 2);
    assert_eq!(ok(&joined(&follower)), 2);
    assert_eq!((t.s.started(), s2.started()), (1, 1));
    assert_idle(&t.group);
}

#[test]
fn no_runtime_threads_follower_joins_while_the_leader_makes_its_call() {
    let t = Threads::new();
    let leader = t.leader_in_make();
    let follower = on_thread(t.follower());
    t.s.release_make(true);
    t.s.step(Cmd::Pending);
    t.s.wake();
    t.s.step(Cmd::Ok(5));
    assert_eq!(ok(&joined(&leader)), 5);
    assert_eq!(ok(&joined(&follower)), 5);
    assert_eq!(t.s.started(), 1);
    assert_idle(&t.group);
}

#[test]
fn no_runtime_threads_make_panics_after_a_follower_joined() {
    let t = Threads::new();
    let leader = t.leader_in_make();
    let follower = on_thread(t.follower());
    t.s.release_make(false);
    assert_panic(&joined(&leader), "make boom");
    assert_panic(&joined(&follower), "make boom");
    assert_eq!(t.group.stats().panics, 1);
    assert_idle(&t.group);
}

// ===========================================================================
// E. Randomized stress on two workers
// ===========================================================================

/// A small deterministic generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Default)]
struct StressBooks {
    made: AtomicUsize,
    live: AtomicUsize,
    panicked: AtomicUsize,
    runs: AtomicUsize,
    wrong: AtomicUsize,
    /// Polls of a call after a newer call for its key was made.
    overlaps: AtomicUsize,
    current: Vec<AtomicUsize>,
}

struct StressCall {
    books: Arc<StressBooks>,
    key: u32,
    id: usize,
    yields: u64,
    ending: u64,
}

impl Future for StressCall {
    type Output = Result<u64, Fail>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if self.books.current[self.key as usize].load(SeqCst) != self.id {
            self.books.overlaps.fetch_add(1, SeqCst);
        }
        if self.yields > 0 {
            self.yields -= 1;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        match self.ending {
            0 => {
                self.books.panicked.fetch_add(1, SeqCst);
                panic!("stress boom")
            }
            1 => Poll::Ready(Err(Fail(7))),
            _ => Poll::Ready(Ok(u64::from(self.key) * 1_000_000 + self.id as u64)),
        }
    }
}

impl Drop for StressCall {
    fn drop(&mut self) {
        self.books.live.fetch_sub(1, SeqCst);
    }
}

fn quiet_expected_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let message = info.payload().downcast_ref::<&str>().copied();
            if !matches!(message, Some("stress boom")) {
                default(info);
            }
        }));
    });
}

fn stress(forgets: bool, seed: u64, keys: u32) {
    quiet_expected_panics();
    #[allow(non_snake_case)]
    let KEYS: u32 = keys;
    const TASKS: u64 = 3000;
    let rt = mt_runtime();
    let group: Group<u32, u64> = Group::new();
    let completing = group.clone().run_to_completion(true);
    let books = Arc::new(StressBooks {
        current: (0..KEYS).map(|_| AtomicUsize::new(usize::MAX)).collect(),
        ..StressBooks::default()
    });

    // Panics in calls are expected here; keep the output readable.
    rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..TASKS {
            let mut rng = Rng(seed ^ (i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            rng.next();
            let group = if rng.below(4) == 0 {
                completing.clone()
            } else {
                group.clone()
            };
            let books = Arc::clone(&books);
            tasks.push(tokio::spawn(async move {
                let key = rng.below(u64::from(KEYS)) as u32;
                if forgets && rng.below(25) == 0 {
                    group.forget(&key);
                }
                for _ in 0..rng.below(3) {
                    tokio::task::yield_now().await;
                }
                let (yields, ending) = (rng.below(6), rng.below(25));
                let work = {
                    let books = Arc::clone(&books);
                    move || {
                        let id = books.made.fetch_add(1, SeqCst);
                        books.live.fetch_add(1, SeqCst);
                        books.current[key as usize].store(id, SeqCst);
                        StressCall {
                            books,
                            key,
                            id,
                            yields,
                            ending,
                        }
                    }
                };
                books.runs.fetch_add(1, SeqCst);
                let run = group.run(key, work);
                let out = if rng.below(5) == 0 {
                    let leave_after = rng.below(4);
                    tokio::select! {
                        biased;
                        out = run => Some(out),
                        () = async {
                            for _ in 0..leave_after {
                                tokio::task::yield_now().await;
                            }
                        } => None,
                    }
                } else {
                    Some(run.await)
                };
                match out {
                    Some(Ok(v)) if v / 1_000_000 != u64::from(key) => {
                        books.wrong.fetch_add(1, SeqCst);
                    }
                    Some(Err(e)) if !e.is_panic() && e.downcast_ref::<Fail>() != Some(&Fail(7)) => {
                        books.wrong.fetch_add(1, SeqCst);
                    }
                    _ => {}
                }
            }));
            if i % 8 == 0 {
                tokio::task::yield_now().await;
            }
        }
        for task in tasks {
            tokio::time::timeout(WAIT, task)
                .await
                .expect("a caller hung")
                .expect("a caller's task panicked");
        }
    });
    eventually("every call ends", || books.live.load(SeqCst) == 0);
    assert_idle(&group);
    let stats = group.stats();
    let made = books.made.load(SeqCst) as u64;
    assert_eq!(
        books.wrong.load(SeqCst),
        0,
        "a waiter got another key's outcome"
    );
    assert_eq!(
        stats.leaders, made,
        "every leader makes exactly one call: {stats:?}"
    );
    assert_eq!(
        stats.leaders + stats.followers,
        books.runs.load(SeqCst) as u64,
        "{stats:?}"
    );
    assert_eq!(stats.panics, books.panicked.load(SeqCst) as u64);
    eprintln!("stress: {stats:?}");
    if !forgets {
        assert_eq!(
            books.overlaps.load(SeqCst),
            0,
            "a call was polled after a newer call for its key was made"
        );
    }
    drop(rt);
}

#[test]
fn stress_random_arrivals_and_cancellations_on_two_workers_never_overlap_calls_per_key() {
    for round in 0..6 {
        stress(false, 0x5EED_0001 + round, [2, 5, 12][round as usize % 3]);
    }
}

#[test]
fn stress_random_arrivals_cancellations_and_forgets_on_two_workers() {
    for round in 0..6 {
        stress(true, 0x5EED_0002 + round, [2, 5, 12][round as usize % 3]);
    }
}

// ===========================================================================
// F. More transitions: runtime shutdown, wake counts, two threads by hand
// ===========================================================================

#[test]
fn runtime_shut_down_under_a_shared_call_hands_it_back_to_the_callers() {
    let t = Callers::new();
    let rt = current_thread_runtime();
    let (mut leader, mut follower) = rt.block_on(async {
        let pair = t.parked_pair();
        settle().await;
        pair
    });
    assert!(
        t.calls.polls.load(SeqCst) >= 2,
        "the task never polled the call"
    );
    // The task driving the call goes with its runtime.
    drop(rt);
    assert_eq!(t.calls.live(), 1, "the call must survive the task");
    run_woken(&mut [&mut leader, &mut follower]);
    // Some caller must have been handed the call when its task went away.
    t.deliver(0, 5, &mut [&mut leader, &mut follower]);
    t.ended(1);
}

#[test]
fn runtime_shut_down_under_a_lone_leaders_call_taken_over_by_a_task_before_its_first_poll() {
    let t = Callers::new();
    let rt = current_thread_runtime();
    // The follower joins before the leader's first poll; the task never runs.
    let (mut leader, mut follower) = rt.block_on(async { (t.leader(), t.follower()) });
    drop(rt);
    assert_eq!(t.calls.live(), 1);
    assert!(!follower.poll() || follower.done());
    assert!(!leader.poll() || leader.done());
    // Neither hangs after the runtime went away.
    t.deliver(0, 5, &mut [&mut leader, &mut follower]);
    t.ended(1);
}

#[test]
fn runtime_shut_down_under_a_call_running_to_completion_drops_it() {
    let t = Callers::running_to_completion();
    let rt = current_thread_runtime();
    rt.block_on(async {
        drop(t.leader().parked());
        settle().await;
        assert_eq!(t.calls.live(), 1);
    });
    drop(rt);
    assert_eq!(t.calls.live(), 0, "the call outlived its runtime");
    assert_idle(&t.group);
    let mut next = t.leader();
    t.calls.resolve(1, Cmd::Ok(1));
    assert!(next.poll());
    t.ended(2);
}

#[tokio::test(flavor = "current_thread")]
async fn current_thread_followers_are_woken_once_whenever_they_join() {
    for point in 0..3 {
        let t = Callers::new();
        let mut leader = t.leader();
        if point >= 1 {
            assert!(!leader.poll());
        }
        let mut followers: Vec<_> = (0..3).map(|_| t.follower().parked()).collect();
        if point == 2 {
            drop(leader);
            leader = t.follower().parked();
        }
        settle().await;
        for f in &followers {
            assert!(
                !f.woken(),
                "point {point}: a follower was woken before the outcome"
            );
        }
        t.calls.resolve(0, Cmd::Ok(1));
        settle().await;
        for f in &mut followers {
            assert_eq!(
                f.wakes.0.load(SeqCst),
                1,
                "point {point}: woken more than once"
            );
            assert!(f.poll());
            assert_eq!(f.polls, 2, "point {point}");
            assert_eq!(ok(f.out()), 1);
        }
        assert!(leader.poll());
        assert_eq!(ok(leader.out()), 1);
        t.ended_on_runtime(1).await;
    }
}

type Parked = Arc<Mutex<Vec<Box<dyn std::any::Any + Send>>>>;

/// A call that, once its gate opens, drops every caller parked in `parked`
/// (its own waiters among them), then finishes with `finish` (or never).
fn dropping_waiters(
    calls: &Arc<Calls>,
    parked: &Parked,
    finish: Option<u32>,
) -> impl FnOnce() -> Pin<Box<dyn Future<Output = Out> + Send>> + Send + 'static {
    let (calls, parked) = (Arc::clone(calls), Arc::clone(parked));
    move || {
        let gate = calls.gated();
        Box::pin(async move {
            gate.await?;
            let waiters = std::mem::take(&mut *parked.lock().unwrap());
            drop(waiters);
            match finish {
                Some(v) => Ok(v),
                None => std::future::pending().await,
            }
        })
    }
}

#[tokio::test(flavor = "current_thread")]
async fn current_thread_a_task_driven_call_that_drops_all_its_waiters_from_inside_its_poll() {
    for finish in [None, Some(3)] {
        let t = Callers::new();
        let parked: Parked = Arc::default();
        let caller = || Polled::new(t.group.run(1, dropping_waiters(&t.calls, &parked, finish)));
        let leader = caller().parked();
        let follower = caller().parked();
        parked.lock().unwrap().push(Box::new(leader));
        parked.lock().unwrap().push(Box::new(follower));
        settle().await;
        t.calls.resolve(0, Cmd::Ok(0));
        let settled = tokio::time::timeout(WAIT, settle()).await;
        assert!(settled.is_ok(), "finish {finish:?}: deadlocked");
        t.ended_on_runtime(1).await;
        assert!(parked.lock().unwrap().is_empty(), "finish {finish:?}");
        let stats = t.group.stats();
        assert_eq!(
            stats.abandoned,
            u64::from(finish.is_none()),
            "finish {finish:?}: {stats:?}"
        );
    }
}

#[test]
fn no_runtime_a_call_polled_by_a_follower_drops_the_leader_from_inside_its_poll() {
    let t = Callers::new();
    let parked: Parked = Arc::default();
    let caller = || Polled::new(t.group.run(1, dropping_waiters(&t.calls, &parked, Some(4))));
    let leader = caller().parked();
    let mut follower = caller();
    assert!(!follower.poll(), "the follower polls the call last");
    parked.lock().unwrap().push(Box::new(leader));
    t.calls.resolve(0, Cmd::Ok(0));
    run_woken(&mut [&mut follower]);
    assert!(follower.done(), "the follower hung");
    assert_values(&[&follower], 4);
    t.ended(1);
}

/// Two plain threads share one group, poll their callers by hand, resolve
/// their own calls, drop callers and forget keys at random.
#[test]
fn no_runtime_stress_two_threads_polling_by_hand() {
    quiet_expected_panics();
    let group: Group<u32, u32> = Group::new();
    let mut threads = Vec::new();
    for t in 0..2u64 {
        let group = group.clone();
        threads.push(std::thread::spawn(move || {
            let mut rng = Rng(0xA11CE ^ ((t + 1) * 0x9E37_79B9));
            let calls = Calls::new();
            let mut keys_of_calls: Vec<u32> = Vec::new();
            let mut waiters: Vec<(u32, Polled<Run<u32, u32, _>>)> = Vec::new();
            let mut wrong = 0;
            let key_work = |calls: &Arc<Calls>| calls.work();
            let resolve = |calls: &Arc<Calls>, keys: &Vec<u32>, i: usize, how: u64| {
                let tx = calls.gates.lock().unwrap()[i].take();
                if let Some(tx) = tx {
                    let v = keys[i] * 1000 + (t as u32) * 100 + (i as u32 % 100);
                    let cmd = match how {
                        0 => Cmd::Panic,
                        1 => Cmd::Err(3),
                        _ => Cmd::Ok(v),
                    };
                    let _ = tx.send(cmd);
                }
            };
            for _ in 0..3000 {
                match rng.below(100) {
                    0..=29 => {
                        let key = rng.below(5) as u32;
                        let before = calls.started();
                        let run = group.run(key, key_work(&calls));
                        if calls.started() > before {
                            keys_of_calls.push(key);
                        }
                        waiters.push((key, Polled::new(run)));
                    }
                    30..=49 if !waiters.is_empty() => {
                        let i = rng.below(waiters.len() as u64) as usize;
                        waiters[i].1.poll();
                    }
                    50..=64 if !keys_of_calls.is_empty() => {
                        let i = rng.below(keys_of_calls.len() as u64) as usize;
                        let how = rng.below(30);
                        resolve(&calls, &keys_of_calls, i, how);
                    }
                    65..=74 if !waiters.is_empty() => {
                        let i = rng.below(waiters.len() as u64) as usize;
                        waiters.swap_remove(i);
                    }
                    75..=78 => {
                        group.forget(&(rng.below(5) as u32));
                    }
                    _ => {
                        let mut steps: Vec<&mut dyn Step> = waiters
                            .iter_mut()
                            .map(|(_, p)| p as &mut dyn Step)
                            .collect();
                        run_woken(&mut steps);
                    }
                }
                // Check and clear the finished ones.
                waiters.retain(|(key, p)| {
                    if let Some(out) = &p.out {
                        match out {
                            Ok(v) if v / 1000 != *key => wrong += 1,
                            Err(e)
                                if !e.is_panic() && e.downcast_ref::<Fail>() != Some(&Fail(3)) =>
                            {
                                wrong += 1;
                            }
                            _ => {}
                        }
                        false
                    } else {
                        true
                    }
                });
            }
            // Resolve everything of ours, then wait for every caller.
            for i in 0..keys_of_calls.len() {
                resolve(&calls, &keys_of_calls, i, 99);
            }
            for p in waiters.iter_mut() {
                p.1.poll();
            }
            let deadline = Instant::now() + WAIT;
            while waiters.iter().any(|(_, p)| !p.done()) {
                let mut steps: Vec<&mut dyn Step> = waiters
                    .iter_mut()
                    .map(|(_, p)| p as &mut dyn Step)
                    .collect();
                run_woken(&mut steps);
                if Instant::now() > deadline {
                    let stuck = waiters.iter().filter(|(_, p)| !p.done()).count();
                    return Err(format!("thread {t}: {stuck} callers hung"));
                }
                std::thread::yield_now();
            }
            for (key, p) in &waiters {
                if let Ok(v) = p.out() {
                    if v / 1000 != *key {
                        wrong += 1;
                    }
                }
            }
            drop(waiters);
            if wrong > 0 {
                return Err(format!("thread {t}: {wrong} callers got a wrong outcome"));
            }
            Ok((calls.started(), calls))
        }));
    }
    let mut started = 0;
    let mut keep = Vec::new();
    for th in threads {
        let (n, calls) = th.join().unwrap().unwrap_or_else(|e| panic!("{e}"));
        started += n;
        keep.push(calls);
    }
    assert_idle(&group);
    for calls in &keep {
        assert_eq!(calls.live(), 0, "a call outlived its callers");
    }
    let stats = group.stats();
    eprintln!("no-runtime stress: {stats:?}");
    assert_eq!(stats.leaders, started as u64);
}

/// A call that yields `yields` times (waking whoever polls it), then
/// returns a value naming its key; runtime-agnostic.
struct Yielding {
    key: u32,
    yields: u32,
    live: Arc<AtomicUsize>,
}

impl Future for Yielding {
    type Output = Out;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Out> {
        if self.yields > 0 {
            self.yields -= 1;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        Poll::Ready(Ok(self.key * 1000))
    }
}

impl Drop for Yielding {
    fn drop(&mut self) {
        self.live.fetch_sub(1, SeqCst);
    }
}

fn yielding(
    key: u32,
    yields: u32,
    live: &Arc<AtomicUsize>,
    made: &Arc<AtomicUsize>,
) -> impl FnOnce() -> Yielding + Send + 'static {
    let (live, made) = (Arc::clone(live), Arc::clone(made));
    move || {
        made.fetch_add(1, SeqCst);
        live.fetch_add(1, SeqCst);
        Yielding { key, yields, live }
    }
}

/// Callers on short-lived current-thread runtimes (dropped mid-flight, with
/// the tasks that drive their calls), on a multi-thread runtime, and on
/// plain threads with no runtime, all on the same keys.
#[test]
fn stress_runtimes_shutting_down_under_shared_calls() {
    const KEYS: u64 = 6;
    let main = mt_runtime();
    let group: Group<u32, u32> = Group::new();
    let completing = group.clone().run_to_completion(true);
    let live = Arc::new(AtomicUsize::new(0));
    let made = Arc::new(AtomicUsize::new(0));
    let runs = Arc::new(AtomicUsize::new(0));
    let wrong = Arc::new(AtomicUsize::new(0));

    let check = {
        let wrong = Arc::clone(&wrong);
        move |key: u32, out: &Result<u32, Error>| {
            if !matches!(out, Ok(v) if *v == key * 1000) {
                wrong.fetch_add(1, SeqCst);
            }
        }
    };

    // Plain threads, no runtime.
    let mut plain = Vec::new();
    for t in 0..2u64 {
        let (group, live, made, runs, check) = (
            group.clone(),
            Arc::clone(&live),
            Arc::clone(&made),
            Arc::clone(&runs),
            check.clone(),
        );
        plain.push(thread(move || {
            let mut rng = Rng(0xB0B + t);
            for _ in 0..300 {
                let key = rng.below(KEYS) as u32;
                runs.fetch_add(1, SeqCst);
                let run = group.run(key, yielding(key, rng.below(20) as u32, &live, &made));
                let out = futures::executor::block_on(run);
                check(key, &out);
            }
        }));
    }

    // A random key, group and call for a caller on a runtime.
    let next_caller = |rng: &mut Rng| {
        let key = rng.below(KEYS) as u32;
        let group = if rng.below(3) == 0 {
            completing.clone()
        } else {
            group.clone()
        };
        let work = yielding(key, 3 + rng.below(30) as u32, &live, &made);
        (key, group, work, check.clone())
    };
    let mut waiting = Vec::new();
    let mut rng = Rng(0xC0FFEE);
    for _ in 0..150 {
        // Followers (or leaders) on the long-lived runtime.
        for _ in 0..3 {
            let (key, group, work, check) = next_caller(&mut rng);
            runs.fetch_add(1, SeqCst);
            waiting.push(main.spawn(async move {
                let out = group.run(key, work).await;
                check(key, &out);
            }));
        }
        // Callers on a runtime about to go away.
        let rt = current_thread_runtime();
        for _ in 0..3 {
            let (key, group, work, check) = next_caller(&mut rng);
            let runs = Arc::clone(&runs);
            rt.spawn(async move {
                let run = group.run(key, work);
                runs.fetch_add(1, SeqCst);
                let out = run.await;
                check(key, &out);
            });
        }
        let steps = rng.below(40);
        rt.block_on(async {
            for _ in 0..steps {
                tokio::task::yield_now().await;
            }
        });
        drop(rt);
    }
    for handle in waiting {
        wait(&main, handle);
    }
    for p in &plain {
        joined(p);
    }
    eventually("every call ends", || live.load(SeqCst) == 0);
    assert_idle(&group);
    assert_eq!(wrong.load(SeqCst), 0, "a caller got a wrong outcome");
    let stats = group.stats();
    eprintln!("runtime-shutdown stress: {stats:?}");
    assert_eq!(stats.leaders, made.load(SeqCst) as u64);
    assert_eq!(stats.leaders + stats.followers, runs.load(SeqCst) as u64);
}

/// Two threads released together by a barrier, round after round, each
/// doing one random thing to the same key: run to the end, poll once and
/// leave, join and leave at once, or forget. With `rt`, each thread runs
/// inside that runtime (so tasks drive shared calls); without, no runtime.
fn race(rt: Option<&Arc<tokio::runtime::Runtime>>, seed: u64) {
    const ROUNDS: usize = 1500;
    let group: Group<TKey, u32> = Group::new();
    let keys = Arc::new(Tokens::new());
    let completing = group.clone().run_to_completion(true);
    let live = Arc::new(AtomicUsize::new(0));
    let made = Arc::new(AtomicUsize::new(0));
    let barrier = Arc::new(std::sync::Barrier::new(2));
    let mut threads = Vec::new();
    for t in 0..2u64 {
        let keys = Arc::clone(&keys);
        let (group, completing, live, made, barrier, rt) = (
            group.clone(),
            completing.clone(),
            Arc::clone(&live),
            Arc::clone(&made),
            Arc::clone(&barrier),
            rt.cloned(),
        );
        threads.push(thread(move || {
            let _entered = rt.as_ref().map(|rt| rt.enter());
            let mut rng = Rng(seed ^ ((t + 1) * 0x2545_F491_4F6C_DD1D));
            let mut wrong = 0usize;
            let mut runs = 0u64;
            for _ in 0..ROUNDS {
                let key = rng.below(2) as u32;
                let group = if rng.below(3) == 0 {
                    &completing
                } else {
                    &group
                };
                let work = yielding(key, rng.below(3) as u32, &live, &made);
                let op = rng.below(10);
                barrier.wait();
                match op {
                    0..=4 => {
                        runs += 1;
                        let run = group.run(keys.key(key), work);
                        let out = match &rt {
                            Some(rt) => rt.block_on(async {
                                tokio::time::timeout(WAIT, run)
                                    .await
                                    .expect("a caller hung")
                            }),
                            None => futures::executor::block_on(run),
                        };
                        if !matches!(out, Ok(v) if v == key * 1000) {
                            wrong += 1;
                        }
                    }
                    5..=6 => {
                        runs += 1;
                        let mut run = Polled::new(group.run(keys.key(key), work));
                        if run.poll() && !matches!(run.out(), Ok(v) if *v == key * 1000) {
                            wrong += 1;
                        }
                    }
                    7..=8 => {
                        runs += 1;
                        drop(group.run(keys.key(key), work));
                    }
                    _ => {
                        group.forget(&keys.key(key));
                    }
                }
            }
            (wrong, runs)
        }));
    }
    let mut runs = 0;
    for th in &threads {
        let (wrong, r) = th.recv_timeout(WAIT * 4).expect("a racing thread hung");
        assert_eq!(wrong, 0, "a caller got a wrong outcome");
        runs += r;
    }
    eventually("every call ends", || live.load(SeqCst) == 0);
    assert_idle(&group);
    let stats = group.stats();
    assert_eq!(stats.leaders, made.load(SeqCst) as u64, "{stats:?}");
    assert_eq!(stats.leaders + stats.followers, runs, "{stats:?}");
    assert_eq!(
        keys.held(),
        0,
        "a key outlived every caller: an entry or flight leaked"
    );
}

#[test]
fn race_two_threads_on_one_key_without_a_runtime() {
    for seed in 0..3 {
        race(None, 0xD1CE + seed);
    }
}

#[test]
fn race_two_threads_on_one_key_inside_a_multi_thread_runtime() {
    let rt = Arc::new(mt_runtime());
    for seed in 0..3 {
        race(Some(&rt), 0xFACE + seed);
    }
}

// ===========================================================================
// G. Nothing survives: every key and every value handed to the group is
// dropped once its callers are gone, whatever the transition.
// ===========================================================================

/// A key that counts its copies through `token`.
#[derive(Clone)]
struct TKey {
    id: u32,
    _token: Arc<()>,
}

impl PartialEq for TKey {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}

impl Eq for TKey {}

impl std::hash::Hash for TKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.id.hash(state);
    }
}

/// A value that counts its copies through `token`.
#[derive(Clone, Debug)]
struct TVal {
    v: u32,
    _token: Arc<()>,
}

struct Tokens {
    token: Arc<()>,
    calls: Arc<Calls>,
}

impl Tokens {
    fn new() -> Self {
        Self {
            token: Arc::new(()),
            calls: Calls::new(),
        }
    }

    fn key(&self, id: u32) -> TKey {
        TKey {
            id,
            _token: Arc::clone(&self.token),
        }
    }

    fn work(
        &self,
    ) -> impl FnOnce() -> Pin<Box<dyn Future<Output = Result<TVal, Fail>> + Send>> + Send + 'static
    {
        let (calls, token) = (Arc::clone(&self.calls), Arc::clone(&self.token));
        move || {
            let gate = calls.gated();
            Box::pin(async move { gate.await.map(|v| TVal { v, _token: token }) })
        }
    }

    /// Copies of keys and values still held anywhere.
    fn held(&self) -> usize {
        Arc::strong_count(&self.token) - 1
    }
}

#[track_caller]
fn tval(out: &Result<TVal, Error>) -> u32 {
    match out {
        Ok(v) => v.v,
        Err(e) => panic!("expected a value, got {e:?}"),
    }
}

#[test]
fn no_runtime_every_key_and_value_is_freed_after_every_transition() {
    let group: Group<TKey, TVal> = Group::new();
    let completing = group.clone().run_to_completion(true);
    let t = Tokens::new();
    let c = &t.calls;
    let caller = |group: &Group<TKey, TVal>| Polled::new(group.run(t.key(1), t.work()));
    let mut n = 0;
    let mut next = || {
        n += 1;
        n - 1
    };

    // A lone flight that finishes.
    let mut l = caller(&group).parked();
    c.resolve(next(), Cmd::Ok(1));
    run_woken(&mut [&mut l]);
    assert_eq!(tval(l.out()), 1);
    drop(l);
    assert_eq!(t.held(), 0, "after a lone flight");

    // A lone flight abandoned.
    drop(caller(&group).parked());
    next();
    assert_eq!(t.held(), 0, "after an abandoned lone flight");

    // A lone flight forgotten, then finished.
    let mut l = caller(&group).parked();
    group.forget(&t.key(1));
    c.resolve(next(), Cmd::Ok(2));
    run_woken(&mut [&mut l]);
    drop(l);
    assert_eq!(t.held(), 0, "after a forgotten lone flight");

    // Shared before the first poll, finished.
    let mut l = caller(&group);
    let mut f = caller(&group).parked();
    l.poll();
    c.resolve(next(), Cmd::Ok(3));
    run_woken(&mut [&mut l, &mut f]);
    assert_eq!((tval(l.out()), tval(f.out())), (3, 3));
    drop((l, f));
    assert_eq!(t.held(), 0, "after a shared flight");

    // Shared, forgotten before the leader noticed, finished.
    let mut l = caller(&group).parked();
    let mut f = caller(&group);
    group.forget(&t.key(1));
    f.poll();
    l.poll();
    c.resolve(next(), Cmd::Ok(4));
    run_woken(&mut [&mut l, &mut f]);
    assert_eq!((tval(l.out()), tval(f.out())), (4, 4));
    drop((l, f));
    assert_eq!(
        t.held(),
        0,
        "after a shared flight forgotten before its leader noticed"
    );

    // Shared, forgotten and finished before the leader noticed; the leader
    // then collects.
    let mut l = caller(&group).parked();
    let mut f = caller(&group);
    group.forget(&t.key(1));
    c.resolve(next(), Cmd::Ok(5));
    f.poll();
    assert_eq!(tval(f.out()), 5);
    drop(f);
    l.poll();
    assert_eq!(tval(l.out()), 5);
    drop(l);
    assert_eq!(
        t.held(),
        0,
        "after a shared flight finished before its leader noticed"
    );

    // Shared, finished before the leader noticed; the leader leaves unpolled.
    let l = caller(&group);
    let mut f = caller(&group);
    c.resolve(next(), Cmd::Ok(6));
    f.poll();
    drop(f);
    drop(l);
    assert_eq!(t.held(), 0, "after a shared flight whose leader never came");

    // Shared, everyone leaves.
    let l = caller(&group).parked();
    let f = caller(&group).parked();
    next();
    drop(f);
    drop(l);
    assert_eq!(t.held(), 0, "after an abandoned shared flight");

    // Shared, panicking.
    let mut l = caller(&group).parked();
    let mut f = caller(&group).parked();
    c.resolve(next(), Cmd::Panic);
    run_woken(&mut [&mut l, &mut f]);
    assert!(l.done() && f.done());
    drop((l, f));
    assert_eq!(t.held(), 0, "after a panicking shared flight");

    // Run to completion, no runtime: dropped, lone and forgotten.
    drop(caller(&completing).parked());
    next();
    let l = caller(&completing).parked();
    next();
    completing.forget(&t.key(1));
    drop(l);
    assert_eq!(
        t.held(),
        0,
        "after run-to-completion flights outside a runtime"
    );

    assert_eq!(c.live(), 0);
    assert_idle(&group);
}

#[tokio::test(flavor = "current_thread")]
async fn current_thread_every_key_and_value_is_freed_after_task_driven_transitions() {
    let group: Group<TKey, TVal> = Group::new();
    let completing = group.clone().run_to_completion(true);
    let t = Tokens::new();
    let c = &t.calls;
    let caller = |group: &Group<TKey, TVal>| Polled::new(group.run(t.key(1), t.work()));

    // Shared after the leader parked; the task finishes it; the leader
    // collects late.
    let mut l = caller(&group).parked();
    let mut f = caller(&group).parked();
    settle().await;
    c.resolve(0, Cmd::Ok(1));
    settle().await;
    f.poll();
    drop(f);
    l.poll();
    assert_eq!(tval(l.out()), 1);
    drop(l);
    settle().await;
    assert_eq!(t.held(), 0, "after a task-driven flight");

    // Shared before the first poll, forgotten, everyone leaves.
    let l = caller(&group);
    let f = caller(&group);
    group.forget(&t.key(1));
    settle().await;
    drop(f);
    drop(l);
    settle().await;
    assert_eq!(t.held(), 0, "after an abandoned task-driven flight");

    // Run to completion: the leader leaves a lone flight; a late caller
    // joins; it finishes.
    drop(caller(&completing).parked());
    let mut late = caller(&group).parked();
    settle().await;
    c.resolve(2, Cmd::Ok(3));
    settle().await;
    late.poll();
    assert_eq!(tval(late.out()), 3);
    drop(late);

    // Run to completion: forgotten, the leader leaves, it finishes alone.
    let l = caller(&completing).parked();
    completing.forget(&t.key(1));
    drop(l);
    settle().await;
    c.resolve(3, Cmd::Ok(4));
    eventually_async("the call finishes", || c.finished() == 3).await;
    eventually_async("every key and value is freed", || t.held() == 0).await;
    assert_eq!(c.live(), 0);
    idle(&group).await;
}

/// A burst of flights far larger than a shard keeps, in every state (lone,
/// lone forgotten, shared, shared and forgotten before the leader noticed),
/// ended in a scrambled order; then a second burst on the same keys.
#[test]
fn no_runtime_bursts_of_flights_in_every_state_end_cleanly_and_the_table_works_after() {
    const KEYS: u32 = 1500;
    let group: Group<TKey, TVal> = Group::new();
    let t = Tokens::new();
    let mut rng = Rng(0xB0057);

    for burst in 0..2 {
        let first_call = t.calls.started();
        let mut waiters = Vec::new();
        for id in 0..KEYS {
            let mut leader = Polled::new(group.run(t.key(id), t.work()));
            assert_eq!(leader.role(), Role::Leader, "burst {burst}, key {id}");
            let state = id % 4;
            if rng.below(2) == 0 {
                leader.poll();
            }
            if state >= 2 {
                let follower = Polled::new(group.run(t.key(id), t.work()));
                assert_eq!(follower.role(), Role::Follower, "burst {burst}, key {id}");
                waiters.push((id, follower));
            }
            if state == 1 || state == 3 {
                assert!(group.forget(&t.key(id)));
            }
            waiters.push((id, leader));
        }
        assert_eq!(group.len(), (KEYS / 2) as usize);
        assert_eq!(t.calls.started() - first_call, KEYS as usize);

        // Followers joining now find the visible flights.
        for id in (0..KEYS).filter(|id| id % 4 == 0 || id % 4 == 2).step_by(7) {
            let late = Polled::new(group.run(t.key(id), t.work()));
            assert_eq!(late.role(), Role::Follower, "burst {burst}, key {id}");
            waiters.push((id, late));
        }
        assert_eq!(t.calls.started() - first_call, KEYS as usize);

        // Scramble, then end them: some callers leave, the rest get outcomes.
        for i in (1..waiters.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            waiters.swap(i, j);
        }
        let mut order: Vec<u32> = (0..KEYS).collect();
        for i in (1..order.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            order.swap(i, j);
        }
        let mut kept = Vec::new();
        for (id, w) in waiters {
            if rng.below(5) == 0 {
                drop(w);
            } else {
                kept.push((id, w));
            }
        }
        for (_, w) in &mut kept {
            w.poll();
        }
        for id in order {
            let index = first_call + id as usize;
            let tx = t.calls.gates.lock().unwrap()[index].take();
            if let Some(tx) = tx {
                let _ = tx.send(Cmd::Ok(burst * 10_000 + id));
            }
            let mut steps: Vec<&mut dyn Step> =
                kept.iter_mut().map(|(_, p)| p as &mut dyn Step).collect();
            run_woken(&mut steps);
        }
        for (id, w) in &mut kept {
            w.poll();
            assert!(w.done(), "burst {burst}: a caller of key {id} hung");
            assert_eq!(
                tval(w.out()),
                burst * 10_000 + *id,
                "burst {burst}, key {id}"
            );
        }
        drop(kept);
        assert_idle(&group);
        assert_eq!(t.calls.live(), 0);
        assert_eq!(
            t.held(),
            0,
            "burst {burst}: a key or value outlived its callers"
        );
    }
}

#[test]
fn multi_thread_bursts_of_flights_with_forgets_and_departures() {
    let rt = mt_runtime();
    let group: Group<TKey, u32> = Group::new();
    let completing = group.clone().run_to_completion(true);
    let keys = Arc::new(Tokens::new());
    let live = Arc::new(AtomicUsize::new(0));
    let made = Arc::new(AtomicUsize::new(0));
    for round in 0..3u64 {
        let mut handles = Vec::new();
        let mut rng = Rng(0xBEEF + round);
        for i in 0..1200u32 {
            let id = i % 600;
            let group = if rng.below(4) == 0 {
                completing.clone()
            } else {
                group.clone()
            };
            let work = yielding(id, 2 + rng.below(20) as u32, &live, &made);
            let key = keys.key(id);
            let forget = rng.below(6) == 0;
            let leave = rng.below(5) == 0;
            let forget_key = keys.key(id);
            handles.push(rt.spawn(async move {
                let run = group.run(key, work);
                if forget {
                    group.forget(&forget_key);
                }
                drop(forget_key);
                if leave {
                    let mut run = Box::pin(run);
                    tokio::select! {
                        biased;
                        out = &mut run => out.map(|v| v == id * 1000).unwrap_or(false),
                        () = tokio::task::yield_now() => true,
                    }
                } else {
                    matches!(run.await, Ok(v) if v == id * 1000)
                }
            }));
        }
        for h in handles {
            assert!(wait(&rt, h), "round {round}: a caller got a wrong outcome");
        }
        eventually("every call ends", || live.load(SeqCst) == 0);
        assert_idle(&group);
        assert_eq!(keys.held(), 0, "round {round}: a key outlived its callers");
        assert_eq!(group.stats().leaders, made.load(SeqCst) as u64);
    }
}
