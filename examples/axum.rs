//! An axum service with request coalescing, as you would write it.
//!
//! Run with `cargo run --example axum`, then ask for the same profile many
//! times at once from another terminal:
//!
//! ```text
//! seq 20 | xargs -P 20 -I{} curl -s -D - -o /dev/null localhost:3000/users/7 | grep singleflight
//! ```
//!
//! One request leads and the others follow: the slow lookup runs once. Ask
//! with another `Authorization` header, or for another user, and it runs
//! again, since those are other responses.

#![allow(clippy::print_stdout)] // An example reports on standard output.

use std::time::Duration;

use axum::extract::Path;
use axum::http::header;
use axum::routing::get;
use axum::Router;
use tower_singleflight::http::HttpKey;
use tower_singleflight::{OnWaitLimit, SingleflightLayer};

/// The application: a slow profile lookup behind the singleflight layer.
fn app() -> Router {
    // The key: the default (method, URL, and who asks), plus the language,
    // since the profile is rendered in it.
    let key = HttpKey::new().header(header::ACCEPT_LANGUAGE);

    // The layer: share responses of up to 64 KiB; a follower that waits
    // over two seconds makes its own call; tell clients how each response
    // was produced, in an `x-singleflight` header.
    let singleflight = SingleflightLayer::http()
        .key(key)
        .body_limit(64 * 1024)
        .follower_wait_limit(Duration::from_secs(2), OnWaitLimit::CallOwn)
        .role_header(true);

    // The routes, and the layer around them. No error handling is needed:
    // the handlers are infallible, and so is the layer over them.
    Router::new()
        .route("/users/{id}", get(profile))
        .layer(singleflight)
}

/// A lookup slow enough to be worth sharing.
async fn profile(Path(id): Path<u64>) -> String {
    tokio::time::sleep(Duration::from_millis(200)).await;
    format!("{{\"id\":{id},\"name\":\"user {id}\"}}\n")
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app()).await
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    #[tokio::test]
    async fn a_profile_request_goes_through_the_layer() {
        let req = Request::get("/users/7").body(Body::empty()).unwrap();
        let res = super::app().oneshot(req).await.unwrap();

        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.headers()["x-singleflight"], "leader");
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "{\"id\":7,\"name\":\"user 7\"}\n");
    }
}
