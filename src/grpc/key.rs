//! [`GrpcKey`], the default key of the gRPC layer, and [`UnaryCall`], what
//! any key of it is made from.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{request, HeaderMap, HeaderName, HeaderValue, Request, Uri};

use crate::grpc::message::PREFIX_LEN;
use crate::http::IDENTITY_HEADERS;
use crate::key::KeyExtractor;

/// The request headers that say how a call's messages are encoded. They are
/// always part of a [`GrpcKey`]'s key: callers that differ in them may not
/// be able to read each other's responses.
pub const ENCODING_HEADERS: [HeaderName; 3] = [
    CONTENT_TYPE,
    HeaderName::from_static("grpc-encoding"),
    HeaderName::from_static("grpc-accept-encoding"),
];

/// A unary call as the gRPC layer read it: the request's head and its one
/// message. Keys of the gRPC layer are made from it.
///
/// # Examples
///
/// ```
/// use http::Request;
/// use tower_singleflight::grpc::UnaryCall;
///
/// let call = UnaryCall::new(Request::post("/echo.Echo/Get").body(()).unwrap(), "hi");
/// assert_eq!(call.path(), "/echo.Echo/Get");
/// assert_eq!(call.message(), b"hi");
/// assert!(!call.is_compressed());
/// ```
#[derive(Clone)]
pub struct UnaryCall {
    head: request::Parts,
    /// The message as it came: its 5-byte prefix, then its bytes.
    frame: Bytes,
}

/// The default key of the gRPC layer: which method is called, with which
/// message, by whom.
///
/// Two calls share a flight only when they agree on all of:
///
/// - the method's path, such as `/echo.Echo/Get`, and the URI's scheme and
///   authority when it has them;
/// - the request message, byte for byte as encoded on the wire (with its
///   compression flag);
/// - every value, in order, of each of the [`ENCODING_HEADERS`]
///   (`content-type`, `grpc-encoding`, `grpc-accept-encoding`), of each of
///   the [`IDENTITY_HEADERS`] (`authorization`, `cookie`,
///   `proxy-authorization`), and of each metadata key added with
///   [`metadata`](GrpcKey::metadata).
///
/// The deadline (`grpc-timeout`) is never part of it: callers with
/// different deadlines share a call, and each keeps its own deadline.
///
/// # Examples
///
/// ```
/// use http::{HeaderName, Request};
/// use tower_singleflight::grpc::{GrpcKey, UnaryCall};
/// use tower_singleflight::key::KeyExtractor;
///
/// let key = GrpcKey::new().metadata(HeaderName::from_static("x-tenant"));
/// let call = |tenant: &str, message: &'static str| {
///     let req = Request::post("/echo.Echo/Get").header("x-tenant", tenant);
///     UnaryCall::new(req.body(()).unwrap(), message)
/// };
///
/// // Same method, same message, same tenant: one flight.
/// assert_eq!(key.extract(&call("a", "hi")), key.extract(&call("a", "hi")));
/// // Another message, or another tenant: another flight.
/// assert_ne!(key.extract(&call("a", "hi")), key.extract(&call("a", "ho")));
/// assert_ne!(key.extract(&call("a", "hi")), key.extract(&call("b", "hi")));
/// ```
#[derive(Clone, Debug)]
pub struct GrpcKey {
    // Shared, so that the per-request clones of a service cost no allocation.
    metadata: Arc<[HeaderName]>,
}

/// The key a [`GrpcKey`] makes: opaque, compared field by field.
///
/// Its `Debug` shows the method's path only, never the message or a
/// metadata value: those may carry secrets. It shows in the type of a
/// [`Group`] shared by gRPC services.
///
/// # Examples
///
/// ```
/// use tower_singleflight::grpc::GrpcRequestKey;
/// use tower_singleflight::http::FlightResponse;
/// use tower_singleflight::{Group, SingleflightLayer};
///
/// // One set of flights for the tonic services it wraps, and its counters.
/// let group: Group<GrpcRequestKey, FlightResponse<tonic::body::Body>> = Group::new();
/// let layer = SingleflightLayer::grpc(tonic::body::Body::new).with_group(group.clone());
/// assert_eq!(group.stats().flights, 0);
/// # drop(layer);
/// ```
///
/// [`Group`]: crate::Group
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct GrpcRequestKey {
    path: Option<PathAndQuery>,
    scheme: Option<Scheme>,
    authority: Option<Authority>,
    headers: Vec<(HeaderName, HeaderValue)>,
    frame: Bytes,
}

