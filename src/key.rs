//! How a request maps to the key it coalesces on.

use std::fmt;
use std::hash::Hash;

/// Maps a request to the key it coalesces on, or declines.
///
/// Requests whose keys are equal (by `Eq`; an equal hash is never enough)
/// share a flight while one is in progress. A request the extractor declines
/// goes straight to the inner service, untouched and uncounted.
///
/// Every `Fn(&Req) -> Key` is an extractor that never declines; wrap a
/// closure returning `Option<Key>` in [`optional`] to decline with `None`.
/// Build keys from everything that changes the response, including the
/// caller's identity: a key that leaves out a dimension hands one caller's
/// response to another.
///
/// # Examples
///
/// ```
/// use tower_singleflight::key::{optional, KeyExtractor};
///
/// struct Lookup { id: u64, fresh: bool }
///
/// let by_id = |req: &Lookup| req.id;
/// assert_eq!(by_id.extract(&Lookup { id: 7, fresh: false }), Some(7));
///
/// // Requests asking for a fresh value are never coalesced.
/// let cached_only = optional(|req: &Lookup| (!req.fresh).then_some(req.id));
/// assert_eq!(cached_only.extract(&Lookup { id: 7, fresh: true }), None);
/// ```
pub trait KeyExtractor<Req> {
    /// The key. It is hashed with a randomly keyed hasher and never logged.
    type Key: Hash + Eq + Send + Sync + 'static;

    /// The key of `req`, or `None` to let it bypass coalescing.
    fn extract(&self, req: &Req) -> Option<Self::Key>;
}

impl<F, Req, Key> KeyExtractor<Req> for F
where
    F: Fn(&Req) -> Key,
    Key: Hash + Eq + Send + Sync + 'static,
{
    type Key = Key;

    fn extract(&self, req: &Req) -> Option<Key> {
        Some(self(req))
    }
}

/// An extractor from a closure that returns `Option<Key>`; made by
/// [`optional`].
#[derive(Clone, Copy)]
pub struct Optional<F>(F);

/// Turns a closure returning `Option<Key>` into an extractor that declines
/// requests for which it returns `None`.
pub const fn optional<F>(f: F) -> Optional<F> {
    Optional(f)
}

impl<F, Req, Key> KeyExtractor<Req> for Optional<F>
where
    F: Fn(&Req) -> Option<Key>,
    Key: Hash + Eq + Send + Sync + 'static,
{
    type Key = Key;

    fn extract(&self, req: &Req) -> Option<Key> {
        (self.0)(req)
    }
}

impl<F> fmt::Debug for Optional<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Optional(..)")
    }
}
