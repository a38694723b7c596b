//! The gRPC target: calls whose bodies are gRPC frames of every shape (one
//! message, several, truncated, with wrong lengths or compression flags,
//! trailing garbage, trailers, early failures), cut into arbitrary frames
//! with waits between them, through [`SingleflightLayer::grpc`] over a
//! scripted inner service.
//!
//! [`SingleflightLayer::grpc`]: tower_singleflight::SingleflightLayer::grpc

use std::time::Duration;

use bytes::{BufMut, Bytes};
use http::header::{HeaderName, CONTENT_TYPE, SET_COOKIE, VARY};
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::BodyExt;
use tower::Layer;
use tower_singleflight::grpc::{
    GrpcLayer, RequestBody, DEFAULT_END_WAIT, DEFAULT_MESSAGE_LIMIT, DEFAULT_MESSAGE_WAIT,
    ENCODING_HEADERS,
};
use tower_singleflight::http::{DEFAULT_BODY_LIMIT, DEFAULT_BUFFER_WAIT, IDENTITY_HEADERS};
use tower_singleflight::{OnWaitLimit, Role, SingleflightLayer};

use super::input::Input;
use super::script::{
    self, headers, Answer, Backend, BodyFailed, BodySpec, Call, CallerId, Log, ResponseSpec, Step,
};
use super::{
    assert_replays, block_on, run, trace, verify_outcomes, Got, Outcome, Rules, Sure, Timing,
};

/// The request body type of the inner service, as tonic's is: boxed.
type ReqBody = UnsyncBoxBody<Bytes, BodyFailed>;
type MakeBody = fn(RequestBody<ReqBody>) -> ReqBody;

const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
const PREFIX_LEN: usize = 5;
const METADATA: &[&str] = &[
    "authorization",
    "grpc-encoding",
    "grpc-accept-encoding",
    "cookie",
    "te",
    "x-tenant",
];

#[derive(Debug)]
struct Case {
    config: Config,
    responses: Vec<ResponseSpec>,
    callers: Vec<Caller>,
}

#[derive(Debug)]
struct Config {
    streaming: Option<&'static str>,
    unary: Option<&'static str>,
    message_limit: usize,
    message_wait: Duration,
    end_wait: Duration,
    body_limit: usize,
    role_header: bool,
    wait_limit: Option<(Duration, OnWaitLimit)>,
}

#[derive(Debug)]
struct Caller {
    request: RequestSpec,
    timing: Timing,
}

#[derive(Clone, Debug)]
struct RequestSpec {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    /// The body's bytes, whatever frames carry them.
    wire: Bytes,
    body: BodySpec,
}

pub(super) fn check(data: &[u8]) {
    let case = Case::decode(&mut Input::new(data));
    let log = Log::default();
    let backend = Backend::new(case.responses.clone(), log.clone());
    let svc = case.config.layer().layer(backend);
    let callers = case.callers.iter().enumerate();
    let calls = callers.map(|(i, caller)| (caller.request.build(i), caller.timing));
    let outcomes = block_on(run(svc, calls.collect()));
    let calls = log.calls();
    trace(&case, &calls, &outcomes);
    verify(&case, &outcomes, &calls);
}

fn rebox(body: RequestBody<ReqBody>) -> ReqBody {
    body.boxed_unsync()
}

// --- the checks ---

fn verify(case: &Case, outcomes: &[Outcome], calls: &[Call]) {
    // Every request reaches the inner service at most once, its bytes as
    // they were sent; only a coalesced call's `grpc-timeout` may change.
    let mut sent = vec![false; case.callers.len()];
    for call in calls {
        let i = call
            .caller
            .expect("every inner call carries its caller's mark");
        assert!(!sent[i], "caller {i}: its request was sent twice");
        sent[i] = true;
        let spec = &case.callers[i].request;
        assert_eq!(call.method, spec.method, "caller {i}: method sent");
        assert_eq!(call.uri, spec.uri, "caller {i}: URI sent");
        let untimed = |map: &HeaderMap| {
            let mut map = map.clone();
            map.remove(GRPC_TIMEOUT);
            map
        };
        assert_eq!(
            untimed(&call.headers),
            untimed(&spec.headers),
            "caller {i}: headers"
        );
        if let Some(body) = &call.body {
            assert_eq!(*body, spec.body.seen(), "caller {i}: body sent");
        }
    }

    // Each caller's outcome is one the case allows.
    let answer = |k: usize| case.response(k).answer;
    let same_flight = |maker, i| case.same_flight(maker, i);
    let response = |i, got: &Got, who: &str| verify_response(case, calls, i, got, who);
    verify_outcomes(outcomes, calls, &sent, answer, same_flight, response);
}

