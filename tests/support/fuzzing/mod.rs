//! The checks behind the fuzz targets in `fuzz/` and the corpus test
//! `tests/fuzz_corpus.rs`: one function per target that turns any byte
//! string into a case, runs it, and panics if the layer broke its contract.
//!
//! A case is a layer configuration, a scripted inner service (see
//! [`script`]) and a few callers, run on a current-thread runtime with a
//! paused clock, so that every wait is virtual and a hang shows as the
//! clock running out. The checks, for every caller:
//!
//! - the layer never panics, and nothing hangs;
//! - a caller gets a whole response made by one inner call (its own, or,
//!   when shared, its flight's, byte for byte: status, headers, data and
//!   trailers), a typed error of one call, or the layer's own failure
//!   response for a reason the case allows;
//! - a request reaches the inner service at most once, unchanged (the gRPC
//!   layer may take a shared call's `grpc-timeout` off);
//! - a response goes to a caller it was not made for only when the rules
//!   allow sharing it (for HTTP, its key, `Set-Cookie`, `Vary`, the body
//!   limit and the predicate; for gRPC, one request message and at most one
//!   response message).
//!
//! Include it with `#[path = ".../tests/support/fuzzing/mod.rs"] mod
//! fuzzing;` and call [`check_http`] or [`check_grpc`].

#![allow(dead_code)]

mod grpc;
mod http;
mod input;
mod script;

use std::error::Error as StdError;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use ::http::header::{CONTENT_TYPE, SET_COOKIE, VARY};
use ::http::{HeaderMap, HeaderName, Response, StatusCode};
use futures::future::join_all;
use futures::FutureExt;
use tower::{Service, ServiceExt};
use tower_singleflight::http::{Coalescing, ResponseBody, ROLE_HEADER};
use tower_singleflight::{BoxError, Error, Role};

use self::input::Input;
use self::script::{CallFailed, CallId, ResponseSpec, ScriptBody, Seen};

/// Checks one case of the HTTP layer made from `data`.
///
/// # Panics
///
/// When the layer breaks its contract on this case.
pub(crate) fn check_http(data: &[u8]) {
    http::check(data);
}

/// Checks one case of the gRPC layer made from `data`.
///
/// # Panics
///
/// When the layer breaks its contract on this case.
pub(crate) fn check_grpc(data: &[u8]) {
    grpc::check(data);
}

/// How much virtual time a case may take before it counts as hung; far more
/// than any script's waits add up to.
const HANG: Duration = Duration::from_secs(3600);

/// What one caller ended with.
#[derive(Debug)]
enum Outcome {
    Got(Box<Got>),
    Error(BoxError),
    /// The caller's own call unwound into it.
    Panicked,
    /// The caller left before it was done, as its script said.
    Abandoned,
}

/// A response as a caller read it.
#[derive(Debug)]
struct Got {
    status: StatusCode,
    headers: HeaderMap,
    seen: Seen,
    coalescing: Coalescing,
    /// The inner call that made it, unless the layer made it.
    call: Option<usize>,
    /// The layer's own failure it answers, if any.
    failure: Option<Arc<Error>>,
}

/// A caller, as the case drives it.
type Boxed = Pin<Box<dyn Future<Output = Outcome>>>;

/// What a caller gets from either layer.
type Reply = Response<ResponseBody<ScriptBody>>;

/// Prints a case, the calls the inner service got and each caller's
/// outcome, when `SINGLEFLIGHT_FUZZ_TRACE` is set: to see why an input
/// fails.
fn trace(case: &dyn std::fmt::Debug, calls: &[script::Call], outcomes: &[Outcome]) {
    if std::env::var_os("SINGLEFLIGHT_FUZZ_TRACE").is_none() {
        return;
    }
    eprintln!("{case:#?}");
    for (k, call) in calls.iter().enumerate() {
        eprintln!("call {k}: {call:?}");
    }
    for (i, outcome) in outcomes.iter().enumerate() {
        eprintln!("caller {i}: {outcome:?}");
    }
}

/// Runs `case` on a current-thread runtime whose clock is paused.
///
/// # Panics
///
/// When the case does not finish within [`HANG`] of virtual time.
fn block_on<F: Future>(case: F) -> F::Output {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a current-thread runtime");
    let bounded = async { tokio::time::timeout(HANG, case).await };
    runtime
        .block_on(bounded)
        .expect("the case hung: a caller never finished")
}

