//! How the HTTP layer reports failures: the inner service's as errors, its
//! own as responses.

use std::convert::Infallible;
use std::sync::Arc;

use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Response, StatusCode};
use http_body::Body;

use crate::error::{BoxError, Error};
use crate::http::body::ResponseBody;

/// The error types an inner service of the HTTP layer may have, each with the
/// error type the layer then has.
///
/// A failed call reaches every waiter of its flight, so the layer cannot hand
/// out the inner service's own error type unless it never fails:
///
/// | inner error | layer's error | each waiter of a failed call gets |
/// |---|---|---|
/// | [`Infallible`] | [`Infallible`] | (cannot fail) |
/// | [`BoxError`] | [`BoxError`] | a boxed [`Error`], the inner error its source |
/// | [`Error`] (a nested layer) | [`Error`] | an [`Error`] whose source is the inner one |
///
/// So the layer goes straight into an axum router, whose handlers are
/// infallible. For a service with another error type, such as hyper-util's
/// client, box its errors first, for example with
/// `ServiceBuilder::map_err(BoxError::from)`. A call that is not shared (a
/// request without a key, a follower's own call) returns its error as it is.
///
/// When such a stack's response future is awaited inside an `async` block
/// that must be `Send` (one given to `tokio::spawn`, or an axum handler),
/// rustc may reject it with "implementation of `HttpError` is not general
/// enough", although the future is `Send`. Boxing the future first, as a
/// `Pin<Box<dyn Future<Output = ..> + Send>>`, works around it.
///
/// Sealed: implemented for the three types above only. Failures of the layer
/// itself never become errors: see [`HttpSingleflight`]'s `# Errors`.
///
/// # Examples
///
/// ```
/// use std::convert::Infallible;
/// use tower_singleflight::http::HttpError;
///
/// fn layer_error<E: HttpError>() -> &'static str {
///     std::any::type_name::<E::Shared>()
/// }
/// assert_eq!(layer_error::<Infallible>(), "core::convert::Infallible");
/// ```
///
/// [`HttpSingleflight`]: crate::http::HttpSingleflight
pub trait HttpError: Into<BoxError> + sealed::Sealed {
    /// The error type of the layer's service.
    type Shared;

    /// Turns a failed flight's shared error into the layer's error, or hands
    /// it back when the layer's error type cannot hold it.
    #[doc(hidden)]
    fn share(error: Error) -> Result<Self::Shared, Error>;

    /// Turns the error of an unshared call (a bypass, a follower's own call)
    /// into the layer's error, as it is where the types allow.
    #[doc(hidden)]
    fn unshared(self) -> Self::Shared;
}

impl HttpError for Infallible {
    type Shared = Infallible;

    fn share(error: Error) -> Result<Infallible, Error> {
        // An infallible service's flight fails only by a panic or a wait
        // limit, which the layer answers itself.
        Err(error)
    }

    fn unshared(self) -> Infallible {
        self
    }
}

impl HttpError for BoxError {
    type Shared = BoxError;

    fn share(error: Error) -> Result<BoxError, Error> {
        Ok(Box::new(error))
    }

    fn unshared(self) -> BoxError {
        self
    }
}

impl HttpError for Error {
    type Shared = Error;

    fn share(error: Error) -> Result<Error, Error> {
        Ok(error)
    }

    fn unshared(self) -> Error {
        self
    }
}

/// The layer's own answer to a failure it cannot return as an error: 503
/// for a wait limit, 500 for anything else (a panic). It carries `error` as
/// an `Arc<Error>` extension.
pub(crate) fn failure_response<B: Body>(error: Error) -> Response<ResponseBody<B>> {
    let (status, text) = if error.is_wait_limit() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "timed out waiting for a shared response\n",
        )
    } else {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            "the request handler failed\n",
        )
    };
    let mut res = Response::new(ResponseBody::replay(text.into(), None));
    *res.status_mut() = status;
    let plain = HeaderValue::from_static("text/plain; charset=utf-8");
    res.headers_mut().insert(CONTENT_TYPE, plain);
    res.extensions_mut().insert(Arc::new(error));
    res
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for std::convert::Infallible {}
    impl Sealed for crate::error::BoxError {}
    impl Sealed for crate::error::Error {}
}
