//! The fault run's hands: starting and healing the faults that take hold of one broker
//! ([`FaultKind::is_simple`]) as separate steps, so that two can hold at once (the five-broker
//! run's pairs) and a reassignment or a decommission can go on while one holds.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use keel_tests::cluster::{ClusterProc, NetPartition};
use keel_tests::fake_clock::ClockStep;
use keel_tests::faults::{FaultKind, Params};
use keel_tests::link_degrade::DegradedLinks;
use keel_tests::proxy::FaultProxy;

/// What a run can reach the brokers with besides their processes.
pub struct Means {
    /// The brokers' ids, 1..=n.
    pub nodes: u32,
    /// Each broker's own loopback address (iptables rules name them).
    pub ip: Box<dyn Fn(u32) -> String + Send + Sync>,
    /// The netfilter queue of degraded links.
    pub queue: u16,
    /// Each broker's libfaketime offset file.
    pub clock_file: Box<dyn Fn(u32) -> PathBuf + Send + Sync>,
    pub seed: u64,
}

impl Means {
    fn others(&self, node: u32) -> Vec<String> {
        (1..=self.nodes)
            .filter(|i| *i != node)
            .map(|i| (self.ip)(i))
            .collect()
    }
}

/// A fault in force on one broker, until [`heal`].
pub enum Held {
    /// Killed or powered off: started again when healed.
    Down(u32),
    /// SIGSTOPped (the pid): SIGCONT when healed.
    Paused(String),
    Cut(NetPartition),
    Degraded(DegradedLinks),
    Clock(ClockStep),
    FailingFsyncs(u32),
    /// The clients' link to the broker loses responses while [`hold`] runs.
    LosingResponses(u32),
}

/// Starts a simple fault of `kind` on broker `node`. `salt` tells the packets' fates of
/// degraded links apart within a run.
pub fn start(
    cluster: &mut ClusterProc,
    means: &Means,
    kind: FaultKind,
    node: u32,
    params: Params,
    salt: u64,
) -> Held {
    match kind {
        FaultKind::Kill => {
            cluster.node(node).kill9();
            Held::Down(node)
        }
        FaultKind::PowerLoss => {
            cluster.node(node).power_loss();
            Held::Down(node)
        }
        FaultKind::Pause => {
            let pid = cluster.node(node).pid().expect("running").to_string();
            let _ = std::process::Command::new("kill")
                .args(["-STOP", &pid])
                .status();
            Held::Paused(pid)
        }
        FaultKind::DropResponses => Held::LosingResponses(node),
        FaultKind::FailFsync => {
            cluster.node(node).toggle_failing_fsyncs();
            Held::FailingFsyncs(node)
        }
        FaultKind::Isolate | FaultKind::OneWay | FaultKind::CutPair => {
            let ip = (means.ip)(node);
            Held::Cut(
                match kind {
                    FaultKind::Isolate => NetPartition::isolate(&ip, &means.others(node)),
                    FaultKind::OneWay => NetPartition::one_way(&ip, &means.others(node)),
                    // The next broker by id: the others still see both.
                    _ => NetPartition::isolate(&ip, &[(means.ip)(node % means.nodes + 1)]),
                }
                .expect("iptables"),
            )
        }
        FaultKind::LinkDegrade => {
            let Params::Link(netem) = params else {
                unreachable!("a degraded link has its parameters")
            };
            // The packets' fates come from the seed and the fault's place in the run.
            let links = DegradedLinks::degrade(
                &(means.ip)(node),
                &means.others(node),
                netem,
                means.seed ^ salt,
                means.queue,
            )
            .unwrap_or_else(|e| panic!("seed {}: degrading links: {e}", means.seed));
            Held::Degraded(links)
        }
        FaultKind::ClockJump => {
            let Params::Clock { offset_s } = params else {
                unreachable!("a clock jump has its step")
            };
            Held::Clock(ClockStep::step(&(means.clock_file)(node), offset_s))
        }
        other => unreachable!("{other:?} is not a simple fault"),
    }
}

/// Keeps the faults in force for `hold`: the clients' links of `losing` lose a response every
/// 100 ms meanwhile.
pub async fn hold(proxies: &[FaultProxy], losing: &[u32], hold: Duration) {
    let until = Instant::now() + hold;
    while Instant::now() < until {
        for n in losing {
            proxies[*n as usize - 1].drop_next_response();
        }
        tokio::time::sleep(Duration::from_millis(100).min(until - Instant::now())).await;
    }
}

/// The brokers whose clients' links lose responses among `held`.
pub fn losing(held: &[Held]) -> Vec<u32> {
    held.iter()
        .filter_map(|h| match h {
            Held::LosingResponses(n) => Some(*n),
            _ => None,
        })
        .collect()
}

/// Ends the fault; says what it did where there is something to say (a degraded link's
/// packets).
pub fn heal(cluster: &mut ClusterProc, held: Held) -> Option<String> {
    match held {
        Held::Down(node) => cluster.node(node).restart(),
        Held::Paused(pid) => {
            let _ = std::process::Command::new("kill")
                .args(["-CONT", &pid])
                .status();
        }
        Held::Cut(cut) => cut.heal(),
        Held::Degraded(links) => return Some(links.heal().to_string()),
        Held::Clock(step) => step.heal(),
        Held::FailingFsyncs(node) => cluster.node(node).toggle_failing_fsyncs(),
        Held::LosingResponses(_) => {}
    }
    None
}
