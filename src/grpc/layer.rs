//! [`GrpcLayer`], the gRPC configuration of [`SingleflightLayer`].

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::header::CONTENT_TYPE;
use http::{Method, Request};
use http_body::Body;
use tower_layer::Layer;

use crate::group::sealed::Sealed;
use crate::group::{Config, Group, OnWaitLimit, OwnGroup};
use crate::grpc::body::RequestBody;
use crate::grpc::key::GrpcKey;
use crate::grpc::message::{past_one_message, Waits};
use crate::grpc::service::GrpcSingleflight;
use crate::http::{Settings, DEFAULT_BODY_LIMIT};
use crate::layer::SingleflightLayer;

/// How long a request message may be and still be read for its key: 64 KiB.
///
/// A call with a longer message passes through, untouched. Set another
/// limit with [`GrpcLayer::message_limit`].
pub const DEFAULT_MESSAGE_LIMIT: usize = 64 * 1024;

/// How long the layer waits for a request's first message to be whole before
/// it takes the call for a stream: 100 ms.
///
/// Set another wait with [`GrpcLayer::message_wait`].
pub const DEFAULT_MESSAGE_WAIT: Duration = Duration::from_millis(100);

/// How long the layer waits, once a request's first message is whole, for
/// the request to end before it takes the call for a stream: 5 ms.
///
/// Set another wait with [`GrpcLayer::end_wait`].
pub const DEFAULT_END_WAIT: Duration = Duration::from_millis(5);

/// Wraps gRPC services in [`GrpcSingleflight`]: identical concurrent unary
/// calls become one call of the inner service, and every caller gets its
/// response, status and trailers.
///
/// Made by [`SingleflightLayer::grpc`]. It goes on a tonic client, around a
/// `Channel`, or on a tonic server, with `Server::builder().layer(..)`;
/// `make_body` turns the bodies the layer rebuilds into the inner service's
/// own body type (for tonic, `tonic::body::Body::new`). See the
/// [module docs](crate::grpc) for what coalesces and how streams, statuses
/// and deadlines fare.
///
/// Every service one layer wraps shares its flights, and so do the
/// layer's clones; a clone given other settings or another key (by any of
/// the builder methods) gets a group of its own. A group handed over with
/// [`with_group`](GrpcLayer::with_group) stays shared whatever the
/// settings.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use tower_singleflight::{OnWaitLimit, SingleflightLayer};
///
/// let layer = SingleflightLayer::grpc(tonic::body::Body::new)
///     // Calls of these methods always pass through, untouched.
///     .streaming_method("/chat.Chat/Subscribe")
///     .streaming_method("/logs.Logs/")
///     .message_limit(16 * 1024)
///     .follower_wait_limit(Duration::from_secs(5), OnWaitLimit::CallOwn);
/// # drop(layer);
/// ```
#[derive(Clone)]
pub struct GrpcLayer<M, K = GrpcKey, G = OwnGroup> {
    make_body: M,
    extractor: K,
    group: G,
    settings: Arc<GrpcSettings>,
}

/// What the gRPC layer does with calls, shared by its services.
#[derive(Clone)]
pub(crate) struct GrpcSettings {
    /// How responses are buffered and marked: the HTTP layer's settings,
    /// with the rule that a response of more than one message is a stream.
    pub(crate) http: Arc<Settings>,
    /// The longest request message read for a key.
    pub(crate) message_limit: usize,
    /// How long a request may take to show that it is one message.
    pub(crate) waits: Waits,
    /// Paths (or, ending in `/`, services) whose calls always pass through.
    streaming: Vec<Box<str>>,
    /// If any, the only paths (or services) whose calls may coalesce.
    unary: Vec<Box<str>>,
}

impl SingleflightLayer<GrpcKey> {
    /// The gRPC configuration: coalesces identical concurrent unary calls on
    /// a [`GrpcKey`], and replays each response, status and trailers to
    /// every caller. `make_body` turns the bodies the layer rebuilds into the
    /// inner service's request body type: `tonic::body::Body::new` for
    /// tonic.
    ///
    /// Runs on a tokio runtime with its time driver, as tonic's clients and
    /// servers do: reading a call's message and honouring its
    /// `grpc-timeout` wait against deadlines.
    ///
    /// # Examples
    ///
    /// ```
    /// use tower::ServiceBuilder;
    /// use tower_singleflight::SingleflightLayer;
    ///
    /// # async fn wire() -> Result<(), tonic::transport::Error> {
    /// let channel = tonic::transport::Endpoint::from_static("http://[::1]:50051")
    ///     .connect()
    ///     .await?;
    /// let svc = ServiceBuilder::new()
    ///     .layer(SingleflightLayer::grpc(tonic::body::Body::new))
    ///     .service(channel);
    /// // let client = MyServiceClient::new(svc);
    /// # drop(svc);
    /// # Ok(())
    /// # }
    /// # drop(wire());
    /// ```
    pub fn grpc<M, B>(make_body: M) -> GrpcLayer<M>
    where
        M: Fn(RequestBody<B>) -> B,
        B: Body,
    {
        GrpcLayer::new(make_body)
    }
}