/// When a caller calls and when it leaves.
#[derive(Clone, Copy, Debug)]
struct Timing {
    /// When it calls, if not at once with the leader.
    start: Option<Duration>,
    /// When it leaves, after calling, if it does.
    abandon: Option<Duration>,
}

impl Timing {
    fn leader(input: &mut Input<'_>) -> Self {
        let abandon = Self::abandon(input);
        Self {
            start: None,
            abandon,
        }
    }

    /// Most followers call at once, with the leader; some come later.
    fn follower(input: &mut Input<'_>) -> Self {
        let start = match input.below(8) {
            6 => Some(Duration::from_millis(1)),
            7 => Some(Duration::from_millis(u64::from(input.byte()))),
            _ => None,
        };
        let abandon = Self::abandon(input);
        Self { start, abandon }
    }

    fn abandon(input: &mut Input<'_>) -> Option<Duration> {
        (input.below(16) == 15).then(|| Duration::from_millis(u64::from(input.byte())))
    }
}

/// Calls `svc` with every request: at once those with no start time, so
/// that they meet in one flight, then the others when their time comes.
async fn run<S, Req>(svc: S, requests: Vec<(Req, Timing)>) -> Vec<Outcome>
where
    S: Service<Req, Response = Reply, Error = BoxError> + Clone + 'static,
    S::Future: 'static,
    Req: 'static,
{
    let mut callers: Vec<Boxed> = Vec::new();
    for (req, timing) in requests {
        let mut svc = svc.clone();
        let Some(start) = timing.start else {
            let call = svc.ready().await.expect("always ready").call(req);
            callers.push(Box::pin(drive(call, timing.abandon)));
            continue;
        };
        callers.push(Box::pin(async move {
            tokio::time::sleep(start).await;
            let call = svc.ready().await.expect("always ready").call(req);
            drive(call, timing.abandon).await
        }));
    }
    join_all(callers).await
}

/// Waits for a caller's response and reads its body, unless the caller
/// leaves first, after `abandon`.
async fn drive<F>(response: F, abandon: Option<Duration>) -> Outcome
where
    F: Future<Output = Result<Reply, BoxError>>,
{
    let read = async {
        match AssertUnwindSafe(response).catch_unwind().await {
            Err(_) => Outcome::Panicked,
            Ok(Err(error)) => Outcome::Error(error),
            Ok(Ok(res)) => Outcome::Got(Box::new(read(res).await)),
        }
    };
    let Some(abandon) = abandon else {
        return read.await;
    };
    tokio::select! {
        outcome = read => outcome,
        () = tokio::time::sleep(abandon) => Outcome::Abandoned,
    }
}

async fn read(res: Reply) -> Got {
    let (parts, body) = res.into_parts();
    let coalescing = *parts
        .extensions
        .get::<Coalescing>()
        .expect("every response says how it was produced");
    Got {
        status: parts.status,
        headers: parts.headers,
        seen: Seen::read(body).await,
        coalescing,
        call: parts.extensions.get::<CallId>().map(|id| id.0),
        failure: parts.extensions.get::<Arc<Error>>().map(Arc::clone),
    }
}

/// The scripted call that failed with `error`, if any: its number.
fn failed_call(error: &BoxError) -> Option<usize> {
    let mut cause: Option<&(dyn StdError + 'static)> = Some(&**error);
    while let Some(error) = cause {
        if let Some(CallFailed(k)) = error.downcast_ref::<CallFailed>() {
            return Some(*k);
        }
        cause = error.source();
    }
    None
}

/// Asserts that `got` is exactly the response `spec` scripts, apart from
/// the role header when the layer adds it.
fn assert_replays(got: &Got, spec: &ResponseSpec, role_header: bool, who: &str) {
    let mut headers = got.headers.clone();
    let mut expected = spec.headers.clone();
    if role_header {
        let role = headers.get_all(ROLE_HEADER).iter().collect::<Vec<_>>();
        assert_eq!(
            role,
            [role_value(got.coalescing.role())],
            "{who}: role header"
        );
        headers.remove(ROLE_HEADER);
        expected.remove(ROLE_HEADER);
    }
    assert_eq!(got.status, spec.status, "{who}: status");
    assert_eq!(headers, expected, "{who}: headers");
    assert_eq!(got.seen, spec.body.seen(), "{who}: body and trailers");
}

/// How sure a judgement on sharing is: a body that takes exactly the
/// buffering wait may be shared or not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sure {
    /// The layer may share.
    Allowed,
    /// The layer must share.
    Certain,
}

