//! The gRPC layer end to end: a real tonic server on loopback and real tonic
//! clients over HTTP/2, the layer on the client's `Channel` or on the
//! server, no mocks on the wire.
//!
//! The tests run on a multi-threaded runtime, as servers do: there a unary
//! call's message and the end of its request may reach the layer apart,
//! which is what its waits are for.
//!
//! Where the contract's gRPC line, H5, is shown: unary calls coalesce on
//! method and message in
//! `fifty_identical_calls_through_the_client_layer_reach_the_server_once`
//! and `calls_with_different_messages_or_callers_make_different_calls`;
//! statuses and trailers reach every waiter in
//! `a_not_found_status_with_its_message_and_metadata_reaches_all_fifty_callers`
//! and `trailing_metadata_of_an_ok_reply_reaches_every_caller`; streams are
//! never corrupted in `a_listed_streaming_method_is_unaffected_through_both_layers`,
//! `an_unlisted_server_stream_still_reaches_every_caller_whole` and
//! `client_streams_and_chats_pass_through_both_layers_without_stalling`.
#![cfg(feature = "grpc")]

#[path = "support/echo.rs"]
mod echo;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::future::join_all;
use futures::StreamExt;
use http_body::Frame;
use http_body_util::StreamBody;
use prost::Message;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::body::Body;
use tonic::codegen::BoxFuture;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::server::NamedService;
use tonic::transport::{Channel, Endpoint, Server};
use tonic::{Code, Request, Response, Status, Streaming};
use tower::ServiceBuilder;
use tower_singleflight::grpc::{GrpcKey, GrpcRequestKey, GrpcSingleflight, RequestBody};
use tower_singleflight::http::{Coalescing, FlightResponse};
use tower_singleflight::{Group, Role, SingleflightLayer};

use echo::{Echo, EchoClient, EchoServer, Query, Replies, Reply};

// --- the world the tests run in ---

type GrpcGroup = Group<GrpcRequestKey, FlightResponse<Body>>;
type MakeBody = fn(RequestBody<Body>) -> Body;
type Coalesced = GrpcSingleflight<Channel, MakeBody, GrpcKey, GrpcGroup>;

/// The server's side of the test: what it was asked, and a gate every `Get`
/// waits at, so a test can gather every caller in one flight first.
#[derive(Clone)]
struct Backend {
    counts: Arc<Counts>,
    seen: Arc<Mutex<Vec<MetadataMap>>>,
    gate: watch::Receiver<bool>,
}

#[derive(Default)]
struct Counts {
    gets: AtomicUsize,
    gets_finished: AtomicUsize,
    gets_dropped: AtomicUsize,
    watches: AtomicUsize,
    collects: AtomicUsize,
    chats: AtomicUsize,
}

