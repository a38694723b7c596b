//! Request coalescing for tower services: while one call for a key is in
//! flight, further requests with an equal key wait for it and share its
//! outcome.
//!
//! A cache miss on a hot key, a retry storm or a burst of identical page
//! loads can send the same expensive request to a backend hundreds of times
//! at once. [`SingleflightLayer`] maps each request to a key with an
//! extractor you supply. The first request for a key (the leader) calls the
//! inner service; requests that arrive with an equal key while that call is
//! in progress (followers) never reach the inner service, and each receives
//! the leader's outcome. The key is free again the moment the call finishes:
//! this is coalescing, not caching. It is the idea of Go's
//! `golang.org/x/sync/singleflight`, as a tower layer, and as a standalone
//! [`Group`] for any async call.
//!
//! # Examples
//!
//! ```
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use std::sync::Arc;
//! use std::time::Duration;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_singleflight::SingleflightLayer;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let calls = Arc::new(AtomicUsize::new(0));
//! let counter = Arc::clone(&calls);
//! let svc = ServiceBuilder::new()
//!     .layer(SingleflightLayer::new(|user: &u64| *user))
//!     .service(service_fn(move |user: u64| {
//!         counter.fetch_add(1, Ordering::SeqCst);
//!         async move {
//!             tokio::time::sleep(Duration::from_millis(20)).await;
//!             Ok::<_, std::io::Error>(format!("profile of {user}"))
//!         }
//!     }));
//!
//! // Ten concurrent requests for the same user...
//! let calls_made = (0..10).map(|_| svc.clone().oneshot(7));
//! let profiles = futures::future::join_all(calls_made).await;
//!
//! // ...all get the profile, from one inner call.
//! assert!(profiles.iter().all(|p| p.as_deref().unwrap() == "profile of 7"));
//! assert_eq!(calls.load(Ordering::SeqCst), 1);
//! # }
//! ```
//!
//! For an axum service, see `examples/axum.rs` in the repository, and the
//! [`http`] module.
//!
//! # The contract
//!
//! - At most one inner call per key at any moment; it is made once, with
//!   the leader's request. Followers' requests are dropped as they join
//!   (HTTP followers keep theirs until they know the response suits them).
//! - The call goes on while any caller still waits for it, whoever leaves
//!   first, and is dropped when the last one leaves (or, opted in, runs to
//!   completion).
//! - Every caller waiting when the call finishes gets its outcome: the
//!   response (which must be `Clone`) or an [`Error`] through which the
//!   inner error is reachable. A panic in the call reaches every waiter as an
//!   error; nothing hangs, the key is freed.
//! - Followers are woken once, when the outcome is ready, and never take
//!   the inner service's capacity.
//! - Keys are compared with `Eq`, hashed with a randomly keyed hasher, and
//!   never logged.
//!
//! # Features
//!
//! - `http` (default): [`SingleflightLayer::http`] and the [`http`] module,
//!   which make HTTP responses shareable and key requests safely.
//! - `grpc` (default): [`SingleflightLayer::grpc`] and the [`grpc`] module,
//!   which coalesce unary gRPC calls on tonic clients and servers.
//! - `tracing`: a span per flight and `trace`/`debug` events for leaders,
//!   followers and failures, with a hash of the key, never the key.
//!
//! [`SingleflightLayer`]: crate::SingleflightLayer
//! [`Group`]: crate::Group
//! [`Error`]: crate::Error

#![doc(test(attr(deny(warnings))))]
#![cfg_attr(docsrs, feature(doc_auto_cfg))]

pub mod error;
pub mod future;
mod group;
#[cfg(feature = "grpc")]
pub mod grpc;
#[cfg(feature = "http")]
pub mod http;
mod inflight;
pub mod key;
mod layer;
mod service;
mod sync;

pub use crate::error::{BoxError, Error};
pub use crate::group::{Group, GroupSource, OnWaitLimit, OwnGroup, Role, Stats, Work};
pub use crate::layer::SingleflightLayer;
pub use crate::service::Singleflight;
