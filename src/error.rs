//! Errors returned by [`Group`] and [`Singleflight`].
//!
//! [`Group`]: crate::Group
//! [`Singleflight`]: crate::Singleflight

use std::any::Any;
use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;

/// A type-erased error, as tower uses for middleware errors.
pub type BoxError = Box<dyn StdError + Send + Sync>;

/// The error every waiter of a failed call receives.
///
/// One failure can reach many callers, so the inner error is shared behind an
/// [`Arc`] rather than cloned: it need not implement `Clone`. Reach it through
/// [`source`](StdError::source), [`inner`](Error::inner) or the typed
/// [`downcast_ref`](Error::downcast_ref). The crate's own failures are
/// distinct variants, told apart by [`is_panic`](Error::is_panic) and
/// [`is_wait_limit`](Error::is_wait_limit).
///
/// # Examples
///
/// ```
/// use tower_singleflight::Group;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let group: Group<&str, u32> = Group::new();
/// let err = group
///     .run("k", || async { Err(std::io::Error::other("disk on fire")) })
///     .await
///     .unwrap_err();
/// let io = err.downcast_ref::<std::io::Error>().expect("the inner error");
/// assert_eq!(io.to_string(), "disk on fire");
/// # }
/// ```
pub struct Error {
    kind: Kind,
}

enum Kind {
    /// The inner call returned an error.
    Inner(Arc<BoxError>),
    /// The inner call panicked, with the panic's message when it was a string.
    Panicked(Option<Arc<str>>),
    /// A follower's wait limit was reached before the flight finished.
    WaitLimit,
}

impl Error {
    /// Wraps the inner call's error.
    pub(crate) fn inner_error(error: impl Into<BoxError>) -> Self {
        let kind = Kind::Inner(Arc::new(error.into()));
        Self { kind }
    }

    /// Records a panic, keeping its message when the payload is a string.
    pub(crate) fn panicked(payload: &(dyn Any + Send)) -> Self {
        let message = match payload.downcast_ref::<&'static str>() {
            Some(message) => Some(Arc::from(*message)),
            None => payload
                .downcast_ref::<String>()
                .map(|s| Arc::from(s.as_str())),
        };
        Self {
            kind: Kind::Panicked(message),
        }
    }

    /// A follower gave up waiting.
    pub(crate) const fn wait_limit() -> Self {
        Self {
            kind: Kind::WaitLimit,
        }
    }

    /// Shares this error with one more waiter.
    ///
    /// Crate-private: an outcome is shared by the flight, never by callers.
    pub(crate) fn share(&self) -> Self {
        let kind = match &self.kind {
            Kind::Inner(inner) => Kind::Inner(Arc::clone(inner)),
            Kind::Panicked(message) => Kind::Panicked(message.clone()),
            Kind::WaitLimit => Kind::WaitLimit,
        };
        Self { kind }
    }

    /// The inner service's error, if the inner call failed.
    pub fn inner(&self) -> Option<&(dyn StdError + Send + Sync + 'static)> {
        match &self.kind {
            Kind::Inner(inner) => Some(&***inner),
            _ => None,
        }
    }

    /// The inner service's error as a `E`, if the inner call failed with one.
    ///
    /// This also finds an error that the inner service returned boxed as a
    /// [`BoxError`].
    pub fn downcast_ref<E: StdError + 'static>(&self) -> Option<&E> {
        self.inner()?.downcast_ref::<E>()
    }

    /// Whether the inner call panicked.
    pub fn is_panic(&self) -> bool {
        matches!(self.kind, Kind::Panicked(_))
    }

    /// The panic's message, when the inner call panicked with a string.
    pub fn panic_message(&self) -> Option<&str> {
        match &self.kind {
            Kind::Panicked(message) => message.as_deref(),
            _ => None,
        }
    }

    /// Whether this follower's wait limit was reached before the flight ended.
    pub fn is_wait_limit(&self) -> bool {
        matches!(self.kind, Kind::WaitLimit)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Inner(_) => f.write_str("inner call failed"),
            Kind::Panicked(Some(message)) => write!(f, "inner call panicked: {message}"),
            Kind::Panicked(None) => f.write_str("inner call panicked"),
            Kind::WaitLimit => f.write_str("wait limit reached before the inner call finished"),
        }
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Inner(inner) => f.debug_tuple("Inner").field(inner).finish(),
            Kind::Panicked(message) => f.debug_tuple("Panicked").field(message).finish(),
            Kind::WaitLimit => f.write_str("WaitLimit"),
        }
    }
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match &self.kind {
            Kind::Inner(inner) => Some(&***inner),
            _ => None,
        }
    }
}