impl<M> GrpcLayer<M> {
    /// Creates a layer that keys calls with a [`GrpcKey`] and rebuilds
    /// request bodies with `make_body`.
    ///
    /// The bound on `make_body` lets a generic function such as
    /// `tonic::body::Body::new` be passed as it is: its output type says
    /// which body it takes.
    pub fn new<B>(make_body: M) -> Self
    where
        M: Fn(RequestBody<B>) -> B,
        B: Body,
    {
        let http = Settings {
            body_limit: DEFAULT_BODY_LIMIT,
            shareable: None,
            role_header: false,
            overflow: Some(past_one_message),
            buffer_wait: crate::http::DEFAULT_BUFFER_WAIT,
        };
        let settings = GrpcSettings {
            http: Arc::new(http),
            message_limit: DEFAULT_MESSAGE_LIMIT,
            waits: Waits {
                message: DEFAULT_MESSAGE_WAIT,
                end: DEFAULT_END_WAIT,
            },
            streaming: Vec::new(),
            unary: Vec::new(),
        };
        Self {
            make_body,
            extractor: GrpcKey::new(),
            group: OwnGroup::new(Config::default()),
            settings: Arc::new(settings),
        }
    }
}

impl<M, K> GrpcLayer<M, K> {
    /// Limits how long followers wait for a flight; see
    /// [`Group::follower_wait_limit`]. A follower failing with
    /// [`OnWaitLimit::Fail`] gets the status `UNAVAILABLE`.
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
    /// then apply. Its type is `Group<GrpcRequestKey, FlightResponse<B>>`
    /// for the default key and an inner response body `B`.
    ///
    /// [`GrpcRequestKey`]: crate::grpc::GrpcRequestKey
    pub fn with_group<Key, T>(self, group: Group<Key, T>) -> GrpcLayer<M, K, Group<Key, T>> {
        GrpcLayer {
            make_body: self.make_body,
            extractor: self.extractor,
            group,
            settings: self.settings,
        }
    }
}

impl<M, K, G: Sealed> GrpcLayer<M, K, G> {
    /// Keys calls with `extractor` instead: any [`KeyExtractor`] over a
    /// [`UnaryCall`], such as a closure. A key must hold everything the
    /// response depends on, including who asks.
    ///
    /// [`KeyExtractor`]: crate::key::KeyExtractor
    /// [`UnaryCall`]: crate::grpc::UnaryCall
    pub fn key<K2>(mut self, extractor: K2) -> GrpcLayer<M, K2, G> {
        self.group.settings_changed();
        GrpcLayer {
            make_body: self.make_body,
            extractor,
            group: self.group,
            settings: self.settings,
        }
    }

    /// Lets calls of `method` always pass through, untouched: their bodies
    /// are not read. `method` is a path such as `/chat.Chat/Subscribe`, or a
    /// service such as `/chat.Chat/` (ending in `/`) for all its methods.
    ///
    /// List every server-streaming method, and every bidirectional one whose
    /// server speaks first: nothing on the wire tells them from unary calls
    /// (see the [module docs](crate::grpc#streaming-calls)).
    pub fn streaming_method(mut self, method: impl Into<Box<str>>) -> Self {
        self.settings_mut().streaming.push(method.into());
        self
    }

    /// Lets only the listed methods coalesce: once one is listed, calls of
    /// every other method pass through, untouched. `method` is a path or a
    /// service, as for [`streaming_method`](GrpcLayer::streaming_method).
    pub fn unary_method(mut self, method: impl Into<Box<str>>) -> Self {
        self.settings_mut().unary.push(method.into());
        self
    }

    /// Reads request messages of up to `bytes` bytes for their key (by
    /// default [`DEFAULT_MESSAGE_LIMIT`]); a call with a longer one passes
    /// through, its bytes read so far in front of the rest.
    pub fn message_limit(mut self, bytes: usize) -> Self {
        self.settings_mut().message_limit = bytes;
        self
    }

    /// Waits up to `wait` (by default [`DEFAULT_MESSAGE_WAIT`]) for a
    /// request's first message to be whole before taking the call for a
    /// stream and passing it through. Zero takes only a message that is
    /// there at once.
    ///
    /// A unary call's message comes right behind its head (on a client, it
    /// is there at once). A bidirectional stream's client may send nothing
    /// until the server has answered: unless the method is listed with
    /// [`streaming_method`](GrpcLayer::streaming_method), such a call starts
    /// this much later.
    pub fn message_wait(mut self, wait: Duration) -> Self {
        self.settings_mut().waits.message = wait;
        self
    }

