//! [`HttpSingleflight`], the service, and the work behind its flights.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use http::{Request, Response};
use http_body::Body;
use tower::ServiceExt;
use tower_service::Service;

use crate::group::{GroupSource, OwnGroup, Work};
use crate::http::body::ResponseBody;
use crate::http::error::HttpError;
use crate::http::future::ResponseFuture;
use crate::http::key::HttpKey;
use crate::http::layer::Settings;
use crate::http::response::FlightResponse;
use crate::key::KeyExtractor;

/// Coalesces concurrent HTTP requests with equal keys into one call of the
/// inner service, and replays its response to every caller it suits.
///
/// Made by [`HttpLayer`] (see [`SingleflightLayer::http`]). Clones share
/// their flights. What is shared, with whom, and what each caller gets, is
/// told in the [module docs](crate::http).
///
/// # Examples
///
/// ```
/// use std::convert::Infallible;
/// use bytes::Bytes;
/// use http::{Request, Response, StatusCode};
/// use http_body_util::Full;
/// use tower::{service_fn, Layer, ServiceExt};
/// use tower_singleflight::http::Coalescing;
/// use tower_singleflight::{Role, SingleflightLayer};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let svc = SingleflightLayer::http().layer(service_fn(|_: Request<Full<Bytes>>| async {
///     Ok::<_, Infallible>(Response::new(Full::<Bytes>::from("hi")))
/// }));
/// let res = svc.oneshot(Request::new(Full::default())).await.unwrap();
/// assert_eq!(res.status(), StatusCode::OK);
/// assert_eq!(res.extensions().get::<Coalescing>().unwrap().role(), Role::Leader);
/// # }
/// ```
///
/// # Backpressure
///
/// As for [`Singleflight`]: [`poll_ready`] is always ready, and a leader or
/// a request without a key calls a clone of the inner service once that
/// clone is ready, inside the response future. A follower waits for no
/// capacity, unless it ends up making its own call (the response could not
/// be shared with it); then it waits for a clone of its own, like a leader.
///
/// # Errors
///
/// The layer's error type follows the inner service's, as [`HttpError`]
/// tells: an infallible inner service makes an infallible layer. The
/// layer's own failures are answered with responses, never errors:
///
/// - a panic in the inner service (or its body, while buffered): every
///   waiter of the flight gets `500 Internal Server Error`;
/// - a follower's wait limit with [`OnWaitLimit::Fail`]: that follower gets
///   `503 Service Unavailable`.
///
/// Both carry the crate's [`Error`] as an `Arc<Error>` response extension,
/// and a short plain-text body that tells no details.
///
/// # Cancellation
///
/// Dropping a response future leaves the flight, as for [`Singleflight`]:
/// the call goes on for the others. A leader that leaves does not take the
/// response with it, unless it was not to be shared: then each follower
/// makes its own call.
///
/// [`HttpLayer`]: crate::http::HttpLayer
/// [`SingleflightLayer::http`]: crate::SingleflightLayer::http
/// [`Singleflight`]: crate::Singleflight
/// [`poll_ready`]: Service::poll_ready
/// [`OnWaitLimit::Fail`]: crate::OnWaitLimit::Fail
/// [`Error`]: crate::Error
#[derive(Clone)]
pub struct HttpSingleflight<S, K = HttpKey, G = OwnGroup> {
    inner: S,
    extractor: K,
    group: G,
    settings: Arc<Settings>,
}

/// A request held until it is sent: by the leader's call at once, by a
/// follower only if it must call on its own.
pub(crate) type RequestSlot<B> = Arc<Mutex<Option<Request<B>>>>;

/// The work behind a flight: sends the leader's request, then reads the
/// response for sharing.
///
/// Public only because it shows in the type of [`ResponseFuture`].
pub struct HttpCall<S, B> {
    inner: S,
    request: RequestSlot<B>,
    settings: Arc<Settings>,
}

impl<S, B> HttpCall<S, B> {
    /// The work of a flight that sends the request in `request` to `inner`.
    pub(crate) fn new(inner: S, request: RequestSlot<B>, settings: Arc<Settings>) -> Self {
        Self {
            inner,
            request,
            settings,
        }
    }
}

impl<S, K, G> HttpSingleflight<S, K, G> {
    pub(crate) fn new(inner: S, extractor: K, group: G, settings: Arc<Settings>) -> Self {
        Self {
            inner,
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

impl<S, K, G, ReqB, ResB> Service<Request<ReqB>> for HttpSingleflight<S, K, G>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: HttpError,
    ResB: Body + Send + 'static,
    ResB::Error: Send,
    K: KeyExtractor<Request<ReqB>>,
    G: GroupSource<K::Key, FlightResponse<ResB>>,
    ReqB: Send + 'static,
{
    type Response = Response<ResponseBody<ResB>>;
    type Error = <S::Error as HttpError>::Shared;
    type Future = ResponseFuture<S, ReqB, ResB, K::Key>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Always ready: a follower must never wait for, reserve or consume
        // the inner service's capacity. Whoever calls the inner service waits
        // for a clone of it to be ready inside its response future instead.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        let settings = Arc::clone(&self.settings);
        let Some(key) = self.extractor.extract(&req) else {
            return ResponseFuture::bypass(self.inner.clone(), req, settings);
        };

        // The request stays in its slot unless the leader's call takes it:
        // a follower keeps it until it knows the response suits it.
        let request = Arc::new(Mutex::new(Some(req)));
        let work = || {
            let (request, settings) = (Arc::clone(&request), Arc::clone(&settings));
            HttpCall::new(self.inner.clone(), request, settings)
        };
        let run = self.group.group().run_with(key, work);
        ResponseFuture::flight(run, request, &self.inner, settings)
    }
}

impl<S, B, ResB> Work<FlightResponse<ResB>> for HttpCall<S, B>
where
    S: Service<Request<B>, Response = Response<ResB>> + Send + 'static,
    S::Future: Send,
    ResB: Body + Send + 'static,
    ResB::Error: Send,
    B: Send + 'static,
{
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<FlightResponse<ResB>, S::Error>> + Send>>;

    fn start(self) -> Self::Future {
        // Keep the leader's headers, to learn what the response varies on.
        #[allow(unused_mut)]
        let mut req = take(&self.request).expect("a flight's request is sent once");
        #[cfg(feature = "grpc")]
        crate::grpc::restore_deadline(&mut req);
        let leader = req.headers().clone();
        let call = self.inner.oneshot(req);
        let settings = self.settings;
        Box::pin(async move {
            let res = call.await?;
            Ok(FlightResponse::read(res, &leader, &settings).await)
        })
    }
}

impl<S: fmt::Debug, K, G: fmt::Debug> fmt::Debug for HttpSingleflight<S, K, G> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpSingleflight")
            .field("inner", &self.inner)
            .field("group", &self.group)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl<S, B> fmt::Debug for HttpCall<S, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpCall").finish_non_exhaustive()
    }
}

/// Takes the request out of its slot, if it is still there.
pub(crate) fn take<B>(slot: &RequestSlot<B>) -> Option<Request<B>> {
    slot.lock().unwrap_or_else(PoisonError::into_inner).take()
}