// --- impl UnaryCall ---

impl UnaryCall {
    /// A call with the head of `request` and `message`, uncompressed, as its
    /// one message; for testing extractors.
    ///
    /// # Panics
    ///
    /// When `message` is longer than gRPC's 4 GiB limit.
    pub fn new(request: Request<()>, message: impl Into<Bytes>) -> Self {
        let message = message.into();
        let len = u32::try_from(message.len()).expect("a gRPC message is shorter than 4 GiB");
        let mut frame = Vec::with_capacity(PREFIX_LEN + message.len());
        frame.push(0);
        frame.extend_from_slice(&len.to_be_bytes());
        frame.extend_from_slice(&message);
        let (head, ()) = request.into_parts();
        Self::from_parts(head, frame.into())
    }

    pub(crate) fn from_parts(head: request::Parts, frame: Bytes) -> Self {
        debug_assert!(
            frame.len() >= PREFIX_LEN,
            "a unary call has a whole message"
        );
        Self { head, frame }
    }

    pub(crate) fn into_parts(self) -> (request::Parts, Bytes) {
        (self.head, self.frame)
    }

    /// The called method's path, such as `/echo.Echo/Get`.
    pub fn path(&self) -> &str {
        self.head.uri.path()
    }

    /// The request's URI.
    pub fn uri(&self) -> &Uri {
        &self.head.uri
    }

    /// The request's headers: its custom metadata and gRPC's own headers.
    pub fn headers(&self) -> &HeaderMap {
        &self.head.headers
    }

    /// The message's bytes as sent, compressed if
    /// [`is_compressed`](UnaryCall::is_compressed) holds.
    pub fn message(&self) -> &[u8] {
        &self.frame[PREFIX_LEN..]
    }

    /// Whether the message was sent compressed, with the request's
    /// `grpc-encoding`.
    pub fn is_compressed(&self) -> bool {
        self.frame[0] != 0
    }
}

impl fmt::Debug for UnaryCall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UnaryCall")
            .field("path", &self.path())
            .field("message_len", &self.message().len())
            .finish_non_exhaustive()
    }
}

// --- impl GrpcKey ---

impl GrpcKey {
    /// A key of the method, the message, the [`ENCODING_HEADERS`] and the
    /// [`IDENTITY_HEADERS`].
    pub fn new() -> Self {
        Self {
            metadata: Arc::new([]),
        }
    }

    /// Adds every value of the metadata key `name` to the key: calls that
    /// differ in it never share a flight.
    ///
    /// Use it for metadata the response depends on, such as a tenant or a
    /// locale.
    pub fn metadata(mut self, name: HeaderName) -> Self {
        let known = ENCODING_HEADERS.contains(&name) || IDENTITY_HEADERS.contains(&name);
        if !known && !self.metadata.contains(&name) {
            self.metadata = self.metadata.iter().cloned().chain([name]).collect();
        }
        self
    }
}

impl Default for GrpcKey {
    fn default() -> Self {
        Self::new()
    }
}

impl KeyExtractor<UnaryCall> for GrpcKey {
    type Key = GrpcRequestKey;

    fn extract(&self, call: &UnaryCall) -> Option<GrpcRequestKey> {
        // How it is encoded, who asks, and the user's metadata, every value
        // in order.
        let (encoding, identity) = (ENCODING_HEADERS, IDENTITY_HEADERS);
        let names = encoding.iter().chain(&identity).chain(self.metadata.iter());
        let mut headers = Vec::new();
        for name in names {
            for value in call.headers().get_all(name) {
                headers.push((name.clone(), value.clone()));
            }
        }

        let uri = call.uri();
        Some(GrpcRequestKey {
            path: uri.path_and_query().cloned(),
            scheme: uri.scheme().cloned(),
            authority: uri.authority().cloned(),
            headers,
            frame: call.frame.clone(),
        })
    }
}

impl fmt::Debug for GrpcRequestKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = self.path.as_ref().map_or("", PathAndQuery::path);
        f.debug_struct("GrpcRequestKey")
            .field("path", &path)
            .finish_non_exhaustive()
    }
}
