//! The scripted world a case runs in: bodies that yield scripted frames
//! ([`ScriptBody`]), an inner service that answers each call from a script
//! and logs what it was sent ([`Backend`]), and the decoders that make both
//! from fuzz input.

use std::collections::VecDeque;
use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::time::Sleep;
use tower::Service;
use tower_singleflight::BoxError;

use super::input::Input;

/// The most frames a body may yield before it counts as never ending.
const MAX_FRAMES: usize = 100_000;

// --- bodies ---

/// One step of a scripted body, or of a scripted call before it answers.
#[derive(Clone, Debug)]
pub(crate) enum Step {
    Data(Bytes),
    Trailers(HeaderMap),
    /// The body fails, and yields nothing after.
    Fail,
    /// Nothing for a while (virtual time).
    Sleep(Duration),
    /// Pending once, woken at once.
    Yield,
}

/// A scripted body: its steps, and whether it tells its exact size.
#[derive(Clone, Debug, Default)]
pub(crate) struct BodySpec {
    pub(crate) steps: Vec<Step>,
    pub(crate) exact: bool,
}

/// A body that yields its [`BodySpec`]'s steps.
#[derive(Debug)]
pub(crate) struct ScriptBody {
    steps: VecDeque<Step>,
    exact: bool,
    sleep: Option<Pin<Box<Sleep>>>,
}

/// The error of a [`ScriptBody`] whose script fails.
#[derive(Debug)]
pub(crate) struct BodyFailed;

/// What a reader of a body saw: its data, its trailers, whether it failed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Seen {
    pub(crate) data: Bytes,
    pub(crate) trailers: Option<HeaderMap>,
    pub(crate) failed: bool,
}

impl BodySpec {
    /// What a reader of this body sees, if it reads it to the end.
    pub(crate) fn seen(&self) -> Seen {
        let mut seen = Seen::default();
        let mut data = Vec::new();
        for step in &self.steps {
            match step {
                Step::Data(bytes) => data.extend_from_slice(bytes),
                Step::Trailers(map) => merge(&mut seen.trailers, map.clone()),
                Step::Fail => {
                    seen.failed = true;
                    break;
                }
                Step::Sleep(_) | Step::Yield => {}
            }
        }
        seen.data = data.into();
        seen
    }

    /// Whether the body ever makes its reader wait.
    pub(crate) fn waits(&self) -> bool {
        self.steps
            .iter()
            .any(|step| matches!(step, Step::Sleep(_) | Step::Yield))
    }

    /// How long the body keeps its reader waiting, all told.
    pub(crate) fn sleep_time(&self) -> Duration {
        let sleep = |step: &Step| match step {
            Step::Sleep(time) => *time,
            _ => Duration::ZERO,
        };
        self.steps.iter().map(sleep).sum()
    }

    /// Whether the body ever makes its reader wait on the clock.
    pub(crate) fn sleeps(&self) -> bool {
        self.steps.iter().any(|step| matches!(step, Step::Sleep(_)))
    }

    pub(crate) fn body(&self) -> ScriptBody {
        ScriptBody {
            steps: self.steps.iter().cloned().collect(),
            exact: self.exact,
            sleep: None,
        }
    }

    /// `wire` cut into data frames at points the input picks, with waits
    /// between them, then an end the input picks.
    pub(crate) fn chunked(input: &mut Input<'_>, wire: &[u8], trailer: &[&'static str]) -> Self {
        let mut steps = Vec::new();
        let mut rest = wire;
        while !rest.is_empty() {
            // A zero length takes all that is left.
            let len = match input.below(12) {
                0 => rest.len(),
                n => n.min(rest.len()),
            };
            steps.push(Step::Data(Bytes::copy_from_slice(&rest[..len])));
            rest = &rest[len..];
            if let Some(wait) = wait(input) {
                steps.push(wait);
            }
        }
        end(input, &mut steps, trailer);
        Self {
            steps,
            exact: input.flag(),
        }
    }
}

/// A wait between frames, or none (most often).
pub(crate) fn wait(input: &mut Input<'_>) -> Option<Step> {
    match input.below(16) {
        13 => Some(Step::Yield),
        14 => Some(Step::Sleep(Duration::from_millis(1))),
        15 => Some(Step::Sleep(Duration::from_millis(u64::from(input.byte())))),
        _ => None,
    }
}

/// How a body ends: plainly (most often), with trailers, with an empty data
/// frame, or failing.
pub(crate) fn end(input: &mut Input<'_>, steps: &mut Vec<Step>, trailer: &[&'static str]) {
    match input.below(8) {
        5 => steps.push(Step::Trailers(headers(input, trailer, 4))),
        6 => steps.push(Step::Data(Bytes::new())),
        7 => steps.push(Step::Fail),
        _ => {}
    }
}

