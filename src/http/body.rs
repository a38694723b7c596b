//! [`ResponseBody`], the body of every response of the HTTP layer.

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

pin_project! {
    /// The body of a response from [`HttpSingleflight`]: a replay of a
    /// shared buffered response, or the inner service's own body.
    ///
    /// A replay yields the whole buffered body as one data frame, then the
    /// trailers if there were any, and never fails. Otherwise the frames come
    /// from the inner body, with the data already read while trying to
    /// buffer it (and, if reading failed, that error) in front. The data is
    /// always [`Bytes`]; errors are the inner body's.
    ///
    /// Its size hint is exact for a replay without trailers, so that an
    /// HTTP/1 server sends a `Content-Length`; with trailers it is left open,
    /// so that the server sends chunks and can send the trailers too.
    ///
    /// # Examples
    ///
    /// ```
    /// use http::{Request, Response};
    /// use http_body_util::{BodyExt, Full};
    /// use tower::{service_fn, ServiceBuilder, ServiceExt};
    /// use tower_singleflight::http::ResponseBody;
    /// use tower_singleflight::SingleflightLayer;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let svc = ServiceBuilder::new()
    ///     .layer(SingleflightLayer::http())
    ///     .service(service_fn(|_: Request<Full<bytes::Bytes>>| async {
    ///         Ok::<_, std::convert::Infallible>(Response::new(Full::from("hello")))
    ///     }));
    ///
    /// let res = svc.oneshot(Request::new(Full::default())).await.unwrap();
    /// let body: ResponseBody<Full<bytes::Bytes>> = res.into_body();
    /// assert_eq!(body.collect().await.unwrap().to_bytes(), "hello");
    /// # }
    /// ```
    ///
    /// [`HttpSingleflight`]: crate::http::HttpSingleflight
    pub struct ResponseBody<B>
    where
        B: Body,
    {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B>
    where
        B: Body,
    {
        // A buffered response: its data (empty once sent), then its trailers.
        Replay {
            data: Bytes,
            trailers: Option<HeaderMap>,
        },
        // The inner body, untouched.
        Pass {
            #[pin]
            body: B,
        },
        // The inner body, behind what was read of it before. Boxed, so that
        // reading could start before the body was handed on.
        Resume {
            prefix: VecDeque<Bytes>,
            error: Option<B::Error>,
            rest: Option<Pin<Box<B>>>,
        },
    }
}

impl<B: Body> ResponseBody<B> {
    /// Replays a buffered body and its trailers.
    pub(crate) fn replay(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        Self {
            kind: Kind::Replay { data, trailers },
        }
    }

    /// Streams `body` as it is.
    pub(crate) fn pass(body: B) -> Self {
        Self {
            kind: Kind::Pass { body },
        }
    }

    /// Streams the data already read of a body, then either the rest of the
    /// body or the error that stopped the reading.
    pub(crate) fn resume(prefix: VecDeque<Bytes>, rest: Result<Pin<Box<B>>, B::Error>) -> Self {
        let (rest, error) = match rest {
            Ok(body) => (Some(body), None),
            Err(error) => (None, Some(error)),
        };
        Self {
            kind: Kind::Resume {
                prefix,
                error,
                rest,
            },
        }
    }
}

impl<B: Body> Body for ResponseBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().kind.project() {
            // A replay: the data, then the trailers, then the end.
            KindProj::Replay { data, trailers } => {
                if !data.is_empty() {
                    return Poll::Ready(Some(Ok(Frame::data(std::mem::take(data)))));
                }
                Poll::Ready(
                    trailers
                        .take()
                        .map(|trailers| Ok(Frame::trailers(trailers))),
                )
            }

            // The inner body's frames, as they come.
            KindProj::Pass { body } => body.poll_frame(cx).map(map_frame),

            // What was read before, then the error or the rest.
            KindProj::Resume {
                prefix,
                error,
                rest,
            } => {
                if let Some(data) = prefix.pop_front() {
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                if let Some(error) = error.take() {
                    return Poll::Ready(Some(Err(error)));
                }
                let Some(body) = rest else {
                    return Poll::Ready(None);
                };
                let frame = std::task::ready!(body.as_mut().poll_frame(cx));
                if frame.is_none() {
                    *rest = None;
                }
                Poll::Ready(map_frame(frame))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Replay { data, trailers } => data.is_empty() && trailers.is_none(),
            Kind::Pass { body } => body.is_end_stream(),
            Kind::Resume {
                prefix,
                error,
                rest,
            } => {
                let rest_ended = rest.as_ref().map_or(true, |body| body.is_end_stream());
                prefix.is_empty() && error.is_none() && rest_ended
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            // Exact without trailers, so that HTTP/1 can send a length; with
            // them the size is left open, so that it sends chunks.
            Kind::Replay { data, trailers } => {
                let len = data.len() as u64;
                match trailers {
                    None => SizeHint::with_exact(len),
                    Some(_) => {
                        let mut hint = SizeHint::new();
                        hint.set_lower(len);
                        hint
                    }
                }
            }
            Kind::Pass { body } => body.size_hint(),
            Kind::Resume {
                prefix,
                error,
                rest,
            } => {
                let read: u64 = prefix.iter().map(|data| data.len() as u64).sum();
                let rest = match (rest, error) {
                    (Some(body), _) => body.size_hint(),
                    (None, None) => SizeHint::with_exact(0),
                    (None, Some(_)) => SizeHint::new(),
                };
                let mut hint = SizeHint::new();
                hint.set_lower(read + rest.lower());
                if let Some(upper) = rest.upper() {
                    hint.set_upper(read + upper);
                }
                hint
            }
        }
    }
}

impl<B: Body> fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            Kind::Replay { .. } => "Replay",
            Kind::Pass { .. } => "Pass",
            Kind::Resume { .. } => "Resume",
        };
        f.debug_struct("ResponseBody")
            .field("kind", &kind)
            .finish_non_exhaustive()
    }
}

/// Turns a polled frame's data into [`Bytes`], without a copy when it is one.
fn map_frame<D: Buf, E>(frame: Option<Result<Frame<D>, E>>) -> Option<Result<Frame<Bytes>, E>> {
    let into_bytes = |mut data: D| data.copy_to_bytes(data.remaining());
    frame.map(|frame| frame.map(|frame| frame.map_data(into_bytes)))
}
