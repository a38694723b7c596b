//! What the `tracing` feature logs about keys (K3 of the contract): a hash,
//! never the key.
//!
//! A test binary of its own: every thread that runs a test here has a
//! subscriber, so no callsite's interest is cached as "never" by a thread
//! without one while a test captures its log.
#![cfg(feature = "tracing")]

use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use tower_singleflight::Group;
use tracing_subscriber::fmt::format::FmtSpan;
use tracing_subscriber::fmt::MakeWriter;

mod support;

use support::{within, Gate};

/// Everything a subscriber writes, kept in memory.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Captured {
    type Writer = Self;

    fn make_writer(&'a self) -> Self {
        self.clone()
    }
}

impl Captured {
    /// Captures every event and span of this thread from now on.
    fn install(&self) -> tracing::subscriber::DefaultGuard {
        let subscriber = tracing_subscriber::fmt()
            .with_writer(self.clone())
            .with_max_level(tracing::Level::TRACE)
            .with_span_events(FmtSpan::FULL)
            .with_ansi(false)
            .without_time()
            .finish();
        let guard = tracing::subscriber::set_default(subscriber);

        // Other tests of this binary run on threads with no subscriber,
        // and a callsite they reach first may have cached "never".
        tracing::callsite::rebuild_interest_cache();
        guard
    }

    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

/// The `key_hash` of each event that started a flight.
fn leader_hashes(log: &str) -> Vec<u64> {
    log.lines()
        .filter(|line| line.contains("started a flight as its leader"))
        .filter_map(|line| {
            line.rsplit("key_hash=")
                .next()?
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn trace_output_names_a_hash_of_the_key_and_never_the_key() {
    let captured = Captured::default();
    let _guard = captured.install();
    let group = Group::<Secret, u32>::new();
    let key = || Secret(SECRET.to_owned());

    // A shared success, handed over from a departing leader.
    let gate = Gate::new();
    let wait = gate.wait();
    let mut leader = Box::pin(group.run(key(), move || async move {
        wait.await;
        Ok::<_, io::Error>(1)
    }));
    assert!(futures::poll!(leader.as_mut()).is_pending());
    let follower = group.run(key(), || async { Ok::<_, io::Error>(0) });
    drop(leader);
    gate.open();
    assert_eq!(within(follower).await.unwrap(), 1);

    // A shared failure, a panic and an abandoned flight.
    let failing = || async { Err::<u32, _>(io::Error::other("no")) };
    let (first, second) = tokio::join!(group.run(key(), failing), group.run(key(), failing));
    assert!(first.is_err() && second.is_err());
    let panicking = || async {
        panic!("boom");
        #[allow(unreachable_code)]
        Ok::<u32, io::Error>(0)
    };
    assert!(group.run(key(), panicking).await.unwrap_err().is_panic());
    let mut abandoned = Box::pin(group.run(key(), std::future::pending::<io::Result<u32>>));
    assert!(futures::poll!(abandoned.as_mut()).is_pending());
    drop(abandoned);

    // The log speaks of key hashes, never of the key.
    let log = captured.text();
    assert!(log.contains("key_hash="), "{log}");
    assert!(!log.contains(SECRET), "{log}");
}

#[tokio::test(flavor = "current_thread")]
async fn each_group_hashes_keys_with_its_own_random_key() {
    let captured = Captured::default();
    let _guard = captured.install();
    let key = || Secret(SECRET.to_owned());

    // Two groups each lead a flight for the same key.
    for _ in 0..2 {
        let group = Group::<Secret, u32>::new();
        group
            .run(key(), || async { Ok::<_, io::Error>(1) })
            .await
            .unwrap();
    }

    // The two hashes differ (each group draws its own hasher keys, as
    // std's `RandomState` does), and neither is a fixed-key hash.
    let hashes = leader_hashes(&captured.text());
    assert_eq!(hashes.len(), 2, "{}", captured.text());
    assert_ne!(hashes[0], hashes[1]);
    let fixed = BuildHasherDefault::<DefaultHasher>::default().hash_one(key());
    assert!(!hashes.contains(&fixed));
}

/// A key that must never appear in any output.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Secret(String);

const SECRET: &str = "hunter2-session-token";
