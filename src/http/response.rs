//! What a flight of the HTTP layer shares: the leader's response, buffered
//! once, or the response kept whole for the one caller it may go to.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{SET_COOKIE, VARY};
use http::{response, HeaderMap, HeaderName, HeaderValue, Response};
use http_body::Body;
use http_body_util::BodyExt;

use crate::http::body::ResponseBody;
use crate::http::layer::Settings;

/// A user's test of whether a response may be shared.
pub(crate) type Predicate = Arc<dyn Fn(&response::Parts) -> bool + Send + Sync>;

/// A protocol's test of a body being buffered, given the chunks read so far
/// and their total length: true once it must not be shared, whatever follows.
pub(crate) type Overflow = fn(&VecDeque<Bytes>, usize) -> bool;

/// The outcome of one flight of the HTTP layer, as its waiters share it.
///
/// Opaque. It only shows in the type of a [`Group`] handed to
/// [`HttpLayer::with_group`]: `Group<RequestKey, FlightResponse<B>>`, where
/// `B` is the inner service's response body.
///
/// # Examples
///
/// ```
/// use tower_singleflight::http::{FlightResponse, RequestKey};
/// use tower_singleflight::Group;
///
/// let group: Group<RequestKey, FlightResponse<http_body_util::Full<bytes::Bytes>>> =
///     Group::new();
/// assert!(group.is_empty());
/// ```
///
/// [`Group`]: crate::Group
/// [`HttpLayer::with_group`]: crate::http::HttpLayer::with_group
pub struct FlightResponse<B: Body> {
    kind: Kind<B>,
}

enum Kind<B: Body> {
    /// Buffered whole, replayed to every waiter it suits.
    Shared(Arc<Buffered>),
    /// Not to be shared: taken once, by the caller whose request made it.
    Private(Arc<Mutex<Option<Response<ResponseBody<B>>>>>),
}

/// A response read whole: everything needed to replay it.
struct Buffered {
    parts: response::Parts,
    body: Bytes,
    trailers: Option<HeaderMap>,
    /// For each request header the response's `Vary` names, the leader's
    /// values of it. A follower whose values differ gets no replay.
    vary: Vec<(HeaderName, Vec<HeaderValue>)>,
}

impl<B: Body> FlightResponse<B> {
    /// Reads `res` whole, up to the body limit, if it may be shared.
    ///
    /// `leader` holds the headers of the request that made it, to record
    /// what its `Vary` depends on. A response that switches protocols (1xx),
    /// streams events (`text/event-stream`), sets a cookie, varies on `*`,
    /// fails the `shareable` predicate, runs past the body limit, the
    /// buffering wait or the `overflow` rule, or fails while being read is
    /// kept whole, for its own caller only.
    pub(crate) async fn read(res: Response<B>, leader: &HeaderMap, settings: &Settings) -> Self {
        // Unshareable by its head: keep it, untouched.
        let (limit, shareable) = (settings.body_limit, settings.shareable.as_ref());
        let overflow = settings.overflow.unwrap_or(|_, _| false);
        let (parts, body) = res.into_parts();
        if parts.status.is_informational() || is_event_stream(&parts.headers) {
            return Self::private(parts, ResponseBody::pass(body));
        }
        let vary = vary_on(&parts.headers, leader)
            .filter(|_| !parts.headers.contains_key(SET_COOKIE))
            .filter(|_| shareable.map_or(true, |shareable| shareable(&parts)));
        let Some(vary) = vary else {
            return Self::private(parts, ResponseBody::pass(body));
        };
        if body.size_hint().lower() > limit as u64 {
            return Self::private(parts, ResponseBody::pass(body));
        }

        // Read it frame by frame until it ends, grows past the limit, takes
        // longer than the buffering wait, or fails.
        // NOTE: `collect` would lose what it read when stopped at the limit;
        // `frame` lets the caller keep it and stream on.
        let mut body = Box::pin(body);
        let mut read = VecDeque::new();
        let mut len = 0;
        let mut trailers = None;
        // A wait too long to name as an instant is no limit.
        let deadline = tokio::time::Instant::now().checked_add(settings.buffer_wait);
        loop {
            let frame = match deadline {
                Some(deadline) => tokio::time::timeout_at(deadline, body.frame()).await,
                None => Ok(body.frame().await),
            };
            let frame = match frame {
                Err(_) => return Self::private(parts, ResponseBody::resume(read, Ok(body))),
                Ok(None) => break,
                Ok(Some(Ok(frame))) => frame,
                Ok(Some(Err(error))) => {
                    return Self::private(parts, ResponseBody::resume(read, Err(error)));
                }
            };
            match frame.into_data() {
                Ok(mut data) => {
                    len += data.remaining();
                    read.push_back(data.copy_to_bytes(data.remaining()));
                    if len > limit || overflow(&read, len) {
                        return Self::private(parts, ResponseBody::resume(read, Ok(body)));
                    }
                }
                Err(frame) => {
                    if let Ok(map) = frame.into_trailers() {
                        trailers.get_or_insert_with(HeaderMap::new).extend(map);
                    }
                }
            }
        }

        // Whole: share it.
        let buffered = Buffered {
            parts,
            body: concat(read, len),
            trailers,
            vary,
        };
        Self {
            kind: Kind::Shared(Arc::new(buffered)),
        }
    }

