//! The timed scenarios of `BENCHMARKS.md`, every implementation side by
//! side, in one process: no duplicates, hot key, mixed, and the failure
//! paths. Prints markdown tables, then the targets of the benchmark issue
//! checked against this run.
//!
//! Run with `cargo bench --bench scenarios`; add `-- --quick` for a short
//! run, and scenario names (`no-dup`, `hot-key`, `mixed`, `failure`) to run
//! only those.

// A scenario binary: the tables it prints are its output.
#![allow(clippy::print_stdout)]

#[macro_use]
mod support;

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::runtime::Runtime;

use support::{
    announced, cpu_time, median, print_table, runtime, Arrivals, AsyncSingleflight, Backend, Bare,
    Caller, Contender, Floor, Gate, Mode, OursGroup, OursService, Resilience, RsSingleflight,
    SingleflightAsync, Uniflight,
};

/// The one key of the hot-key and failure scenarios.
const HOT_KEY: u64 = 7;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|arg| arg == "--quick");
    let names: Vec<&str> = args
        .iter()
        .filter(|arg| !arg.starts_with('-'))
        .map(String::as_str)
        .collect();
    let wanted = |name: &str| names.is_empty() || names.contains(&name);

    // For profilers: `--profile=NAME --calls=N` makes N uncoalesced calls
    // through one contender on one thread (for callgrind), and nothing else;
    // `--workers=W` makes them from 64 tasks on W workers instead (for perf);
    // `--callers=N` runs one hot-key round of N callers on one thread.
    let value = |flag: &str| args.iter().find_map(|arg| arg.strip_prefix(flag));
    if let Some(name) = value("--profile=") {
        let calls = value("--calls=").map_or(100_000, |n| n.parse().expect("a count"));
        let workers = value("--workers=").map_or(0, |n| n.parse().expect("a count"));
        let hot = value("--callers=").map(|n| n.parse().expect("a count"));
        let ran = match hot {
            // `--callers=N`: one hot-key round of N callers, on one thread.
            Some(callers) => each_contender!(profile_hot(name, callers), with bare),
            None => each_contender!(profile(name, calls, workers), with baselines),
        };
        assert!(
            ran.iter().any(|(_, ran)| *ran),
            "no contender is named {name}"
        );
        return;
    }

    // Two workers, as the issue asks: the machine has two cores.
    let rt = runtime(2);
    println!("Mode: {}", if quick { "quick" } else { "full" });
    let mut targets = Vec::new();
    if wanted("no-dup") {
        targets.extend(no_duplicates(&rt, if quick { 3 } else { 7 }));
    }
    if wanted("hot-key") {
        targets.extend(hot_key(&rt, quick));
    }
    if wanted("mixed") {
        mixed(&rt, if quick { 3 } else { 10 });
    }
    if wanted("failure") {
        failure_paths(&rt);
    }
    if !targets.is_empty() {
        println!("\n#### Targets, in this run\n");
        for line in targets {
            println!("- {line}");
        }
    }
}

// --- no duplicates ---

const DISTINCT_CALLS: u64 = 1_000_000;
const DISTINCT_TASKS: u64 = 64;

