//! [`HttpKey`], the identity-safe default key of the HTTP layer.

use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use http::header::{
    AUTHORIZATION, CONNECTION, COOKIE, HOST, IF_MATCH, IF_MODIFIED_SINCE, IF_NONE_MATCH, IF_RANGE,
    IF_UNMODIFIED_SINCE, PROXY_AUTHORIZATION, RANGE, UPGRADE,
};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Extensions, HeaderName, HeaderValue, Method, Request, Uri};
use http_body::Body;

use crate::key::KeyExtractor;

/// The request headers that say who is asking. They are always part of an
/// [`HttpKey`]'s key, so that a response made for one of these identities
/// never reaches another.
///
/// They are not the only way a server can tell callers apart: an identity
/// in another header (an API key), in a request extension (a TLS client
/// certificate, the peer's address, an authenticated user set by an earlier
/// layer) is invisible to the key. Add such headers with
/// [`HttpKey::header`], or give the layer a key of your own.
pub const IDENTITY_HEADERS: [HeaderName; 3] = [AUTHORIZATION, COOKIE, PROXY_AUTHORIZATION];

/// The request headers that choose which representation of a resource the
/// response carries (a part of it, or a `304 Not Modified`). They are
/// always part of an [`HttpKey`]'s key: servers rarely name them in `Vary`,
/// so a full `200` must never answer a range request, nor a `304` a request
/// with no validator.
pub const CONDITIONAL_HEADERS: [HeaderName; 6] = [
    RANGE,
    IF_RANGE,
    IF_NONE_MATCH,
    IF_MODIFIED_SINCE,
    IF_MATCH,
    IF_UNMODIFIED_SINCE,
];

/// The default key of the HTTP layer: what a request asks for, and who asks.
///
/// Two requests share a flight only when they agree on all of:
///
/// - the method;
/// - the scheme and authority of the URI, or the `Host` header when the URI
///   has no authority (as on an HTTP/1 server; an HTTP/2 request's URI has
///   both, so requests over the two versions do not share);
/// - the path and query;
/// - every value, in order, of each of the [`IDENTITY_HEADERS`]
///   (`Authorization`, `Cookie`, `Proxy-Authorization`), of the
///   [`CONDITIONAL_HEADERS`] (`Range`, `If-None-Match` and the like), and of
///   each header added with [`header`](HttpKey::header).
///
/// Only `GET` and `HEAD` requests get a key; [`method`](HttpKey::method)
/// adds more. A request whose body is not known to be empty gets none either,
/// unless [`ignore_bodies`](HttpKey::ignore_bodies) says otherwise, and
/// neither does a request to switch protocols (`Upgrade`, or `Connection:
/// upgrade`, as a WebSocket handshake asks): each such connection is its
/// own. Requests without a key go straight to the inner service.
///
/// Headers outside the key that the response depends on are handled by the
/// response's `Vary` header: see the [module docs](crate::http).
///
/// # Under a router that rewrites the URI
///
/// The key reads the URI as the layer sees it. A router that rewrites it
/// first hides what tells requests apart: axum's `Router::nest` strips its
/// prefix, so a layer on a nested router sees `/tenants/acme/users` and
/// `/tenants/globex/users` both as `/users`. Put the layer on the outer
/// router, or key on the URI the request arrived with, which such routers
/// keep in an extension: see [`uri_extension`](HttpKey::uri_extension).
///
/// # Examples
///
/// ```
/// use http::{header, Request};
/// use tower_singleflight::http::HttpKey;
/// use tower_singleflight::key::KeyExtractor;
///
/// let key = HttpKey::new().header(header::ACCEPT_LANGUAGE);
/// let get = |user: &str, lang: &str| {
///     Request::get("https://example.com/feed?page=2")
///         .header(header::AUTHORIZATION, user)
///         .header(header::ACCEPT_LANGUAGE, lang)
///         .body(String::new())
///         .unwrap()
/// };
///
/// // Same resource, same user, same language: one flight.
/// assert_eq!(key.extract(&get("alice", "en")), key.extract(&get("alice", "en")));
/// // Another user, or another language: another flight.
/// assert_ne!(key.extract(&get("alice", "en")), key.extract(&get("bob", "en")));
/// assert_ne!(key.extract(&get("alice", "en")), key.extract(&get("alice", "fr")));
///
/// // A POST goes straight through.
/// let post = Request::post("https://example.com/feed").body(String::new()).unwrap();
/// assert_eq!(key.extract(&post), None);
/// ```
#[derive(Clone, Debug)]
pub struct HttpKey {
    // Shared, so that the per-request clones of a service cost no allocation.
    headers: Arc<[HeaderName]>,
    methods: Arc<[Method]>,
    ignore_bodies: bool,
    /// Reads the URI the request arrived with from its extensions.
    original_uri: Option<fn(&Extensions) -> Option<&Uri>>,
}