fn verify_response(case: &Case, calls: &[Call], i: usize, got: &Got, who: &str) {
    // The layer's own answers: a panic, a wait limit set to fail, a deadline.
    let status = got.headers.get(GRPC_STATUS).map(HeaderValue::as_bytes);
    if let Some(failure) = &got.failure {
        if failure.is_panic() {
            assert_eq!(status, Some(&b"13"[..]), "{who}: panic status");
            let panicked = |(k, call): (usize, &Call)| {
                case.response(k).answer == Answer::Panic && case.same_flight(call.caller, i)
            };
            assert!(
                calls.iter().enumerate().any(panicked),
                "{who}: INTERNAL for no panic"
            );
        } else {
            assert!(
                failure.is_wait_limit(),
                "{who}: unexpected failure {failure}"
            );
            assert_eq!(status, Some(&b"14"[..]), "{who}: wait limit status");
            let fails = matches!(case.config.wait_limit, Some((_, OnWaitLimit::Fail)));
            assert!(fails, "{who}: a wait limit that was not set to fail");
        }
        return;
    }
    let Some(k) = got.call else {
        assert_eq!(status, Some(&b"4"[..]), "{who}: a response no call made");
        let timed = case.callers[i].request.headers.contains_key(GRPC_TIMEOUT);
        assert!(timed, "{who}: DEADLINE_EXCEEDED without a deadline");
        return;
    };

    // Otherwise one inner call's response, exactly as it made it.
    let spec = case.response(k);
    assert_replays(got, spec, case.config.role_header, who);
    let maker = calls[k]
        .caller
        .expect("every inner call carries its caller's mark");
    let request = &case.callers[i].request;
    match got.coalescing.role() {
        Role::Bypass => {
            assert_eq!(maker, i, "{who}: passed through to another's call");
            assert_eq!(
                calls[k].headers, request.headers,
                "{who}: headers passed through"
            );
            let prompt = !request.body.sleeps()
                && (!request.body.waits()
                    || !(case.config.message_wait.is_zero() || case.config.end_wait.is_zero()));
            assert!(
                !(case.unary(i) && prompt),
                "{who}: a prompt unary call passed through"
            );
        }
        Role::Leader | Role::Fallback => {
            assert!(case.unary(i), "{who}: coalesced a call that is not unary");
            assert_eq!(maker, i, "{who}: led or fell back to another's call");
            if got.coalescing.is_shared() {
                assert!(
                    case.shares(spec, i, i, Sure::Allowed),
                    "{who}: shared a response not to be shared"
                );
            }
            if got.coalescing.role() == Role::Leader {
                let timed = calls[k].headers.contains_key(GRPC_TIMEOUT);
                assert!(!timed, "{who}: the shared call carries a deadline");
            } else {
                let own = matches!(case.config.wait_limit, Some((_, OnWaitLimit::CallOwn)));
                assert!(
                    own || case.may_refuse(i),
                    "{who}: fell back from a shareable response"
                );
            }
        }
        Role::Follower => {
            assert!(case.unary(i), "{who}: coalesced a call that is not unary");
            assert!(
                got.coalescing.is_shared(),
                "{who}: a follower not shared with"
            );
            assert_ne!(maker, i, "{who}: followed its own call");
            assert!(case.same_key(maker, i), "{who}: followed another key");
            assert!(
                case.shares(spec, maker, i, Sure::Allowed),
                "{who}: got a response not to be shared"
            );
        }
        role => panic!("{who}: unknown role {role:?}"),
    }
}

impl Case {
    fn response(&self, k: usize) -> &ResponseSpec {
        &self.responses[k % self.responses.len()]
    }