/// Counts a `Get` that was dropped before it finished: a cancelled RPC.
struct Unfinished<'a>(Option<&'a AtomicUsize>);

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        if let Some(dropped) = self.0 {
            dropped.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Backend {
    fn new() -> (Self, watch::Sender<bool>) {
        let (open, gate) = watch::channel(false);
        let backend = Self {
            counts: Arc::default(),
            seen: Arc::default(),
            gate,
        };
        (backend, open)
    }

    fn gets(&self) -> usize {
        self.counts.gets.load(Ordering::SeqCst)
    }

    fn count(&self, which: impl Fn(&Counts) -> &AtomicUsize) -> usize {
        which(&self.counts).load(Ordering::SeqCst)
    }

    /// The metadata of every `Get` the server received, in order.
    fn seen(&self) -> Vec<MetadataMap> {
        self.seen.lock().unwrap().clone()
    }
}

impl Echo for Backend {
    /// Echoes the text after the gate opens; `missing:<what>` fails with
    /// `NOT_FOUND`, a message, details and metadata, and `crash` panics, so
    /// that the RPC fails with no status at all.
    async fn get(&self, req: Request<Query>) -> Result<Response<Reply>, Status> {
        let n = self.counts.gets.fetch_add(1, Ordering::SeqCst) + 1;
        self.seen.lock().unwrap().push(req.metadata().clone());
        let mut unfinished = Unfinished(Some(&self.counts.gets_dropped));
        let mut gate = self.gate.clone();
        gate.wait_for(|open| *open)
            .await
            .expect("the test holds the gate");
        unfinished.0 = None;
        self.counts.gets_finished.fetch_add(1, Ordering::SeqCst);

        let text = req.into_inner().text;
        assert_ne!(text, "crash", "the handler crashes, as asked");
        if let Some(what) = text.strip_prefix("missing:") {
            let mut metadata = MetadataMap::new();
            metadata.insert("x-reason", MetadataValue::from_static("gone"));
            let details = bytes::Bytes::from_static(b"\x08\x05details");
            let message = format!("no {what} here");
            return Err(Status::with_details_and_metadata(
                Code::NotFound,
                message,
                details,
                metadata,
            ));
        }
        let call = u32::try_from(n).unwrap();
        let mut res = Response::new(Reply {
            text: format!("echo {text}"),
            call,
        });
        res.metadata_mut()
            .insert("x-call", MetadataValue::from(call));
        Ok(res)
    }

    /// Three replies, 20 ms apart.
    async fn watch(&self, req: Request<Query>) -> Result<Response<Replies>, Status> {
        let n = self.counts.watches.fetch_add(1, Ordering::SeqCst) + 1;
        let text = req.into_inner().text;
        let replies = futures::stream::unfold(0, move |i| {
            let text = text.clone();
            async move {
                if i == 3 {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                let reply = Reply {
                    text: format!("{text} #{i}"),
                    call: u32::try_from(n).unwrap(),
                };
                Some((Ok(reply), i + 1))
            }
        });
        Ok(Response::new(Box::pin(replies)))
    }

    /// Joins every text it is sent.
    async fn collect(&self, req: Request<Streaming<Query>>) -> Result<Response<Reply>, Status> {
        self.counts.collects.fetch_add(1, Ordering::SeqCst);
        let mut queries = req.into_inner();
        let mut texts = Vec::new();
        while let Some(query) = queries.next().await {
            texts.push(query?.text);
        }
        let text = texts.join(",");
        Ok(Response::new(Reply { text, call: 0 }))
    }

    /// Answers each text as it comes.
    async fn chat(&self, req: Request<Streaming<Query>>) -> Result<Response<Replies>, Status> {
        self.counts.chats.fetch_add(1, Ordering::SeqCst);
        let replies = req.into_inner().map(|query| {
            let text = format!("re: {}", query?.text);
            Ok(Reply { text, call: 0 })
        });
        Ok(Response::new(Box::pin(replies)))
    }
}

/// A server written against `http` directly, whose replies carry trailing
/// metadata of their own, which tonic's unary handlers cannot send. It
/// counts its calls in, and waits at the gate of, a [`Backend`].
#[derive(Clone)]
struct Trailing(Backend);

impl NamedService for Trailing {
    const NAME: &'static str = "echo.Echo";
}

impl tower::Service<http::Request<Body>> for Trailing {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Request<Body>) -> Self::Future {
        let backend = self.0.clone();
        Box::pin(async move {
            // Counted, then held at the gate.
            let n = backend.counts.gets.fetch_add(1, Ordering::SeqCst) + 1;
            let mut gate = backend.gate.clone();
            gate.wait_for(|open| *open).await.unwrap();

            // One message, then trailers: the status, and a checksum.
            let call = u32::try_from(n).unwrap();
            let reply = Reply {
                text: "trailed".into(),
                call,
            };
            let message = reply.encode_to_vec();
            let mut frame = vec![0];
            frame.extend(u32::try_from(message.len()).unwrap().to_be_bytes());
            frame.extend(message);
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
            trailers.insert("x-checksum", http::HeaderValue::from(call));
            let frames = [Frame::data(Bytes::from(frame)), Frame::trailers(trailers)];
            let frames = futures::stream::iter(frames.map(Ok::<_, Status>));
            let body = Body::new(StreamBody::new(frames));
            let res = http::Response::builder().header("content-type", "application/grpc");
            Ok(res.body(body).unwrap())
        })
    }
}

/// Serves `backend` on a fresh loopback port, in the background, with the
/// gRPC layer sharing `group` if one is given.
async fn serve(backend: Backend, group: Option<GrpcGroup>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = TcpListenerStream::new(listener);
    let echo = EchoServer::new(backend);
    let server = async move {
        match group {
            Some(group) => {
                let layer = SingleflightLayer::grpc(Body::new as MakeBody).with_group(group);
                let router = Server::builder().layer(layer).add_service(echo);
                router.serve_with_incoming(incoming).await
            }
            None => {
                let router = Server::builder().add_service(echo);
                router.serve_with_incoming(incoming).await
            }
        }
    };
    tokio::spawn(async move { server.await.expect("the server runs") });
    addr
}

/// Serves a [`Trailing`] server on a fresh loopback port, in the background.
async fn serve_trailing(backend: Backend) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = TcpListenerStream::new(listener);
    let router = Server::builder().add_service(Trailing(backend));
    tokio::spawn(async move { router.serve_with_incoming(incoming).await.unwrap() });
    addr
}

/// A channel of its own (one HTTP/2 connection) to `addr`.
async fn channel(addr: SocketAddr) -> Channel {
    let endpoint = Endpoint::from_shared(format!("http://{addr}")).unwrap();
    endpoint.connect().await.expect("the server accepts")
}

/// A plain client.
async fn client(addr: SocketAddr) -> EchoClient<Channel> {
    EchoClient::new(channel(addr).await)
}

