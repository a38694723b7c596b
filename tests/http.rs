//! The HTTP layer end to end: real axum servers on loopback, driven by
//! hyper-util's client over real sockets.
//!
//! Where the contract's HTTP lines are shown:
//!
//! - H1, the ready-made key: `each_identity_gets_its_own_call_and_its_own_body`,
//!   `posts_are_never_coalesced_with_or_without_a_body`,
//!   `the_default_key_takes_the_host_header_and_lets_unsafe_requests_through`,
//!   `upgrades_get_no_key_and_ranges_and_validators_are_part_of_it`,
//!   `under_a_nested_router_each_prefix_gets_its_own_flight`;
//! - H2, one buffered response replayed whole:
//!   `two_hundred_identical_gets_make_one_handler_call_and_identical_replies`,
//!   `a_streamed_body_and_its_trailers_are_replayed_whole_to_every_waiter`,
//!   `a_body_over_the_limit_reaches_every_caller_whole`,
//!   `a_body_slower_than_the_buffering_wait_streams_to_the_leader_and_followers_call_again`;
//! - H3, responses that must not be shared are not:
//!   `a_cookie_set_for_one_caller_never_reaches_another`,
//!   `a_follower_that_differs_in_a_varied_header_makes_its_own_call`,
//!   `a_response_the_predicate_rejects_goes_to_the_leader_alone`,
//!   `an_event_stream_reaches_its_caller_at_once_and_is_never_shared`, and
//!   what is shared though a cache would not keep it:
//!   `a_response_marked_private_is_shared_by_callers_with_one_key`;
//! - H4, straight onto a router, the crate's failures as responses:
//!   `a_stateless_router_served_directly_coalesces_across_connections`,
//!   `a_panicking_handler_answers_500_to_every_waiter_and_the_next_request_succeeds`,
//!   `a_follower_past_its_wait_limit_gets_503_while_the_leader_still_succeeds`.
#![cfg(feature = "http")]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{OriginalUri, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use futures::future::join_all;
use futures::StreamExt;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tower::{BoxError, Layer, ServiceBuilder, ServiceExt};
use tower_singleflight::http::{
    Coalescing, FlightResponse, HttpKey, HttpLayer, RequestKey, ROLE_HEADER,
};
use tower_singleflight::{Group, OnWaitLimit, Role, SingleflightLayer};

// --- the world the tests run in ---

type HttpGroup = Group<RequestKey, FlightResponse<Body>>;

/// What a handler needs: a call counter and a gate it waits at, so a test
/// can gather every caller in one flight before the call ends.
#[derive(Clone)]
struct Backend {
    calls: Arc<AtomicUsize>,
    gate: watch::Receiver<bool>,
}

impl Backend {
    fn new() -> (Self, watch::Sender<bool>) {
        let (open, gate) = watch::channel(false);
        let calls = Arc::new(AtomicUsize::new(0));
        (Self { calls, gate }, open)
    }

    /// Counts a call, waits for the gate, and returns the call's number.
    async fn call(&self) -> usize {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let mut gate = self.gate.clone();
        gate.wait_for(|open| *open)
            .await
            .expect("the test holds the gate");
        n
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

/// A reply as a client saw it, `Date` left out: the server stamps it as it
/// writes, so two replies of one response may differ in it.
#[derive(Debug, Clone, PartialEq)]
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    trailers: Option<HeaderMap>,
}

impl Reply {
    fn header(&self, name: impl header::AsHeaderName) -> &str {
        self.headers.get(name).map_or("", |v| v.to_str().unwrap())
    }