    /// Whether caller `i`'s call is unary, as the layer's docs define it:
    /// a gRPC `POST` of a method allowed to coalesce, whose body is one
    /// whole message within the message limit and then its end.
    fn unary(&self, i: usize) -> bool {
        let request = &self.callers[i].request;
        let grpc = request
            .headers
            .get(CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("application/grpc"))
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(['+', ';']));
        let path = request.uri.path();
        let listed = |method: Option<&str>| method.is_some_and(|method| matches(method, path));
        let allowed = !listed(self.config.streaming)
            && (self.config.unary.is_none() || listed(self.config.unary));
        let seen = request.body.seen();
        // One whole message, with a compression flag gRPC defines (0 or 1).
        let one = declared(&request.wire).is_some_and(|len| {
            request.wire.len() == PREFIX_LEN + len && len <= self.config.message_limit
        }) && matches!(request.wire.first(), Some(0 | 1));
        request.method == Method::POST
            && grpc
            && allowed
            && one
            && !seen.failed
            && seen.trailers.is_none()
    }

    /// Whether callers `a` and `b` have equal keys, as [`GrpcKey`] defines
    /// them: the URI's path, query, scheme and authority, the encoding and
    /// identity headers, and the message as sent.
    ///
    /// [`GrpcKey`]: tower_singleflight::grpc::GrpcKey
    fn same_key(&self, a: usize, b: usize) -> bool {
        let (a, b) = (&self.callers[a].request, &self.callers[b].request);
        let (encoding, identity) = (ENCODING_HEADERS, IDENTITY_HEADERS);
        let headers = |req: &RequestSpec| {
            let names = encoding.iter().chain(&identity);
            let values = names.flat_map(|name| req.headers.get_all(name));
            values.cloned().collect::<Vec<_>>()
        };
        a.uri.path_and_query() == b.uri.path_and_query()
            && a.uri.scheme() == b.uri.scheme()
            && a.uri.authority() == b.uri.authority()
            && headers(a) == headers(b)
            && a.wire == b.wire
    }

    /// Whether caller `i` may get the outcome of a call made by `maker`.
    fn same_flight(&self, maker: Option<usize>, i: usize) -> bool {
        let maker = maker.expect("every inner call carries its caller's mark");
        maker == i || (self.unary(i) && self.unary(maker) && self.same_key(maker, i))
    }

    /// Whether `spec`, made for caller `maker`, may be (or, when `sure`,
    /// must be) replayed to `i`: at most one message, and the HTTP layer's
    /// rules.
    fn shares(&self, spec: &ResponseSpec, maker: usize, i: usize, sure: Sure) -> bool {
        let data = spec.body.seen().data;
        let streams = declared(&data).is_some_and(|len| data.len() > PREFIX_LEN + len);
        let (leader, follower) = (&self.callers[maker].request, &self.callers[i].request);
        let rules = Rules {
            body_limit: self.config.body_limit,
            buffer_wait: DEFAULT_BUFFER_WAIT,
        };
        !streams && rules.share(spec, &leader.headers, &follower.headers, sure)
    }

    /// Whether some scripted response could be kept from caller `i`.
    fn may_refuse(&self, i: usize) -> bool {
        let others = || (0..self.callers.len()).filter(move |&j| j != i);
        let refused = |spec| others().any(|j| !self.shares(spec, j, i, Sure::Certain));
        self.responses.iter().any(refused)
    }
}

/// The length the first message's prefix declares, once it is whole.
fn declared(wire: &[u8]) -> Option<usize> {
    let prefix = wire.get(1..PREFIX_LEN)?;
    let len = u32::from_be_bytes(prefix.try_into().expect("four bytes"));
    usize::try_from(len).ok()
}

/// Whether a listed method (a path, or a service ending in `/`) names
/// `path`.
fn matches(method: &str, path: &str) -> bool {
    match method.strip_suffix('/') {
        Some(_) => path.starts_with(method),
        None => path == method,
    }
}

impl Config {
    fn layer(&self) -> GrpcLayer<MakeBody> {
        let mut layer = SingleflightLayer::grpc(rebox as MakeBody)
            .message_limit(self.message_limit)
            .message_wait(self.message_wait)
            .end_wait(self.end_wait)
            .body_limit(self.body_limit)
            .role_header(self.role_header);
        if let Some(method) = self.streaming {
            layer = layer.streaming_method(method);
        }
        if let Some(method) = self.unary {
            layer = layer.unary_method(method);
        }
        if let Some((limit, then)) = self.wait_limit {
            layer = layer.follower_wait_limit(limit, then);
        }
        layer
    }
}

impl RequestSpec {
    fn build(&self, caller: usize) -> Request<ReqBody> {
        let mut req = Request::new(self.body.body().boxed_unsync());
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.headers_mut() = self.headers.clone();
        req.extensions_mut().insert(CallerId(caller));
        req
    }
}

// --- decoding ---