/// A client whose channel is wrapped in the gRPC layer, sharing `group`.
async fn coalescing_client(addr: SocketAddr, group: &GrpcGroup) -> EchoClient<Coalesced> {
    let layer = SingleflightLayer::grpc(Body::new as MakeBody)
        .role_header(true)
        .with_group(group.clone());
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(channel(addr).await);
    EchoClient::new(svc)
}

/// A `Get` for `text`, with a deadline if given.
fn query(text: &str, timeout: Option<Duration>) -> Request<Query> {
    let mut req = Request::new(Query::new(text));
    if let Some(timeout) = timeout {
        req.set_timeout(timeout);
    }
    req
}

/// Sends a `Get` in a task of its own.
fn spawn_get<T>(client: &EchoClient<T>, req: Request<Query>) -> tokio::task::JoinHandle<Got>
where
    EchoClient<T>: Clone + Send + 'static,
    T: tonic::client::GrpcService<Body> + Send + 'static,
    T::Error: Into<tonic::codegen::StdError>,
    T::Future: Send,
    T::ResponseBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    <T::ResponseBody as http_body::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    let mut client = client.clone();
    tokio::spawn(async move { client.get(req).await })
}

type Got = Result<Response<Reply>, Status>;

async fn outcomes(tasks: Vec<tokio::task::JoinHandle<Got>>) -> Vec<Got> {
    join_all(tasks)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect()
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

fn role(res: &Response<Reply>) -> Role {
    res.extensions().get::<Coalescing>().expect("marked").role()
}

fn metadata<'a>(res: &'a Response<Reply>, key: &str) -> &'a str {
    metadata_of(res.metadata(), key)
}

fn metadata_of<'a>(map: &'a MetadataMap, key: &str) -> &'a str {
    map.get(key).map_or("", |v| v.to_str().unwrap())
}

