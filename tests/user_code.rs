//! User code the crate runs on its callers' behalf: `T::clone`, wakers, and
//! keys' destructors. A panic in it reaches at most the caller it ran for,
//! and code in it that asks the group about itself runs with no lock held,
//! so it never deadlocks. Each test that could hang runs on a thread of its
//! own, with a bound.

use std::future::Future;
use std::hash::{Hash, Hasher};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use tower_singleflight::{Group, Role};

mod support;

use support::{within, Gate};

/// Runs `f` on a thread of its own and fails if it does not return within
/// five seconds: a call that deadlocks fails the test instead of hanging it.
fn returns_in_time(what: &str, f: impl FnOnce() + Send + 'static) {
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        f();
        let _ = done.send(());
    });
    finished
        .recv_timeout(Duration::from_secs(5))
        .unwrap_or_else(|_| panic!("{what}: deadlocked or panicked"));
}

/// A key compared by `id`, whose drop runs `on_drop`: user code the crate
/// runs when it lets go of a follower's key.
struct Key {
    id: u32,
    on_drop: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl Key {
    fn new(id: u32) -> Self {
        Self { id, on_drop: None }
    }

    fn on_drop(id: u32, f: impl FnOnce() + Send + Sync + 'static) -> Self {
        let on_drop: Option<Box<dyn FnOnce() + Send + Sync>> = Some(Box::new(f));
        Self { id, on_drop }
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}

impl Eq for Key {}

impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.id.hash(state);
    }
}

impl Drop for Key {
    fn drop(&mut self) {
        if let Some(on_drop) = self.on_drop.take() {
            on_drop();
        }
    }
}

#[test]
fn a_follower_key_whose_drop_asks_the_group_about_itself_does_not_deadlock() {
    returns_in_time("a follower's key dropped on joining", || {
        let group = Group::<Key, u32>::new();
        let leader = group.run(
            Key::new(1),
            futures::future::pending::<Result<u32, io::Error>>,
        );
        // The follower's key is not kept: the flight has the leader's.
        let nosy = group.clone();
        let key = Key::on_drop(1, move || {
            assert_eq!(nosy.len(), 1);
            assert_eq!(nosy.stats().flights, 1);
        });
        let follower = group.run(key, || async { Ok::<_, io::Error>(0) });
        assert_eq!(follower.role(), Role::Follower);
        drop((follower, leader));
        assert!(group.is_empty());
    });
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_follower_key_whose_drop_panics_leaves_the_flight_whole() {
    let group = Group::<Key, u32>::new();
    let gate = Gate::new();
    let wait = gate.wait();
    let leader = tokio::spawn(group.run(Key::new(1), move || async move {
        wait.await;
        Ok::<_, io::Error>(7)
    }));
    support::settle().await;

    // The panic reaches the caller whose key it was, and only it: the
    // leader's parked call still gets a task to drive it, and the follower
    // counts itself out.
    let key = Key::on_drop(1, || panic!("key exploded"));
    let joined = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        drop(group.run(key, || async { Ok::<_, io::Error>(0) }));
    }));
    assert!(joined.is_err(), "the key's panic reaches its caller");
    gate.open();
    assert_eq!(within(leader).await.unwrap().unwrap(), 7);
    let stats = group.stats();
    assert_eq!((group.len(), stats.flights, stats.waiters), (0, 0, 0));
}

#[test]
fn a_waker_whose_drop_asks_the_group_about_itself_does_not_deadlock() {
    /// A waker that, once its last handle is dropped, reads the group.
    struct Nosy(Group<u32, u32>);
    impl std::task::Wake for Nosy {
        fn wake(self: Arc<Self>) {}
    }
    impl Drop for Nosy {
        fn drop(&mut self) {
            assert_eq!(self.0.len(), 1);
        }
    }

    returns_in_time("a leader's replaced waker", || {
        let group = Group::<u32, u32>::new();
        let mut leader = Box::pin(group.run(1, futures::future::pending::<Result<u32, io::Error>>));
        // The leader's flight keeps a clone of the waker of its last poll.
        let nosy = std::task::Waker::from(Arc::new(Nosy(group.clone())));
        assert!(leader
            .as_mut()
            .poll(&mut Context::from_waker(&nosy))
            .is_pending());
        drop(nosy);
        // A poll with another waker replaces it: its last handle goes.
        let waker = futures::task::noop_waker();
        assert!(leader
            .as_mut()
            .poll(&mut Context::from_waker(&waker))
            .is_pending());
        drop(leader);
        assert!(group.is_empty());
    });
}