    fn private(parts: response::Parts, body: ResponseBody<B>) -> Self {
        let res = Response::from_parts(parts, body);
        Self {
            kind: Kind::Private(Arc::new(Mutex::new(Some(res)))),
        }
    }

    /// Whether the response is buffered for every waiter it suits.
    pub(crate) fn is_shared(&self) -> bool {
        matches!(self.kind, Kind::Shared(_))
    }

    /// The response for the caller whose request made it.
    ///
    /// # Panics
    ///
    /// When a kept response is taken twice: only that one caller takes it.
    pub(crate) fn into_own(self) -> Response<ResponseBody<B>> {
        match self.kind {
            Kind::Shared(buffered) => buffered.replay(),
            Kind::Private(cell) => cell
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take()
                .expect("a kept response goes to the one caller whose request made it"),
        }
    }

    /// The response for a follower whose request has `headers`, unless it
    /// must make its own call.
    pub(crate) fn for_follower(&self, headers: &HeaderMap) -> Option<Response<ResponseBody<B>>> {
        match &self.kind {
            Kind::Shared(buffered) if buffered.suits(headers) => Some(buffered.replay()),
            Kind::Shared(_) | Kind::Private(_) => None,
        }
    }
}

impl Buffered {
    fn replay<B: Body>(&self) -> Response<ResponseBody<B>> {
        let body = ResponseBody::replay(self.body.clone(), self.trailers.clone());
        Response::from_parts(self.parts.clone(), body)
    }

    /// Whether a request with `headers` agrees with the leader's on every
    /// header the response varies on.
    fn suits(&self, headers: &HeaderMap) -> bool {
        self.vary
            .iter()
            .all(|(name, values)| headers.get_all(name).iter().eq(values))
    }
}

impl<B: Body> Clone for FlightResponse<B> {
    fn clone(&self) -> Self {
        let kind = match &self.kind {
            Kind::Shared(buffered) => Kind::Shared(Arc::clone(buffered)),
            Kind::Private(cell) => Kind::Private(Arc::clone(cell)),
        };
        Self { kind }
    }
}

impl<B: Body> fmt::Debug for FlightResponse<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (kind, status) = match &self.kind {
            Kind::Shared(buffered) => ("Shared", Some(buffered.parts.status)),
            Kind::Private(_) => ("Private", None),
        };
        f.debug_struct("FlightResponse")
            .field("kind", &kind)
            .field("status", &status)
            .finish_non_exhaustive()
    }
}

/// The leader's values of each request header that `response`'s `Vary`
/// names; `None` when it names `*` or something that is no header name.
fn vary_on(
    response: &HeaderMap,
    leader: &HeaderMap,
) -> Option<Vec<(HeaderName, Vec<HeaderValue>)>> {
    let mut vary = Vec::new();
    for value in response.get_all(VARY) {
        let names = value.to_str().ok()?.split(',').map(str::trim);
        for name in names.filter(|name| !name.is_empty()) {
            if name == "*" {
                return None;
            }
            let name = HeaderName::from_bytes(name.as_bytes()).ok()?;
            let values = leader.get_all(&name).iter().cloned().collect();
            vary.push((name, values));
        }
    }
    Some(vary)
}

/// Joins the chunks read, copying only when there are several.
fn concat(mut chunks: VecDeque<Bytes>, len: usize) -> Bytes {
    if chunks.len() <= 1 {
        return chunks.pop_front().unwrap_or_default();
    }
    let mut whole = BytesMut::with_capacity(len);
    for chunk in chunks {
        whole.extend_from_slice(&chunk);
    }
    whole.freeze()
}

/// Whether a response is a stream of server-sent events, which may never
/// end: it goes to its own caller as it comes.
fn is_event_stream(headers: &HeaderMap) -> bool {
    let content_type = headers.get(http::header::CONTENT_TYPE);
    content_type.is_some_and(|value| value.as_bytes().starts_with(b"text/event-stream"))
}
