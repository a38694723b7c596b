//! [`GrpcSingleflight`], the service.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use http_body::Body;
use tokio::time::Instant;
use tower_service::Service;

use crate::error::BoxError;
use crate::group::{GroupSource, OwnGroup};
use crate::grpc::body::RequestBody;
use crate::grpc::future::{ResponseFuture, Start};
use crate::grpc::key::{GrpcKey, UnaryCall};
use crate::grpc::layer::GrpcSettings;
use crate::grpc::status;
use crate::http::{FlightResponse, ResponseBody};
use crate::key::KeyExtractor;

/// Coalesces identical concurrent unary gRPC calls into one call of the
/// inner service, and replays its response, status and trailers to every
/// caller.
///
/// Made by [`GrpcLayer`] (see [`SingleflightLayer::grpc`]). Clones share
/// their flights. `M` rebuilds request bodies for the inner service. Which
/// calls coalesce, and what each caller gets, is told in the
/// [module docs](crate::grpc).
///
/// # Examples
///
/// ```
/// use std::convert::Infallible;
/// use bytes::Bytes;
/// use http::{Request, Response};
/// use http_body_util::combinators::UnsyncBoxBody;
/// use http_body_util::{BodyExt, Full};
/// use tower::{service_fn, Layer, ServiceExt};
/// use tower_singleflight::grpc::RequestBody;
/// use tower_singleflight::http::Coalescing;
/// use tower_singleflight::{Role, SingleflightLayer};
///
/// type Boxed = UnsyncBoxBody<Bytes, Infallible>;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let layer = SingleflightLayer::grpc(|body: RequestBody<Boxed>| body.boxed_unsync());
/// let svc = layer.layer(service_fn(|_: Request<Boxed>| async {
///     Ok::<_, Infallible>(Response::new(Full::<Bytes>::from(&[0, 0, 0, 0, 0][..])))
/// }));
///
/// // One message ("hi", uncompressed), then the end: a unary call.
/// let message = Full::from(&[0, 0, 0, 0, 2, b'h', b'i'][..]).boxed_unsync();
/// let req = Request::post("/echo.Echo/Get")
///     .header("content-type", "application/grpc")
///     .body(message)
///     .unwrap();
/// let res = svc.oneshot(req).await.unwrap();
/// assert_eq!(res.extensions().get::<Coalescing>().unwrap().role(), Role::Leader);
/// # }
/// ```
///
/// # Backpressure
///
/// As for [`Singleflight`]: [`poll_ready`] is always ready, and whoever
/// calls the inner service (a leader, a call that passes through, a follower
/// making its own call) waits for a clone of it to be ready inside the
/// response future. A follower waits for no capacity.
///
/// # Errors
///
/// The error type is [`BoxError`]. A call of its own (one that passes
/// through, or a follower's own call) fails with the inner service's error,
/// boxed as it is. Every waiter of a failed shared call gets a boxed
/// [`Error`] whose source is the inner error, so tonic's
/// `Status::from_error` finds the same status in it. The layer's own
/// failures are statuses, never errors:
///
/// - a caller's deadline passing while it waits: `DEADLINE_EXCEEDED`, for
///   that caller only;
/// - a follower's wait limit with [`OnWaitLimit::Fail`]: `UNAVAILABLE`;
/// - a panic in the inner service: `INTERNAL`, for every waiter.
///
/// # Cancellation
///
/// Dropping a response future leaves the flight, as for [`Singleflight`]:
/// the call goes on for the others, and is dropped (which cancels the RPC)
/// when the last one leaves.
///
/// [`GrpcLayer`]: crate::grpc::GrpcLayer
/// [`SingleflightLayer::grpc`]: crate::SingleflightLayer::grpc
/// [`Singleflight`]: crate::Singleflight
/// [`poll_ready`]: Service::poll_ready
/// [`OnWaitLimit::Fail`]: crate::OnWaitLimit::Fail
/// [`Error`]: crate::Error
#[derive(Clone)]
pub struct GrpcSingleflight<S, M, K = GrpcKey, G = OwnGroup> {
    inner: S,
    make_body: M,
    extractor: K,
    group: G,
    settings: Arc<GrpcSettings>,
}

impl<S, M, K, G> GrpcSingleflight<S, M, K, G> {
    pub(crate) fn new(
        inner: S,
        make_body: M,
        extractor: K,
        group: G,
        settings: Arc<GrpcSettings>,
    ) -> Self {
        Self {
            inner,
            make_body,
            extractor,
            group,
            settings,
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

impl<S, M, K, G, B, ResB> Service<Request<B>> for GrpcSingleflight<S, M, K, G>
where
    S: Service<Request<B>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    ResB: Body + Send + 'static,
    ResB::Error: Send,
    M: Fn(RequestBody<B>) -> B + Clone,
    K: KeyExtractor<UnaryCall> + Clone,
    G: GroupSource<K::Key, FlightResponse<ResB>>,
{
    type Response = Response<ResponseBody<ResB>>;
    type Error = BoxError;
    type Future = ResponseFuture<S, B, ResB, M, K>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Always ready: a follower must never wait for, reserve or consume
        // the inner service's capacity. Whoever calls the inner service waits
        // for a clone of it to be ready inside its response future instead.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let settings = Arc::clone(&self.settings);
        if !settings.may_coalesce(&req) {
            return ResponseFuture::bypass(self.inner.clone(), req, settings);
        }

        // The caller's own deadline counts from now, and is kept here: the
        // shared call carries none.
        let deadline = status::timeout(req.headers()).and_then(|t| Instant::now().checked_add(t));
        let start = Start {
            inner: self.inner.clone(),
            make_body: self.make_body.clone(),
            extractor: self.extractor.clone(),
            group: self.group.group().clone(),
        };
        ResponseFuture::read(req, start, settings, deadline)
    }
}

impl<S: fmt::Debug, M, K, G: fmt::Debug> fmt::Debug for GrpcSingleflight<S, M, K, G> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcSingleflight")
            .field("inner", &self.inner)
            .field("group", &self.group)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}