/// The key an [`HttpKey`] makes: opaque, compared field by field.
///
/// Its `Debug` shows the method and the path only, never the query or a
/// header value: those may carry secrets.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct RequestKey {
    method: Method,
    scheme: Option<Scheme>,
    authority: Option<Authority>,
    path_and_query: Option<PathAndQuery>,
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl HttpKey {
    /// A key of method, authority, path, query and the
    /// [`IDENTITY_HEADERS`], for `GET` and `HEAD` requests without a body.
    pub fn new() -> Self {
        Self {
            headers: Arc::new([]),
            methods: Arc::new([]),
            ignore_bodies: false,
            original_uri: None,
        }
    }

    /// Adds every value of the request header `name` to the key: requests
    /// that differ in it never share a flight.
    ///
    /// Use it for headers the response depends on, such as
    /// `Accept-Language` or a tenant header.
    pub fn header(mut self, name: HeaderName) -> Self {
        let built_in = IDENTITY_HEADERS.contains(&name) || CONDITIONAL_HEADERS.contains(&name);
        if !built_in && !self.headers.contains(&name) {
            self.headers = self.headers.iter().cloned().chain([name]).collect();
        }
        self
    }

    /// Lets requests with `method` coalesce too, besides `GET` and `HEAD`.
    ///
    /// Only for methods that are safe to answer once for many callers: a
    /// `POST` that changes state must reach the server once per caller.
    pub fn method(mut self, method: Method) -> Self {
        if !self.coalesces(&method) {
            self.methods = self.methods.iter().cloned().chain([method]).collect();
        }
        self
    }

    /// Lets requests with a body coalesce, ignoring the body: it is **not**
    /// part of the key, and only the leader's body reaches the server.
    ///
    /// Only for routes whose response never depends on the request body. By
    /// default a request whose body is not known to be empty goes straight
    /// through.
    pub fn ignore_bodies(mut self, enabled: bool) -> Self {
        self.ignore_bodies = enabled;
        self
    }

    /// Keys on the URI in the request extension `E`, when the request has
    /// one, rather than on the request's own: for a layer behind a router
    /// that rewrites the URI and keeps the one the request arrived with in
    /// `E`, as axum's `Router::nest` keeps it in `axum::extract::OriginalUri`.
    ///
    /// # Examples
    ///
    /// ```
    /// use axum::extract::OriginalUri;
    /// use axum::{routing::get, Router};
    /// use tower_singleflight::http::{HttpKey, HttpLayer};
    ///
    /// // Each tenant's users are a resource of their own, though the nested
    /// // router sees every one of them as `/users`.
    /// let users: Router = Router::new()
    ///     .route("/users", get(|| async { "the users" }))
    ///     .layer(HttpLayer::new(HttpKey::new().uri_extension::<OriginalUri>()));
    /// let app: Router = Router::new().nest("/tenants/{tenant}", users);
    /// # drop(app);
    /// ```
    pub fn uri_extension<E>(mut self) -> Self
    where
        E: Deref<Target = Uri> + Send + Sync + 'static,
    {
        self.original_uri = Some(|extensions| extensions.get::<E>().map(|uri| &**uri));
        self
    }

    fn coalesces(&self, method: &Method) -> bool {
        *method == Method::GET || *method == Method::HEAD || self.methods.contains(method)
    }
}

impl Default for HttpKey {
    fn default() -> Self {
        Self::new()
    }
}

impl<B: Body> KeyExtractor<Request<B>> for HttpKey {
    type Key = RequestKey;

    fn extract(&self, req: &Request<B>) -> Option<RequestKey> {
        // Methods and bodies that must not coalesce go straight through.
        if !self.coalesces(req.method()) {
            return None;
        }
        let body = req.body();
        if !self.ignore_bodies && !body.is_end_stream() && body.size_hint().exact() != Some(0) {
            return None;
        }
        if asks_to_upgrade(req.headers()) {
            return None;
        }

        // The URI's authority, else the `Host` header; a bad one declines.
        let original = self.original_uri.and_then(|read| read(req.extensions()));
        let uri = original.unwrap_or(req.uri());
        let authority = match (uri.authority(), req.headers().get(HOST)) {
            (Some(authority), _) => Some(authority.clone()),
            (None, Some(host)) => Some(Authority::try_from(host.as_bytes()).ok()?),
            (None, None) => None,
        };

        // Who asks, and the user's further headers, every value in order.
        let mut headers = Vec::new();
        let names = IDENTITY_HEADERS.iter().chain(&CONDITIONAL_HEADERS);
        for name in names.chain(self.headers.iter()) {
            for value in req.headers().get_all(name) {
                headers.push((name.clone(), value.clone()));
            }
        }

        Some(RequestKey {
            method: req.method().clone(),
            scheme: uri.scheme().cloned(),
            authority,
            path_and_query: uri.path_and_query().cloned(),
            headers,
        })
    }
}

impl fmt::Debug for RequestKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = self.path_and_query.as_ref().map_or("", PathAndQuery::path);
        f.debug_struct("RequestKey")
            .field("method", &self.method)
            .field("path", &path)
            .finish_non_exhaustive()
    }
}

/// Whether a request asks to switch protocols on its connection.
fn asks_to_upgrade(headers: &http::HeaderMap) -> bool {
    let upgrade_token = |value: &HeaderValue| {
        let tokens = value.to_str().unwrap_or_default().split(',');
        tokens
            .map(str::trim)
            .any(|token| token.eq_ignore_ascii_case("upgrade"))
    };
    headers.contains_key(UPGRADE) || headers.get_all(CONNECTION).iter().any(upgrade_token)
}
