//! Degraded broker-to-broker links for the fault run's `LinkDegrade`: latency, jitter, loss and
//! duplicates through a netfilter queue the test reads (see [`DegradedLinks`]).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// The netfilter queues of degraded links: `QUEUE_BASE + net`, so that runs on different
/// loopback networks use different queues, and leftovers are recognised as ours.
const QUEUE_BASE: u16 = 0x4b00;

/// Latency, jitter, loss and duplicates on the links between one address and others (both
/// directions), for the fault run's `LinkDegrade`. iptables sends those packets (and only
/// those: matched on each address pair) to a netfilter queue that a thread of the test reads:
/// it drops some, sends a copy of some again (through a raw socket, so the copy arrives
/// separately and is itself delayed), and lets each of the others through once its delay,
/// drawn from the seed, has passed, so packets are also reordered. Linux and root only.
///
/// This does in the test what `tc qdisc … netem` does in the kernel: the kernels of this
/// project's machines are built without `sch_netem` (and without `sch_prio`), while netfilter
/// queues and iptables are there on any Linux that runs the other network faults. The rules are
/// removed on [`DegradedLinks::heal`] or drop (held packets are then let through at once), and
/// [`DegradedLinks::probe`] removes the rules a run that died left behind.
pub struct DegradedLinks {
    rules: Vec<(String, String)>,
    queue: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    worker: Option<std::thread::JoinHandle<LinkStats>>,
}

/// What a degraded link did to its packets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    pub packets: u64,
    pub lost: u64,
    pub duplicated: u64,
}

impl std::fmt::Display for LinkStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} packets delayed, {} lost, {} duplicated",
            self.packets, self.lost, self.duplicated
        )
    }
}

impl DegradedLinks {
    /// The queue of the run on `127.0.<net>.*`.
    pub fn queue_for(net: u8) -> u16 {
        QUEUE_BASE + u16::from(net)
    }

