//! [`Group`]: request coalescing for any async call, with no tower involved.

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::sync::OnceLock;
use std::time::Duration;

use crate::error::BoxError;
use crate::future::Run;
use crate::inflight::Table;
use crate::sync::Arc;

/// Coalesces concurrent calls that share a key into one call.
///
/// The first caller for a key (the leader) starts the call; callers that
/// arrive with an equal key while it is in progress (followers) wait for it,
/// and every one of them receives its outcome. The key is free again the
/// moment the call finishes: nothing is cached.
///
/// A `Group` is a cheap handle: clones share one set of flights, and each
/// clone may carry its own settings (the wait limit of its followers, and
/// whether the flights it leads run to completion when abandoned).
/// [`SingleflightLayer`] is built on it.
///
/// # Examples
///
/// ```
/// use std::sync::atomic::{AtomicUsize, Ordering};
/// use std::sync::Arc;
/// use tower_singleflight::Group;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let group: Group<String, String> = Group::new();
/// let loads = Arc::new(AtomicUsize::new(0));
/// let load = |key: &str| {
///     let (loads, key) = (Arc::clone(&loads), key.to_owned());
///     move || async move {
///         loads.fetch_add(1, Ordering::SeqCst);
///         tokio::task::yield_now().await;
///         Ok::<_, std::io::Error>(format!("value of {key}"))
///     }
/// };
///
/// let (a, b) = tokio::join!(
///     group.run("user:7".to_owned(), load("user:7")),
///     group.run("user:7".to_owned(), load("user:7")),
/// );
/// assert_eq!(a.unwrap(), "value of user:7");
/// assert_eq!(b.unwrap(), "value of user:7");
/// assert_eq!(loads.load(Ordering::SeqCst), 1);
/// # }
/// ```
///
/// # Cancellation
///
/// Dropping a caller's future leaves the flight and changes nothing for the
/// others. While the leader is alone, the call runs in the leader's task.
/// Once a follower joins, the call moves to a task of its own, spawned on
/// the tokio runtime of the caller that hands it over (the follower that
/// joined, or the leader if it was polling the call just then), and each
/// waiter is woken once, by the outcome; outside a runtime, the waiters
/// take turns polling the call instead. Either way, a waiter that leaves
/// does not restart the call. When the last waiter leaves, the call is
/// dropped and the key freed, unless
/// [`run_to_completion`](Group::run_to_completion) is set.
///
/// A current-thread runtime runs that task only while something blocks on
/// the runtime. A follower that joins from one which then goes idle (a
/// `block_on` with a timeout, from synchronous code, say) leaves the call
/// unpolled, and its other waiters waiting, until that runtime runs again:
/// join flights from a current-thread runtime only while it is driven.
///
/// # Panics
///
/// A panic in the call does not unwind into any caller: every waiter gets an
/// [`Error`](crate::Error) for which [`is_panic`](crate::Error::is_panic)
/// holds, and the key is freed.
///
/// [`SingleflightLayer`]: crate::SingleflightLayer
pub struct Group<K, T> {
    table: Arc<Table<K, T>>,
    config: Config,
}

/// What a follower does when its wait limit is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum OnWaitLimit {
    /// Fail with an error for which [`Error::is_wait_limit`] holds.
    ///
    /// [`Error::is_wait_limit`]: crate::Error::is_wait_limit
    Fail,
    /// Make an unshared call of its own, as nginx's `proxy_cache_lock_timeout`
    /// does. The follower then keeps its request until the flight ends.
    CallOwn,
}

/// Counters of a [`Group`]'s flights, read with [`Group::stats`].
///
/// Gauges (`flights`, `waiters`) say what is in progress now; the others
/// count since the group was created. Each value is read on its own, so a
/// snapshot taken while calls run may be off by the calls in between.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Flights whose call is in progress.
    pub flights: u64,
    /// Callers waiting for a flight's outcome, leaders included.
    pub waiters: u64,
    /// Callers that started a flight.
    pub leaders: u64,
    /// Callers that joined a flight in progress.
    pub followers: u64,
    /// Calls that panicked.
    pub panics: u64,
    /// Flights dropped because every waiter left before the call finished.
    pub abandoned: u64,
}

/// The whole piece of work behind a key: makes the future whose outcome the
/// flight shares.
///
/// Implemented for every `FnOnce() -> F` whose `F` resolves to a `Result`.
/// Only the leader's work is started; a follower's is dropped on joining,
/// unless its wait limit may make it call on its own.
///
/// A group needs the call to be `Send + 'static` and its error to convert
/// into a [`BoxError`].
pub trait Work<T> {
    /// The error the call may fail with.
    type Error;
    /// The call.
    type Future: Future<Output = Result<T, Self::Error>>;

