//! A tonic server and tonic clients in one process, over loopback HTTP/2:
//! a burst of identical unary calls, without the layer, with it on the
//! client's channel, and with it on the server.
//!
//! Run with `cargo run --example grpc`. It prints, for each set-up, how many
//! calls the clients made and how many RPCs the server served. On a client,
//! the layer coalesces that client's own calls (one RPC per query and
//! client); on the server, the calls of every client (one RPC per query).
//! The service
//! (`echo.Echo`, in `tests/support/echo.rs`) is written by hand, so no
//! `protoc` is needed.

#![allow(clippy::print_stdout)] // An example reports on standard output.

#[path = "../tests/support/echo.rs"]
mod echo;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::join_all;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::body::Body;
use tonic::client::GrpcService;
use tonic::codegen::StdError;
use tonic::transport::{Channel, Endpoint, Server};
use tonic::{Request, Response, Status, Streaming};
use tower::{BoxError, ServiceBuilder};
use tower_singleflight::SingleflightLayer;

use echo::{Echo, EchoClient, EchoServer, Query, Replies, Reply};

/// Calls per run, over this many distinct queries, from this many clients.
const CALLS: usize = 200;
const QUERIES: usize = 5;
const CLIENTS: usize = 10;

/// The server: a lookup that takes 50 ms and counts the RPCs it serves.
#[derive(Clone, Default)]
struct Lookup {
    served: Arc<AtomicUsize>,
}

impl Echo for Lookup {
    async fn get(&self, req: Request<Query>) -> Result<Response<Reply>, Status> {
        let n = self.served.fetch_add(1, Ordering::SeqCst) + 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let text = format!("value of {}", req.into_inner().text);
        let call = u32::try_from(n).unwrap_or(u32::MAX);
        Ok(Response::new(Reply { text, call }))
    }

    async fn watch(&self, _: Request<Query>) -> Result<Response<Replies>, Status> {
        Err(Status::unimplemented("only `Get` is served here"))
    }

    async fn collect(&self, _: Request<Streaming<Query>>) -> Result<Response<Reply>, Status> {
        Err(Status::unimplemented("only `Get` is served here"))
    }

    async fn chat(&self, _: Request<Streaming<Query>>) -> Result<Response<Replies>, Status> {
        Err(Status::unimplemented("only `Get` is served here"))
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Where {
    Nowhere,
    Client,
    Server,
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    for layer in [Where::Nowhere, Where::Client, Where::Server] {
        // The server, on a fresh loopback port, with the layer if asked.
        let lookup = Lookup::default();
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let incoming = TcpListenerStream::new(listener);
        let server = EchoServer::new(lookup.clone());
        if layer == Where::Server {
            let router = Server::builder()
                .layer(SingleflightLayer::grpc(Body::new))
                .add_service(server);
            tokio::spawn(router.serve_with_incoming(incoming));
        } else {
            let router = Server::builder().add_service(server);
            tokio::spawn(router.serve_with_incoming(incoming));
        }

        // The clients: a few of them, each on a connection of its own and
        // with the layer if asked; every call at once, over a few queries.
        let started = Instant::now();
        let mut calls = Vec::new();
        for client in 0..CLIENTS {
            let channel = connect(addr).await?;
            if layer == Where::Client {
                let svc = ServiceBuilder::new()
                    .layer(SingleflightLayer::grpc(Body::new))
                    .service(channel);
                calls.extend(burst(&EchoClient::new(svc), client));
            } else {
                calls.extend(burst(&EchoClient::new(channel), client));
            }
        }
        let outcomes = join_all(calls).await;
        let failed = outcomes.iter().filter(|o| !matches!(o, Ok(Ok(_)))).count();

        let label = match layer {
            Where::Nowhere => "without the layer",
            Where::Client => "on the clients",
            Where::Server => "on the server",
        };
        println!(
            "{label:>17}: {CALLS} calls made, {} RPCs served, {failed} failed, {:?}",
            lookup.served.load(Ordering::SeqCst),
            started.elapsed(),
        );
    }
    Ok(())
}

/// The calls of one client, each in a task of its own.
fn burst<T>(client: &EchoClient<T>, n: usize) -> Vec<JoinHandle<Result<Response<Reply>, Status>>>
where
    T: GrpcService<Body> + Clone + Send + 'static,
    T::Error: Into<StdError>,
    T::Future: Send,
    T::ResponseBody: http_body::Body<Data = Bytes> + Send + 'static,
    <T::ResponseBody as http_body::Body>::Error: Into<StdError> + Send,
{
    (0..CALLS / CLIENTS)
        .map(|i| {
            let mut client = client.clone();
            let query = Query::new(format!("key-{}", (n + i) % QUERIES));
            tokio::spawn(async move { client.get(query).await })
        })
        .collect()
}

async fn connect(addr: SocketAddr) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await
}
