//! [`HttpLayer`], the HTTP configuration of [`SingleflightLayer`].

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::response;
use tower_layer::Layer;

use crate::group::sealed::Sealed;
use crate::group::{Config, Group, OnWaitLimit, OwnGroup};
use crate::http::key::HttpKey;
use crate::http::response::{Overflow, Predicate};
use crate::http::service::HttpSingleflight;
use crate::layer::SingleflightLayer;

/// How large a response body may be and still be buffered and shared: 1 MiB.
///
/// Over it, the leader streams its response whole, and followers make their
/// own calls. Set another limit with [`HttpLayer::body_limit`].
pub const DEFAULT_BODY_LIMIT: usize = 1024 * 1024;

/// How long, by default, the leader's response body may take to arrive
/// whole before it goes to the leader alone, streamed as it comes, and each
/// follower makes its own call: half a second. See
/// [`HttpLayer::buffer_wait`].
pub const DEFAULT_BUFFER_WAIT: Duration = Duration::from_millis(500);

/// Wraps HTTP services in [`HttpSingleflight`]: [`SingleflightLayer`] made
/// for `http::Request` and `http::Response`, whose bodies are not `Clone`.
///
/// Made by [`SingleflightLayer::http`] with the default key ([`HttpKey`]), or
/// by [`HttpLayer::new`] with a key of your own. The leader's response is
/// read once, up to a [body limit](HttpLayer::body_limit), and replayed to
/// every caller; responses that must not be shared are not. See the
/// [module docs](crate::http) for the whole story.
///
/// Every service one layer wraps shares its flights (axum wraps each route,
/// and each route again for every connection): one group serves them all,
/// made at the first request. To read its counters, or to share flights
/// between layers, hand it a group with
/// [`with_group`](HttpLayer::with_group).
///
/// A clone of the layer shares its group; a clone given other settings
/// or another key (by any of the builder methods) gets a group of its own,
/// so that a follower never gets a response its own layer would not share.
/// A group handed over with [`with_group`](HttpLayer::with_group) stays
/// shared whatever the settings.
///
/// # Panics
///
/// The layer's own group serves up to four key and response body types
/// between the services that share it (under axum there is one: every
/// route answers with `axum::body::Body`). A fifth panics at its first
/// request; give such services a layer or a group of their own.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use axum::{routing::get, Router};
/// use tower_singleflight::{OnWaitLimit, SingleflightLayer};
///
/// let app: Router = Router::new()
///     .route("/report", get(|| async { "an expensive report" }))
///     .layer(
///         SingleflightLayer::http()
///             .body_limit(256 * 1024)
///             .role_header(true)
///             .follower_wait_limit(Duration::from_secs(5), OnWaitLimit::CallOwn),
///     );
/// # drop(app);
/// ```
#[derive(Clone)]
pub struct HttpLayer<K = HttpKey, G = OwnGroup> {
    extractor: K,
    group: G,
    settings: Arc<Settings>,
}

/// What the HTTP layer does with responses, shared by its services.
#[derive(Clone)]
pub(crate) struct Settings {
    /// The most body bytes buffered for sharing.
    pub(crate) body_limit: usize,
    /// A user's further test of whether a response may be shared.
    pub(crate) shareable: Option<Predicate>,
    /// Whether responses carry the [`ROLE_HEADER`](crate::http::ROLE_HEADER).
    pub(crate) role_header: bool,
    /// A protocol's further rule that stops buffering (the gRPC layer stops
    /// at a second message); none for plain HTTP.
    pub(crate) overflow: Option<Overflow>,
    /// How long a response body may take to arrive whole before it goes to
    /// its own caller, streamed, instead.
    pub(crate) buffer_wait: Duration,
}

impl SingleflightLayer<HttpKey> {
    /// The HTTP configuration: coalesces `GET` and `HEAD` requests on an
    /// [`HttpKey`], buffers and replays responses up to
    /// [`DEFAULT_BODY_LIMIT`], and answers its own failures with 500 and 503
    /// responses.
    ///
    /// Runs on a tokio runtime with its time driver, as `#[tokio::main]` and
    /// axum's servers have: buffering a response waits against a deadline.
    /// On a runtime built without it, each coalesced request fails with a
    /// 500.
    ///
    /// # Examples
    ///
    /// ```
    /// use axum::{routing::get, Router};
    /// use tower_singleflight::SingleflightLayer;
    ///
    /// let app: Router = Router::new()
    ///     .route("/", get(|| async { "hello" }))
    ///     .layer(SingleflightLayer::http());
    /// # drop(app);
    /// ```
    pub fn http() -> HttpLayer {
        HttpLayer::new(HttpKey::new())
    }
}

impl<K> HttpLayer<K> {
    /// Creates a layer that keys requests with `extractor`.
    ///
    /// Any [`KeyExtractor`] over `http::Request<B>` works, such as a closure
    /// or an [`HttpKey`] with more headers. A key must hold everything the
    /// response depends on, including who asks.
    ///
    /// [`KeyExtractor`]: crate::key::KeyExtractor
    pub fn new(extractor: K) -> Self {
        let settings = Settings {
            body_limit: DEFAULT_BODY_LIMIT,
            shareable: None,
            role_header: false,
            overflow: None,
            buffer_wait: DEFAULT_BUFFER_WAIT,
        };
        Self {
            extractor,
            group: OwnGroup::new(Config::default()),
            settings: Arc::new(settings),
        }
    }