/// The rules on sharing that both layers follow, as the HTTP layer's docs
/// give them.
struct Rules {
    body_limit: usize,
    buffer_wait: Duration,
}

impl Rules {
    /// Whether `spec`, made for a leader whose request had `leader`'s
    /// headers, may (or, when `sure`, must) be replayed to a follower with
    /// `follower`'s: not 1xx, no event stream, no cookie set, a `Vary` the
    /// two agree on, a body read whole, without failing, within the limit
    /// and the buffering wait.
    fn share(
        &self,
        spec: &ResponseSpec,
        leader: &HeaderMap,
        follower: &HeaderMap,
        sure: Sure,
    ) -> bool {
        let events = spec
            .headers
            .get(CONTENT_TYPE)
            .is_some_and(|value| value.as_bytes().starts_with(b"text/event-stream"));
        let head =
            !spec.status.is_informational() && !events && !spec.headers.contains_key(SET_COOKIE);
        let suits = vary(&spec.headers).is_some_and(|names| {
            let agree = |name: &HeaderName| leader.get_all(name).iter().eq(follower.get_all(name));
            names.iter().all(agree)
        });
        let time = spec.body.sleep_time();
        let in_time = match sure {
            Sure::Allowed => time <= self.buffer_wait,
            Sure::Certain => time < self.buffer_wait,
        };
        let seen = spec.body.seen();
        head && suits && in_time && !seen.failed && seen.data.len() <= self.body_limit
    }
}

/// The request headers a response's `Vary` names, or `None` when it may
/// not be shared with anyone: it names `*`, or something that is no header
/// name, as the HTTP layer's docs say.
fn vary(headers: &HeaderMap) -> Option<Vec<HeaderName>> {
    let mut names = Vec::new();
    for value in headers.get_all(VARY) {
        for name in value.to_str().ok()?.split(',').map(str::trim) {
            match name {
                "" => {}
                "*" => return None,
                name => names.push(HeaderName::from_bytes(name.as_bytes()).ok()?),
            }
        }
    }
    Some(names)
}

fn role_value(role: Role) -> &'static str {
    match role {
        Role::Leader => "leader",
        Role::Follower => "follower",
        Role::Fallback => "fallback",
        Role::Bypass => "bypass",
        _ => "unknown",
    }
}

/// Checks that each caller's outcome is one the case allows: a panic of a
/// call its own request made, the error of a call of its own flight, or a
/// response `response` accepts; and that a caller marked a follower never
/// had its own request sent.
fn verify_outcomes(
    outcomes: &[Outcome],
    calls: &[script::Call],
    sent: &[bool],
    answer: impl Fn(usize) -> script::Answer,
    same_flight: impl Fn(Option<usize>, usize) -> bool,
    response: impl Fn(usize, &Got, &str),
) {
    for (i, outcome) in outcomes.iter().enumerate() {
        let who = format!("caller {i}");
        match outcome {
            Outcome::Abandoned => {}
            Outcome::Panicked => {
                let own = |(k, call): (usize, &script::Call)| {
                    call.caller == Some(i) && answer(k) == script::Answer::Panic
                };
                assert!(
                    calls.iter().enumerate().any(own),
                    "{who}: a panic not its own"
                );
            }
            Outcome::Error(error) => {
                let k = failed_call(error).unwrap_or_else(|| panic!("{who}: untyped {error}"));
                assert_eq!(answer(k), script::Answer::Fail, "{who}: error of call {k}");
                assert!(
                    same_flight(calls[k].caller, i),
                    "{who}: error of another flight's call"
                );
            }
            Outcome::Got(got) => response(i, got, &who),
        }
        if matches!(outcome, Outcome::Got(got) if got.coalescing.role() == Role::Follower) {
            assert!(
                !sent[i],
                "{who}: marked a follower, yet its own request was sent"
            );
        }
    }
}
