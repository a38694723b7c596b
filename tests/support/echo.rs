//! A small gRPC service, `echo.Echo`, written by hand: its prost messages
//! and the tonic client and server glue that `tonic-build` would generate
//! from this `.proto`, so that no `protoc` is needed:
//!
//! ```proto
//! package echo;
//! service Echo {
//!   rpc Get(Query) returns (Reply);
//!   rpc Watch(Query) returns (stream Reply);
//!   rpc Collect(stream Query) returns (Reply);
//!   rpc Chat(stream Query) returns (stream Reply);
//! }
//! message Query { string text = 1; }
//! message Reply { string text = 1; uint32 call = 2; }
//! ```
//!
//! Used by `tests/grpc.rs` and `examples/grpc.rs`, each with `#[path]`.

#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::Stream;
use tonic::body::Body;
use tonic::client::GrpcService;
use tonic::codegen::{http, BoxFuture, StdError};
use tonic::server::{
    ClientStreamingService, NamedService, ServerStreamingService, StreamingService, UnaryService,
};
use tonic::{IntoRequest, IntoStreamingRequest, Request, Response, Status, Streaming};
use tonic_prost::ProstCodec;
use tower::Service;

// --- messages ---

/// What a caller asks.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Query {
    #[prost(string, tag = "1")]
    pub(crate) text: String,
}

/// What the server answers: some text, and the number of the call that made
/// it.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Reply {
    #[prost(string, tag = "1")]
    pub(crate) text: String,
    #[prost(uint32, tag = "2")]
    pub(crate) call: u32,
}

impl Query {
    pub(crate) fn new(text: impl Into<String>) -> Self {
        Self { text: text.into() }
    }
}

/// A stream of replies, as a streaming method returns it.
pub(crate) type Replies = Pin<Box<dyn Stream<Item = Result<Reply, Status>> + Send>>;

// --- the server ---

/// What an `echo.Echo` server does; what tonic-build would call the
/// service trait.
pub(crate) trait Echo: Send + Sync + 'static {
    fn get(
        &self,
        req: Request<Query>,
    ) -> impl Future<Output = Result<Response<Reply>, Status>> + Send;

    fn watch(
        &self,
        req: Request<Query>,
    ) -> impl Future<Output = Result<Response<Replies>, Status>> + Send;

    fn collect(
        &self,
        req: Request<Streaming<Query>>,
    ) -> impl Future<Output = Result<Response<Reply>, Status>> + Send;

    fn chat(
        &self,
        req: Request<Streaming<Query>>,
    ) -> impl Future<Output = Result<Response<Replies>, Status>> + Send;
}

/// The tower service that serves an [`Echo`] implementation.
pub(crate) struct EchoServer<T> {
    inner: Arc<T>,
}

impl<T> EchoServer<T> {
    pub(crate) fn new(inner: T) -> Self {
        Self {
            inner: Arc::new(inner),
        }
    }
}

impl<T> Clone for EchoServer<T> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<T> NamedService for EchoServer<T> {
    const NAME: &'static str = "echo.Echo";
}

impl<T: Echo> Service<http::Request<Body>> for EchoServer<T> {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let inner = Method(Arc::clone(&self.inner));
        let codec = ProstCodec::<Reply, Query>::default();
        let mut grpc = tonic::server::Grpc::new(codec);
        match req.uri().path() {
            "/echo.Echo/Get" => Box::pin(async move { Ok(grpc.unary(inner, req).await) }),
            "/echo.Echo/Watch" => {
                Box::pin(async move { Ok(grpc.server_streaming(inner, req).await) })
            }
            "/echo.Echo/Collect" => {
                Box::pin(async move { Ok(grpc.client_streaming(inner, req).await) })
            }
            "/echo.Echo/Chat" => Box::pin(async move { Ok(grpc.streaming(inner, req).await) }),
            _ => Box::pin(async { Ok(Status::unimplemented("no such method").into_http()) }),
        }
    }
}