    /// Limits how long followers wait for a flight; see
    /// [`Group::follower_wait_limit`]. A follower failing with
    /// [`OnWaitLimit::Fail`] gets a 503 response.
    pub fn follower_wait_limit(mut self, limit: Duration, then: OnWaitLimit) -> Self {
        self.group
            .configure(|config| config.wait_limit = Some((limit, then)));
        self
    }

    /// Lets abandoned flights run to completion; see
    /// [`Group::run_to_completion`].
    pub fn run_to_completion(mut self, enabled: bool) -> Self {
        self.group
            .configure(|config| config.run_to_completion = enabled);
        self
    }

    /// Makes every service this layer wraps share `group`, whose settings
    /// then apply. Its type is `Group<RequestKey, FlightResponse<B>>` for the
    /// default key and an inner response body `B`.
    pub fn with_group<Key, T>(self, group: Group<Key, T>) -> HttpLayer<K, Group<Key, T>> {
        HttpLayer {
            extractor: self.extractor,
            group,
            settings: self.settings,
        }
    }
}

impl<K, G: Sealed> HttpLayer<K, G> {
    /// Keys requests with `extractor` instead.
    pub fn key<K2>(mut self, extractor: K2) -> HttpLayer<K2, G> {
        self.group.settings_changed();
        HttpLayer {
            extractor,
            group: self.group,
            settings: self.settings,
        }
    }

    /// Waits at most `wait` (by default [`DEFAULT_BUFFER_WAIT`]), from the
    /// response's head, for its body to arrive whole and be shared.
    ///
    /// The leader's response reaches no one until its body is read, so a
    /// body that streams slowly (progress reports, long polls) would hold
    /// the leader back, and one that never ends (server-sent events) would
    /// hold it for ever. Past the wait, the leader gets the response
    /// streamed, what was read first, and each follower makes its own
    /// call. Responses of type `text/event-stream` are never buffered.
    /// Needs tokio's time driver, unless the wait is too long to add to the
    /// current time (such as [`Duration::MAX`]): then there is no limit.
    pub fn buffer_wait(mut self, wait: Duration) -> Self {
        self.settings_mut().buffer_wait = wait;
        self
    }

    /// Buffers and shares response bodies of up to `bytes` bytes (by default
    /// [`DEFAULT_BODY_LIMIT`]).
    ///
    /// A longer body is never truncated: the leader streams it whole, the
    /// bytes read so far in front, and each follower makes its own call.
    pub fn body_limit(mut self, bytes: usize) -> Self {
        self.settings_mut().body_limit = bytes;
        self
    }

    /// Shares a response only if `predicate` holds for its head, besides the
    /// built-in rules; replaces any earlier predicate.
    ///
    /// A response it rejects goes to the leader alone, and each follower
    /// makes its own call.
    ///
    /// # Examples
    ///
    /// ```
    /// use tower_singleflight::SingleflightLayer;
    ///
    /// // Share successes only: every caller retries a failure on its own.
    /// let layer = SingleflightLayer::http().shareable(|res| res.status.is_success());
    /// # drop(layer);
    /// ```
    pub fn shareable<F>(mut self, predicate: F) -> Self
    where
        F: Fn(&response::Parts) -> bool + Send + Sync + 'static,
    {
        self.settings_mut().shareable = Some(Arc::new(predicate));
        self
    }

    /// Whether every response carries a [`ROLE_HEADER`] saying how it was
    /// produced, for clients to see; off by default.
    ///
    /// [`ROLE_HEADER`]: crate::http::ROLE_HEADER
    pub fn role_header(mut self, enabled: bool) -> Self {
        self.settings_mut().role_header = enabled;
        self
    }
}

impl<K, G: Sealed> HttpLayer<K, G> {
    /// The settings, to change: the layer's own group stays with the
    /// clones that keep the old ones.
    fn settings_mut(&mut self) -> &mut Settings {
        self.group.settings_changed();
        Arc::make_mut(&mut self.settings)
    }
}

impl<S, K: Clone> Layer<S> for HttpLayer<K> {
    type Service = HttpSingleflight<S, K>;

    fn layer(&self, inner: S) -> Self::Service {
        // Every service this layer wraps shares its flights: axum applies a
        // router's layers to each route, and again for each connection, and
        // requests on all of them must meet. The key (method, authority,
        // path) keeps different routes' requests apart.
        let (extractor, settings) = (self.extractor.clone(), Arc::clone(&self.settings));
        HttpSingleflight::new(inner, extractor, self.group.clone(), settings)
    }
}

impl<S, K: Clone, Key, T> Layer<S> for HttpLayer<K, Group<Key, T>> {
    type Service = HttpSingleflight<S, K, Group<Key, T>>;

    fn layer(&self, inner: S) -> Self::Service {
        let (extractor, settings) = (self.extractor.clone(), Arc::clone(&self.settings));
        HttpSingleflight::new(inner, extractor, self.group.clone(), settings)
    }
}

impl<K, G: fmt::Debug> fmt::Debug for HttpLayer<K, G> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpLayer")
            .field("group", &self.group)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("body_limit", &self.body_limit)
            .field("shareable", &self.shareable.as_ref().map(|_| ".."))
            .field("role_header", &self.role_header)
            .field("overflow", &self.overflow.is_some())
            .finish()
    }
}