// --- the tests ---

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_identical_calls_through_the_client_layer_reach_the_server_once() {
    bounded(async {
        let (backend, open) = Backend::new();
        let addr = serve(backend.clone(), None).await;
        let group = GrpcGroup::new();
        let client = coalescing_client(addr, &group).await;

        // Fifty identical calls, each with the same caller's metadata, join
        // one flight before the server answers.
        let tasks = (0..50)
            .map(|_| {
                let mut req = query("hello", None);
                req.metadata_mut()
                    .insert("authorization", MetadataValue::from_static("Bearer alice"));
                req.metadata_mut()
                    .insert("x-trace", MetadataValue::from_static("t-1"));
                spawn_get(&client, req)
            })
            .collect();
        until(|| group.stats().waiters == 50).await;
        open.send_replace(true);
        let outcomes = outcomes(tasks).await;

        // One RPC, and every caller has its message and metadata.
        assert_eq!(backend.gets(), 1);
        let replies: Vec<_> = outcomes.into_iter().map(Result::unwrap).collect();
        for res in &replies {
            assert_eq!(res.get_ref().text, "echo hello");
            assert_eq!(res.get_ref().call, 1);
            assert_eq!(metadata(res, "x-call"), "1");
        }
        let leaders = replies.iter().filter(|r| role(r) == Role::Leader).count();
        let followers = replies.iter().filter(|r| role(r) == Role::Follower);
        assert_eq!(leaders, 1);
        assert_eq!(followers.count(), 49);
        assert!(replies
            .iter()
            .all(|r| ["leader", "follower"].contains(&metadata(r, "x-singleflight"))));

        // What reached the server is what the leader sent.
        let seen = backend.seen();
        assert_eq!(seen[0].get("authorization").unwrap(), "Bearer alice");
        assert_eq!(seen[0].get("x-trace").unwrap(), "t-1");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_with_different_messages_or_callers_make_different_calls() {
    bounded(async {
        let (backend, open) = Backend::new();
        let addr = serve(backend.clone(), None).await;
        let group = GrpcGroup::new();
        let client = coalescing_client(addr, &group).await;

        // Four texts, and one of them again for another caller, four calls
        // each.
        let asks = |text: &'static str, who: Option<&'static str>| {
            let client = client.clone();
            (0..4).map(move |_| {
                let mut req = query(text, None);
                if let Some(who) = who {
                    let who = MetadataValue::from_static(who);
                    req.metadata_mut().insert("authorization", who);
                }
                (text, spawn_get(&client, req))
            })
        };
        let tasks: Vec<_> = ["a", "b", "c", "d"]
            .into_iter()
            .flat_map(|text| asks(text, None))
            .chain(asks("a", Some("Bearer bob")))
            .collect();
        until(|| group.stats().waiters == 20).await;
        open.send_replace(true);

        // Five calls, each caller with the echo of its own text.
        for (text, task) in tasks {
            let res = task.await.unwrap().expect("the call succeeds");
            assert_eq!(res.get_ref().text, format!("echo {text}"));
        }
        assert_eq!(backend.gets(), 5);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_not_found_status_with_its_message_and_metadata_reaches_all_fifty_callers() {
    bounded(async {
        let (backend, open) = Backend::new();
        let addr = serve(backend.clone(), None).await;
        let group = GrpcGroup::new();
        let client = coalescing_client(addr, &group).await;

        // Fifty callers ask for something that is not there.
        let tasks = (0..50)
            .map(|_| spawn_get(&client, query("missing:thing", None)))
            .collect();
        until(|| group.stats().waiters == 50).await;
        open.send_replace(true);

        // One RPC; every caller gets its code, message, details, metadata.
        for outcome in outcomes(tasks).await {
            let status = outcome.expect_err("the call fails");
            assert_eq!(status.code(), Code::NotFound);
            assert_eq!(status.message(), "no thing here");
            assert_eq!(status.details(), b"\x08\x05details");
            assert_eq!(status.metadata().get("x-reason").unwrap(), "gone");
        }
        assert_eq!(backend.gets(), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailing_metadata_of_an_ok_reply_reaches_every_caller() {
    bounded(async {
        let (backend, open) = Backend::new();
        let addr = serve_trailing(backend.clone()).await;
        let group = GrpcGroup::new();
        let client = coalescing_client(addr, &group).await;

        // Twenty callers join one flight.
        let tasks = (0..20)
            .map(|_| spawn_get(&client, query("t", None)))
            .collect();
        until(|| group.stats().waiters == 20).await;
        open.send_replace(true);

        // Each gets the message, and the trailers merged into its metadata.
        for outcome in outcomes(tasks).await {
            let res = outcome.expect("the call succeeds");
            assert_eq!(res.get_ref().text, "trailed");
            assert_eq!(metadata(&res, "x-checksum"), "1");
        }
        assert_eq!(backend.gets(), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_fails_without_a_status_fails_alike_for_every_caller() {
    bounded(async {
        let (backend, open) = Backend::new();
        let addr = serve(backend.clone(), None).await;
        let group = GrpcGroup::new();
        let coalescing = coalescing_client(addr, &group).await;

        // Ten callers share a call whose handler crashes, so the stream is
        // reset before any reply: the shared call fails with a transport
        // error, not a status.
        let tasks = (0..10)
            .map(|_| spawn_get(&coalescing, query("crash", None)))
            .collect();
        until(|| group.stats().waiters == 10).await;
        open.send_replace(true);
        let statuses: Vec<_> = outcomes(tasks)
            .await
            .into_iter()
            .map(Result::unwrap_err)
            .collect();

        // Each caller gets the status a plain client gets for the same crash.
        let plain = client(addr).await.get(query("crash", None)).await;
        let plain = plain.expect_err("the call fails");
        assert_ne!(plain.code(), Code::Ok);
        for status in statuses {
            assert_eq!(
                (status.code(), status.message()),
                (plain.code(), plain.message())
            );
        }
        assert_eq!(backend.gets(), 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listed_streaming_method_is_unaffected_through_both_layers() {
    bounded(async {
        // The layer on both sides, with `Watch` listed on each.
        let (backend, _open) = Backend::new();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server_layer =
            SingleflightLayer::grpc(Body::new as MakeBody).streaming_method("/echo.Echo/Watch");
        let server = Server::builder()
            .layer(server_layer)
            .add_service(EchoServer::new(backend.clone()))
            .serve_with_incoming(TcpListenerStream::new(listener));
        tokio::spawn(server);
        let client_layer = SingleflightLayer::grpc(Body::new as MakeBody)
            .streaming_method("/echo.Echo/")
            .role_header(true);
        let svc = ServiceBuilder::new()
            .layer(client_layer)
            .service(channel(addr).await);
        let client = EchoClient::new(svc);

        // Five identical watches at once: five streams, each whole.
        let watches = (0..5).map(|_| {
            let mut client = client.clone();
            async move {
                let res = client
                    .watch(Query::new("w"))
                    .await
                    .expect("the stream starts");
                assert_eq!(metadata_of(res.metadata(), "x-singleflight"), "bypass");
                let replies: Vec<_> = res.into_inner().map(Result::unwrap).collect().await;
                replies.into_iter().map(|r| r.text).collect::<Vec<_>>()
            }
        });
        for texts in join_all(watches).await {
            assert_eq!(texts, ["w #0", "w #1", "w #2"]);
        }
        assert_eq!(backend.count(|c| &c.watches), 5);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unlisted_server_stream_still_reaches_every_caller_whole() {
    bounded(async {
        // The layer on both sides, nothing listed.
        let (backend, _open) = Backend::new();
        let addr = serve(backend.clone(), Some(GrpcGroup::new())).await;
        let group = GrpcGroup::new();
        let client = coalescing_client(addr, &group).await;

        // Five identical watches: they look unary, so they share a flight,
        // but a response of several messages is never replayed.
        let watches = (0..5).map(|_| {
            let mut client = client.clone();
            async move {
                let res = client
                    .watch(Query::new("w"))
                    .await
                    .expect("the stream starts");
                let replies: Vec<_> = res.into_inner().map(Result::unwrap).collect().await;
                replies.into_iter().map(|r| r.text).collect::<Vec<_>>()
            }
        });
        for texts in join_all(watches).await {
            assert_eq!(texts, ["w #0", "w #1", "w #2"]);
        }
        assert_eq!(backend.count(|c| &c.watches), 5);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_streams_and_chats_pass_through_both_layers_without_stalling() {
    bounded(async {
        let (backend, _open) = Backend::new();
        let addr = serve(backend.clone(), Some(GrpcGroup::new())).await;
        let group = GrpcGroup::new();
        let mut client = coalescing_client(addr, &group).await;

        // A client stream of three messages reaches the server whole.
        let queries = ["x", "y", "z"].map(Query::new);
        let res = client.collect(futures::stream::iter(queries)).await;
        assert_eq!(res.expect("the call succeeds").get_ref().text, "x,y,z");

        // A chat whose client waits for each answer before it speaks again:
        // its first message is sent before the call, its second only after
        // the first answer.
        let (say, said) = mpsc::channel(1);
        say.send(Query::new("ping")).await.unwrap();
        let res = client.chat(ReceiverStream::new(said)).await;
        let mut answers = res.expect("the chat starts").into_inner();
        let first = answers.next().await.unwrap().unwrap();
        assert_eq!(first.text, "re: ping");
        say.send(Query::new("pong")).await.unwrap();
        let second = answers.next().await.unwrap().unwrap();
        assert_eq!(second.text, "re: pong");
        drop(say);
        assert!(answers.next().await.is_none());

        // A chat whose client sends nothing until the call has started.
        let (say, said) = mpsc::channel(1);
        let res = client.chat(ReceiverStream::new(said)).await;
        let mut answers = res.expect("the chat starts").into_inner();
        say.send(Query::new("late")).await.unwrap();
        assert_eq!(answers.next().await.unwrap().unwrap().text, "re: late");
        drop(say);
        assert!(answers.next().await.is_none());

        // Nothing was shared, nothing waits.
        assert_eq!(backend.count(|c| &c.collects), 1);
        assert_eq!(backend.count(|c| &c.chats), 2);
        assert_eq!(group.stats().leaders, 0);
        assert!(group.is_empty());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_listed_unary_methods_coalesce_once_any_is_listed() {
    bounded(async {
        let (backend, open) = Backend::new();
        let addr = serve(backend.clone(), None).await;

        // `Get` is not on the list, so five identical calls are five RPCs.
        let layer = SingleflightLayer::grpc(Body::new).unary_method("/echo.Echo/Watch");
        let svc = ServiceBuilder::new()
            .layer(layer)
            .service(channel(addr).await);
        let client = EchoClient::new(svc);
        let tasks = (0..5)
            .map(|_| spawn_get(&client, query("x", None)))
            .collect();
        until(|| backend.gets() == 5).await;
        open.send_replace(true);
        for outcome in outcomes(tasks).await {
            assert_eq!(outcome.unwrap().get_ref().text, "echo x");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_the_limit_passes_through_and_one_within_it_coalesces() {
    bounded(async {
        let (backend, open) = Backend::new();
        let addr = serve(backend.clone(), None).await;
        let group = GrpcGroup::new();
        let layer = SingleflightLayer::grpc(Body::new as MakeBody)
            .message_limit(4)
            .with_group(group.clone());
        let svc = ServiceBuilder::new()
            .layer(layer)
            .service(channel(addr).await);
        let client = EchoClient::new(svc);

        // Five calls whose message is 4 bytes (a tag, a length, "ab"), and
        // five whose message is 5: one RPC for the first, five for the rest.
        let short: Vec<_> = (0..5)
            .map(|_| spawn_get(&client, query("ab", None)))
            .collect();
        let long: Vec<_> = (0..5)
            .map(|_| spawn_get(&client, query("abc", None)))
            .collect();
        until(|| backend.gets() == 6 && group.stats().waiters == 5).await;
        open.send_replace(true);
        for outcome in outcomes(short).await {
            assert_eq!(outcome.unwrap().get_ref().text, "echo ab");
        }
        for outcome in outcomes(long).await {
            assert_eq!(outcome.unwrap().get_ref().text, "echo abc");
        }
        assert_eq!(backend.gets(), 6);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_layer_coalesces_identical_calls_from_independent_clients() {
    bounded(async {
        let (backend, open) = Backend::new();
        let group = GrpcGroup::new();
        let addr = serve(backend.clone(), Some(group.clone())).await;

        // Twenty plain clients, each on a connection of its own.
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let client = client(addr).await;
            tasks.push(spawn_get(&client, query("shared", None)));
        }
        until(|| group.stats().waiters == 20).await;
        open.send_replace(true);

        // One call; every client gets its reply and its metadata.
        for outcome in outcomes(tasks).await {
            let res = outcome.expect("the call succeeds");
            assert_eq!(res.get_ref().text, "echo shared");
            assert_eq!(metadata(&res, "x-call"), "1");
        }
        assert_eq!(backend.gets(), 1);
        assert_eq!(group.stats().followers, 19);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_with_a_shorter_deadline_leaves_alone() {
    bounded(async {
        let (backend, open) = Backend::new();
        let addr = serve(backend.clone(), None).await;
        let group = GrpcGroup::new();
        let client = coalescing_client(addr, &group).await;

        // A leader with no deadline, a follower with 5 s, and one with 100 ms.
        let leader = spawn_get(&client, query("slow", None));
        until(|| backend.gets() == 1).await;
        let patient = spawn_get(&client, query("slow", Some(Duration::from_secs(5))));
        let hasty = spawn_get(&client, query("slow", Some(Duration::from_millis(100))));
        until(|| group.stats().waiters == 3).await;

        // The hasty one gives up at its deadline, alone.
        let status = hasty.await.unwrap().expect_err("its deadline passes");
        assert_eq!(status.code(), Code::DeadlineExceeded);
        assert!(status.message().contains("shared call"), "{status:?}");
        assert_eq!(group.stats().waiters, 2);
        open.send_replace(true);

        // The others get the reply of the one call, which ran to its end.
        assert_eq!(leader.await.unwrap().unwrap().get_ref().text, "echo slow");
        assert_eq!(patient.await.unwrap().unwrap().get_ref().text, "echo slow");
        assert_eq!(backend.gets(), 1);
        assert_eq!(backend.count(|c| &c.gets_finished), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leaders_deadline_does_not_fail_followers_within_theirs() {
    bounded(async {
        let (backend, open) = Backend::new();
        let addr = serve(backend.clone(), None).await;
        let group = GrpcGroup::new();
        let client = coalescing_client(addr, &group).await;

        // A leader with 250 ms, then followers with 5 s or none.
        let leader = spawn_get(&client, query("slow", Some(Duration::from_millis(250))));
        until(|| backend.gets() == 1).await;
        let followers: Vec<_> = (0..4)
            .map(|i| {
                let timeout = (i % 2 == 0).then_some(Duration::from_secs(5));
                spawn_get(&client, query("slow", timeout))
            })
            .collect();
        until(|| group.stats().waiters == 5).await;

        // The leader gives up at its deadline; the call goes on.
        let status = leader.await.unwrap().expect_err("its deadline passes");
        assert_eq!(status.code(), Code::DeadlineExceeded);
        assert_eq!(status.message(), "deadline exceeded", "it waited on no one");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(backend.count(|c| &c.gets_dropped), 0);
        open.send_replace(true);

        // Every follower gets the reply; the shared call carried no
        // deadline of its leader's.
        for outcome in outcomes(followers).await {
            assert_eq!(outcome.unwrap().get_ref().text, "echo slow");
        }
        assert_eq!(backend.gets(), 1);
        assert!(backend.seen()[0].get("grpc-timeout").is_none());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_server_the_leaders_deadline_does_not_fail_followers_within_theirs() {
    bounded(async {
        let (backend, open) = Backend::new();
        let group = GrpcGroup::new();
        let addr = serve(backend.clone(), Some(group.clone())).await;

        // Plain clients: a leader with 250 ms, followers with 5 s.
        let leader = spawn_get(
            &client(addr).await,
            query("slow", Some(Duration::from_millis(250))),
        );
        until(|| backend.gets() == 1).await;
        let mut followers = Vec::new();
        for _ in 0..3 {
            let client = client(addr).await;
            followers.push(spawn_get(
                &client,
                query("slow", Some(Duration::from_secs(5))),
            ));
        }
        until(|| group.stats().waiters == 4).await;

        // The leader's own client gives up at its deadline (tonic calls that
        // `CANCELLED` on the client side); the call goes on for the others.
        let status = leader.await.unwrap().expect_err("its deadline passes");
        assert!(matches!(
            status.code(),
            Code::Cancelled | Code::DeadlineExceeded
        ));
        until(|| group.stats().waiters == 3).await;
        assert_eq!(backend.count(|c| &c.gets_dropped), 0);
        open.send_replace(true);

        for outcome in outcomes(followers).await {
            assert_eq!(outcome.unwrap().get_ref().text, "echo slow");
        }
        assert_eq!(backend.gets(), 1);
        assert_eq!(backend.count(|c| &c.gets_finished), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_caller_has_left_the_shared_rpc_is_cancelled() {
    bounded(async {
        let (backend, _open) = Backend::new();
        let addr = serve(backend.clone(), None).await;
        let group = GrpcGroup::new();
        let client = coalescing_client(addr, &group).await;

        // Three callers, each with 100 ms, and a server that never answers.
        let tasks = (0..3)
            .map(|_| spawn_get(&client, query("never", Some(Duration::from_millis(100)))))
            .collect();
        for outcome in outcomes(tasks).await {
            assert_eq!(outcome.unwrap_err().code(), Code::DeadlineExceeded);
        }

        // The one RPC is cancelled: its handler is dropped, the key is free.
        until(|| backend.count(|c| &c.gets_dropped) == 1).await;
        assert_eq!(backend.gets(), 1);
        assert!(group.is_empty());
    })
    .await;
}

// --- malformed frames ---

/// A successful reply, its status in its head, with `body`.
fn ok_reply(body: Body) -> http::Response<Body> {
    http::Response::builder()
        .header("content-type", "application/grpc")
        .header("grpc-status", "0")
        .body(body)
        .expect("a response")
}

/// A unary `Get` call as a client sends it, with `frame` as its body: a
/// message's prefix and bytes.
fn get_request(frame: Vec<u8>) -> http::Request<Body> {
    http::Request::post("http://localhost/echo.Echo/Get")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Body::new(http_body_util::Full::new(Bytes::from(frame))))
        .expect("a request")
}

/// Two identical unary calls sent straight through the server layer, whose
/// message carries compression flag `flag`: how many reach the service.
async fn calls_made_with_flag(flag: u8) -> usize {
    use tower::ServiceExt;

    let group = GrpcGroup::new();
    let made = Arc::new(AtomicUsize::new(0));
    let (open, gate) = watch::channel(false);
    let inner = {
        let made = Arc::clone(&made);
        tower::service_fn(move |_req: http::Request<Body>| {
            made.fetch_add(1, Ordering::SeqCst);
            let mut gate = gate.clone();
            async move {
                gate.wait_for(|open| *open).await.expect("the gate stays");
                Ok::<_, Infallible>(ok_reply(Body::empty()))
            }
        })
    };
    let layer = SingleflightLayer::grpc(Body::new as MakeBody).with_group(group.clone());
    let svc = ServiceBuilder::new().layer(layer).service(inner);
    let request = || get_request(vec![flag, 0, 0, 0, 2, b'h', b'i']);
    let first = tokio::spawn(svc.clone().oneshot(request()));
    let second = tokio::spawn(svc.oneshot(request()));

    // Both calls are in: at the service, or waiting for the one that is.
    until(|| made.load(Ordering::SeqCst) + group.stats().followers as usize >= 2).await;
    open.send(true).expect("a receiver");
    for task in [first, second] {
        let res = task.await.expect("a task").expect("a response");
        assert_eq!(res.status(), 200);
    }
    made.load(Ordering::SeqCst)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_whose_own_call_panics_gets_internal_like_any_waiter() {
    use tower::ServiceExt;

    bounded(async {
        // The first call answers with two messages, which are never shared;
        // each follower's own call then panics.
        let group = GrpcGroup::new();
        let made = Arc::new(AtomicUsize::new(0));
        let (open, gate) = watch::channel(false);
        let inner = {
            let made = Arc::clone(&made);
            tower::service_fn(move |_req: http::Request<Body>| {
                let first = made.fetch_add(1, Ordering::SeqCst) == 0;
                let mut gate = gate.clone();
                async move {
                    assert!(first, "the service fell over");
                    gate.wait_for(|open| *open).await.expect("the gate stays");
                    let two = Bytes::from_static(&[0, 0, 0, 0, 1, b'a', 0, 0, 0, 0, 1, b'b']);
                    Ok::<_, Infallible>(ok_reply(Body::new(http_body_util::Full::new(two))))
                }
            })
        };
        let layer = SingleflightLayer::grpc(Body::new as MakeBody).with_group(group.clone());
        let svc = ServiceBuilder::new().layer(layer).service(inner);
        let tasks: Vec<_> = (0..3)
            .map(|_| {
                tokio::spawn(
                    svc.clone()
                        .oneshot(get_request(vec![0, 0, 0, 0, 2, b'h', b'i'])),
                )
            })
            .collect();
        until(|| group.stats().waiters == 3).await;
        open.send(true).expect("a receiver");

        // The leader gets its stream; each follower, INTERNAL.
        let mut statuses = Vec::new();
        for task in tasks {
            let res = task.await.expect("no caller's task panics");
            let res = res.expect("a response");
            let status = res.headers().get("grpc-status").cloned();
            statuses.push(status.map_or("0 in trailers".to_owned(), |s| {
                s.to_str().expect("ASCII").to_owned()
            }));
        }
        statuses.sort_unstable();
        assert_eq!(statuses, ["0", "13", "13"]);
        assert_eq!(made.load(Ordering::SeqCst), 3);
        assert!(group.is_empty());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_with_an_undefined_compression_flag_is_never_coalesced() {
    bounded(async {
        assert_eq!(calls_made_with_flag(0).await, 1, "plain messages coalesce");
        assert_eq!(calls_made_with_flag(1).await, 1, "compressed ones too");
        assert_eq!(
            calls_made_with_flag(0xff).await,
            2,
            "a malformed one went through"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clone_of_the_layer_given_other_settings_leads_flights_of_its_own() {
    use tower::{Layer, ServiceExt};

    bounded(async {
        // The original's call waits at a gate; each changed clone's inner
        // service answers at once, with the same call.
        let (open, gate) = watch::channel(false);
        let gated = tower::service_fn(move |_req: http::Request<Body>| {
            let mut gate = gate.clone();
            async move {
                gate.wait_for(|open| *open).await.expect("the gate stays");
                Ok::<_, Infallible>(ok_reply(Body::empty()))
            }
        });
        let at_once = tower::service_fn(move |_req: http::Request<Body>| async move {
            Ok::<_, Infallible>(ok_reply(Body::empty()))
        });
        let request = || get_request(vec![0, 0, 0, 0, 2, b'h', b'i']);
        let base = SingleflightLayer::grpc(Body::new as MakeBody);
        let svc = base.layer(gated);
        let own = svc.group().clone();
        let waiters = move || {
            let group = own.get::<GrpcRequestKey, FlightResponse<Body>>();
            group.map_or(0, |group| group.stats().waiters)
        };

        // A plain clone's service joins the original's flight.
        let original = tokio::spawn(svc.oneshot(request()));
        until(|| waiters() == 1).await;
        let joined = tokio::spawn(base.clone().layer(at_once).oneshot(request()));
        until(|| waiters() == 2).await;

        // Each changed clone's service leads a flight of its own.

        let changed = [
            base.clone().body_limit(1),
            base.clone().role_header(true),
            base.clone().message_limit(1024),
            base.clone().streaming_method("/other.Other/"),
        ];
        for layer in changed {
            let res = layer.layer(at_once).oneshot(request()).await;
            let res = res.expect("a response");
            let how = res.extensions().get::<Coalescing>().copied();
            assert_eq!(how.map(|how| how.role()), Some(Role::Leader), "{layer:?}");
        }
        open.send(true).expect("a receiver");
        for task in [original, joined] {
            let res = task.await.expect("a task").expect("a response");
            let how = res.extensions().get::<Coalescing>().copied();
            assert!(how.is_some_and(|how| how.is_shared()));
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_past_its_wait_limit_sends_what_is_left_of_its_deadline() {
    use tower::ServiceExt;
    use tower_singleflight::OnWaitLimit;

    bounded(async {
        // The service records each request's `grpc-timeout`; the first call
        // waits at a gate.
        let limit = Duration::from_millis(50);
        let group = GrpcGroup::new().follower_wait_limit(limit, OnWaitLimit::CallOwn);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (open, gate) = watch::channel(false);
        let inner = {
            let seen = Arc::clone(&seen);
            tower::service_fn(move |req: http::Request<Body>| {
                let timeout = req.headers().get("grpc-timeout").cloned();
                let first = {
                    let mut seen = seen.lock().unwrap();
                    seen.push(timeout);
                    seen.len() == 1
                };
                let mut gate = gate.clone();
                async move {
                    if first {
                        gate.wait_for(|open| *open).await.expect("the gate stays");
                    }
                    Ok::<_, Infallible>(ok_reply(Body::empty()))
                }
            })
        };
        let layer = SingleflightLayer::grpc(Body::new as MakeBody).with_group(group.clone());
        let svc = ServiceBuilder::new().layer(layer).service(inner);
        let within = |timeout: &'static str| {
            let mut req = get_request(vec![0, 0, 0, 0, 2, b'h', b'i']);
            let timeout = http::HeaderValue::from_static(timeout);
            req.headers_mut().insert("grpc-timeout", timeout);
            req
        };

        // The leader's call carries no caller's deadline; the follower's own
        // call, past its wait limit, carries what is left of its 5 s.
        let leader = tokio::spawn(svc.clone().oneshot(within("10S")));
        until(|| seen.lock().unwrap().len() == 1).await;
        let follower = svc.oneshot(within("5S")).await.expect("a response");
        let how = follower.extensions().get::<Coalescing>().copied();
        assert_eq!(how.map(|how| how.role()), Some(Role::Fallback));
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen[0], None, "the shared call carries no deadline");
        let sent = seen[1].as_ref().expect("the follower's call carries one");
        let sent = sent.to_str().expect("ASCII");
        let (digits, unit) = sent.split_at(sent.len() - 1);
        let per_unit = match unit {
            "u" => Duration::from_micros(1),
            "m" => Duration::from_millis(1),
            other => panic!("an unexpected unit in {other}"),
        };
        let left = per_unit * digits.parse::<u32>().expect("digits");
        assert!(left <= Duration::from_secs(5) - limit, "{sent}");
        assert!(left > Duration::from_secs(4), "{sent}");

        open.send(true).expect("a receiver");
        leader.await.expect("a task").expect("a response");
    })
    .await;
}