/// One method of the service, as tonic's server wants it.
struct Method<T>(Arc<T>);

impl<T: Echo> UnaryService<Query> for Method<T> {
    type Response = Reply;
    type Future = BoxFuture<Response<Reply>, Status>;

    fn call(&mut self, req: Request<Query>) -> Self::Future {
        let inner = Arc::clone(&self.0);
        Box::pin(async move { inner.get(req).await })
    }
}

impl<T: Echo> ServerStreamingService<Query> for Method<T> {
    type Response = Reply;
    type ResponseStream = Replies;
    type Future = BoxFuture<Response<Replies>, Status>;

    fn call(&mut self, req: Request<Query>) -> Self::Future {
        let inner = Arc::clone(&self.0);
        Box::pin(async move { inner.watch(req).await })
    }
}

impl<T: Echo> ClientStreamingService<Query> for Method<T> {
    type Response = Reply;
    type Future = BoxFuture<Response<Reply>, Status>;

    fn call(&mut self, req: Request<Streaming<Query>>) -> Self::Future {
        let inner = Arc::clone(&self.0);
        Box::pin(async move { inner.collect(req).await })
    }
}

impl<T: Echo> StreamingService<Query> for Method<T> {
    type Response = Reply;
    type ResponseStream = Replies;
    type Future = BoxFuture<Response<Replies>, Status>;

    fn call(&mut self, req: Request<Streaming<Query>>) -> Self::Future {
        let inner = Arc::clone(&self.0);
        Box::pin(async move { inner.chat(req).await })
    }
}

// --- the client ---

/// An `echo.Echo` client over any gRPC service: a `Channel`, or a stack
/// around one.
#[derive(Clone)]
pub(crate) struct EchoClient<T> {
    inner: tonic::client::Grpc<T>,
}

impl<T> EchoClient<T>
where
    T: GrpcService<Body>,
    T::Error: Into<StdError>,
    T::ResponseBody: http_body::Body<Data = Bytes> + Send + 'static,
    <T::ResponseBody as http_body::Body>::Error: Into<StdError> + Send,
{
    pub(crate) fn new(inner: T) -> Self {
        Self {
            inner: tonic::client::Grpc::new(inner),
        }
    }

    pub(crate) async fn get(
        &mut self,
        req: impl IntoRequest<Query>,
    ) -> Result<Response<Reply>, Status> {
        self.ready().await?;
        let path = http::uri::PathAndQuery::from_static("/echo.Echo/Get");
        let codec = ProstCodec::default();
        self.inner.unary(req.into_request(), path, codec).await
    }

    pub(crate) async fn watch(
        &mut self,
        req: impl IntoRequest<Query>,
    ) -> Result<Response<Streaming<Reply>>, Status> {
        self.ready().await?;
        let path = http::uri::PathAndQuery::from_static("/echo.Echo/Watch");
        let codec = ProstCodec::default();
        self.inner
            .server_streaming(req.into_request(), path, codec)
            .await
    }

    pub(crate) async fn collect(
        &mut self,
        req: impl IntoStreamingRequest<Message = Query>,
    ) -> Result<Response<Reply>, Status> {
        self.ready().await?;
        let path = http::uri::PathAndQuery::from_static("/echo.Echo/Collect");
        let codec = ProstCodec::default();
        let req = req.into_streaming_request();
        self.inner.client_streaming(req, path, codec).await
    }

    pub(crate) async fn chat(
        &mut self,
        req: impl IntoStreamingRequest<Message = Query>,
    ) -> Result<Response<Streaming<Reply>>, Status> {
        self.ready().await?;
        let path = http::uri::PathAndQuery::from_static("/echo.Echo/Chat");
        let codec = ProstCodec::default();
        self.inner
            .streaming(req.into_streaming_request(), path, codec)
            .await
    }

    async fn ready(&mut self) -> Result<(), Status> {
        let ready = self.inner.ready().await;
        ready.map_err(|e| Status::unknown(format!("service was not ready: {}", e.into())))
    }
}