    /// Starts the call.
    fn start(self) -> Self::Future;
}

/// Which part a caller plays in its flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Role {
    /// Started the flight; its request made the call.
    Leader,
    /// Joined a flight in progress and waits for its outcome.
    Follower,
    /// Joined as a follower, then made a call of its own: it reached its wait
    /// limit, or (in the HTTP layer) the flight's response could not be
    /// shared with it.
    Fallback,
    /// Had no key, so it went straight to the inner service.
    Bypass,
}

#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Config {
    pub(crate) wait_limit: Option<(Duration, OnWaitLimit)>,
    pub(crate) run_to_completion: bool,
}

// --- impl Group ---

impl<K, T> Group<K, T>
where
    K: Hash + Eq + Send + Sync + 'static,
    T: Clone + Send + 'static,
{
    /// Creates a group with no flights, no wait limit, and calls dropped
    /// when abandoned.
    pub fn new() -> Self {
        Self {
            table: Arc::new(Table::new()),
            config: Config::default(),
        }
    }

    /// Runs `work` for `key`, or joins the call already in progress for an
    /// equal key.
    ///
    /// The caller joins at once: a leader's work is started here (its
    /// future is made, and first polled when the returned future is), and a
    /// follower's work is dropped here unless a wait limit with
    /// [`OnWaitLimit::CallOwn`] is set.
    ///
    /// # Errors
    ///
    /// The returned future fails when the call fails (the inner error is
    /// shared by every waiter), when it panics, or when this follower's wait
    /// limit is reached with [`OnWaitLimit::Fail`].
    pub fn run<W>(&self, key: K, work: W) -> Run<K, T, W>
    where
        W: Work<T>,
        W::Future: Send + 'static,
        W::Error: Into<BoxError>,
    {
        self.run_with(key, || work)
    }

    /// Like [`run`](Group::run), but makes the work only when it is needed:
    /// for a leader, or for a follower that may call on its own.
    pub(crate) fn run_with<W>(&self, key: K, work: impl FnOnce() -> W) -> Run<K, T, W>
    where
        W: Work<T>,
        W::Future: Send + 'static,
        W::Error: Into<BoxError>,
    {
        let (ticket, leads) = self.table.join(key, self.config.run_to_completion);
        if leads {
            return Run::lead(ticket, work);
        }
        let keep = matches!(self.config.wait_limit, Some((_, OnWaitLimit::CallOwn)));
        Run::follow(ticket, keep.then(work), self.config.wait_limit)
    }

    /// Unlinks the flight for `key`, if any: the next caller with an equal
    /// key starts a new call, while the current waiters still get the
    /// current call's outcome. Returns whether there was a flight.
    pub fn forget(&self, key: &K) -> bool {
        self.table.forget(key)
    }

    /// The number of keys with a flight that new callers would join.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Whether no key has a flight that new callers would join.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads the counters of every flight of this group and its clones.
    pub fn stats(&self) -> Stats {
        self.table.stats()
    }

    pub(crate) fn with_config(config: Config) -> Self {
        Self {
            config,
            ..Self::new()
        }
    }
}

impl<K, T> Group<K, T> {
    /// Limits how long a follower waits for a flight before `then` applies.
    ///
    /// The limit counts from the moment the follower joined. The flight and
    /// its other waiters are unaffected. Leaders have no limit. Needs a tokio
    /// runtime with its time driver. A limit too long to add to the current
    /// time, such as [`Duration::MAX`], is no limit.
    pub fn follower_wait_limit(mut self, limit: Duration, then: OnWaitLimit) -> Self {
        self.config.wait_limit = Some((limit, then));
        self
    }

    /// Lets flights led through this group run to completion, in a task of
    /// their own, when every waiter has left; their outcome then goes to no
    /// one, unless new callers join the flight before it ends.
    ///
    /// Useful when the call fills a cache. Needs a tokio runtime at the
    /// moment the last waiter leaves; outside one, the call is dropped as
    /// usual.
    pub fn run_to_completion(mut self, enabled: bool) -> Self {
        self.config.run_to_completion = enabled;
        self
    }
}

impl<K, T> Default for Group<K, T>
where
    K: Hash + Eq + Send + Sync + 'static,
    T: Clone + Send + 'static,
{
    fn default() -> Self {
        Self::new()
    }
}

impl<K, T> Clone for Group<K, T> {
    fn clone(&self) -> Self {
        Self {
            table: Arc::clone(&self.table),
            config: self.config,
        }
    }
}