/// 1 M distinct keys from 64 tasks; the call returns at once.
fn no_duplicates(rt: &Runtime, rounds: usize) -> Vec<String> {
    // Rounds interleave the contenders, so drift on a shared machine hits
    // them all alike; each keeps the median of its rounds.
    let mut wall: Vec<(&str, Vec<f64>)> = Vec::new();
    let mut cpu: Vec<Vec<f64>> = Vec::new();
    for round in 0..rounds {
        let results = each_contender!(distinct_round(rt), with baselines);
        for (index, (name, (wall_ns, cpu_ns))) in results.into_iter().enumerate() {
            if round == 0 {
                wall.push((name, Vec::new()));
                cpu.push(Vec::new());
            }
            wall[index].1.push(wall_ns);
            cpu[index].push(cpu_ns);
        }
    }

    let names: Vec<&str> = wall.iter().map(|(name, _)| *name).collect();
    let wall: Vec<f64> = wall.into_iter().map(|(_, values)| median(values)).collect();
    let cpu: Vec<f64> = cpu.into_iter().map(median).collect();
    let cells = |values: &[f64]| values.iter().map(|ns| format!("{ns:.0}")).collect();
    let title = format!(
        "No duplicates: {DISTINCT_CALLS} distinct keys from {DISTINCT_TASKS} tasks, \
         2 workers (median of {rounds} rounds)"
    );
    let rows = [
        ("ns per call (wall)".to_owned(), cells(&wall)),
        ("CPU ns per call".to_owned(), cells(&cpu)),
    ];
    print_table(&title, &names, &rows);

    // The targets: against the fastest peer, the floor, and the other layer.
    let of = |name: &str| wall[names.iter().position(|n| *n == name).expect("measured")];
    let ours = of(OursGroup::NAME);
    let peers = [
        Resilience::NAME,
        Uniflight::NAME,
        RsSingleflight::NAME,
        SingleflightAsync::NAME,
        AsyncSingleflight::NAME,
    ];
    let (best, best_ns) = peers
        .iter()
        .map(|name| (*name, of(name)))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .expect("peers");
    vec![
        verdict(
            &format!("no duplicates: ours (Group) / fastest peer ({best})"),
            ours / best_ns,
            0.7,
        ),
        verdict(
            "no duplicates: ours (Group) / floor",
            ours / of(Floor::NAME),
            1.5,
        ),
        verdict(
            "no duplicates: ours (Service) / tower-resilience-coalesce",
            of(OursService::NAME) / of(Resilience::NAME),
            0.5,
        ),
    ]
}

/// One round: wall and CPU nanoseconds per call.
fn distinct_round<C: Contender>(rt: &Runtime) -> (f64, f64) {
    let contender = C::new(Backend::new(Mode::Immediate));
    let per_task = DISTINCT_CALLS / DISTINCT_TASKS;
    let (wall, cpu) = rt.block_on(async {
        let cpu = cpu_time();
        let start = Instant::now();
        let tasks: Vec<_> = (0..DISTINCT_TASKS)
            .map(|task| {
                let mut caller = contender.caller();
                tokio::spawn(async move {
                    let mut failed = 0;
                    for key in task * per_task..(task + 1) * per_task {
                        failed += u64::from(black_box(caller.call(key).await).is_err());
                    }
                    failed
                })
            })
            .collect();
        for task in tasks {
            assert_eq!(task.await.expect("a caller task"), 0, "{} failed", C::NAME);
        }
        (start.elapsed(), cpu_time() - cpu)
    });
    let calls = (per_task * DISTINCT_TASKS) as f64;
    (
        wall.as_nanos() as f64 / calls,
        cpu.as_nanos() as f64 / calls,
    )
}

/// `calls` uncoalesced calls through `C`, if it is the one `name`d: on
/// this thread, or, given `workers`, as in the no-duplicates scenario.
fn profile<C: Contender>(name: &str, calls: u64, workers: usize) -> bool {
    if name != C::NAME {
        return false;
    }
    if workers > 0 {
        let rt = runtime(workers);
        for _ in 0..calls.div_ceil(DISTINCT_CALLS) {
            black_box(distinct_round::<C>(&rt));
        }
        return true;
    }
    let contender = C::new(Backend::new(Mode::Immediate));
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    let mut caller = contender.caller();
    rt.block_on(async {
        for key in 0..calls {
            black_box(caller.call(key).await).expect("a value");
        }
    });
    true
}

