//! Request coalescing for HTTP services: axum, hyper and anything else that
//! speaks `http::Request` and `http::Response`.
//!
//! HTTP bodies are streams, not `Clone`, so the generic layer cannot share
//! them. [`SingleflightLayer::http`] makes an [`HttpLayer`] that can: the
//! leader's response is read once, buffered whole (status, headers, body and
//! trailers), and replayed byte for byte to every caller of the flight.
//!
//! # What coalesces
//!
//! The default key, [`HttpKey`], is safe with identities: method, authority,
//! path and query, and the `Authorization`, `Cookie` and
//! `Proxy-Authorization` headers, plus any further headers you name. Only
//! `GET` and `HEAD` requests without a body coalesce; everything else goes
//! straight to the inner service, untouched. Any [`KeyExtractor`] can
//! replace it.
//!
//! The key reads the URI as the layer sees it: on a router nested under a
//! prefix, which axum strips first, key on the URI the request arrived with
//! ([`HttpKey::uri_extension`]), or put the layer on the outer router.
//!
//! # What is shared, and with whom
//!
//! A response is kept for the leader alone, never replayed, when:
//!
//! - it sets a cookie (`Set-Cookie`);
//! - its `Vary` names `*`, or something that is no header name;
//! - the [`shareable`](HttpLayer::shareable) predicate rejects it;
//! - its body runs past the [body limit](HttpLayer::body_limit) (by default
//!   [`DEFAULT_BODY_LIMIT`], 1 MiB): the leader still gets all of it,
//!   streamed, the bytes read so far in front;
//! - its body fails while being read: the leader gets what was read, then
//!   the error, as it would have without the layer.
//!
//! A replay also skips each follower that differs from the leader in a
//! request header the response's `Vary` names.
//!
//! `Cache-Control` is not consulted: coalescing stores nothing beyond the
//! flight, and every caller it shares with has the same key, identity
//! headers included. A response marked `private` or `no-store` is shared
//! like any other. Where a server tells callers apart by something the key
//! does not hold, add it to the key; or keep such responses to their
//! leaders with a predicate:
//!
//! ```
//! use http::header::CACHE_CONTROL;
//! use tower_singleflight::SingleflightLayer;
//!
//! let layer = SingleflightLayer::http().shareable(|res| {
//!     let private = |v: &http::HeaderValue| v.to_str().is_ok_and(|v| v.contains("private"));
//!     !res.headers.get_all(CACHE_CONTROL).iter().any(private)
//! });
//! # drop(layer);
//! ```
//!
//! A follower that gets no replay makes its own call, with its own request.
//! So, unlike the generic layer (where a follower's request is dropped as it
//! joins), a follower here keeps its request until it knows whether the
//! flight's response suits it.
//!
//! # What each caller learns
//!
//! Every response carries a [`Coalescing`] extension saying how it was
//! produced, and, if [`role_header`](HttpLayer::role_header) is on, a
//! [`ROLE_HEADER`] saying the same to clients. The layer's own failures
//! become responses (500 for a panic, 503 for a wait limit), so the layer
//! stays infallible over infallible handlers: see [`HttpSingleflight`].
//!
//! # Examples
//!
//! ```
//! use axum::{routing::get, Router};
//! use tower_singleflight::SingleflightLayer;
//!
//! async fn report() -> String {
//!     // Something slow and expensive.
//!     "the report".to_owned()
//! }
//!
//! let app: Router = Router::new()
//!     .route("/report", get(report))
//!     .layer(SingleflightLayer::http());
//! # drop(app);
//! ```
//!
//! `examples/axum.rs` in the repository is a fuller service;
//! `examples/demo.rs` measures the layer on real traffic.
//!
//! [`SingleflightLayer::http`]: crate::SingleflightLayer::http
//! [`KeyExtractor`]: crate::key::KeyExtractor

mod body;
mod error;
mod future;
mod key;
mod layer;
mod response;
mod service;

pub use self::body::ResponseBody;
pub use self::error::HttpError;
pub use self::future::{Coalescing, ResponseFuture, ROLE_HEADER};
pub use self::key::{HttpKey, RequestKey, CONDITIONAL_HEADERS, IDENTITY_HEADERS};
pub use self::layer::{HttpLayer, DEFAULT_BODY_LIMIT, DEFAULT_BUFFER_WAIT};
pub use self::response::FlightResponse;
pub use self::service::{HttpCall, HttpSingleflight};

// What the gRPC layer builds on.
#[cfg(feature = "grpc")]
pub(crate) use self::{
    future::mark,
    layer::Settings,
    service::{take, RequestSlot},
};