    /// Waits up to `wait` (by default [`DEFAULT_END_WAIT`]) for a request to
    /// end after its first message before taking the call for a stream and
    /// passing it through. Zero takes only a request that has ended already.
    ///
    /// A unary call's request ends right after its message, but on a
    /// server the end may come in a frame of its own, a moment later.
    pub fn end_wait(mut self, wait: Duration) -> Self {
        self.settings_mut().waits.end = wait;
        self
    }

    /// Buffers and shares response bodies of up to `bytes` bytes (by default
    /// [`DEFAULT_BODY_LIMIT`]). A longer one goes to the leader alone,
    /// streamed whole, and each follower makes its own call.
    pub fn body_limit(mut self, bytes: usize) -> Self {
        let settings = self.settings_mut();
        Arc::make_mut(&mut settings.http).body_limit = bytes;
        self
    }

    /// Whether every response carries the metadata key
    /// [`ROLE_HEADER`](crate::http::ROLE_HEADER) (`x-singleflight`) saying
    /// how it was produced, for clients to see; off by default.
    pub fn role_header(mut self, enabled: bool) -> Self {
        let settings = self.settings_mut();
        Arc::make_mut(&mut settings.http).role_header = enabled;
        self
    }
}

impl<M, K, G: Sealed> GrpcLayer<M, K, G> {
    /// The settings, to change: the layer's own group stays with the
    /// clones that keep the old ones.
    fn settings_mut(&mut self) -> &mut GrpcSettings {
        self.group.settings_changed();
        Arc::make_mut(&mut self.settings)
    }
}

impl<S, M: Clone, K: Clone> Layer<S> for GrpcLayer<M, K> {
    type Service = GrpcSingleflight<S, M, K>;

    fn layer(&self, inner: S) -> Self::Service {
        // Every service this layer wraps shares its flights, as for HTTP: a
        // server applies its layers to each connection, and the key (the
        // method's path) keeps different methods apart.
        let (make_body, extractor) = (self.make_body.clone(), self.extractor.clone());
        let settings = Arc::clone(&self.settings);
        GrpcSingleflight::new(inner, make_body, extractor, self.group.clone(), settings)
    }
}

impl<S, M: Clone, K: Clone, Key, T> Layer<S> for GrpcLayer<M, K, Group<Key, T>> {
    type Service = GrpcSingleflight<S, M, K, Group<Key, T>>;

    fn layer(&self, inner: S) -> Self::Service {
        let (make_body, extractor) = (self.make_body.clone(), self.extractor.clone());
        let settings = Arc::clone(&self.settings);
        GrpcSingleflight::new(inner, make_body, extractor, self.group.clone(), settings)
    }
}

impl<M, K, G: fmt::Debug> fmt::Debug for GrpcLayer<M, K, G> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcLayer")
            .field("group", &self.group)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

// --- impl GrpcSettings ---

impl GrpcSettings {
    /// Whether a call may be unary and coalesce, judged by its head alone: a
    /// gRPC `POST` of a method that is not listed as streaming (and, with a
    /// list of unary methods, is listed there).
    pub(crate) fn may_coalesce<B>(&self, req: &Request<B>) -> bool {
        let grpc = req
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .is_some_and(is_grpc);
        let path = req.uri().path();
        let listed = |methods: &[Box<str>]| methods.iter().any(|method| matches(method, path));
        *req.method() == Method::POST
            && grpc
            && !listed(&self.streaming)
            && (self.unary.is_empty() || listed(&self.unary))
    }
}

impl fmt::Debug for GrpcSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcSettings")
            .field("http", &self.http)
            .field("message_limit", &self.message_limit)
            .field("waits", &self.waits)
            .field("streaming", &self.streaming)
            .field("unary", &self.unary)
            .finish()
    }
}

/// Whether a `content-type` is gRPC's own (`application/grpc`, with or
/// without a `+format` or parameters); gRPC-Web's is not.
fn is_grpc(content_type: &str) -> bool {
    let rest = content_type.strip_prefix("application/grpc");
    rest.is_some_and(|rest| rest.is_empty() || rest.starts_with(['+', ';']))
}

/// Whether a listed `method` (a path, or a service ending in `/`) names the
/// called `path`.
fn matches(method: &str, path: &str) -> bool {
    if method.ends_with('/') {
        path.starts_with(method)
    } else {
        path == method
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_grpc_content_types_are_grpc() {
        assert!(is_grpc("application/grpc"));
        assert!(is_grpc("application/grpc+proto"));
        assert!(!is_grpc("application/grpc-web"));
        assert!(!is_grpc("application/grpc-web+proto"));
        assert!(!is_grpc("application/json"));
    }

    #[test]
    fn a_listed_service_names_all_its_methods() {
        assert!(matches("/chat.Chat/", "/chat.Chat/Subscribe"));
        assert!(matches("/chat.Chat/Subscribe", "/chat.Chat/Subscribe"));
        assert!(!matches("/chat.Chat/Subscribe", "/chat.Chat/SubscribeAll"));
        assert!(!matches("/chat.Chat/", "/chat.Chatter/Get"));
    }
}