impl Case {
    fn decode(input: &mut Input<'_>) -> Self {
        let config = Config::decode(input);
        let mut responses: Vec<_> = (0..1 + input.below(3)).map(|_| response(input)).collect();
        let leader = RequestSpec::decode(input);
        let timing = Timing::leader(input);
        let mut callers = vec![Caller {
            request: leader.clone(),
            timing,
        }];
        for _ in 0..1 + input.below(4) {
            let request = leader.mutated(input);
            let timing = Timing::follower(input);
            callers.push(Caller { request, timing });
        }

        // Last, so that shorter inputs mean what they meant before it: now
        // and then a few bytes of garbage after a response's messages.
        for response in &mut responses {
            if input.below(4) == 3 {
                let garbage = Step::Data(input.bytes(3));
                let steps = &mut response.body.steps;
                let ends = matches!(steps.last(), Some(Step::Trailers(_) | Step::Fail));
                let at = steps.len() - usize::from(ends);
                steps.insert(at, garbage);
            }
        }
        Self {
            config,
            responses,
            callers,
        }
    }
}

impl Config {
    fn decode(input: &mut Input<'_>) -> Self {
        let ms = Duration::from_millis;
        let wait_limit = match input.below(8) {
            4 => Some((ms(1), OnWaitLimit::Fail)),
            5 => Some((ms(1), OnWaitLimit::CallOwn)),
            6 => Some((ms(5), OnWaitLimit::Fail)),
            7 => Some((ms(5), OnWaitLimit::CallOwn)),
            _ => None,
        };
        Self {
            streaming: input.pick(&[None, None, Some("/pkg.Svc/Watch"), Some("/pkg.Svc/")]),
            unary: input.pick(&[None, None, None, Some("/pkg.Svc/Get"), Some("/other.Svc/")]),
            message_limit: input.pick(&[DEFAULT_MESSAGE_LIMIT, 0, 3, 16]),
            message_wait: input.pick(&[DEFAULT_MESSAGE_WAIT, Duration::ZERO, ms(1)]),
            end_wait: input.pick(&[DEFAULT_END_WAIT, Duration::ZERO, ms(1)]),
            body_limit: input.pick(&[DEFAULT_BODY_LIMIT, 0, 8, 64]),
            role_header: input.flag(),
            wait_limit,
        }
    }
}

impl RequestSpec {
    fn decode(input: &mut Input<'_>) -> Self {
        let mut headers = headers(input, METADATA, 3);
        if let Some(value) = content_type(input) {
            headers.insert(CONTENT_TYPE, value);
        }
        if let Some(value) = timeout(input) {
            headers.insert(GRPC_TIMEOUT, value);
        }
        let wire = request_wire(input);
        Self {
            method: method(input),
            uri: uri(input),
            headers,
            body: BodySpec::chunked(input, &wire, METADATA),
            wire,
        }
    }

    /// A follower's call: most often the leader's, else the leader's with
    /// one thing changed.
    fn mutated(&self, input: &mut Input<'_>) -> Self {
        let mut req = self.clone();
        match input.below(16) {
            8 => {
                req.wire = request_wire(input);
                req.body = BodySpec::chunked(input, &req.wire, METADATA);
            }
            9 | 10 => req.body = BodySpec::chunked(input, &req.wire, METADATA),
            11 => {
                if let Some(value) = script::value(input) {
                    req.headers.insert(http::header::AUTHORIZATION, value);
                }
            }
            12 => match timeout(input) {
                Some(value) => drop(req.headers.insert(GRPC_TIMEOUT, value)),
                None => drop(req.headers.remove(GRPC_TIMEOUT)),
            },
            13 => req.uri = uri(input),
            14 => match content_type(input) {
                Some(value) => drop(req.headers.insert(CONTENT_TYPE, value)),
                None => drop(req.headers.remove(CONTENT_TYPE)),
            },
            15 => req.method = method(input),
            _ => {}
        }
        req
    }
}

fn method(input: &mut Input<'_>) -> Method {
    match input.below(8) {
        6 => Method::GET,
        7 => Method::PUT,
        _ => Method::POST,
    }
}

fn uri(input: &mut Input<'_>) -> Uri {
    let fixed = [
        "/pkg.Svc/Get",
        "/pkg.Svc/Get",
        "/pkg.Svc/Get",
        "/pkg.Svc/Watch",
        "/other.Svc/Get",
        "http://h:50051/pkg.Svc/Get",
    ];
    match input.below(fixed.len() + 1) {
        n if n < fixed.len() => Uri::from_static(fixed[n]),
        _ => Uri::try_from(input.bytes(24).as_ref()).unwrap_or_else(|_| Uri::from_static("/")),
    }
}