impl ScriptBody {
    pub(crate) fn empty() -> Self {
        BodySpec::default().body()
    }
}

impl Body for ScriptBody {
    type Data = Bytes;
    type Error = BodyFailed;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyFailed>>> {
        let this = &mut *self;
        loop {
            if let Some(sleep) = this.sleep.as_mut() {
                std::task::ready!(sleep.as_mut().poll(cx));
                this.sleep = None;
            }
            let frame = match this.steps.pop_front() {
                None => return Poll::Ready(None),
                Some(Step::Data(data)) => Ok(Frame::data(data)),
                Some(Step::Trailers(map)) => Ok(Frame::trailers(map)),
                Some(Step::Fail) => {
                    this.steps.clear();
                    Err(BodyFailed)
                }
                Some(Step::Sleep(time)) => {
                    this.sleep = Some(Box::pin(tokio::time::sleep(time)));
                    continue;
                }
                Some(Step::Yield) => {
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
            };
            return Poll::Ready(Some(frame));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.steps.is_empty() && self.sleep.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        if !self.exact {
            return SizeHint::new();
        }
        let data = self.steps.iter().map(|step| match step {
            Step::Data(data) => data.len() as u64,
            _ => 0,
        });
        SizeHint::with_exact(data.sum())
    }
}

impl fmt::Display for BodyFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("scripted body failure")
    }
}

impl StdError for BodyFailed {}

impl Seen {
    /// Reads `body` to its end or its first error.
    ///
    /// # Panics
    ///
    /// When the body yields more than [`MAX_FRAMES`] frames.
    pub(crate) async fn read<B: Body>(body: B) -> Self {
        let mut body = Box::pin(body);
        let (mut seen, mut data) = (Self::default(), Vec::new());
        for _ in 0..MAX_FRAMES {
            let frame = match body.frame().await {
                None => {
                    seen.data = data.into();
                    return seen;
                }
                Some(Ok(frame)) => frame,
                Some(Err(_)) => {
                    seen.failed = true;
                    seen.data = data.into();
                    return seen;
                }
            };
            match frame.into_data() {
                Ok(mut chunk) => data.extend_from_slice(&chunk.copy_to_bytes(chunk.remaining())),
                Err(frame) => {
                    let map = frame
                        .into_trailers()
                        .ok()
                        .expect("a frame is data or trailers");
                    merge(&mut seen.trailers, map);
                }
            }
        }
        panic!("a body yielded more than {MAX_FRAMES} frames");
    }
}

/// Adds a trailers frame to those seen before, as `http-body-util` does.
fn merge(trailers: &mut Option<HeaderMap>, map: HeaderMap) {
    match trailers {
        Some(seen) => seen.extend(map),
        None => *trailers = Some(map),
    }
}

// --- headers ---

/// Up to `max` headers, each named from `names` or by the input's bytes,
/// with values of every kind the `http` crate accepts: empty, odd bytes,
/// huge, repeated names.
pub(crate) fn headers(input: &mut Input<'_>, names: &[&'static str], max: usize) -> HeaderMap {
    let mut map = HeaderMap::new();
    for _ in 0..input.below(max + 1) {
        let name = match input.below(names.len() + 1) {
            0 => HeaderName::from_bytes(&input.bytes(12)).ok(),
            n => Some(HeaderName::from_static(names[n - 1])),
        };
        if let (Some(name), Some(value)) = (name, value(input)) {
            map.append(name, value);
        }
    }
    map
}

/// A header value: short and plain most often, sometimes empty, not UTF-8,
/// huge, or any bytes at all (skipped when `http` rejects them).
pub(crate) fn value(input: &mut Input<'_>) -> Option<HeaderValue> {
    match input.below(8) {
        0..=2 => Some(HeaderValue::from_static(
            input.pick(&["a", "b", "a, b", "0"]),
        )),
        3 => Some(HeaderValue::from_static("")),
        4 => HeaderValue::from_bytes(&[0x80, input.byte() | 0x80, b'x', 0xff]).ok(),
        5 => {
            let len = usize::from(input.u16()) * 2;
            HeaderValue::from_bytes(&vec![b'v'; len]).ok()
        }
        _ => HeaderValue::from_bytes(&input.bytes(24)).ok(),
    }
}

// --- the inner service ---

/// Marks a request with the number of the caller that sent it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct CallerId(pub(crate) usize);

