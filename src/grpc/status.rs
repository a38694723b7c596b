//! The gRPC layer's own answers (statuses it gives without the inner
//! service), and the `grpc-timeout` header each caller's deadline comes in.

use std::sync::Arc;
use std::time::Duration;

use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response};
use http_body::Body;
use tokio::time::Instant;

use crate::error::Error;
use crate::http::ResponseBody;

/// The header that carries a call's deadline, as a time left.
pub(crate) const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");

// The status codes the layer answers with, as gRPC numbers them.
const DEADLINE_EXCEEDED: &str = "4";
const INTERNAL: &str = "13";
const UNAVAILABLE: &str = "14";

/// A caller's deadline passed before its call finished: one it waited for
/// as a follower when `following`, else its own.
pub(crate) fn deadline_exceeded<B: Body>(following: bool) -> Response<ResponseBody<B>> {
    let message = if following {
        "deadline exceeded while waiting for a shared call"
    } else {
        "deadline exceeded"
    };
    status(DEADLINE_EXCEEDED, message)
}

/// The layer's own failure: `UNAVAILABLE` for a wait limit, `INTERNAL` for
/// anything else (a panic, in the shared call or in a follower's own). It
/// carries `error` as an `Arc<Error>` extension.
pub(crate) fn failure<B: Body>(error: Error) -> Response<ResponseBody<B>> {
    let mut res = if error.is_wait_limit() {
        status(UNAVAILABLE, "timed out waiting for a shared call")
    } else {
        status(INTERNAL, "the call panicked")
    };
    res.extensions_mut().insert(Arc::new(error));
    res
}

/// A trailers-only response: the status in the head, no message.
///
/// `message` is plain ASCII without `%`, so it needs no percent-encoding.
fn status<B: Body>(code: &'static str, message: &'static str) -> Response<ResponseBody<B>> {
    let mut res = Response::new(ResponseBody::replay(Default::default(), None));
    let headers = res.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.insert(GRPC_STATUS, HeaderValue::from_static(code));
    headers.insert(GRPC_MESSAGE, HeaderValue::from_static(message));
    res
}

/// The time left that a request's `grpc-timeout` says, if it says one a
/// client may send: 1 to 8 digits, then a unit (`H`, `M`, `S`, `m`, `u` or
/// `n`). A malformed one is ignored, as tonic does.
pub(crate) fn timeout(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(GRPC_TIMEOUT)?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 60 * 60),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A follower's deadline, kept in its request's extensions while the
/// request waits in its slot: the shared call carries no caller's deadline,
/// but a follower's own call carries what is left of the follower's.
#[derive(Clone, Copy)]
pub(crate) struct FollowerDeadline(pub(crate) Instant);

/// Puts what is left of a follower's deadline, if its request has one, back
/// on the request as its `grpc-timeout`, as the request leaves for the
/// inner service.
pub(crate) fn restore_deadline<B>(req: &mut Request<B>) {
    if let Some(FollowerDeadline(deadline)) = req.extensions_mut().remove() {
        let left = deadline.saturating_duration_since(Instant::now());
        req.headers_mut().insert(GRPC_TIMEOUT, timeout_value(left));
    }
}

/// `left` as a `grpc-timeout` value: the finest unit that fits in 8 digits,
/// rounded up.
pub(crate) fn timeout_value(left: Duration) -> HeaderValue {
    const MAX: u128 = 99_999_999;
    let nanos = left.as_nanos();
    let units = [
        (1, 'n'),
        (1_000, 'u'),
        (1_000_000, 'm'),
        (1_000_000_000, 'S'),
        (60_000_000_000, 'M'),
        (3_600_000_000_000, 'H'),
    ];
    let (n, unit) = units
        .iter()
        .map(|&(per, unit)| (nanos.div_ceil(per), unit))
        .find(|&(n, _)| n <= MAX)
        .unwrap_or((MAX, 'H'));
    HeaderValue::from_str(&format!("{n}{unit}")).expect("digits and a letter are a header value")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(value: &'static str) -> Option<Duration> {
        let mut headers = HeaderMap::new();
        headers.insert(GRPC_TIMEOUT, HeaderValue::from_static(value));
        timeout(&headers)
    }

    #[test]
    fn every_unit_of_grpc_timeout_parses() {
        assert_eq!(parse("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse("4S"), Some(Duration::from_secs(4)));
        assert_eq!(parse("150m"), Some(Duration::from_millis(150)));
        assert_eq!(parse("7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse("99999999n"), Some(Duration::from_nanos(99_999_999)));
    }

    #[test]
    fn malformed_grpc_timeouts_are_ignored() {
        for value in ["", "m", "123456789m", "1x", "-1S", "1.5S", "1 S"] {
            assert_eq!(parse(value), None, "{value:?}");
        }
    }

    #[test]
    fn time_left_is_written_in_the_finest_unit_that_fits() {
        let value = |left| timeout_value(left).to_str().unwrap().to_owned();
        assert_eq!(value(Duration::from_nanos(1_500)), "1500n");
        assert_eq!(value(Duration::from_millis(250)), "250000u");
        assert_eq!(value(Duration::from_secs(500)), "500000m");
        assert_eq!(value(Duration::from_secs(86_400 * 365)), "31536000S");
        assert_eq!(parse("250m"), Some(Duration::from_millis(250)));
    }
}
