//! The HTTP target: arbitrary requests (method, URI, headers, body) from a
//! leader and its followers, through [`SingleflightLayer::http`] over a
//! scripted inner service whose responses have arbitrary status, headers,
//! bodies split into frames, trailers and failures.
//!
//! [`SingleflightLayer::http`]: tower_singleflight::SingleflightLayer::http

use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, SET_COOKIE};
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, Uri};
use tower::Layer;
use tower_singleflight::http::{HttpKey, DEFAULT_BODY_LIMIT, DEFAULT_BUFFER_WAIT};
use tower_singleflight::key::KeyExtractor;
use tower_singleflight::{OnWaitLimit, Role, SingleflightLayer};

use super::input::Input;
use super::script::{
    self, end, headers, Answer, Backend, BodySpec, Call, CallerId, Log, ResponseSpec, ScriptBody,
    Step,
};
use super::{
    assert_replays, block_on, run, trace, verify_outcomes, Got, Outcome, Rules, Sure, Timing,
};

const REQUEST_HEADERS: &[&str] = &[
    "host",
    "authorization",
    "cookie",
    "proxy-authorization",
    "accept-language",
    "x-tenant",
    "content-length",
    "range",
    "if-none-match",
    "upgrade",
    "connection",
];
const RESPONSE_HEADERS: &[&str] = &[
    "content-type",
    "content-type",
    "content-length",
    "cache-control",
    "etag",
    "x-private",
    "x-singleflight",
    "transfer-encoding",
];

/// One case: how the layer is set up, what the inner service answers, and
/// who calls.
#[derive(Debug)]
struct Case {
    config: Config,
    responses: Vec<ResponseSpec>,
    callers: Vec<Caller>,
}

#[derive(Debug)]
struct Config {
    key: HttpKey,
    body_limit: usize,
    buffer_wait: Duration,
    predicate: Predicate,
    role_header: bool,
    wait_limit: Option<(Duration, OnWaitLimit)>,
    run_to_completion: bool,
}

