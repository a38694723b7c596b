//! [`SingleflightLayer`], which wraps services in [`Singleflight`].

use std::fmt;
use std::time::Duration;

use tower_layer::Layer;

use crate::group::{Config, Group, OnWaitLimit, OwnGroup};
use crate::service::Singleflight;

/// Wraps services in [`Singleflight`], coalescing concurrent requests whose
/// keys are equal into one inner call.
///
/// `K` is the [`KeyExtractor`]; a plain `Fn(&Req) -> Key` closure works. By
/// default each wrapped service gets a group of its own (an [`OwnGroup`]);
/// [`with_group`](SingleflightLayer::with_group) shares one [`Group`] instead.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use tower::ServiceBuilder;
/// use tower_singleflight::{OnWaitLimit, SingleflightLayer};
///
/// let svc = ServiceBuilder::new()
///     .layer(
///         SingleflightLayer::new(|path: &String| path.clone())
///             .follower_wait_limit(Duration::from_secs(2), OnWaitLimit::CallOwn),
///     )
///     .service_fn(|path: String| async move { Ok::<_, std::io::Error>(path.len()) });
/// # drop(svc);
/// ```
///
/// [`KeyExtractor`]: crate::key::KeyExtractor
#[derive(Clone)]
pub struct SingleflightLayer<K, G = OwnGroup> {
    extractor: K,
    group: G,
}

impl<K> SingleflightLayer<K> {
    /// Creates a layer that keys requests with `extractor`.
    pub fn new(extractor: K) -> Self {
        let group = OwnGroup::new(Config::default());
        Self { extractor, group }
    }

    /// Limits how long followers wait for a flight; see
    /// [`Group::follower_wait_limit`].
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
    /// then apply.
    pub fn with_group<Key, T>(self, group: Group<Key, T>) -> SingleflightLayer<K, Group<Key, T>> {
        SingleflightLayer {
            extractor: self.extractor,
            group,
        }
    }
}

impl<S, K: Clone> Layer<S> for SingleflightLayer<K> {
    type Service = Singleflight<S, K>;

    fn layer(&self, inner: S) -> Self::Service {
        // Each wrapped service gets its own flights.
        Singleflight::with_group(inner, self.extractor.clone(), self.group.fresh())
    }
}

impl<S, K: Clone, Key, T> Layer<S> for SingleflightLayer<K, Group<Key, T>> {
    type Service = Singleflight<S, K, Group<Key, T>>;

    fn layer(&self, inner: S) -> Self::Service {
        Singleflight::with_group(inner, self.extractor.clone(), self.group.clone())
    }
}

impl<K, G: fmt::Debug> fmt::Debug for SingleflightLayer<K, G> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SingleflightLayer")
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}