impl<K, T> fmt::Debug for Group<K, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Group")
            .field("wait_limit", &self.config.wait_limit)
            .field("run_to_completion", &self.config.run_to_completion)
            .finish_non_exhaustive()
    }
}

// --- impl Work ---

impl<F, Fut, T, E> Work<T> for F
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<T, E>> + Send + 'static,
    E: Into<BoxError>,
{
    type Error = E;
    type Future = Fut;

    fn start(self) -> Fut {
        self()
    }
}

// --- where a service finds its group ---

/// Where a [`Singleflight`] service finds its [`Group`]: either one handed to
/// it ([`SingleflightLayer::with_group`]), or an [`OwnGroup`] it makes for
/// itself.
///
/// Sealed: implemented for [`Group`] and [`OwnGroup`] only.
///
/// [`Singleflight`]: crate::Singleflight
/// [`SingleflightLayer::with_group`]: crate::SingleflightLayer::with_group
pub trait GroupSource<K, T>: sealed::Sealed {
    /// The group.
    fn group(&self) -> &Group<K, T>;
}

/// The group of services wrapped without an explicit [`Group`]: made at the
/// first call through it, and shared by whatever holds a clone of it.
///
/// Services made by one [`SingleflightLayer`] each get their own, never
/// shared with another service. Services made by one HTTP or gRPC layer
/// all share the layer's, since a server wraps its routes again for every
/// connection. To share flights between layers, or to call
/// [`Group::forget`] and [`Group::stats`], hand the services a [`Group`]
/// instead.
///
/// [`SingleflightLayer`]: crate::SingleflightLayer
#[derive(Clone)]
pub struct OwnGroup {
    config: Config,
    slots: std::sync::Arc<[Slot; SLOTS]>,
}

/// One group of an [`OwnGroup`], made at the first call with its types.
type Slot = OnceLock<Box<dyn Any + Send + Sync>>;

/// How many key and response types one [`OwnGroup`] serves; a layer
/// usually wraps services of one.
const SLOTS: usize = 4;

impl OwnGroup {
    pub(crate) fn new(config: Config) -> Self {
        Self {
            config,
            slots: std::sync::Arc::default(),
        }
    }

    /// A new, empty group with the same settings.
    pub(crate) fn fresh(&self) -> Self {
        Self::new(self.config)
    }

    /// Changes the settings of the groups made from now on. Clones made
    /// before keep theirs, and their groups: the change makes a new, empty
    /// group, so that services with different settings never share one.
    pub(crate) fn configure(&mut self, change: impl FnOnce(&mut Config)) {
        change(&mut self.config);
        *self = self.fresh();
    }

    /// The group for these key and response types, if a call through it
    /// has made one.
    pub fn get<K: 'static, T: 'static>(&self) -> Option<&Group<K, T>> {
        self.slots
            .iter()
            .find_map(|slot| slot.get()?.downcast_ref())
    }
}

impl<K, T> GroupSource<K, T> for OwnGroup
where
    K: Hash + Eq + Send + Sync + 'static,
    T: Clone + Send + 'static,
{
    /// The group for these types, made at the first call with them.
    ///
    /// # Panics
    ///
    /// When the services sharing this group use more than four key and
    /// response types between them.
    fn group(&self) -> &Group<K, T> {
        let make =
            || Box::new(Group::<K, T>::with_config(self.config)) as Box<dyn Any + Send + Sync>;
        let group = self
            .slots
            .iter()
            .find_map(|slot| slot.get_or_init(make).downcast_ref());
        group.expect("services sharing a layer's own group use at most four key and response types")
    }
}

impl<K, T> GroupSource<K, T> for Group<K, T> {
    fn group(&self) -> &Group<K, T> {
        self
    }
}

impl fmt::Debug for OwnGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OwnGroup")
            .field("config", &self.config)
            .field(
                "groups",
                &self.slots.iter().filter(|s| s.get().is_some()).count(),
            )
            .finish()
    }
}

pub(crate) mod sealed {
    /// What a layer's builder methods need of its group: a way to leave it.
    pub trait Sealed {
        /// Called as a layer's settings change: an [`OwnGroup`] makes a
        /// new, empty group, so that services whose layers differ in
        /// settings never share a flight. A group the user handed over
        /// stays: sharing it was asked for.
        ///
        /// [`OwnGroup`]: super::OwnGroup
        fn settings_changed(&mut self) {}
    }

    impl Sealed for super::OwnGroup {
        fn settings_changed(&mut self) {
            *self = self.fresh();
        }
    }

    impl<K, T> Sealed for super::Group<K, T> {}
}