    fn text(&self) -> &str {
        std::str::from_utf8(&self.body).unwrap()
    }
}

/// Serves `app` on a fresh loopback port, in the background.
async fn serve(app: Router) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

fn request(method: Method, addr: SocketAddr, path: &str) -> http::request::Builder {
    Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
}

/// Sends `req` and reads the whole reply.
async fn send(
    client: &Client<HttpConnector, Full<Bytes>>,
    req: http::request::Builder,
    body: &'static str,
) -> Reply {
    let res = client.request(req.body(Full::from(body)).unwrap()).await;
    let (parts, body) = res.expect("the server answers").into_parts();
    let body = body.collect().await.expect("the body arrives whole");
    let mut headers = parts.headers;
    headers.remove(header::DATE);
    Reply {
        status: parts.status,
        headers,
        trailers: body.trailers().cloned(),
        body: body.to_bytes(),
    }
}

/// Fires `n` copies of a request at once, in tasks of their own.
async fn burst(
    n: usize,
    client: &Client<HttpConnector, Full<Bytes>>,
    req: impl Fn() -> http::request::Builder,
) -> Vec<tokio::task::JoinHandle<Reply>> {
    (0..n)
        .map(|_| {
            let (client, req) = (client.clone(), req());
            tokio::spawn(async move { send(&client, req, "").await })
        })
        .collect()
}

async fn replies(tasks: Vec<tokio::task::JoinHandle<Reply>>) -> Vec<Reply> {
    join_all(tasks)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect()
}

/// Fires `n` copies of a request at once, waits until all of them wait in
/// `group`'s flights, opens the backend's gate, and reads every reply.
async fn gathered(
    n: u64,
    group: &HttpGroup,
    open: &watch::Sender<bool>,
    req: impl Fn() -> http::request::Builder,
) -> Vec<Reply> {
    let client = client();
    let tasks = burst(n as usize, &client, req).await;
    until(|| group.stats().waiters == n).await;
    open.send_replace(true);
    replies(tasks).await
}

/// Waits until `done` holds; the test's overall bound catches a miss.
async fn until(mut done: impl FnMut() -> bool) {
    while !done() {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Runs a test with a bound, so that nothing can hang.
async fn bounded(test: impl Future<Output = ()>) {
    tokio::time::timeout(Duration::from_secs(10), test)
        .await
        .expect("the test finished in time");
}

fn roles(replies: &[Reply]) -> Vec<&str> {
    let mut roles: Vec<_> = replies.iter().map(|r| r.header(ROLE_HEADER)).collect();
    roles.sort_unstable();
    roles.dedup();
    roles
}

// --- the tests ---

#[tokio::test(flavor = "current_thread")]
async fn a_stateless_router_served_directly_coalesces_across_connections() {
    bounded(async {
        // The plainest wiring: a stateless router with the layer, served as
        // it is. axum wraps its routes again for every connection; the
        // layer's one group must still see every request.
        let (backend, open) = Backend::new();
        let calls = backend.clone();
        let app: Router = Router::new()
            .route(
                "/item",
                get(move || async move { calls.call().await.to_string() }),
            )
            .layer(SingleflightLayer::http());
        let addr = serve(app).await;

        // Twenty callers, each on a connection of its own.
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let client = client();
                let req = request(Method::GET, addr, "/item").body(Full::default());
                tokio::spawn(async move { client.request(req.unwrap()).await })
            })
            .collect();
        // The first reaches the handler; the others join it meanwhile.
        until(|| backend.calls() == 1).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        open.send_replace(true);

        // One handler call answers them all.
        for task in tasks {
            let res = task.await.unwrap().unwrap();
            let body = res.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, "1");
        }
        assert_eq!(backend.calls(), 1);
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn two_hundred_identical_gets_make_one_handler_call_and_identical_replies() {
    bounded(async {
        // A handler whose replies carry a body, headers and its call number.
        let (backend, open) = Backend::new();
        let handler = |State(backend): State<Backend>| async move {
            let n = backend.call().await;
            let headers = [
                ("x-call", n.to_string()),
                ("cache-control", "max-age=5".into()),
            ];
            (headers, format!("the item, from call {n}"))
        };
        let group = HttpGroup::new();
        let layer = SingleflightLayer::http().with_group(group.clone());
        let app = Router::new().route("/item", get(handler)).layer(layer);
        let addr = serve(app.with_state(backend.clone())).await;

        // Every caller joins the one flight before it ends.
        let replies = gathered(200, &group, &open, || {
            request(Method::GET, addr, "/item?id=7")
        })
        .await;

        // One call; every reply is the leader's, byte for byte.
        assert_eq!(backend.calls(), 1);
        assert_eq!(replies[0].status, StatusCode::OK);
        assert_eq!(replies[0].text(), "the item, from call 1");
        assert_eq!(replies[0].header("x-call"), "1");
        assert!(replies.iter().all(|reply| *reply == replies[0]));
        assert_eq!(group.stats().leaders, 1);
        assert_eq!(group.stats().followers, 199);
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn each_identity_gets_its_own_call_and_its_own_body() {
    bounded(async {
        // A handler that greets whoever the Authorization header names.
        let (backend, open) = Backend::new();
        let handler = |State(backend): State<Backend>, headers: HeaderMap| async move {
            backend.call().await;
            let who = headers.get(header::AUTHORIZATION);
            format!("hello {}", who.map_or("anonymous", |v| v.to_str().unwrap()))
        };
        let group = HttpGroup::new();
        let layer = SingleflightLayer::http().with_group(group.clone());
        let app = Router::new().route("/me", get(handler)).layer(layer);
        let addr = serve(app.with_state(backend.clone())).await;

        // Alice, Bob and an anonymous caller, five requests each, all at once.
        let client = client();
        let who = |user: Option<&'static str>| {
            move || match user {
                Some(user) => request(Method::GET, addr, "/me").header(header::AUTHORIZATION, user),
                None => request(Method::GET, addr, "/me"),
            }
        };
        let alice = burst(5, &client, who(Some("alice"))).await;
        let bob = burst(5, &client, who(Some("bob"))).await;
        let anonymous = burst(5, &client, who(None)).await;
        until(|| group.stats().waiters == 15).await;
        open.send_replace(true);

        // Three calls, and nobody sees another's greeting.
        let (alice, bob, anonymous) = (replies(alice), replies(bob), replies(anonymous));
        let (alice, bob, anonymous) = tokio::join!(alice, bob, anonymous);
        assert_eq!(backend.calls(), 3);
        assert!(alice.iter().all(|r| r.text() == "hello alice"));
        assert!(bob.iter().all(|r| r.text() == "hello bob"));
        assert!(anonymous.iter().all(|r| r.text() == "hello anonymous"));
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn under_a_nested_router_each_prefix_gets_its_own_flight() {
    bounded(async {
        // Each tenant's users, behind a router nested at a path parameter.
        // The layer goes on the nested router, keyed on the URI the request
        // arrived with, or on the outer router with the default key.
        let handler = |State(backend): State<Backend>, Path(tenant): Path<String>| async move {
            backend.call().await;
            format!("users of {tenant}")
        };
        let on_nested = HttpKey::new().uri_extension::<OriginalUri>();
        for layer_on_nested in [true, false] {
            let (backend, open) = Backend::new();
            let group = HttpGroup::new();
            let users = Router::new().route("/users", get(handler));
            let app = if layer_on_nested {
                let layer = HttpLayer::new(on_nested.clone()).with_group(group.clone());
                Router::new().nest("/tenants/{tenant}", users.layer(layer))
            } else {
                let layer = SingleflightLayer::http().with_group(group.clone());
                Router::new().nest("/tenants/{tenant}", users).layer(layer)
            };
            let addr = serve(app.with_state(backend.clone())).await;

            let client = client();
            let mut tasks = Vec::new();
            for tenant in ["acme", "globex"] {
                let path = format!("/tenants/{tenant}/users");
                tasks.extend(burst(3, &client, || request(Method::GET, addr, &path)).await);
            }
            until(|| group.stats().waiters == 6).await;
            open.send_replace(true);
            let replies = replies(tasks).await;
            let texts: Vec<_> = replies.iter().map(Reply::text).collect();
            assert_eq!(texts[..3], ["users of acme"; 3], "{layer_on_nested}");
            assert_eq!(texts[3..], ["users of globex"; 3], "{layer_on_nested}");
            assert_eq!(backend.calls(), 2, "{layer_on_nested}");
        }
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_cookie_set_for_one_caller_never_reaches_another() {
    bounded(async {
        // A handler that opens a new session, with its own cookie, per call.
        let (backend, open) = Backend::new();
        let handler = |State(backend): State<Backend>| async move {
            let n = backend.call().await;
            (
                [(header::SET_COOKIE, format!("session={n}"))],
                format!("session={n}"),
            )
        };
        let group = HttpGroup::new();
        let layer = SingleflightLayer::http()
            .with_group(group.clone())
            .role_header(true);
        let app = Router::new().route("/login", get(handler)).layer(layer);
        let addr = serve(app.with_state(backend.clone())).await;

        // Ten anonymous callers join one flight.
        let replies = gathered(10, &group, &open, || request(Method::GET, addr, "/login")).await;

        // The leader keeps its response; each follower made its own call.
        assert_eq!(backend.calls(), 10);
        assert_eq!(roles(&replies), ["fallback", "leader"]);
        let mut cookies: Vec<_> = replies
            .iter()
            .map(|r| r.header(header::SET_COOKIE))
            .collect();
        assert!(replies
            .iter()
            .all(|r| r.header(header::SET_COOKIE) == r.text()));
        cookies.sort_unstable();
        cookies.dedup();
        assert_eq!(cookies.len(), 10, "every caller got a cookie of its own");
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_follower_that_differs_in_a_varied_header_makes_its_own_call() {
    bounded(async {
        // A handler whose reply depends on Accept-Language, and says so.
        let (backend, open) = Backend::new();
        let handler = |State(backend): State<Backend>, headers: HeaderMap| async move {
            backend.call().await;
            let lang = headers.get(header::ACCEPT_LANGUAGE).cloned();
            let lang = lang.unwrap_or(HeaderValue::from_static("none"));
            (
                [(header::VARY, "accept-language")],
                format!("lang={}", lang.to_str().unwrap()),
            )
        };
        let group = HttpGroup::new();
        let layer = SingleflightLayer::http().with_group(group.clone());
        let app = Router::new().route("/news", get(handler)).layer(layer);
        let addr = serve(app.with_state(backend.clone())).await;

        // The leader asks in English, then three in English and two in French.
        let client = client();
        let lang = |lang: &'static str| {
            move || request(Method::GET, addr, "/news").header(header::ACCEPT_LANGUAGE, lang)
        };
        let leader = burst(1, &client, lang("en")).await;
        until(|| group.stats().waiters == 1).await;
        let english = burst(3, &client, lang("en")).await;
        let french = burst(2, &client, lang("fr")).await;
        until(|| group.stats().waiters == 6).await;
        open.send_replace(true);

        // The French followers each made a call of their own.
        let english = [replies(leader).await, replies(english).await].concat();
        let french = replies(french).await;
        assert_eq!(backend.calls(), 3);
        assert!(english.iter().all(|r| r.text() == "lang=en"));
        assert!(french.iter().all(|r| r.text() == "lang=fr"));
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn posts_are_never_coalesced_with_or_without_a_body() {
    bounded(async {
        // A handler that takes a moment, so the posts overlap.
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&calls);
        let handler = move |body: String| async move {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(50)).await;
            format!("posted {body:?}")
        };
        let layer = SingleflightLayer::http().role_header(true);
        let app = Router::new()
            .route("/orders", get(|| async { "list" }).post(handler))
            .layer(layer);
        let addr = serve(app).await;

        // Ten posts with a body and ten without, all at once.
        let client = client();
        let posts = (0..20).map(|i| {
            let body = if i % 2 == 0 { "one widget" } else { "" };
            send(&client, request(Method::POST, addr, "/orders"), body)
        });
        let replies = join_all(posts).await;

        // Every post reached the handler, with its own body.
        assert_eq!(calls.load(Ordering::SeqCst), 20);
        assert_eq!(roles(&replies), ["bypass"]);
        let with_body = replies
            .iter()
            .filter(|r| r.text() == "posted \"one widget\"");
        assert_eq!(with_body.count(), 10);
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn concurrent_heads_make_one_call_and_each_gets_the_headers() {
    bounded(async {
        let (backend, open) = Backend::new();
        let handler = |State(backend): State<Backend>| async move {
            backend.call().await;
            ([("x-kind", "report")], "a body HEAD never shows")
        };
        let group = HttpGroup::new();
        let layer = SingleflightLayer::http().with_group(group.clone());
        let app = Router::new().route("/report", get(handler)).layer(layer);
        let addr = serve(app.with_state(backend.clone())).await;

        let replies = gathered(20, &group, &open, || request(Method::HEAD, addr, "/report")).await;

        assert_eq!(backend.calls(), 1);
        assert!(replies.iter().all(|reply| *reply == replies[0]));
        assert_eq!(replies[0].status, StatusCode::OK);
        assert_eq!(replies[0].header("x-kind"), "report");
        assert!(replies[0].body.is_empty());
    })
    .await;
}

/// A handler that streams its body in chunks, with trailers at the end.
async fn streaming(State(backend): State<Backend>) -> Response {
    backend.call().await;
    let frames =
        (0..8).map(|i| Ok::<_, Infallible>(Frame::data(Bytes::from(format!("chunk {i};")))));
    let mut trailers = HeaderMap::new();
    trailers.insert("x-checksum", HeaderValue::from_static("8 chunks"));
    let frames = frames.chain([Ok(Frame::trailers(trailers))]);
    let stream = futures::stream::iter(frames).then(|frame| async {
        tokio::time::sleep(Duration::from_millis(2)).await;
        frame
    });
    let headers = [(header::TRAILER, "x-checksum")];
    (headers, Body::new(StreamBody::new(stream))).into_response()
}

#[tokio::test(flavor = "current_thread")]
async fn a_streamed_body_and_its_trailers_are_replayed_whole_to_every_waiter() {
    bounded(async {
        let (backend, open) = Backend::new();
        let group = HttpGroup::new();
        let layer = SingleflightLayer::http().with_group(group.clone());
        let app = Router::new().route("/stream", get(streaming)).layer(layer);
        let addr = serve(app.with_state(backend.clone())).await;

        // HTTP/1 sends trailers only to a client that says it accepts them.
        let req = || request(Method::GET, addr, "/stream").header(header::TE, "trailers");
        let replies = gathered(20, &group, &open, req).await;

        let whole: String = (0..8).map(|i| format!("chunk {i};")).collect();
        assert_eq!(backend.calls(), 1);
        for reply in &replies {
            assert_eq!(reply.text(), whole);
            let trailers = reply.trailers.as_ref().expect("the trailers arrive");
            assert_eq!(trailers["x-checksum"], "8 chunks");
        }
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_body_over_the_limit_reaches_every_caller_whole() {
    bounded(async {
        // A 64 KiB body, streamed in 4 KiB chunks, over a 1 KiB limit.
        let (backend, open) = Backend::new();
        let chunk = |i: u8| Bytes::from(vec![b'a' + i; 4096]);
        let handler = move |State(backend): State<Backend>| async move {
            backend.call().await;
            let chunks = (0..16).map(move |i| Ok::<_, Infallible>(chunk(i)));
            Body::from_stream(futures::stream::iter(chunks))
        };
        let group = HttpGroup::new();
        let layer = SingleflightLayer::http()
            .with_group(group.clone())
            .body_limit(1024)
            .role_header(true);
        let app = Router::new().route("/big", get(handler)).layer(layer);
        let addr = serve(app.with_state(backend.clone())).await;

        let replies = gathered(10, &group, &open, || request(Method::GET, addr, "/big")).await;

        // The leader streamed it; each follower made its own call.
        let whole: Vec<u8> = (0..16).flat_map(|i| chunk(i).to_vec()).collect();
        assert_eq!(backend.calls(), 10);
        assert_eq!(roles(&replies), ["fallback", "leader"]);
        assert!(replies.iter().all(|reply| reply.body == whole));
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn followers_still_get_the_response_when_the_leader_hangs_up() {
    bounded(async {
        let (backend, open) = Backend::new();
        let handler = |State(backend): State<Backend>| async move {
            format!("from call {}", backend.call().await)
        };
        let group = HttpGroup::new();
        let layer = SingleflightLayer::http().with_group(group.clone());
        let app = Router::new().route("/slow", get(handler)).layer(layer);
        let addr = serve(app.with_state(backend.clone())).await;

        // The leader, on a raw connection, starts the flight.
        let mut leader = TcpStream::connect(addr).await.unwrap();
        let raw = format!("GET /slow HTTP/1.1\r\nhost: {addr}\r\n\r\n");
        leader.write_all(raw.as_bytes()).await.unwrap();
        until(|| backend.calls() == 1).await;

        // Five followers join, then the leader hangs up.
        let client = client();
        let tasks = burst(5, &client, || {
            request(Method::GET, addr, "/slow").header(header::HOST, addr.to_string())
        })
        .await;
        until(|| group.stats().waiters == 6).await;
        drop(leader);
        until(|| group.stats().waiters == 5).await;
        open.send_replace(true);

        // The one call goes on, and its response reaches every follower.
        let replies = replies(tasks).await;
        assert_eq!(backend.calls(), 1);
        assert!(replies.iter().all(|r| r.status == StatusCode::OK));
        assert!(replies.iter().all(|r| r.text() == "from call 1"));
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_panicking_handler_answers_500_to_every_waiter_and_the_next_request_succeeds() {
    bounded(async {
        // A handler that panics on its first call only.
        let (backend, open) = Backend::new();
        let handler = |State(backend): State<Backend>| async move {
            if backend.call().await == 1 {
                panic!("the handler fell over");
            }
            "fine again"
        };
        let group = HttpGroup::new();
        let layer = SingleflightLayer::http().with_group(group.clone());
        let app = Router::new().route("/fragile", get(handler)).layer(layer);
        let addr = serve(app.with_state(backend.clone())).await;

        // Every waiter of the panicking flight gets the documented 500.
        let replies = gathered(10, &group, &open, || request(Method::GET, addr, "/fragile")).await;
        assert!(replies
            .iter()
            .all(|r| r.status == StatusCode::INTERNAL_SERVER_ERROR));
        assert_eq!(group.stats().panics, 1);
        assert!(group.is_empty());

        // The key is free, and the next request starts a fresh call.
        let next = send(&client(), request(Method::GET, addr, "/fragile"), "").await;
        assert_eq!(next.status, StatusCode::OK);
        assert_eq!(next.text(), "fine again");
        assert_eq!(backend.calls(), 2);
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_follower_whose_own_call_panics_gets_500_like_any_waiter() {
    bounded(async {
        // The first call opens a session, which is never shared; each
        // follower's own call then panics.
        let (backend, open) = Backend::new();
        let handler = |State(backend): State<Backend>| async move {
            if backend.call().await > 1 {
                panic!("the handler fell over");
            }
            ([(header::SET_COOKIE, "session=1")], "session=1")
        };
        let group = HttpGroup::new();
        let layer = SingleflightLayer::http()
            .with_group(group.clone())
            .role_header(true);
        let app = Router::new().route("/login", get(handler)).layer(layer);
        let addr = serve(app.with_state(backend.clone())).await;

        let mut replies = gathered(3, &group, &open, || request(Method::GET, addr, "/login")).await;
        replies.sort_by_key(|reply| reply.status);
        let statuses: Vec<_> = replies.iter().map(|reply| reply.status).collect();
        assert_eq!(statuses, [200, 500, 500]);
        assert_eq!(replies[0].text(), "session=1");
        assert!(replies[1..]
            .iter()
            .all(|r| r.header(ROLE_HEADER) == "fallback"));
        assert_eq!(backend.calls(), 3);
        assert!(group.is_empty());
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_follower_past_its_wait_limit_gets_503_while_the_leader_still_succeeds() {
    bounded(async {
        let (backend, open) = Backend::new();
        let handler = |State(backend): State<Backend>| async move {
            backend.call().await;
            "worth the wait"
        };
        let group =
            HttpGroup::new().follower_wait_limit(Duration::from_millis(30), OnWaitLimit::Fail);
        let layer = SingleflightLayer::http().with_group(group.clone());
        let app = Router::new().route("/slow", get(handler)).layer(layer);
        let addr = serve(app.with_state(backend.clone())).await;

        // The follower gives up while the gate is shut.
        let client = client();
        let leader = burst(1, &client, || request(Method::GET, addr, "/slow")).await;
        until(|| group.stats().waiters == 1).await;
        let follower = send(&client, request(Method::GET, addr, "/slow"), "").await;
        assert_eq!(follower.status, StatusCode::SERVICE_UNAVAILABLE);

        // The leader's call is unharmed.
        open.send_replace(true);
        let leader = replies(leader).await;
        assert_eq!(leader[0].text(), "worth the wait");
        assert_eq!(backend.calls(), 1);
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_hyper_util_client_coalesces_its_own_requests() {
    bounded(async {
        // A plain server, no layer: the client side coalesces.
        let (backend, open) = Backend::new();
        let handler = |State(backend): State<Backend>| async move {
            format!("from call {}", backend.call().await)
        };
        let app = Router::new().route("/item", get(handler));
        let addr = serve(app.with_state(backend.clone())).await;

        // The client behind the layer; its errors boxed, as the layer needs.
        let group = Group::new();
        let client = ServiceBuilder::new()
            .layer(SingleflightLayer::http().with_group(group.clone()))
            .map_err(BoxError::from)
            .service(client());
        let calls = (0..50).map(|_| {
            let req = request(Method::GET, addr, "/item").body(Full::<Bytes>::default());
            client.clone().oneshot(req.unwrap())
        });
        let calls = tokio::spawn(join_all(calls));
        until(|| group.stats().waiters == 50).await;
        open.send_replace(true);

        // One request went out; every caller read its body.
        for res in calls.await.unwrap() {
            let res = res.expect("the request succeeds");
            let body = res.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, "from call 1");
        }
        assert_eq!(backend.calls(), 1);
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn every_response_says_how_it_was_produced_in_an_extension() {
    bounded(async {
        // Wired with `route_layer` this time, and driven in process.
        let app = Router::new()
            .route("/", get(|| async { "got" }).post(|| async { "posted" }))
            .route_layer(SingleflightLayer::http().key(HttpKey::new().header(header::ACCEPT)));

        let get = Request::get("/").body(Body::empty()).unwrap();
        let res = app.clone().oneshot(get).await.unwrap();
        let how = res.extensions().get::<Coalescing>().copied().unwrap();
        assert_eq!((how.role(), how.is_shared()), (Role::Leader, false));
        assert!(
            res.headers().get(ROLE_HEADER).is_none(),
            "the header is off by default"
        );

        let post = Request::post("/").body(Body::from("x")).unwrap();
        let res = app.oneshot(post).await.unwrap();
        let how = res.extensions().get::<Coalescing>().copied().unwrap();
        assert_eq!(how.role(), Role::Bypass);
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_response_the_predicate_rejects_goes_to_the_leader_alone() {
    bounded(async {
        // A handler that fails, and a layer that shares successes only.
        let (backend, open) = Backend::new();
        let handler = |State(backend): State<Backend>| async move {
            let n = backend.call().await;
            (StatusCode::BAD_GATEWAY, format!("upstream down, call {n}"))
        };
        let group = HttpGroup::new();
        let layer = SingleflightLayer::http()
            .with_group(group.clone())
            .shareable(|res| res.status.is_success())
            .role_header(true);
        let app = Router::new().route("/flaky", get(handler)).layer(layer);
        let addr = serve(app.with_state(backend.clone())).await;

        let replies = gathered(4, &group, &open, || request(Method::GET, addr, "/flaky")).await;

        // Every caller tried for itself.
        assert_eq!(backend.calls(), 4);
        assert_eq!(roles(&replies), ["fallback", "leader"]);
        assert!(replies.iter().all(|r| r.status == StatusCode::BAD_GATEWAY));
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_response_marked_private_is_shared_by_callers_with_one_key() {
    bounded(async {
        // Cache-Control speaks of caches; coalescing keeps nothing, and the
        // callers share a key, identity headers included.
        let (backend, open) = Backend::new();
        let handler = |State(backend): State<Backend>| async move {
            let n = backend.call().await;
            (
                [(header::CACHE_CONTROL, "private, no-store")],
                format!("call {n}"),
            )
        };
        let group = HttpGroup::new();
        let layer = SingleflightLayer::http()
            .with_group(group.clone())
            .role_header(true);
        let app = Router::new().route("/mine", get(handler)).layer(layer);
        let addr = serve(app.with_state(backend.clone())).await;

        let as_alice =
            || request(Method::GET, addr, "/mine").header(header::AUTHORIZATION, "alice");
        let replies = gathered(4, &group, &open, as_alice).await;
        assert_eq!(backend.calls(), 1);
        assert_eq!(roles(&replies), ["follower", "leader"]);
        assert!(replies.iter().all(|r| r.text() == "call 1"));
        assert!(replies
            .iter()
            .all(|r| r.header(header::CACHE_CONTROL) == "private, no-store"));
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn an_inner_error_reaches_every_waiter_with_its_source() {
    bounded(async {
        // A fallible inner service, held at a gate, that fails once.
        let (backend, open) = Backend::new();
        let counted = backend.clone();
        let svc = tower::service_fn(move |_: Request<Full<Bytes>>| {
            let backend = counted.clone();
            async move {
                backend.call().await;
                Err::<Response<Full<Bytes>>, BoxError>("the origin refused".into())
            }
        });
        let group = Group::new();
        let svc = ServiceBuilder::new()
            .layer(SingleflightLayer::http().with_group(group.clone()))
            .service(svc);

        // Five callers share the one failing call.
        let calls = (0..5).map(|_| svc.clone().oneshot(Request::new(Full::default())));
        let calls = tokio::spawn(join_all(calls));
        until(|| group.stats().waiters == 5).await;
        open.send_replace(true);

        for outcome in calls.await.unwrap() {
            let error = outcome.expect_err("the call failed");
            let shared = error.downcast_ref::<tower_singleflight::Error>().unwrap();
            assert_eq!(shared.inner().unwrap().to_string(), "the origin refused");
        }
        assert_eq!(backend.calls(), 1);
    })
    .await;
}

#[test]
fn the_default_key_takes_the_host_header_and_lets_unsafe_requests_through() {
    use tower_singleflight::key::KeyExtractor;
    let key = HttpKey::new();
    let req = |method: Method, uri: &str, body: &'static str| {
        let req = Request::builder().method(method).uri(uri);
        req.header(header::HOST, "example.com")
            .body(Full::<Bytes>::from(body))
            .unwrap()
    };

    // On a server the URI has no authority: the Host header stands in.
    let origin_form = key.extract(&req(Method::GET, "/a?b=1", ""));
    let other_host = Request::get("/a?b=1").header(header::HOST, "example.org");
    assert!(origin_form.is_some());
    assert_ne!(
        origin_form,
        key.extract(&other_host.body(Full::<Bytes>::default()).unwrap())
    );
    assert_ne!(origin_form, key.extract(&req(Method::GET, "/a?b=2", "")));

    // Other methods, and requests with a body, go straight through...
    assert_eq!(key.extract(&req(Method::DELETE, "/a", "")), None);
    assert_eq!(key.extract(&req(Method::GET, "/a", "a body")), None);

    // ...unless the user opts in.
    let key = HttpKey::new().method(Method::POST).ignore_bodies(true);
    assert!(key
        .extract(&req(Method::POST, "/search", "q=rust"))
        .is_some());
    assert_eq!(
        key.extract(&req(Method::POST, "/search", "q=rust")),
        key.extract(&req(Method::POST, "/search", "q=go")),
        "an ignored body is no part of the key",
    );
}

// --- requests and responses that are never shared ---

#[test]
fn upgrades_get_no_key_and_ranges_and_validators_are_part_of_it() {
    use tower_singleflight::http::HttpKey;
    use tower_singleflight::key::KeyExtractor;

    let key = HttpKey::new();
    let get = |headers: &[(&str, &str)]| {
        let mut req = Request::get("http://example.com/file");
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        req.body(Full::<Bytes>::default()).unwrap()
    };

    // A WebSocket handshake, or any request to switch protocols, bypasses.
    assert!(key.extract(&get(&[("upgrade", "websocket")])).is_none());
    assert!(key
        .extract(&get(&[("connection", "keep-alive, Upgrade")]))
        .is_none());
    assert!(key.extract(&get(&[("connection", "keep-alive")])).is_some());

    // A range, or a validator, asks for another representation: another key.
    let plain = key.extract(&get(&[]));
    assert_ne!(plain, key.extract(&get(&[("range", "bytes=0-4")])));
    assert_ne!(plain, key.extract(&get(&[("if-none-match", "\"v1\"")])));
    assert_ne!(
        plain,
        key.extract(&get(&[("if-modified-since", "Tue, 1 Dec 2026")]))
    );
    let ranged = key.extract(&get(&[("range", "bytes=0-4")]));
    assert_eq!(ranged, key.extract(&get(&[("range", "bytes=0-4")])));
}

#[tokio::test(flavor = "current_thread")]
async fn an_event_stream_reaches_its_caller_at_once_and_is_never_shared() {
    bounded(async {
        // A stream of events that never ends.
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&calls);
        let events = move || {
            counter.fetch_add(1, Ordering::SeqCst);
            async {
                let ticks = futures::stream::unfold(0u32, |n| async move {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    let frame = Frame::data(Bytes::from(format!("data: {n}\n\n")));
                    Some((Ok::<_, Infallible>(frame), n + 1))
                });
                let mut res = Response::new(Body::new(StreamBody::new(ticks)));
                let content_type = HeaderValue::from_static("text/event-stream");
                res.headers_mut().insert(header::CONTENT_TYPE, content_type);
                res
            }
        };
        let app: Router = Router::new()
            .route("/events", get(events))
            .layer(SingleflightLayer::http());
        let addr = serve(app).await;

        // Two subscribers each get their head and a first event promptly,
        // each from a call of its own.
        let client = client();
        for _ in 0..2 {
            let req = request(Method::GET, addr, "/events").body(Full::default());
            let res = tokio::time::timeout(Duration::from_secs(2), client.request(req.unwrap()));
            let mut body = res
                .await
                .expect("the head comes at once")
                .unwrap()
                .into_body();
            let first = tokio::time::timeout(Duration::from_secs(2), body.frame()).await;
            let first = first
                .expect("the first event comes at once")
                .unwrap()
                .unwrap();
            assert_eq!(first.into_data().unwrap(), "data: 0\n\n");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    })
    .await;
}

/// A router whose `/slow` route counts its call and waits at the backend's
/// gate, then answers with a body of `parts` parts, `gap` apart.
fn slow_route(parts: u32, gap: Duration) -> Router<Backend> {
    let slow = move |State(backend): State<Backend>| async move {
        backend.call().await;
        let chunks = futures::stream::iter(0..parts).then(move |n| async move {
            tokio::time::sleep(gap).await;
            Ok::<_, Infallible>(Frame::data(Bytes::from(format!("part {n};"))))
        });
        Response::new(Body::new(StreamBody::new(chunks)))
    };
    Router::new().route("/slow", get(slow))
}

#[tokio::test(flavor = "current_thread")]
async fn a_body_slower_than_the_buffering_wait_streams_to_the_leader_and_followers_call_again() {
    bounded(async {
        // A body that takes about 400 ms to stream, against a 100 ms wait.
        let (backend, open) = Backend::new();
        open.send_replace(true);
        let layer = SingleflightLayer::http().buffer_wait(Duration::from_millis(100));
        let app = slow_route(4, Duration::from_millis(100)).layer(layer);
        let addr = serve(app.with_state(backend.clone())).await;

        // Three callers at once: the leader's head comes before its body
        // ends, and every caller gets the whole body.
        let client = client();
        let started = tokio::time::Instant::now();
        let tasks = burst(3, &client, || request(Method::GET, addr, "/slow")).await;
        let replies = replies(tasks).await;
        assert!(started.elapsed() < Duration::from_secs(3));
        for reply in &replies {
            assert_eq!(reply.text(), "part 0;part 1;part 2;part 3;");
        }

        // The followers made their own calls rather than wait on a stream.
        assert_eq!(backend.calls(), 3);
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_buffering_wait_too_long_to_name_as_an_instant_is_no_limit() {
    bounded(async {
        // A body that takes about 600 ms to stream, longer than the default
        // wait, and no buffering wait at all.
        let (backend, open) = Backend::new();
        let group = HttpGroup::new();
        let layer = SingleflightLayer::http()
            .with_group(group.clone())
            .buffer_wait(Duration::MAX)
            .role_header(true);
        let app = slow_route(2, Duration::from_millis(300)).layer(layer);
        let addr = serve(app.with_state(backend.clone())).await;

        // Three callers in one flight: the body is read whole and shared,
        // however long it takes.
        let replies = gathered(3, &group, &open, || request(Method::GET, addr, "/slow")).await;
        for reply in &replies {
            assert_eq!(reply.status, StatusCode::OK);
            assert_eq!(reply.text(), "part 0;part 1;");
        }
        assert_eq!(roles(&replies), ["follower", "leader"]);
        assert_eq!(backend.calls(), 1);
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_clone_given_other_settings_or_another_key_never_joins_the_originals_flights() {
    bounded(async {
        // Called straight, with no server: two services behind clones of
        // one layer, on one path. The original's call waits at a gate.
        let get = || {
            Request::get("http://localhost/x")
                .body(Body::empty())
                .unwrap()
        };
        let answer = |text: &'static str| {
            tower::service_fn(move |_: Request<Body>| async move {
                Ok::<_, Infallible>(Response::new(Body::from(text)))
            })
        };
        let (open, gate) = watch::channel(false);
        let gated = tower::service_fn(move |_: Request<Body>| {
            let mut gate = gate.clone();
            async move {
                gate.wait_for(|open| *open).await.expect("the gate stays");
                Ok::<_, Infallible>(Response::new(Body::from("original")))
            }
        });
        let base = SingleflightLayer::http();
        let leader = tokio::spawn(base.layer(gated).oneshot(get()));
        tokio::task::yield_now().await;

        // Each changed clone's services lead flights of their own.
        let changed = [
            base.clone().buffer_wait(Duration::from_secs(1)),
            base.clone().body_limit(1),
            base.clone().shareable(|_| true),
            base.clone().role_header(true),
            base.clone().key(HttpKey::new()),
        ];
        for layer in changed {
            let res = layer.layer(answer("its own")).oneshot(get()).await.unwrap();
            let how = res.extensions().get::<Coalescing>().copied().unwrap();
            assert_eq!(how.role(), Role::Leader, "{layer:?}");
            let body = res.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, "its own");
        }

        // A plain clone's services join the original's flight.
        let follower = tokio::spawn(base.clone().layer(answer("unsent")).oneshot(get()));
        tokio::task::yield_now().await;
        open.send_replace(true);
        for task in [leader, follower] {
            let res = task.await.unwrap().unwrap();
            let body = res.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, "original");
        }
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn clones_of_a_layer_with_other_keys_or_settings_work_side_by_side() {
    bounded(async {
        // One base layer; a clone with another key type, and a clone with a
        // wait limit, each on a route of its own.
        let base = SingleflightLayer::http();
        let path_only = base
            .clone()
            .key(|req: &Request<Body>| req.uri().path().to_owned());
        let limited = base
            .clone()
            .follower_wait_limit(Duration::from_millis(50), OnWaitLimit::Fail);
        let slow = || async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            "slow"
        };
        let app: Router = Router::new()
            .route("/a", get(|| async { "a" }).layer(base))
            .route("/b", get(|| async { "b" }).layer(path_only))
            .route("/c", get(slow).layer(limited));
        let addr = serve(app).await;

        // Each route answers; the clone with a wait limit applies it.
        let client = client();
        for path in ["/a", "/b"] {
            let tasks = burst(1, &client, || request(Method::GET, addr, path)).await;
            assert_eq!(replies(tasks).await[0].text(), &path[1..]);
        }
        let tasks = burst(3, &client, || request(Method::GET, addr, "/c")).await;
        let mut statuses: Vec<u16> = replies(tasks)
            .await
            .iter()
            .map(|r| r.status.as_u16())
            .collect();
        statuses.sort_unstable();
        assert_eq!(statuses, [200, 503, 503]);
    })
    .await;
}