fn content_type(input: &mut Input<'_>) -> Option<HeaderValue> {
    let fixed = [
        "application/grpc",
        "application/grpc",
        "application/grpc",
        "application/grpc",
        "application/grpc+proto",
        "application/grpc;charset=x",
        "application/grpc-web",
        "application/json",
    ];
    match input.below(fixed.len() + 2) {
        n if n < fixed.len() => Some(HeaderValue::from_static(fixed[n])),
        8 => None,
        _ => script::value(input),
    }
}

/// A `grpc-timeout`, most often none, sometimes malformed.
fn timeout(input: &mut Input<'_>) -> Option<HeaderValue> {
    let fixed = ["1m", "5m", "0n", "100m", "1S", "99999999H", "7u", "1x", "m"];
    match input.below(16) {
        14 => Some(HeaderValue::from_static(input.pick(&fixed))),
        15 => script::value(input),
        _ => None,
    }
}

/// The bytes of a request body: one message most often, else none,
/// several, or frames that are broken in some way.
fn request_wire(input: &mut Input<'_>) -> Bytes {
    let mut wire = Vec::new();
    for _ in 0..input.pick(&[1, 1, 1, 1, 1, 0, 2, 3]) {
        let flag = match input.below(8) {
            6 => 1,
            7 => input.byte(),
            _ => 0,
        };
        let message = match input.below(32) {
            31 => Bytes::from(vec![b'm'; DEFAULT_MESSAGE_LIMIT + 1]),
            _ => input.bytes(12),
        };
        let len = u32::try_from(message.len()).expect("a short message");
        match input.below(8) {
            5 => {
                let wrong = [len + 1, len.saturating_sub(1), u32::MAX, input.u32()];
                frame(&mut wire, flag, input.pick(&wrong), &message);
            }
            6 => {
                let mut whole = Vec::new();
                frame(&mut whole, flag, len, &message);
                wire.extend_from_slice(&whole[..input.below(whole.len())]);
            }
            7 => wire.extend_from_slice(&input.bytes(8)),
            _ => frame(&mut wire, flag, len, &message),
        }
    }
    wire.into()
}

fn frame(wire: &mut Vec<u8>, flag: u8, len: u32, message: &[u8]) {
    wire.put_u8(flag);
    wire.put_u32(len);
    wire.extend_from_slice(message);
}

fn response(input: &mut Input<'_>) -> ResponseSpec {
    // A status (almost always 200), gRPC's headers, and now and then a
    // cookie, a `Vary`, or a status in the head (trailers-only).
    let status = match input.below(8) {
        7 => StatusCode::from_u16(100 + input.u16() % 900).unwrap_or(StatusCode::OK),
        _ => StatusCode::OK,
    };
    let names = ["grpc-status", "grpc-message", "x-meta", "x-singleflight"];
    let mut map = headers(input, &names, 2);
    map.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    let only_status = match input.below(16) {
        12 => {
            let vary = input.pick(&["x-tenant", "authorization", "*", "te"]);
            map.append(VARY, HeaderValue::from_static(vary));
            false
        }
        13 => {
            map.append(SET_COOKIE, HeaderValue::from_static("id=1"));
            false
        }
        14 | 15 => {
            map.insert(GRPC_STATUS, HeaderValue::from_static("5"));
            true
        }
        _ => false,
    };

    // Its messages in frames, then most often the status in trailers.
    let mut wire = Vec::new();
    let count = if only_status {
        0
    } else {
        input.pick(&[1, 1, 1, 0, 2, 3])
    };
    for _ in 0..count {
        let message = input.bytes(12);
        let len = u32::try_from(message.len()).expect("a short message");
        frame(&mut wire, 0, len, &message);
    }
    let trailer = ["grpc-status", "grpc-message", "x-trailer"];
    let mut body = BodySpec::chunked(input, &wire, &trailer);
    let ended = matches!(body.steps.last(), Some(Step::Trailers(_) | Step::Fail));
    if !only_status && !ended && input.below(4) != 3 {
        let mut trailers = HeaderMap::new();
        let code = input.pick(&["0", "0", "5", "13"]);
        trailers.insert(GRPC_STATUS, HeaderValue::from_static(code));
        body.steps.push(Step::Trailers(trailers));
    }
    let (delay, answer) = ResponseSpec::delay_and_answer(input);
    ResponseSpec {
        status,
        headers: map,
        body,
        delay,
        answer,
    }
}