// --- O4: the crate's own failures ---

/// A value whose clones are counted, and whose `panic_at`-th clone panics.
#[derive(Debug)]
struct Brittle {
    value: u32,
    clones: Arc<AtomicUsize>,
    panic_at: usize,
}

impl Clone for Brittle {
    fn clone(&self) -> Self {
        let made = self.clones.fetch_add(1, SeqCst) + 1;
        assert!(made != self.panic_at, "clone {made} exploded");
        Self {
            value: self.value,
            clones: Arc::clone(&self.clones),
            panic_at: self.panic_at,
        }
    }
}

impl Brittle {
    /// What a caller got: its value, or the message of its panic error.
    fn value(outcome: Result<Self, tower_singleflight::Error>) -> Result<u32, String> {
        outcome.map(|brittle| brittle.value).map_err(|error| {
            assert!(error.is_panic(), "{error}");
            error.panic_message().unwrap_or_default().to_owned()
        })
    }
}

/// Runs a flight of `callers` tasks whose value's `panic_at`-th clone
/// panics, and returns what each caller got (its value or its error) and
/// how many clones were made.
async fn flight_of_brittle_values(
    callers: usize,
    panic_at: usize,
) -> (Vec<Result<u32, String>>, usize) {
    let group: Group<u32, Brittle> = Group::new();
    let gate = Gate::new();
    let clones = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..callers)
        .map(|_| {
            let (wait, clones) = (gate.wait(), Arc::clone(&clones));
            tokio::spawn(group.run(1, move || async move {
                wait.await;
                Ok::<_, io::Error>(Brittle {
                    value: 7,
                    clones,
                    panic_at,
                })
            }))
        })
        .collect();
    support::settle().await;
    gate.open();
    let mut got = Vec::new();
    for task in tasks {
        let outcome = within(task).await.expect("no caller's task panics");
        got.push(Brittle::value(outcome));
    }
    let stats = group.stats();
    assert_eq!((group.len(), stats.flights, stats.waiters), (0, 0, 0));
    (got, clones.load(SeqCst))
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_task_that_publishes_hands_the_waiters_its_outcome_and_no_copy_of_its_own() {
    // Each waiter but the last out copies the outcome; the last takes it.
    let (got, clones) = flight_of_brittle_values(3, usize::MAX).await;
    assert_eq!(got, [Ok(7), Ok(7), Ok(7)]);
    assert_eq!(clones, 2);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_clone_that_panics_for_one_waiter_reaches_that_waiter_alone() {
    // A task publishes the outcome, so every clone is a waiter's own.
    let (got, _) = flight_of_brittle_values(3, 2).await;
    let failed: Vec<_> = got.iter().filter_map(|got| got.as_ref().err()).collect();
    assert_eq!(failed, ["clone 2 exploded"], "{got:?}");
    assert_eq!(
        got.iter().filter(|got| got == &&Ok(7)).count(),
        2,
        "{got:?}"
    );
}

#[test]
fn a_clone_that_panics_while_a_caller_publishes_reaches_the_others_alone() {
    // With no runtime, the callers drive the call, and the leader that
    // polled it last publishes: it keeps the outcome, and the copy kept for
    // the others panics. Each of them gets the panic; no one hangs.
    returns_in_time("a flight whose published copy panics", || {
        let group: Group<u32, Brittle> = Group::new();
        let gate = Gate::new();
        let clones = Arc::new(AtomicUsize::new(0));
        let caller = || {
            let (wait, clones) = (gate.wait(), Arc::clone(&clones));
            group.run(1, move || async move {
                wait.await;
                Ok::<_, io::Error>(Brittle {
                    value: 7,
                    clones,
                    panic_at: 1,
                })
            })
        };
        let (leader, first, second, ()) = futures::executor::block_on(async {
            futures::join!(caller(), caller(), caller(), async { gate.open() })
        });
        let got = [leader, first, second].map(Brittle::value);
        let failed = Err("clone 1 exploded".to_owned());
        assert_eq!(got, [Ok(7), failed.clone(), failed]);
        assert_eq!(group.len(), 0);
    });
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_waker_that_panics_does_not_keep_the_other_waiters_asleep() {
    /// A waker that panics when woken.
    struct Explodes;
    impl Wake for Explodes {
        fn wake(self: Arc<Self>) {
            panic!("waker exploded");
        }
    }

    // The leader waits with the exploding waker; a follower in a task.
    let group: Group<u32, u32> = Group::new();
    let gate = Gate::new();
    let wait = gate.wait();
    let mut leader = Box::pin(group.run(1, move || async move {
        wait.await;
        Ok::<_, io::Error>(7)
    }));
    let explodes = Waker::from(Arc::new(Explodes));
    let polled = leader.as_mut().poll(&mut Context::from_waker(&explodes));
    assert!(polled.is_pending());
    let follower = tokio::spawn(group.run(1, || async { Ok::<_, io::Error>(0) }));
    support::settle().await;

    // The task that drives the call panics while it wakes the leader; the
    // follower is woken all the same, and so is a leader polled again.
    gate.open();
    assert_eq!(within(follower).await.unwrap().unwrap(), 7);
    assert_eq!(within(leader).await.unwrap(), 7);
    assert_eq!((group.len(), group.stats().waiters), (0, 0));
}

#[test]
fn a_follower_waker_whose_drop_asks_the_group_about_itself_does_not_deadlock() {
    /// A waker that, once its last handle is dropped, reads the group.
    struct Nosy(Group<u32, u32>, Arc<AtomicBool>);
    impl Wake for Nosy {
        fn wake(self: Arc<Self>) {}
    }
    impl Drop for Nosy {
        fn drop(&mut self) {
            let _ = (self.0.len(), self.0.stats());
            self.1.store(true, SeqCst);
        }
    }

    returns_in_time("a follower's waker freed as it leaves", || {
        let group = Group::<u32, u32>::new();
        let mut leader = Box::pin(group.run(1, futures::future::pending::<Result<u32, io::Error>>));
        let noop = futures::task::noop_waker();
        assert!(leader
            .as_mut()
            .poll(&mut Context::from_waker(&noop))
            .is_pending());

        // The flight keeps the only handle of the follower's waker.
        let mut follower = Box::pin(group.run(1, || async { Ok::<_, io::Error>(0) }));
        assert_eq!(follower.role(), Role::Follower);
        let dropped = Arc::new(AtomicBool::new(false));
        let nosy = Waker::from(Arc::new(Nosy(group.clone(), Arc::clone(&dropped))));
        assert!(follower
            .as_mut()
            .poll(&mut Context::from_waker(&nosy))
            .is_pending());
        drop(nosy);
        assert!(
            !dropped.load(SeqCst),
            "the flight holds the follower's waker"
        );

        // Leaving frees its slot, and the waker with it.
        drop(follower);
        assert!(dropped.load(SeqCst), "the follower's waker went with it");
        drop(leader);
        assert!(group.is_empty());
    });
}

#[test]
fn a_call_to_run_to_completion_does_so_after_a_follower_joined_outside_a_runtime() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let group = Group::<u32, u32>::new().run_to_completion(true);
    let finished = Arc::new(AtomicBool::new(false));
    let gate = Gate::new();

    // The leader starts in the runtime and waits once.
    let (wait, done) = (gate.wait(), Arc::clone(&finished));
    let mut leader = Box::pin(group.run(1, move || async move {
        wait.await;
        done.store(true, SeqCst);
        Ok::<_, io::Error>(7)
    }));
    runtime.block_on(async {
        assert!(futures::poll!(leader.as_mut()).is_pending());
    });

    // A follower joins from a thread with no runtime, where no task can be
    // spawned to drive the call.
    let joining = group.clone();
    let follower = std::thread::spawn(move || {
        let mut follower = Box::pin(joining.run(1, || async { Ok::<_, io::Error>(0) }));
        let noop = futures::task::noop_waker();
        let polled = follower.as_mut().poll(&mut Context::from_waker(&noop));
        assert!(polled.is_pending());
        follower
    })
    .join()
    .unwrap();

    // Back in the runtime, both leave: the call runs on to its end.
    runtime.block_on(async {
        drop((leader, follower));
        gate.open();
        within(async {
            while !finished.load(SeqCst) {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await;
    });
    assert_eq!(group.stats().abandoned, 0);
    assert!(group.is_empty());
}

pin_project_lite::pin_project! {
    /// A call whose destructor panics.
    struct PanicsOnDrop<F> {
        #[pin]
        call: F,
    }

    impl<F> PinnedDrop for PanicsOnDrop<F> {
        fn drop(this: Pin<&mut Self>) {
            let _ = this;
            panic!("the call's drop exploded");
        }
    }
}

impl<F: Future> Future for PanicsOnDrop<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.project().call.poll(cx)
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_call_whose_drop_panics_after_its_outcome_hurts_no_caller_and_no_other_flight() {
    let group = Group::<u32, u32>::new();

    // Another flight is in progress in the meantime.
    let gate = Gate::new();
    let wait = gate.wait();
    let mut other = Box::pin(group.run(2, move || async move {
        wait.await;
        Ok::<_, io::Error>(2)
    }));
    assert!(futures::poll!(other.as_mut()).is_pending());

    // A lone leader's call answers, then panics as it is dropped.
    let answers = || PanicsOnDrop {
        call: async { Ok::<_, io::Error>(7) },
    };
    let mut lone = Box::pin(group.run(1, answers));
    assert_eq!(within(lone.as_mut()).await.unwrap(), 7);
    drop(lone);
    assert_eq!(group.len(), 1);

    // The other flight goes on untouched, and the key serves again.
    gate.open();
    assert_eq!(within(other).await.unwrap(), 2);
    assert_eq!(within(group.run(1, answers)).await.unwrap(), 7);
    let stats = group.stats();
    assert_eq!((group.len(), stats.flights, stats.waiters), (0, 0, 0));
}

#[tokio::test(flavor = "current_thread")]
async fn a_call_whose_drop_panics_as_its_last_waiter_leaves_hurts_no_caller_and_ends_its_task() {
    // Each copy of the key holds a clone of `alive`, so its flight can be
    // seen alive.
    let group = Group::<Key, u32>::new();
    let alive = Arc::new(());
    let key = || {
        let alive = Arc::clone(&alive);
        Key::on_drop(1, move || drop(alive))
    };

    // A shared flight, driven by its own task, whose call never answers.
    let mut leader = Box::pin(group.run(key(), || PanicsOnDrop {
        call: futures::future::pending::<Result<u32, io::Error>>(),
    }));
    assert!(futures::poll!(leader.as_mut()).is_pending());
    let mut follower = Box::pin(group.run(key(), || async { Ok::<_, io::Error>(0) }));
    assert!(futures::poll!(follower.as_mut()).is_pending());
    support::settle().await;

    // Both leave: the call is dropped, and its panic reaches neither.
    drop(leader);
    drop(follower);
    support::settle().await;
    assert_eq!(Arc::strong_count(&alive), 1, "the flight's task ended");
    let stats = group.stats();
    assert_eq!((group.len(), stats.flights, stats.waiters), (0, 0, 0));
}

#[test]
fn a_call_whose_drop_panics_after_a_follower_polled_it_to_the_end_hurts_no_one() {
    returns_in_time("a follower polling the call outside a runtime", || {
        let group = Group::<u32, u32>::new();
        let (open, gate) = futures::channel::oneshot::channel::<()>();
        let mut leader = Box::pin(group.run(1, move || PanicsOnDrop {
            call: async move {
                gate.await.unwrap();
                Ok::<_, io::Error>(7)
            },
        }));
        let noop = futures::task::noop_waker();
        let mut cx = Context::from_waker(&noop);
        assert!(leader.as_mut().poll(&mut cx).is_pending());
        let mut follower = Box::pin(group.run(1, || async { Ok::<_, io::Error>(0) }));
        assert!(follower.as_mut().poll(&mut cx).is_pending());

        // With no runtime, the follower takes the call up once the leader
        // leaves, and polls it to its end.
        drop(leader);
        open.send(()).unwrap();
        let got = (0..3).find_map(|_| match follower.as_mut().poll(&mut cx) {
            Poll::Ready(got) => Some(got),
            Poll::Pending => None,
        });
        assert_eq!(got.expect("the follower finished").unwrap(), 7);
        assert!(group.is_empty());
    });
}