/// Marks a response with the number of the inner call that made it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct CallId(pub(crate) usize);

/// The error of a scripted call that fails: says which call.
#[derive(Debug)]
pub(crate) struct CallFailed(pub(crate) usize);

/// What a scripted call does once it has read its request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Answer {
    Respond,
    Fail,
    /// Unwinds without the panic hook, so that `libfuzzer` sees no crash.
    Panic,
}

/// A scripted response: what the inner service answers a call with.
#[derive(Clone, Debug)]
pub(crate) struct ResponseSpec {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: BodySpec,
    /// Waits before answering.
    pub(crate) delay: Vec<Step>,
    pub(crate) answer: Answer,
}

impl ResponseSpec {
    /// Whether its body holds a failure.
    pub(crate) fn fails(&self) -> bool {
        self.body.seen().failed
    }

    /// Decodes the parts every protocol shares: how long the call takes,
    /// and whether it answers at all.
    pub(crate) fn delay_and_answer(input: &mut Input<'_>) -> (Vec<Step>, Answer) {
        let delay = match input.below(8) {
            0..=3 => vec![Step::Sleep(Duration::from_millis(1))],
            4 => vec![],
            5 => vec![Step::Yield],
            6 => vec![Step::Sleep(Duration::from_millis(u64::from(input.byte())))],
            _ => vec![Step::Yield, Step::Sleep(Duration::from_millis(3))],
        };
        let answer = match input.below(16) {
            14 => Answer::Fail,
            15 => Answer::Panic,
            _ => Answer::Respond,
        };
        (delay, answer)
    }
}

/// The inner service: answers call `k` with response script `k` modulo
/// their number, after reading the request's body whole.
#[derive(Clone)]
pub(crate) struct Backend {
    responses: Arc<[ResponseSpec]>,
    log: Log,
}

/// Every call the inner service got, numbered in order.
#[derive(Clone, Default)]
pub(crate) struct Log(Arc<Mutex<Vec<Call>>>);

/// One call the inner service got.
#[derive(Clone, Debug)]
pub(crate) struct Call {
    pub(crate) caller: Option<usize>,
    pub(crate) method: Method,
    pub(crate) uri: Uri,
    pub(crate) headers: HeaderMap,
    /// The request body as read, once read whole.
    pub(crate) body: Option<Seen>,
}

impl Backend {
    pub(crate) fn new(responses: Vec<ResponseSpec>, log: Log) -> Self {
        Self {
            responses: responses.into(),
            log,
        }
    }
}

impl Log {
    pub(crate) fn calls(&self) -> Vec<Call> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn push(&self, call: Call) -> usize {
        let mut calls = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        calls.push(call);
        calls.len() - 1
    }

    fn read(&self, k: usize, seen: Seen) {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)[k].body = Some(seen);
    }
}

type BoxFuture = Pin<Box<dyn Future<Output = Result<Response<ScriptBody>, BoxError>> + Send>>;

impl<B> Service<Request<B>> for Backend
where
    B: Body + Send + 'static,
{
    type Response = Response<ScriptBody>;
    type Error = BoxError;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> BoxFuture {
        // Log the call, and pick its script.
        let (parts, body) = req.into_parts();
        let k = self.log.push(Call {
            caller: parts.extensions.get::<CallerId>().map(|id| id.0),
            method: parts.method,
            uri: parts.uri,
            headers: parts.headers,
            body: None,
        });
        let spec = self.responses[k % self.responses.len()].clone();
        let log = self.log.clone();

        // Read the request, take the scripted time, answer.
        Box::pin(async move {
            log.read(k, Seen::read(body).await);
            for step in &spec.delay {
                pause(step).await;
            }
            match spec.answer {
                Answer::Respond => {}
                Answer::Fail => return Err(Box::new(CallFailed(k)) as BoxError),
                Answer::Panic => std::panic::resume_unwind(Box::new(CallFailed(k))),
            }
            let mut res = Response::new(spec.body.body());
            *res.status_mut() = spec.status;
            *res.headers_mut() = spec.headers;
            res.extensions_mut().insert(CallId(k));
            Ok(res)
        })
    }
}

impl fmt::Display for CallFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "scripted call {} failed", self.0)
    }
}

impl StdError for CallFailed {}

/// Waits as a [`Step::Sleep`] or [`Step::Yield`] says; other steps are no
/// waits.
pub(crate) async fn pause(step: &Step) {
    match step {
        Step::Sleep(time) => tokio::time::sleep(*time).await,
        Step::Yield => tokio::task::yield_now().await,
        Step::Data(_) | Step::Trailers(_) | Step::Fail => {}
    }
}
