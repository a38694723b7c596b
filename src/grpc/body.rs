//! [`RequestBody`], the body of every request the gRPC layer rebuilt.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::http::ResponseBody;

pin_project! {
    /// The body of a request that [`GrpcSingleflight`] read before handing it
    /// on: the buffered message of a unary call, or the bytes read so far of
    /// any other call, followed by the rest of its body.
    ///
    /// The inner service wants a body of its own type, so the layer turns
    /// this one into it with the function it was made with: for tonic,
    /// `tonic::body::Body::new`. The bytes are the ones the caller sent, in
    /// order; only their split into frames may differ.
    ///
    /// # Examples
    ///
    /// A service over boxed bodies boxes this one too:
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http_body_util::combinators::UnsyncBoxBody;
    /// use http_body_util::BodyExt;
    /// use tower_singleflight::grpc::RequestBody;
    /// use tower_singleflight::SingleflightLayer;
    ///
    /// type Boxed = UnsyncBoxBody<Bytes, std::io::Error>;
    ///
    /// let layer = SingleflightLayer::grpc(|body: RequestBody<Boxed>| body.boxed_unsync());
    /// # drop(layer);
    /// ```
    ///
    /// [`GrpcSingleflight`]: crate::grpc::GrpcSingleflight
    pub struct RequestBody<B>
    where
        B: Body,
    {
        #[pin]
        inner: ResponseBody<B>,
    }
}

impl<B: Body> RequestBody<B> {
    pub(crate) fn new(inner: ResponseBody<B>) -> Self {
        Self { inner }
    }
}

impl<B: Body> Body for RequestBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B: Body> fmt::Debug for RequestBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("RequestBody").field(&self.inner).finish()
    }
}
