//! [`Singleflight`], the service.

use std::fmt;
use std::task::{Context, Poll};

use tower_service::Service;

use crate::error::{BoxError, Error};
use crate::future::{OwnCall, ResponseFuture};
use crate::group::{Config, GroupSource, OwnGroup};
use crate::key::KeyExtractor;

/// Coalesces concurrent requests with equal keys into one call of the inner
/// service, and gives every caller its outcome.
///
/// Made by [`SingleflightLayer`]. Clones share their flights; two services
/// wrapped separately never do, unless both were handed the same [`Group`].
/// `G` is where the service finds its group (see [`GroupSource`]).
///
/// # Backpressure
///
/// [`poll_ready`] is always ready. Followers never touch the inner service:
/// they neither wait for its readiness nor reserve or consume any of its
/// capacity. A leader, and a request without a key, calls a clone of the
/// inner service once that clone is ready, inside the response future. So
/// backpressure from the inner service shows as a slower response future,
/// never as a `Pending` from [`poll_ready`], and followers of a flight are
/// served even while the inner service has no capacity left.
///
/// # Errors
///
/// Responses must be `Clone`: each waiter gets a copy. Errors need not be:
/// every waiter of a failed flight gets an [`Error`] through which the inner
/// error is reachable.
///
/// # Cancellation
///
/// Dropping a response future leaves the flight. The inner call goes on
/// while anyone waits for it, then is dropped (see [`Group`]).
///
/// [`SingleflightLayer`]: crate::SingleflightLayer
/// [`Group`]: crate::Group
/// [`poll_ready`]: Service::poll_ready
#[derive(Clone)]
pub struct Singleflight<S, K, G = OwnGroup> {
    inner: S,
    extractor: K,
    group: G,
}

impl<S, K> Singleflight<S, K> {
    /// Wraps `inner`, keying requests with `extractor`, in a group of its own.
    pub fn new(inner: S, extractor: K) -> Self {
        Self::with_group(inner, extractor, OwnGroup::new(Config::default()))
    }
}

impl<S, K, G> Singleflight<S, K, G> {
    /// Wraps `inner`, keying requests with `extractor`, sharing `group`.
    pub const fn with_group(inner: S, extractor: K, group: G) -> Self {
        Self {
            inner,
            extractor,
            group,
        }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// Where the service finds its group: a [`Group`](crate::Group) or an
    /// [`OwnGroup`].
    pub fn group(&self) -> &G {
        &self.group
    }
}

impl<S, K, G, Req> Service<Req> for Singleflight<S, K, G>
where
    S: Service<Req> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    S::Response: Clone + Send + 'static,
    K: KeyExtractor<Req>,
    G: GroupSource<K::Key, S::Response>,
    Req: Send + 'static,
{
    type Response = S::Response;
    type Error = Error;
    type Future = ResponseFuture<S, Req, K::Key>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Error>> {
        // Always ready: a follower must never wait for, reserve or consume
        // the inner service's capacity. Leaders wait for a clone of the inner
        // service to be ready inside their response future instead.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let Some(key) = self.extractor.extract(&req) else {
            return ResponseFuture::bypass(self.inner.clone(), req);
        };

        // The request is moved into the work only if it will be used; a
        // follower's request is otherwise dropped here.
        let inner = &self.inner;
        let run = self
            .group
            .group()
            .run_with(key, || OwnCall::new(inner.clone(), req));
        ResponseFuture::flight(run)
    }
}

impl<S: fmt::Debug, K, G: fmt::Debug> fmt::Debug for Singleflight<S, K, G> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Singleflight")
            .field("inner", &self.inner)
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}
