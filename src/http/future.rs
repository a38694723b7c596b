//! [`ResponseFuture`] of the HTTP layer, and how each response says how it
//! was produced.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::{HeaderName, HeaderValue, Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tower::util::Oneshot;
use tower::ServiceExt;
use tower_service::Service;

use crate::error::Error;
use crate::future::{poll_caught, Run};
use crate::group::{Role, Work};
use crate::http::body::ResponseBody;
use crate::http::error::{failure_response, HttpError};
use crate::http::layer::Settings;
use crate::http::response::FlightResponse;
use crate::http::service::{take, HttpCall, RequestSlot};

/// The response header that says how a response was produced, when
/// [`HttpLayer::role_header`] turns it on: `leader`, `follower`, `fallback`
/// or `bypass`, as [`Coalescing::role`] says.
///
/// [`HttpLayer::role_header`]: crate::http::HttpLayer::role_header
pub const ROLE_HEADER: HeaderName = HeaderName::from_static("x-singleflight");

/// How a response of the HTTP layer was produced; a response extension on
/// every one of them.
///
/// # Examples
///
/// ```
/// use tower_singleflight::http::Coalescing;
/// use tower_singleflight::Role;
///
/// fn was_shared(res: &http::Response<()>) -> bool {
///     res.extensions().get::<Coalescing>().is_some_and(|how| how.is_shared())
/// }
/// # assert!(!was_shared(&http::Response::new(())));
/// # let _ = Role::Leader;
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Coalescing {
    role: Role,
    shared: bool,
}

impl Coalescing {
    /// The part this caller played: it led the flight ([`Role::Leader`]),
    /// got the leader's response replayed ([`Role::Follower`]), made its own
    /// call as a follower ([`Role::Fallback`]: the response could not be
    /// shared with it, or it reached its wait limit), or had no key
    /// ([`Role::Bypass`]).
    pub fn role(&self) -> Role {
        self.role
    }

    /// Whether this response came from a flight with more than one caller:
    /// for a follower, when it got the flight's response (not one the layer
    /// made for it, such as a 503 past its wait limit); for a leader, when
    /// followers joined its flight (even ones that left before the response)
    /// and its response could be shared with them.
    pub fn is_shared(&self) -> bool {
        self.shared
    }
}

