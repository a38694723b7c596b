//! Futures returned by [`Group::run`] and [`Singleflight`].
//!
//! [`Group::run`]: crate::Group::run
//! [`Singleflight`]: crate::Singleflight

use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::panic::{self, AssertUnwindSafe};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower::util::Oneshot;
use tower::ServiceExt;
use tower_service::Service;

use crate::error::{BoxError, Error};
use crate::group::{OnWaitLimit, Role, Work};
use crate::inflight::Ticket;

pin_project! {
    /// A caller's share of a flight, returned by [`Group::run`].
    ///
    /// Resolves to the flight's outcome. [`role`](Run::role) says at once
    /// whether this caller leads or follows; once the future has resolved,
    /// [`is_shared`](Run::is_shared) says whether other callers joined its
    /// flight. Poll it by reference to read both afterwards.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::pin::pin;
    /// use tower_singleflight::{Group, Role};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let group: Group<u8, u8> = Group::new();
    /// let mut run = pin!(group.run(1, || async { Ok::<_, std::io::Error>(2) }));
    /// assert_eq!(run.role(), Role::Leader);
    /// assert_eq!(run.as_mut().await.unwrap(), 2);
    /// assert!(!run.is_shared());
    /// # }
    /// ```
    ///
    /// [`Group::run`]: crate::Group::run
    pub struct Run<K, T, W>
    where
        W: Work<T>,
    {
        role: Role,
        shared: bool,
        #[pin]
        state: State<K, T, W>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<K, T, W>
    where
        W: Work<T>,
    {
        // The leader, in the flight it started.
        Lead {
            ticket: Ticket<K, T>,
        },
        // A follower, in the flight it joined.
        Follow {
            ticket: Ticket<K, T>,
            // Kept only by followers that may call on their own.
            work: Option<W>,
            limit: Option<(Instant, OnWaitLimit)>,
            // Boxed, as only followers with a wait limit need it, and only
            // once they wait.
            sleep: Option<Pin<Box<Sleep>>>,
        },
        // A follower past its wait limit, making its own call.
        Own {
            #[pin]
            call: W::Future,
        },
        Done,
    }
}

impl<K, T, W> Run<K, T, W>
where
    K: Hash + Eq + Send + Sync + 'static,
    T: Clone + Send + 'static,
    W: Work<T>,
    W::Future: Send + 'static,
    W::Error: Into<BoxError>,
{
    /// Starts the flight's call with the work `make` returns; a panic in
    /// either reaches every waiter as the flight's outcome.
    pub(crate) fn lead(mut ticket: Ticket<K, T>, make: impl FnOnce() -> W) -> Self {
        ticket.start(|| Call {
            call: make().start(),
        });
        Self::new(Role::Leader, State::Lead { ticket })
    }

    pub(crate) fn follow(
        ticket: Ticket<K, T>,
        work: Option<W>,
        limit: Option<(Duration, OnWaitLimit)>,
    ) -> Self {
        // A limit too far off to name as an instant is no limit.
        let limit =
            limit.and_then(|(limit, then)| Some((Instant::now().checked_add(limit)?, then)));
        let state = State::Follow {
            ticket,
            work,
            limit,
            sleep: None,
        };
        Self::new(Role::Follower, state)
    }
}

pin_project! {
    /// A leader's call, its error made the flight's.
    struct Call<F> {
        #[pin]
        call: F,
    }
}

impl<F, T, E> Future for Call<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().call.poll(cx).map_err(Error::inner_error)
    }
}

impl<K, T, W: Work<T>> Run<K, T, W> {
    fn new(role: Role, state: State<K, T, W>) -> Self {
        Self {
            role,
            shared: false,
            state,
        }
    }

    /// Whether this caller leads the flight, follows it, or (past its wait
    /// limit) made a call of its own.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Whether the flight had more than one caller: always for a follower,
    /// and for a leader when anyone joined its flight, even a follower that
    /// left before the outcome. Meaningful once the future has resolved.
    pub fn is_shared(&self) -> bool {
        self.shared
    }
}