/// One hot-key round of `callers` callers through `C`, on this thread, if
/// it is the one `name`d.
fn profile_hot<C: Contender>(name: &str, callers: usize) -> bool {
    if name != C::NAME {
        return false;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    black_box(hot_rounds::<C>(&rt, callers, 1).inner_calls);
    true
}

// --- hot key ---

/// What one contender did with N callers on one key, over its rounds.
struct HotKey {
    cpu_us: f64,
    served_us: f64,
    inner_calls: f64,
    failed: u64,
}

/// 1 to 10,000 concurrent callers on one key; the call completes on a signal.
fn hot_key(rt: &Runtime, quick: bool) -> Vec<String> {
    let sizes: [(usize, usize); 5] = if quick {
        [(1, 50), (10, 50), (100, 20), (1_000, 10), (10_000, 3)]
    } else {
        [(1, 300), (10, 200), (100, 100), (1_000, 40), (10_000, 8)]
    };
    let mut by_size = Vec::new();
    for (callers, rounds) in sizes {
        by_size.push((
            callers,
            rounds,
            each_contender!(hot_rounds(rt, callers, rounds), with bare),
        ));
    }

    let names: Vec<&str> = by_size[0].2.iter().map(|(name, _)| *name).collect();
    let table = |title: &str, cell: &dyn Fn(&HotKey) -> String| {
        let rows: Vec<(String, Vec<String>)> = by_size
            .iter()
            .map(|(callers, rounds, results)| {
                let metric = format!("{callers} callers ({rounds} rounds)");
                (metric, results.iter().map(|(_, hot)| cell(hot)).collect())
            })
            .collect();
        print_table(title, &names, &rows);
    };
    table("Hot key: CPU time per round, µs (median)", &|hot| {
        format!("{:.0}", hot.cpu_us)
    });
    table(
        "Hot key: call returned → last caller served, µs (median)",
        &|hot| format!("{:.1}", hot.served_us),
    );
    table("Hot key: inner calls per round (mean)", &|hot| {
        let failed = if hot.failed > 0 {
            format!(" ({} failed)", hot.failed)
        } else {
            String::new()
        };
        format!("{:.2}{failed}", hot.inner_calls)
    });

    // The targets, at 1,000 callers.
    let thousand = &by_size[3].2;
    let of = |name: &str| {
        &thousand
            .iter()
            .find(|(n, _)| *n == name)
            .expect("measured")
            .1
    };
    let ours = of(OursGroup::NAME);
    let peers = |busy: bool| {
        thousand
            .iter()
            .filter(|(name, _)| !name.starts_with("ours") && *name != Bare::NAME)
            .filter(move |(name, _)| busy || *name != Resilience::NAME)
    };
    let best = |busy: bool, metric: fn(&HotKey) -> f64| {
        peers(busy)
            .map(|(name, hot)| (*name, metric(hot)))
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .expect("peers")
    };
    let (cpu_peer, cpu_best) = best(true, |hot| hot.cpu_us);
    let (served_peer, served_best) = best(false, |hot| hot.served_us);
    vec![
        format!(
            "hot key, 1,000 callers: inner calls per round {:.2} (target exactly 1): {}",
            ours.inner_calls,
            if ours.inner_calls == 1.0 {
                "met"
            } else {
                "MISSED"
            }
        ),
        verdict(
            &format!("hot key, 1,000 callers: CPU per round, ours / best peer ({cpu_peer})"),
            ours.cpu_us / cpu_best,
            0.8,
        ),
        verdict(
            &format!(
                "hot key, 1,000 callers: return → last served, ours / best peer that does \
                 not busy-poll ({served_peer})"
            ),
            ours.served_us / served_best,
            0.5,
        ),
    ]
}

/// `rounds` rounds of `callers` callers on one key.
fn hot_rounds<C: Contender>(rt: &Runtime, callers: usize, rounds: usize) -> HotKey {
    let backend = Backend::new(Mode::Gated);
    let contender = C::new(backend);
    let (mut cpu, mut served, mut failed) = (Vec::new(), Vec::new(), 0);
    rt.block_on(async {
        for _ in 0..rounds {
            // Every caller joins; then the backend is let go.
            backend.gate().close();
            let arrivals = Arrivals::new(callers);
            let start = cpu_time();
            let tasks: Vec<_> = (0..callers)
                .map(|_| {
                    let mut caller = contender.caller();
                    let arrivals = Arc::clone(&arrivals);
                    tokio::spawn(async move {
                        let outcome = announced(caller.call(HOT_KEY), &arrivals).await;
                        (outcome, Instant::now())
                    })
                })
                .collect();
            arrivals.all().await;
            backend.gate().open();

            // The last caller served, counted from the call's return.
            let mut last = None;
            for task in tasks {
                let (outcome, at) = task.await.expect("a caller task");
                failed += u64::from(outcome.is_err());
                last = last.max(Some(at));
            }
            cpu.push(micros(cpu_time() - start));
            let returned = backend.take_returned().expect("the call returned");
            let last = last.expect("callers");
            served.push(micros(last.saturating_duration_since(returned)));
        }
    });
    HotKey {
        cpu_us: median(cpu),
        served_us: median(served),
        inner_calls: backend.calls() as f64 / rounds as f64,
        failed,
    }
}

// --- mixed ---

const MIXED_TASKS: u64 = 10_000;
const MIXED_KEYS: u64 = 100;

/// 10,000 tasks over 100 keys, released together; the call yields once.
fn mixed(rt: &Runtime, rounds: usize) {
    let results = each_contender!(mixed_rounds(rt, rounds), with bare);
    let names: Vec<&str> = results.iter().map(|(name, _)| *name).collect();
    let rows = [
        (
            "calls per second".to_owned(),
            results
                .iter()
                .map(|(_, (rate, _))| format!("{rate:.0}"))
                .collect(),
        ),
        (
            "callers coalesced".to_owned(),
            results
                .iter()
                .map(|(_, (_, share))| format!("{:.1} %", share * 100.0))
                .collect(),
        ),
    ];
    let title = format!(
        "Mixed: {MIXED_TASKS} tasks over {MIXED_KEYS} keys released together \
         ({rounds} rounds)"
    );
    print_table(&title, &names, &rows);
}

/// Calls per second, and the share of callers that did not call the backend.
fn mixed_rounds<C: Contender>(rt: &Runtime, rounds: usize) -> (f64, f64) {
    let backend = Backend::new(Mode::Yield);
    let contender = C::new(backend);
    let mut elapsed = Duration::ZERO;
    rt.block_on(async {
        for _ in 0..rounds {
            let start = Arc::new(Gate::new());
            let arrivals = Arrivals::new(MIXED_TASKS as usize);
            let tasks: Vec<_> = (0..MIXED_TASKS)
                .map(|task| {
                    let mut caller = contender.caller();
                    let (start, arrivals) = (Arc::clone(&start), Arc::clone(&arrivals));
                    tokio::spawn(async move {
                        arrivals.arrive();
                        start.wait().await;
                        caller.call(task % MIXED_KEYS).await
                    })
                })
                .collect();
            arrivals.all().await;
            let released = Instant::now();
            start.open();
            for task in tasks {
                task.await.expect("a caller task").expect("a value");
            }
            elapsed += released.elapsed();
        }
    });
    let calls = (MIXED_TASKS * rounds as u64) as f64;
    (
        calls / elapsed.as_secs_f64(),
        1.0 - backend.calls() as f64 / calls,
    )
}

// --- failure paths ---

const FOLLOWERS: usize = 10;
/// How long the backend goes on after the leader is dropped.
const BACKEND_AFTER_DROP: Duration = Duration::from_millis(5);
/// How long a follower may take before it counts as hung.
const PATIENCE: Duration = Duration::from_secs(2);

/// What the followers of a failed flight saw.
struct Failed {
    inner_calls: u64,
    outcomes: String,
    waited: String,
}

/// The leader dropped while 10 followers wait; the call panics.
fn failure_paths(rt: &Runtime) {
    // Panics are the point here; keep them off the terminal.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let dropped = each_contender!(leader_dropped(rt));
    let panicked = each_contender!(call_panics(rt));
    std::panic::set_hook(hook);

    for (title, results) in [
        (
            "Failure: leader dropped while 10 followers wait (the backend returns \
             5 ms after the drop)",
            dropped,
        ),
        (
            "Failure: the call panics while 10 followers wait (the leader's \
             task counted with them)",
            panicked,
        ),
    ] {
        let names: Vec<&str> = results.iter().map(|(name, _)| *name).collect();
        let row = |cell: fn(&Failed) -> String| results.iter().map(|(_, f)| cell(f)).collect();
        let rows = [
            ("inner calls".to_owned(), row(|f| f.inner_calls.to_string())),
            ("callers got".to_owned(), row(|f| f.outcomes.clone())),
            (
                "last caller served, after the drop or panic".to_owned(),
                row(|f| f.waited.clone()),
            ),
        ];
        print_table(title, &names, &rows);
    }
}

fn leader_dropped<C: Contender>(rt: &Runtime) -> Failed {
    let backend = Backend::new(Mode::Gated);
    let contender = C::new(backend);
    rt.block_on(async {
        // The leader starts the call, then the followers join.
        let mut caller = contender.caller();
        let leader = tokio::spawn(async move { caller.call(HOT_KEY).await });
        backend.started().await;
        let arrivals = Arrivals::new(FOLLOWERS);
        let followers = spawn_callers(&contender, FOLLOWERS, &arrivals);
        arrivals.all().await;

        // Drop the leader; the backend is let go a little later, as a slow
        // backend would be, so that retrying followers can meet again.
        let dropped = Instant::now();
        leader.abort();
        let _cancelled = leader.await;
        tokio::time::sleep(BACKEND_AFTER_DROP).await;
        backend.gate().open();
        collect(followers, Some(dropped), backend).await
    })
}

fn call_panics<C: Contender>(rt: &Runtime) -> Failed {
    let backend = Backend::new(Mode::GatedPanic);
    let contender = C::new(backend);
    rt.block_on(async {
        let arrivals = Arrivals::new(FOLLOWERS + 1);
        let callers = spawn_callers(&contender, FOLLOWERS + 1, &arrivals);
        arrivals.all().await;
        backend.gate().open();

        // The caller that led is reported with the followers.
        collect(callers, None, backend).await
    })
}

type CallerTask = tokio::task::JoinHandle<(support::Outcome, Instant)>;

fn spawn_callers<C: Contender>(
    contender: &C,
    count: usize,
    arrivals: &Arc<Arrivals>,
) -> Vec<CallerTask> {
    (0..count)
        .map(|_| {
            let mut caller = contender.caller();
            let arrivals = Arc::clone(arrivals);
            tokio::spawn(async move {
                let outcome = announced(caller.call(HOT_KEY), &arrivals).await;
                (outcome, Instant::now())
            })
        })
        .collect()
}

/// Waits for the callers, up to `PATIENCE` each, and sums up what they got
/// and how long after `since` (by default, the call's return) the last one
/// got it.
async fn collect(tasks: Vec<CallerTask>, since: Option<Instant>, backend: Backend) -> Failed {
    let mut outcomes: BTreeMap<&str, usize> = BTreeMap::new();
    let mut last = None;
    let mut hung = false;
    for mut task in tasks {
        let label = match tokio::time::timeout(PATIENCE, &mut task).await {
            Ok(Ok((Ok(_), at))) => {
                last = last.max(Some(at));
                "ok"
            }
            Ok(Ok((Err(label), at))) => {
                last = last.max(Some(at));
                label
            }
            Ok(Err(_)) => "task panicked",
            Err(_) => {
                task.abort();
                hung = true;
                "hung"
            }
        };
        *outcomes.entry(label).or_default() += 1;
    }
    let outcomes = outcomes
        .into_iter()
        .map(|(label, count)| format!("{count} {label}"))
        .collect::<Vec<_>>()
        .join(", ");
    let since = since.or_else(|| backend.take_returned());
    let waited = match (hung, last.zip(since)) {
        (true, _) => format!("> {} s (hung)", PATIENCE.as_secs()),
        (false, Some((at, since))) => {
            format!("{:.0} µs", micros(at.saturating_duration_since(since)))
        }
        (false, None) => "–".to_owned(),
    };
    Failed {
        inner_calls: backend.calls(),
        outcomes,
        waited,
    }
}

// --- helpers ---

fn micros(duration: Duration) -> f64 {
    duration.as_nanos() as f64 / 1_000.0
}

/// A line saying whether `ratio` is within `target`.
fn verdict(what: &str, ratio: f64, target: f64) -> String {
    let met = if ratio <= target { "met" } else { "MISSED" };
    format!("{what}: {ratio:.2}x (target ≤ {target}x): {met}")
}