    /// Whether links can be degraded here (iptables and a netfilter queue, as root): `Err`
    /// says why not. First removes the rules of degraded links that nobody reads any more
    /// (a run that died while one held).
    pub fn probe(queue: u16) -> Result<(), String> {
        remove_leftover_queue_rules();
        let mut q = nfq::Queue::open().map_err(|e| format!("no netfilter queue socket: {e}"))?;
        q.bind(queue)
            .map_err(|e| format!("cannot bind netfilter queue {queue}: {e}"))?;
        let _ = q.unbind(queue);
        let ok = std::process::Command::new("iptables")
            .args(["-w", "-S", "INPUT"])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            Ok(())
        } else {
            Err("iptables does not answer".to_owned())
        }
    }

    /// Degrades the links between `ip` and each of `others`, both directions, until healed.
    pub fn degrade(
        ip: &str,
        others: &[String],
        netem: crate::faults::Netem,
        seed: u64,
        queue: u16,
    ) -> Result<Self, String> {
        use std::sync::Arc;
        use std::sync::atomic::AtomicBool;
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let worker = {
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("degraded-links".into())
                .spawn(move || delay_packets(queue, netem, seed, &stop, &ready_tx))
                .map_err(|e| e.to_string())?
        };
        let mut links = Self {
            rules: Vec::new(),
            queue,
            stop,
            worker: Some(worker),
        };
        ready_rx
            .recv()
            .map_err(|_| "the packet thread stopped".to_owned())??;
        for o in others {
            for (src, dst) in [(ip, o.as_str()), (o.as_str(), ip)] {
                let ok = std::process::Command::new("iptables")
                    .args(["-w", "-I", "INPUT"])
                    .args(queue_rule(src, dst, queue))
                    .status()
                    .is_ok_and(|s| s.success());
                if !ok {
                    return Err(format!("iptables refused the queue rule {src} -> {dst}"));
                }
                links.rules.push((src.to_owned(), dst.to_owned()));
            }
        }
        Ok(links)
    }

    /// Removes the rules, lets every held packet through and says what was done.
    pub fn heal(mut self) -> LinkStats {
        self.remove()
    }

    fn remove(&mut self) -> LinkStats {
        for (src, dst) in self.rules.drain(..) {
            let _ = std::process::Command::new("iptables")
                .args(["-w", "-D", "INPUT"])
                .args(queue_rule(&src, &dst, self.queue))
                .status();
        }
        // Only now, so that the thread also sees the packets queued before the rules went.
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        self.worker
            .take()
            .and_then(|w| w.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for DegradedLinks {
    fn drop(&mut self) {
        self.remove();
    }
}

/// An iptables INPUT rule (after `-I INPUT`/`-D INPUT`) that queues `src` -> `dst` packets.
/// `--queue-bypass`: with nobody reading the queue, packets pass instead of being dropped.
fn queue_rule(src: &str, dst: &str, queue: u16) -> Vec<String> {
    [
        "-s",
        src,
        "-d",
        dst,
        "-j",
        "NFQUEUE",
        "--queue-num",
        &queue.to_string(),
        "--queue-bypass",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// Deletes INPUT rules to one of our queues that nobody has bound (left by a run that died).
fn remove_leftover_queue_rules() {
    let bound: std::collections::BTreeSet<u16> =
        std::fs::read_to_string("/proc/net/netfilter/nfnetlink_queue")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_whitespace().next()?.parse().ok())
            .collect();
    let Ok(out) = std::process::Command::new("iptables")
        .args(["-w", "-S", "INPUT"])
        .output()
    else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let queue = words
            .iter()
            .position(|w| *w == "--queue-num")
            .and_then(|i| words.get(i + 1)?.parse::<u16>().ok());
        if words.starts_with(&["-A", "INPUT"])
            && queue.is_some_and(|q| (QUEUE_BASE..=QUEUE_BASE + 255).contains(&q))
            && queue.is_some_and(|q| !bound.contains(&q))
        {
            let _ = std::process::Command::new("iptables")
                .args(["-w", "-D", "INPUT"])
                .args(&words[2..])
                .status();
        }
    }
}

/// The thread behind [`DegradedLinks`]: binds `queue`, says so on `ready`, then holds, drops
/// and duplicates packets until `stop`, when every packet still held goes through.
fn delay_packets(
    queue: u16,
    netem: crate::faults::Netem,
    seed: u64,
    stop: &std::sync::atomic::AtomicBool,
    ready: &std::sync::mpsc::Sender<Result<(), String>>,
) -> LinkStats {
    let mut q = match nfq::Queue::open().and_then(|mut q| {
        q.bind(queue)?;
        // Packets beyond the queue's length pass rather than being lost.
        q.set_fail_open(queue, true)?;
        q.set_queue_max_len(queue, 1 << 16)?;
        Ok(q)
    }) {
        Ok(q) => q,
        Err(e) => {
            let _ = ready.send(Err(format!("netfilter queue {queue}: {e}")));
            return LinkStats::default();
        }
    };
    q.set_nonblocking(true);
    // A raw IP socket re-sends the duplicates as they are (IPPROTO_RAW: the header included).
    let raw = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::RAW,
        Some(socket2::Protocol::from(IPPROTO_RAW)),
    )
    .ok();
    let _ = ready.send(Ok(()));
    let mut rng = crate::faults::Rng::new(seed);
    let mut stats = LinkStats::default();
    let mut held: BTreeMap<(Instant, u64), nfq::Message> = BTreeMap::new();
    let mut n = 0u64;
    loop {
        // Read `stop` before draining: once it is set, the rules are gone, so what the drain
        // finds is the last of the queue.
        let stopping = stop.load(std::sync::atomic::Ordering::Acquire);
        loop {
            let mut msg = match q.recv() {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => break,
            };
            stats.packets += 1;
            if rng.range(0, 99) < u64::from(netem.loss_pct) {
                stats.lost += 1;
                msg.set_verdict(nfq::Verdict::Drop);
                let _ = q.verdict(msg);
                continue;
            }
            let payload = msg.get_payload();
            if let Some(raw) = &raw
                && rng.range(0, 99) < u64::from(netem.duplicate_pct)
                && payload.len() == msg.get_original_len()
                && payload.len() >= 20
                && payload[0] >> 4 == 4
            {
                let dst =
                    std::net::Ipv4Addr::new(payload[16], payload[17], payload[18], payload[19]);
                let to = std::net::SocketAddr::from((dst, 0));
                if raw.send_to(payload, &to.into()).is_ok() {
                    stats.duplicated += 1;
                }
            }
            let jitter = u64::from(netem.jitter_ms);
            let delay =
                (u64::from(netem.delay_ms) + rng.range(0, 2 * jitter)).saturating_sub(jitter);
            n += 1;
            held.insert((Instant::now() + Duration::from_millis(delay), n), msg);
        }
        let now = Instant::now();
        while let Some(entry) = held.first_entry() {
            if !stopping && entry.key().0 > now {
                break;
            }
            let mut msg = entry.remove();
            msg.set_verdict(nfq::Verdict::Accept);
            let _ = q.verdict(msg);
        }
        if stopping {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let _ = q.unbind(queue);
    stats
}

/// A raw socket whose packets carry their own IP header.
const IPPROTO_RAW: i32 = 255;