impl<K, T, W> Future for Run<K, T, W>
where
    T: Clone,
    W: Work<T>,
    W::Error: Into<BoxError>,
{
    type Output = Result<T, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                // Drive the call or wait for it; the ticket knows which.
                StateProj::Lead { ticket } => {
                    let (outcome, shared) = ready!(ticket.poll(cx));
                    *this.shared = shared;
                    this.state.set(State::Done);
                    return Poll::Ready(outcome);
                }

                // The same, for a follower, which may have a wait limit.
                StateProj::Follow {
                    ticket,
                    work,
                    limit,
                    sleep,
                } => {
                    if let Poll::Ready((outcome, shared)) = ticket.poll(cx) {
                        *this.shared = shared;
                        this.state.set(State::Done);
                        return Poll::Ready(outcome);
                    }

                    // Still waiting: a follower may have reached its limit.
                    let Some((deadline, then)) = *limit else {
                        return Poll::Pending;
                    };
                    let timer =
                        sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                    if timer.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }

                    // Leave the flight, then fail or make an unshared call.
                    let work = work.take();
                    this.state.set(State::Done);
                    let Some(work) = work.filter(|_| then == OnWaitLimit::CallOwn) else {
                        return Poll::Ready(Err(Error::wait_limit()));
                    };
                    *this.role = Role::Fallback;
                    match panic::catch_unwind(AssertUnwindSafe(|| work.start())) {
                        Ok(call) => this.state.set(State::Own { call }),
                        Err(payload) => return Poll::Ready(Err(Error::panicked(&*payload))),
                    }
                }

                // The unshared call, with the same error and panic handling.
                StateProj::Own { call } => {
                    let outcome = ready!(poll_caught(call, cx))
                        .and_then(|outcome| outcome.map_err(Error::inner_error));
                    this.state.set(State::Done);
                    return Poll::Ready(outcome);
                }

                StateProj::Done => panic!("`Run` polled after it completed"),
            }
        }
    }
}

/// Polls a follower's own call, turning a panic into a panic error, as the
/// flight's call would have.
pub(crate) fn poll_caught<F: Future>(
    call: Pin<&mut F>,
    cx: &mut Context<'_>,
) -> Poll<Result<F::Output, Error>> {
    match panic::catch_unwind(AssertUnwindSafe(|| call.poll(cx))) {
        Ok(polled) => polled.map(Ok),
        Err(payload) => Poll::Ready(Err(Error::panicked(&*payload))),
    }
}

impl<K, T, W: Work<T>> fmt::Debug for Run<K, T, W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Run")
            .field("role", &self.role)
            .field("shared", &self.shared)
            .finish_non_exhaustive()
    }
}

pin_project! {
    /// Response future of [`Singleflight`].
    ///
    /// [`role`](ResponseFuture::role) says how the response is produced.
    ///
    /// [`Singleflight`]: crate::Singleflight
    pub struct ResponseFuture<S, Req, Key>
    where
        S: Service<Req>,
    {
        #[pin]
        kind: Kind<S, Req, Key>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<S, Req, Key>
    where
        S: Service<Req>,
    {
        Bypass { #[pin] call: Oneshot<S, Req> },
        Flight { #[pin] run: Run<Key, S::Response, OwnCall<S, Req>> },
    }
}

impl<S: Service<Req>, Req, Key> ResponseFuture<S, Req, Key> {
    pub(crate) fn bypass(inner: S, req: Req) -> Self {
        let call = inner.oneshot(req);
        Self {
            kind: Kind::Bypass { call },
        }
    }

    pub(crate) fn flight(run: Run<Key, S::Response, OwnCall<S, Req>>) -> Self {
        Self {
            kind: Kind::Flight { run },
        }
    }

    /// Whether this call leads a flight, follows one, made a call of its own
    /// past its wait limit, or bypassed coalescing for want of a key.
    pub fn role(&self) -> Role {
        match &self.kind {
            Kind::Bypass { .. } => Role::Bypass,
            Kind::Flight { run } => run.role(),
        }
    }

    /// Whether the flight had more than one caller, as
    /// [`Run::is_shared`] says. Meaningful once the future has resolved.
    pub fn is_shared(&self) -> bool {
        match &self.kind {
            Kind::Bypass { .. } => false,
            Kind::Flight { run } => run.is_shared(),
        }
    }
}

impl<S, Req, Key> Future for ResponseFuture<S, Req, Key>
where
    S: Service<Req>,
    S::Response: Clone,
    S::Error: Into<BoxError>,
{
    type Output = Result<S::Response, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Bypass { call } => call.poll(cx).map_err(Error::inner_error),
            KindProj::Flight { run } => run.poll(cx),
        }
    }
}

impl<S: Service<Req>, Req, Key> fmt::Debug for ResponseFuture<S, Req, Key> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("role", &self.role())
            .finish_non_exhaustive()
    }
}

/// The work behind a call through [`Singleflight`]: a clone of the inner
/// service and the request, called once the service is ready.
///
/// [`Singleflight`]: crate::Singleflight
pub struct OwnCall<S, Req> {
    inner: S,
    req: Req,
}

impl<S, Req> OwnCall<S, Req> {
    pub(crate) fn new(inner: S, req: Req) -> Self {
        Self { inner, req }
    }
}

impl<S: Service<Req>, Req> Work<S::Response> for OwnCall<S, Req> {
    type Error = S::Error;
    type Future = Oneshot<S, Req>;

    fn start(self) -> Self::Future {
        self.inner.oneshot(self.req)
    }
}

impl<S, Req> fmt::Debug for OwnCall<S, Req> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OwnCall").finish_non_exhaustive()
    }
}