/// The `shareable` predicate the layer gets, if any.
#[derive(Clone, Copy, Debug)]
enum Predicate {
    None,
    Success,
    NotPrivate,
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

// --- the checks ---

fn verify(case: &Case, outcomes: &[Outcome], calls: &[Call]) {
    // Every request reaches the inner service at most once, as it was sent.
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
        assert_eq!(call.headers, spec.headers, "caller {i}: headers sent");
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
    // The layer's own failures: a panic, or a wait limit set to fail.
    if let Some(failure) = &got.failure {
        if failure.is_panic() {
            assert_eq!(
                got.status,
                StatusCode::INTERNAL_SERVER_ERROR,
                "{who}: panic status"
            );
            let panicked = |(k, call): (usize, &Call)| {
                case.response(k).answer == Answer::Panic && case.same_flight(call.caller, i)
            };
            assert!(
                calls.iter().enumerate().any(panicked),
                "{who}: a 500 for no panic"
            );
        } else {
            assert!(
                failure.is_wait_limit(),
                "{who}: unexpected failure {failure}"
            );
            assert_eq!(
                got.status,
                StatusCode::SERVICE_UNAVAILABLE,
                "{who}: wait limit status"
            );
            let fails = matches!(case.config.wait_limit, Some((_, OnWaitLimit::Fail)));
            assert!(fails, "{who}: a wait limit that was not set to fail");
        }
        return;
    }

    // Otherwise one inner call's response, exactly as it made it.
    let k = got
        .call
        .unwrap_or_else(|| panic!("{who}: a response no call made"));
    let spec = case.response(k);
    assert_replays(got, spec, case.config.role_header, who);
    let maker = calls[k]
        .caller
        .expect("every inner call carries its caller's mark");
    let key = case.key(i);
    match got.coalescing.role() {
        Role::Bypass => {
            assert!(key.is_none(), "{who}: bypassed with a key");
            assert_eq!(maker, i, "{who}: bypassed to another's call");
        }
        Role::Leader | Role::Fallback => {
            assert!(key.is_some(), "{who}: in a flight without a key");
            assert_eq!(maker, i, "{who}: led or fell back to another's call");
            if got.coalescing.is_shared() {
                assert!(
                    case.shares(spec, i, i, Sure::Allowed),
                    "{who}: shared a response not to be shared"
                );
            }
            if got.coalescing.role() == Role::Fallback {
                let own = matches!(case.config.wait_limit, Some((_, OnWaitLimit::CallOwn)));
                assert!(
                    own || case.may_refuse(i),
                    "{who}: fell back from a shareable response"
                );
            }
        }
        Role::Follower => {
            assert!(
                got.coalescing.is_shared(),
                "{who}: a follower not shared with"
            );
            assert_ne!(maker, i, "{who}: followed its own call");
            assert!(
                key.is_some() && key == case.key(maker),
                "{who}: followed another key"
            );
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

    fn key(&self, i: usize) -> Option<tower_singleflight::http::RequestKey> {
        self.config.key.extract(&self.callers[i].request.build(i))
    }

    /// Whether caller `i` may get the outcome of a call made by `maker`.
    fn same_flight(&self, maker: Option<usize>, i: usize) -> bool {
        let maker = maker.expect("every inner call carries its caller's mark");
        maker == i || self.key(i).is_some_and(|key| Some(key) == self.key(maker))
    }

    /// Whether `spec`, made for caller `maker`, may be (or, when `sure`,
    /// must be) replayed to `i`.
    fn shares(&self, spec: &ResponseSpec, maker: usize, i: usize, sure: Sure) -> bool {
        let allowed = match self.config.predicate {
            Predicate::None => true,
            Predicate::Success => spec.status.is_success(),
            Predicate::NotPrivate => !spec.headers.contains_key("x-private"),
        };
        let (leader, follower) = (&self.callers[maker].request, &self.callers[i].request);
        let rules = Rules {
            body_limit: self.config.body_limit,
            buffer_wait: self.config.buffer_wait,
        };
        allowed && rules.share(spec, &leader.headers, &follower.headers, sure)
    }

    /// Whether some scripted response could be kept from caller `i`.
    fn may_refuse(&self, i: usize) -> bool {
        let others = || (0..self.callers.len()).filter(move |&j| j != i);
        let refused = |spec| others().any(|j| !self.shares(spec, j, i, Sure::Certain));
        self.responses.iter().any(refused)
    }
}

impl Config {
    fn layer(&self) -> tower_singleflight::http::HttpLayer {
        let mut layer = SingleflightLayer::http()
            .key(self.key.clone())
            .body_limit(self.body_limit)
            .buffer_wait(self.buffer_wait)
            .role_header(self.role_header)
            .run_to_completion(self.run_to_completion);
        if let Some((limit, then)) = self.wait_limit {
            layer = layer.follower_wait_limit(limit, then);
        }
        match self.predicate {
            Predicate::None => layer,
            Predicate::Success => layer.shareable(|res| res.status.is_success()),
            Predicate::NotPrivate => layer.shareable(|res| !res.headers.contains_key("x-private")),
        }
    }
}

impl RequestSpec {
    fn build(&self, caller: usize) -> Request<ScriptBody> {
        let mut req = Request::new(self.body.body());
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
        let responses = (0..1 + input.below(3)).map(|_| response(input)).collect();
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
        Self {
            config,
            responses,
            callers,
        }
    }
}

impl Config {
    fn decode(input: &mut Input<'_>) -> Self {
        let mut key = HttpKey::new();
        let flags = input.byte();
        if flags & 1 != 0 {
            key = key.header(HeaderName::from_static("accept-language"));
        }
        if flags & 2 != 0 {
            key = key.method(Method::POST);
        }
        if flags & 4 != 0 {
            key = key.ignore_bodies(true);
        }
        let limits = [DEFAULT_BODY_LIMIT, 0, 1, 8, 64];
        let ms = Duration::from_millis;
        let waits = [DEFAULT_BUFFER_WAIT, ms(1), ms(10), ms(300)];
        let wait_limit = match input.below(8) {
            4 => Some((Duration::from_millis(1), OnWaitLimit::Fail)),
            5 => Some((Duration::from_millis(1), OnWaitLimit::CallOwn)),
            6 => Some((Duration::from_millis(5), OnWaitLimit::Fail)),
            7 => Some((Duration::from_millis(5), OnWaitLimit::CallOwn)),
            _ => None,
        };
        Self {
            key,
            body_limit: input.pick(&limits),
            buffer_wait: input.pick(&waits),
            predicate: input.pick(&[Predicate::None, Predicate::Success, Predicate::NotPrivate]),
            role_header: flags & 8 != 0,
            wait_limit,
            run_to_completion: flags & 16 != 0,
        }
    }
}

impl RequestSpec {
    fn decode(input: &mut Input<'_>) -> Self {
        Self {
            method: method(input),
            uri: uri(input),
            headers: headers(input, REQUEST_HEADERS, 5),
            body: request_body(input),
        }
    }

    /// A follower's request: most often the leader's, else the leader's
    /// with one thing changed.
    fn mutated(&self, input: &mut Input<'_>) -> Self {
        let mut req = self.clone();
        match input.below(16) {
            9 => req.method = method(input),
            10 => req.uri = uri(input),
            11 => req.body = request_body(input),
            12 => req.headers = HeaderMap::new(),
            13 => req.headers.extend(headers(input, REQUEST_HEADERS, 3)),
            14 => {
                let name = HeaderName::from_static(input.pick(&REQUEST_HEADERS[1..6]));
                if let Some(value) = script::value(input) {
                    req.headers.insert(name, value);
                }
            }
            15 => req.body = BodySpec::chunked(input, &req.body.seen().data, REQUEST_HEADERS),
            _ => {}
        }
        req
    }
}

fn method(input: &mut Input<'_>) -> Method {
    match input.below(8) {
        0..=2 => Method::GET,
        3 => Method::HEAD,
        4 => Method::POST,
        5 => Method::OPTIONS,
        _ => Method::from_bytes(&input.bytes(8)).unwrap_or(Method::GET),
    }
}

fn uri(input: &mut Input<'_>) -> Uri {
    let fixed = [
        "/",
        "/a?x=1",
        "http://example.com/p?q",
        "https://EXAMPLE.com:443/p",
        "*",
        "example.com:80",
    ];
    match input.below(fixed.len() + 2) {
        n if n < fixed.len() => Uri::from_static(fixed[n]),
        _ => Uri::try_from(input.bytes(24).as_ref()).unwrap_or_else(|_| Uri::from_static("/")),
    }
}

/// A request body: most often empty and known to be, else unknown yet
/// empty, or data.
fn request_body(input: &mut Input<'_>) -> BodySpec {
    match input.below(8) {
        0..=4 => BodySpec {
            steps: vec![],
            exact: true,
        },
        5 => BodySpec {
            steps: vec![Step::Yield],
            exact: false,
        },
        _ => body(input, REQUEST_HEADERS),
    }
}

/// A body of a few frames of data, waits between them, and an end.
fn body(input: &mut Input<'_>, trailer: &[&'static str]) -> BodySpec {
    let mut steps = Vec::new();
    for _ in 0..input.below(6) {
        let step = match input.below(8) {
            0..=3 => Step::Data(input.bytes(40)),
            4 => Step::Data(Bytes::from(vec![b'x'; usize::from(input.u16())])),
            5 => Step::Data(Bytes::new()),
            6 => Step::Yield,
            _ => Step::Sleep(Duration::from_millis(u64::from(input.byte() % 8))),
        };
        steps.push(step);
    }
    end(input, &mut steps, trailer);
    BodySpec {
        steps,
        exact: input.flag(),
    }
}

fn response(input: &mut Input<'_>) -> ResponseSpec {
    // A status, and headers of every kind, `Set-Cookie` and `Vary` among them.
    let status = match input.below(4) {
        0 | 1 => StatusCode::OK,
        _ => StatusCode::from_u16(100 + input.u16() % 900).unwrap_or(StatusCode::OK),
    };
    let mut map = headers(input, RESPONSE_HEADERS, 4);
    match input.below(10) {
        5 => {
            if let Some(value) = script::value(input) {
                map.append(SET_COOKIE, value);
            }
        }
        6 | 7 => {
            let varies = [
                "accept-language",
                "Accept-Language, X-Tenant",
                "*",
                "cookie",
                "",
                " , ",
                "bad name",
                "x-tenant,*",
            ];
            let value = HeaderValue::from_static(input.pick(&varies));
            map.append(http::header::VARY, value);
        }
        8 | 9 => {
            let types = [
                "text/event-stream",
                "text/event-stream;x=y",
                "TEXT/EVENT-STREAM",
            ];
            let value = HeaderValue::from_static(input.pick(&types));
            map.insert(http::header::CONTENT_TYPE, value);
        }
        _ => {}
    }

    // A body in frames, then how long the call takes and how it ends.
    let body = body(input, &["x-checksum", "grpc-status", "expires"]);
    let (delay, answer) = ResponseSpec::delay_and_answer(input);
    ResponseSpec {
        status,
        headers: map,
        body,
        delay,
        answer,
    }
}
