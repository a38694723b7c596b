//! [`ResponseFuture`] of the gRPC layer: read the call, then share it, pass
//! it through, or give up on it at its deadline.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll};

use http::{Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower::util::Oneshot;
use tower::ServiceExt;
use tower_service::Service;

use crate::error::{BoxError, Error};
use crate::future::{poll_caught, Run};
use crate::group::{Group, Role, Work};
use crate::grpc::body::RequestBody;
use crate::grpc::key::UnaryCall;
use crate::grpc::layer::GrpcSettings;
use crate::grpc::message::{Read, ReadMessage};
use crate::grpc::status::{self, FollowerDeadline, GRPC_TIMEOUT};
use crate::http::{mark, take, FlightResponse, HttpCall, RequestSlot, ResponseBody};
use crate::key::KeyExtractor;

/// What a response future needs to start its call once it has read it.
pub(crate) struct Start<S, M, K: KeyExtractor<UnaryCall>, T> {
    pub(crate) inner: S,
    pub(crate) make_body: M,
    pub(crate) extractor: K,
    pub(crate) group: Group<K::Key, T>,
}

pin_project! {
    /// Response future of [`GrpcSingleflight`].
    ///
    /// [`role`](ResponseFuture::role) says how the response is produced,
    /// once the call's request has been read.
    ///
    /// [`GrpcSingleflight`]: crate::grpc::GrpcSingleflight
    pub struct ResponseFuture<S, B, ResB, M, K>
    where
        S: Service<Request<B>>,
        B: Body,
        ResB: Body,
        K: KeyExtractor<UnaryCall>,
        HttpCall<S, B>: Work<FlightResponse<ResB>>,
    {
        role: Option<Role>,
        settings: Arc<GrpcSettings>,
        // When this caller stops waiting, from its `grpc-timeout`.
        deadline: Option<Instant>,
        // Armed at the first poll that waits, if there is a deadline.
        #[pin]
        timer: Option<Sleep>,
        #[pin]
        state: State<S, B, ResB, M, K>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, B, ResB, M, K>
    where
        S: Service<Request<B>>,
        B: Body,
        ResB: Body,
        K: KeyExtractor<UnaryCall>,
        HttpCall<S, B>: Work<FlightResponse<ResB>>,
    {
        // Reading the request until it is known to be one message, or not.
        Read {
            read: ReadMessage<B>,
            start: Option<Start<S, M, K, FlightResponse<ResB>>>,
        },
        // In a flight. A follower keeps its request, and a clone of the inner
        // service, for a call of its own if the response cannot be shared.
        Flight {
            #[pin]
            run: Run<K::Key, FlightResponse<ResB>, HttpCall<S, B>>,
            request: RequestSlot<B>,
            inner: Option<S>,
        },
        // A call of its own: passed through, or a follower's.
        Own {
            #[pin]
            call: Oneshot<S, Request<B>>,
        },
        Done,
    }
}

impl<S, B, ResB, M, K> ResponseFuture<S, B, ResB, M, K>
where
    S: Service<Request<B>> + Clone,
    B: Body,
    ResB: Body,
    K: KeyExtractor<UnaryCall>,
    HttpCall<S, B>: Work<FlightResponse<ResB>>,
{
    pub(crate) fn bypass(inner: S, req: Request<B>, settings: Arc<GrpcSettings>) -> Self {
        let call = inner.oneshot(req);
        Self::new(Some(Role::Bypass), settings, None, State::Own { call })
    }

    pub(crate) fn read(
        req: Request<B>,
        start: Start<S, M, K, FlightResponse<ResB>>,
        settings: Arc<GrpcSettings>,
        deadline: Option<Instant>,
    ) -> Self {
        let read = ReadMessage::new(req, settings.message_limit, settings.waits);
        let start = Some(start);
        Self::new(None, settings, deadline, State::Read { read, start })
    }

    fn new(
        role: Option<Role>,
        settings: Arc<GrpcSettings>,
        deadline: Option<Instant>,
        state: State<S, B, ResB, M, K>,
    ) -> Self {
        Self {
            role,
            settings,
            deadline,
            timer: None,
            state,
        }
    }

    /// Whether this call leads a flight, follows one, made a call of its own
    /// as a follower, or passed through; `None` while its request is still
    /// being read.
    pub fn role(&self) -> Option<Role> {
        self.role
    }
}

impl<S, B, ResB, M, K> Future for ResponseFuture<S, B, ResB, M, K>
where
    S: Service<Request<B>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    ResB: Body + Send + 'static,
    ResB::Error: Send,
    M: Fn(RequestBody<B>) -> B,
    K: KeyExtractor<UnaryCall>,
{
    type Output = Result<Response<ResponseBody<ResB>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let outcome = loop {
            match this.state.as_mut().project() {
                // Reading the request: a unary call joins a flight, anything
                // else is passed on as it came.
                StateProj::Read { read, start } => {
                    let Poll::Ready(read) = read.poll_read(cx) else {
                        if expired(this.timer.as_mut(), *this.deadline, cx) {
                            break Ok((status::deadline_exceeded(false), false));
                        }
                        return Poll::Pending;
                    };
                    let start = start.take().expect("a call starts once");
                    let (role, state) = start.begin(read, this.settings, *this.deadline);
                    *this.role = Some(role);
                    this.state.set(state);
                }

                // The flight's outcome, unless this caller's deadline comes
                // first: then it alone leaves.
                StateProj::Flight {
                    mut run,
                    request,
                    inner,
                } => {
                    let Poll::Ready(outcome) = run.as_mut().poll(cx) else {
                        // Past its wait limit, a follower may be making a
                        // call of its own by now: say so, whatever ends it.
                        *this.role = Some(run.role());
                        if expired(this.timer.as_mut(), *this.deadline, cx) {
                            let following = run.role() == Role::Follower;
                            break Ok((status::deadline_exceeded(following), false));
                        }
                        return Poll::Pending;
                    };
                    let (role, shared) = (run.role(), run.is_shared());
                    *this.role = Some(role);

                    // A failure, or the response of a caller's own call.
                    let flight = match outcome {
                        Err(error) => break failed(error),
                        Ok(flight) if role != Role::Follower => {
                            let shared = shared && flight.is_shared();
                            break Ok((flight.into_own(), shared));
                        }
                        Ok(flight) => flight,
                    };

                    // A follower: a replay if it suits its request, else a
                    // call of its own, with what is left of its deadline.
                    let mut req = take(request).expect("a follower keeps its request");
                    if let Some(res) = flight.for_follower(req.headers()) {
                        break Ok((res, true));
                    }
                    if this
                        .deadline
                        .is_some_and(|deadline| deadline <= Instant::now())
                    {
                        break Ok((status::deadline_exceeded(true), false));
                    }
                    status::restore_deadline(&mut req);
                    let inner = inner.take().expect("a follower keeps the inner service");
                    *this.role = Some(Role::Fallback);
                    this.state.set(State::Own {
                        call: inner.oneshot(req),
                    });
                }

                // A call of its own, streamed as it comes. A follower's
                // answers a panic as the flight's call would; a call passed
                // through is the inner service's alone.
                StateProj::Own { call } => {
                    let res = if *this.role == Some(Role::Fallback) {
                        match ready!(poll_caught(call, cx)) {
                            Ok(res) => res,
                            Err(panic) => break Ok((status::failure(panic), false)),
                        }
                    } else {
                        ready!(call.poll(cx))
                    };
                    let res = res.map_err(Into::into);
                    break res.map(|res| (res.map(ResponseBody::pass), false));
                }

                StateProj::Done => panic!("`ResponseFuture` polled after it completed"),
            }
        };

        // Done: say how the response was produced.
        this.state.set(State::Done);
        let role = this.role.unwrap_or(Role::Bypass);
        let settings = &this.settings.http;
        Poll::Ready(outcome.map(|(res, shared)| mark(res, role, shared, settings)))
    }
}

impl<S, B, ResB, M, K> fmt::Debug for ResponseFuture<S, B, ResB, M, K>
where
    S: Service<Request<B>>,
    B: Body,
    ResB: Body,
    K: KeyExtractor<UnaryCall>,
    HttpCall<S, B>: Work<FlightResponse<ResB>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

// --- impl Start ---

impl<S, M, K, ResB> Start<S, M, K, FlightResponse<ResB>>
where
    ResB: Body,
    K: KeyExtractor<UnaryCall>,
{
    /// Starts what the request read calls for: a flight for a unary call with
    /// a key, a call of its own for anything else.
    fn begin<B>(
        self,
        read: Read<B>,
        settings: &Arc<GrpcSettings>,
        deadline: Option<Instant>,
    ) -> (Role, State<S, B, ResB, M, K>)
    where
        S: Service<Request<B>, Response = Response<ResB>> + Clone + Send + 'static,
        S::Future: Send,
        S::Error: Into<BoxError>,
        B: Body + Send + 'static,
        ResB: Send + 'static,
        ResB::Error: Send,
        M: Fn(RequestBody<B>) -> B,
    {
        // Not one message, or no key: on to the inner service, untouched.
        let call = match read {
            Read::Stream(req) => {
                let req = req.map(&self.make_body);
                return self.pass(req);
            }
            Read::Unary(call) => call,
        };
        let key = self.extractor.extract(&call);
        let (mut head, frame) = call.into_parts();
        let body = (self.make_body)(RequestBody::new(ResponseBody::replay(frame, None)));
        let Some(key) = key else {
            return self.pass(Request::from_parts(head, body));
        };

        // The shared call carries no caller's deadline: each waiter keeps
        // its own, and the call lasts while anyone waits for it.
        head.headers.remove(GRPC_TIMEOUT);
        let request = Arc::new(Mutex::new(Some(Request::from_parts(head, body))));
        let http = Arc::clone(&settings.http);
        let work = || HttpCall::new(self.inner.clone(), Arc::clone(&request), http);
        let run = self.group.run_with(key, work);
        let role = run.role();

        // A follower's own call, should it make one, carries what is left of
        // its deadline then: past its wait limit, or if the response cannot
        // be shared with it.
        if let Some(deadline) = deadline.filter(|_| role == Role::Follower) {
            let mut slot = request.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(req) = slot.as_mut() {
                req.extensions_mut().insert(FollowerDeadline(deadline));
            }
        }
        let inner = (role == Role::Follower).then_some(self.inner);
        let state = State::Flight {
            run,
            request,
            inner,
        };
        (role, state)
    }

    fn pass<B>(self, req: Request<B>) -> (Role, State<S, B, ResB, M, K>)
    where
        S: Service<Request<B>>,
        B: Body,
        HttpCall<S, B>: Work<FlightResponse<ResB>>,
    {
        let call = self.inner.oneshot(req);
        (Role::Bypass, State::Own { call })
    }
}

/// Whether this caller's deadline has passed; arms its timer on first use.
fn expired(
    mut timer: Pin<&mut Option<Sleep>>,
    deadline: Option<Instant>,
    cx: &mut Context<'_>,
) -> bool {
    let Some(deadline) = deadline else {
        return false;
    };
    if timer.is_none() {
        timer.set(Some(tokio::time::sleep_until(deadline)));
    }
    let timer = timer.as_pin_mut().expect("the timer was just armed");
    timer.poll(cx).is_ready()
}

/// A failed flight as the layer reports it: the inner service's error as an
/// error, a panic or a wait limit as a status.
fn failed<B: Body>(error: Error) -> Result<(Response<ResponseBody<B>>, bool), BoxError> {
    if error.inner().is_some() {
        return Err(Box::new(error));
    }
    Ok((status::failure(error), false))
}