pin_project! {
    /// Response future of [`HttpSingleflight`].
    ///
    /// [`role`](ResponseFuture::role) says how the response is produced.
    ///
    /// [`HttpSingleflight`]: crate::http::HttpSingleflight
    pub struct ResponseFuture<S, ReqB, ResB, Key>
    where
        S: Service<Request<ReqB>>,
        ResB: Body,
        HttpCall<S, ReqB>: Work<FlightResponse<ResB>>,
    {
        role: Role,
        settings: Arc<Settings>,
        #[pin]
        state: State<S, ReqB, ResB, Key>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, ReqB, ResB, Key>
    where
        S: Service<Request<ReqB>>,
        ResB: Body,
        HttpCall<S, ReqB>: Work<FlightResponse<ResB>>,
    {
        // In a flight, holding the request until it is known whether the
        // flight's response suits it. A follower keeps a clone of the inner
        // service for a call of its own.
        Flight {
            #[pin]
            run: Run<Key, FlightResponse<ResB>, HttpCall<S, ReqB>>,
            request: RequestSlot<ReqB>,
            inner: Option<S>,
        },
        // An unshared call: a bypass, or a follower's own call.
        Own {
            #[pin]
            call: Oneshot<S, Request<ReqB>>,
        },
        Done,
    }
}

impl<S, ReqB, ResB, Key> ResponseFuture<S, ReqB, ResB, Key>
where
    S: Service<Request<ReqB>> + Clone,
    ResB: Body,
    HttpCall<S, ReqB>: Work<FlightResponse<ResB>>,
{
    pub(crate) fn bypass(inner: S, req: Request<ReqB>, settings: Arc<Settings>) -> Self {
        let call = inner.oneshot(req);
        let state = State::Own { call };
        Self {
            role: Role::Bypass,
            settings,
            state,
        }
    }

    pub(crate) fn flight(
        run: Run<Key, FlightResponse<ResB>, HttpCall<S, ReqB>>,
        request: RequestSlot<ReqB>,
        inner: &S,
        settings: Arc<Settings>,
    ) -> Self {
        let role = run.role();
        let inner = (role == Role::Follower).then(|| inner.clone());
        let state = State::Flight {
            run,
            request,
            inner,
        };
        Self {
            role,
            settings,
            state,
        }
    }

    /// Whether this call leads a flight, follows one, made a call of its own
    /// as a follower, or bypassed coalescing for want of a key.
    pub fn role(&self) -> Role {
        self.role
    }
}

impl<S, ReqB, ResB, Key> Future for ResponseFuture<S, ReqB, ResB, Key>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    S::Error: HttpError,
    ResB: Body,
    HttpCall<S, ReqB>: Work<FlightResponse<ResB>, Error = S::Error>,
{
    type Output = Result<Response<ResponseBody<ResB>>, <S::Error as HttpError>::Shared>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let outcome = loop {
            match this.state.as_mut().project() {
                // The flight's outcome: whose it is decides what to do with it.
                StateProj::Flight {
                    mut run,
                    request,
                    inner,
                } => {
                    let outcome = ready!(run.as_mut().poll(cx));
                    let (role, shared) = (run.role(), run.is_shared());
                    *this.role = role;

                    // A failure, or the response of a caller's own call.
                    let flight = match outcome {
                        Err(error) => break failed::<S::Error, _>(error).map(|res| (res, false)),
                        Ok(flight) if role != Role::Follower => {
                            let shared = shared && flight.is_shared();
                            break Ok((flight.into_own(), shared));
                        }
                        Ok(flight) => flight,
                    };

                    // A follower: a replay if it suits its request, else a
                    // call of its own with that request.
                    let req = take(request).expect("a follower keeps its request");
                    if let Some(res) = flight.for_follower(req.headers()) {
                        break Ok((res, true));
                    }
                    let inner = inner.take().expect("a follower keeps the inner service");
                    *this.role = Role::Fallback;
                    let call = inner.oneshot(req);
                    this.state.set(State::Own { call });
                }

                // An unshared call's response, streamed as it comes. A
                // follower's own call answers a panic as the flight's would;
                // a request without a key is the inner service's alone.
                StateProj::Own { call } => {
                    let res = if *this.role == Role::Fallback {
                        match ready!(poll_caught(call, cx)) {
                            Ok(res) => res,
                            Err(panic) => break Ok((failure_response(panic), false)),
                        }
                    } else {
                        ready!(call.poll(cx))
                    };
                    let res = res.map_err(HttpError::unshared);
                    break res.map(|res| (res.map(ResponseBody::pass), false));
                }

                StateProj::Done => panic!("`ResponseFuture` polled after it completed"),
            }
        };

        // Done: say how the response was produced.
        this.state.set(State::Done);
        let role = *this.role;
        Poll::Ready(outcome.map(|(res, shared)| mark(res, role, shared, this.settings)))
    }
}

impl<S, ReqB, ResB, Key> fmt::Debug for ResponseFuture<S, ReqB, ResB, Key>
where
    S: Service<Request<ReqB>>,
    ResB: Body,
    HttpCall<S, ReqB>: Work<FlightResponse<ResB>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

/// A failed flight as the layer reports it: the inner service's error as an
/// error, where the layer's error type can hold it; anything else, such as a
/// panic or a wait limit, as a failure response.
fn failed<E: HttpError, B: Body>(error: Error) -> Result<Response<ResponseBody<B>>, E::Shared> {
    if error.inner().is_none() {
        return Ok(failure_response(error));
    }
    match E::share(error) {
        Ok(shared) => Err(shared),
        Err(error) => Ok(failure_response(error)),
    }
}

/// Says how `res` was produced: in an extension, and in a header if asked.
pub(crate) fn mark<B>(
    mut res: Response<B>,
    role: Role,
    shared: bool,
    settings: &Settings,
) -> Response<B> {
    res.extensions_mut().insert(Coalescing { role, shared });
    if settings.role_header {
        res.headers_mut().insert(ROLE_HEADER, role_value(role));
    }
    res
}

fn role_value(role: Role) -> HeaderValue {
    HeaderValue::from_static(match role {
        Role::Leader => "leader",
        Role::Follower => "follower",
        Role::Fallback => "fallback",
        Role::Bypass => "bypass",
    })
}
