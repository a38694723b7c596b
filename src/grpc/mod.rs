//! Request coalescing for gRPC: identical concurrent unary calls through a
//! tonic client or server become one call.
//!
//! [`SingleflightLayer::grpc`] makes a [`GrpcLayer`]. It needs neither tonic
//! nor prost: it works on `http::Request` and `http::Response`, reads a
//! call's one message to learn its key, and shares the leader's response
//! the way the [HTTP layer](crate::http) does: buffered once, with its
//! trailers, and replayed byte for byte. The one thing it needs from you is
//! how to make the inner service's request body from the one it rebuilt:
//! for tonic, `tonic::body::Body::new`.
//!
//! # Examples
//!
//! On a tonic client, around its `Channel`:
//!
//! ```no_run
//! use tonic::body::Body;
//! use tonic::transport::Endpoint;
//! use tower::ServiceBuilder;
//! use tower_singleflight::SingleflightLayer;
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), tonic::transport::Error> {
//! let channel = Endpoint::from_static("http://[::1]:50051").connect().await?;
//! let svc = ServiceBuilder::new()
//!     .layer(SingleflightLayer::grpc(Body::new))
//!     .service(channel);
//! // let mut client = GreeterClient::new(svc);
//! # let _ = svc;
//! # Ok(())
//! # }
//! ```
//!
//! On a tonic server:
//!
//! ```no_run
//! use tonic::body::Body;
//! use tonic::service::Routes;
//! use tonic::transport::Server;
//! use tower_singleflight::SingleflightLayer;
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), tonic::transport::Error> {
//! # let routes = Routes::default();
//! Server::builder()
//!     .layer(SingleflightLayer::grpc(Body::new))
//!     // .add_service(GreeterServer::new(greeter))
//!     .add_routes(routes)
//!     .serve("[::1]:50051".parse().unwrap())
//!     .await
//! # }
//! ```
//!
//! `examples/grpc.rs` in the repository runs both over loopback.
//!
//! # What coalesces
//!
//! A call coalesces when it is unary: a gRPC `POST` (its `content-type` is
//! `application/grpc`, with or without a `+format`; gRPC-Web's is not)
//! whose request body is exactly one message, and ends right after it.
//! The default key, [`GrpcKey`], is the method's path, the message's bytes
//! as encoded, the headers that say how messages are encoded, and the
//! caller's identity (`authorization`, as the HTTP layer does), plus any
//! metadata keys you name. Any [`KeyExtractor`] over a [`UnaryCall`] can
//! replace it. Everything else passes through, untouched.
//!
//! Only the leader's request is sent. A follower keeps its own until it
//! knows the response suits it, as in the HTTP layer.
//!
//! # What every caller gets
//!
//! The leader's response, replayed exactly: its headers, its message, and
//! its trailers, so the status (code, message, details) and the trailing
//! metadata too. A failed call reaches every caller with the same status,
//! whether it came in trailers or in a trailers-only response. Every
//! response carries a [`Coalescing`] extension (a tonic client shows it in
//! a successful `Response`'s extensions), and, with
//! [`role_header`](GrpcLayer::role_header), an `x-singleflight` metadata
//! value.
//!
//! A response is not shared, and each follower makes its own call, when it
//! holds more than one message (it is a stream), when it is longer than the
//! [body limit](GrpcLayer::body_limit), or when it fails while being read.
//! The leader then gets it whole, streamed, the bytes read so far in front.
//!
//! # Streaming calls
//!
//! Nothing on the wire says that a method is unary. The layer tells by the
//! request body, and never waits long on a stream:
//!
//! - it waits up to [`message_wait`](GrpcLayer::message_wait) (100 ms by
//!   default) for the first message to be whole: a unary call's message
//!   comes right behind its head, and on a client it is there at once;
//! - past it, it waits up to [`end_wait`](GrpcLayer::end_wait) (5 ms by
//!   default) for the body to end.
//!
//! A call that does not pass both tests, whose message is longer than the
//! [message limit](GrpcLayer::message_limit), or whose message has a
//! compression flag gRPC does not define (neither 0 nor 1), passes through
//! for the inner service to judge: the bytes
//! read so far are replayed in front of the rest of its body, and it goes on
//! as it would have without the layer. So a client- or bidirectional-
//! streaming call is held up by `end_wait` at most; one whose client waits
//! for the server's answer before sending anything, by `message_wait`.
//!
//! Some streams look exactly like a unary call from the request side: a
//! server-streaming call (one message, then the end), or a client-streaming
//! call of one message. The latter has one response, as a unary call does,
//! and shares it safely. The former does not, so **list every
//! server-streaming method** with [`streaming_method`], or list the unary
//! ones with [`unary_method`] to let only those coalesce. Listing a
//! bidirectional method whose client waits for the server spares it the
//! `message_wait`.
//!
//! An unlisted server-streaming call is still never corrupted: its response
//! is shared only if it holds at most one message. Otherwise the leader gets
//! its stream, from the second message on as it comes, and each follower
//! makes its own call. But the first message reaches the leader only with
//! the second, so a long-lived stream must be listed.
//!
//! # Deadlines
//!
//! Each caller keeps its own deadline, its `grpc-timeout`, which is never
//! part of the key. The shared call carries no deadline: the layer removes
//! the leader's `grpc-timeout` from the request it sends, and the call lasts
//! while any caller waits for it. It is dropped, which cancels the RPC, when
//! the last one leaves. Each caller waits only until its own deadline, then
//! gets `DEADLINE_EXCEEDED` alone; the others, the leader's followers
//! included, go on waiting. (On a tonic server, tonic's own timeout sits
//! outside the layer and ends the caller's wait first, so that caller sees
//! tonic's status for it.) A follower that makes a call of its own, because
//! the response could not be shared with it or past its
//! [wait limit](GrpcLayer::follower_wait_limit), sends the time it has left
//! as its `grpc-timeout`.
//!
//! [`SingleflightLayer::grpc`]: crate::SingleflightLayer::grpc
//! [`KeyExtractor`]: crate::key::KeyExtractor
//! [`Coalescing`]: crate::http::Coalescing
//! [`streaming_method`]: GrpcLayer::streaming_method
//! [`unary_method`]: GrpcLayer::unary_method

mod body;
mod future;
mod key;
mod layer;
mod message;
mod service;
mod status;

pub use self::body::RequestBody;
pub use self::future::ResponseFuture;
pub use self::key::{GrpcKey, GrpcRequestKey, UnaryCall, ENCODING_HEADERS};
pub use self::layer::{GrpcLayer, DEFAULT_END_WAIT, DEFAULT_MESSAGE_LIMIT, DEFAULT_MESSAGE_WAIT};
pub use self::service::GrpcSingleflight;

// What the HTTP layer's shared call needs: a follower's own call sends what
// is left of its deadline.
pub(crate) use self::status::restore_deadline;
