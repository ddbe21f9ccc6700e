//! Consumer-group benchmarks: `keel bench consume --group` (members sharing a topic),
//! `keel bench commit` (commit round trips) and `keel bench rebalance` (time from a member's
//! crash until the survivors own every partition again).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use bytes::Bytes;
use keel_client::{Client, GroupConfig, OffsetReset};

use crate::bench_cmd::{BenchArgs, histogram, report};

/// A fresh group id, so every run starts from the beginning of the topic.
fn fresh_group(a: &BenchArgs, what: &str) -> String {
    a.group.clone().unwrap_or_else(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        format!("bench-{what}-{nanos}")
    })
}

fn member_config(a: &BenchArgs, group: &str) -> GroupConfig {
    GroupConfig::new(group)
        .subscribe([a.topic.as_str()])
        .auto_offset_reset(OffsetReset::Earliest)
        .session_timeout(Duration::from_millis(a.session_timeout_ms))
}

/// `--consumers` members of one group read `--records` records between them. Throughput is
/// measured from the moment the group is stable (every member joined and owns its share) to
/// the last record, counting only the records read in that time, so joining and the first
/// rebalances do not count against more members.
pub async fn group_consume(client: &Client, a: &BenchArgs, partitions: u32) -> Result<()> {
    let group = fresh_group(a, "consume");
    let members = a.consumers.unwrap_or(1).max(1);
    let total = Arc::new(AtomicU64::new(0));
    let counted = Arc::new(AtomicU64::new(0));
    let bytes = Arc::new(AtomicU64::new(0));
    let go = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..members {
        let (client, cfg) = (client.clone(), member_config(a, &group));
        let (total, counted, bytes, go, want) = (
            Arc::clone(&total),
            Arc::clone(&counted),
            Arc::clone(&bytes),
            Arc::clone(&go),
            a.records,
        );
        tasks.push(tokio::spawn(async move {
            let mut member = client.group_consumer(cfg)?;
            let mut hist = histogram()?;
            while total.load(Ordering::Relaxed) < want {
                let t = Instant::now();
                let batch = member.poll(Duration::from_millis(200)).await?;
                if batch.is_empty() {
                    continue;
                }
                total.fetch_add(batch.len() as u64, Ordering::Relaxed);
                if go.load(Ordering::Acquire) {
                    hist.record(t.elapsed().as_micros().max(1) as u64)?;
                    counted.fetch_add(batch.len() as u64, Ordering::Relaxed);
                    bytes.fetch_add(
                        batch
                            .iter()
                            .map(|r| r.value.as_ref().map_or(0, Bytes::len) as u64)
                            .sum(),
                        Ordering::Relaxed,
                    );
                }
            }
            let done = Instant::now();
            member.close().await?;
            anyhow::Ok((hist, done))
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while !settled(client, &group, members, partitions).await {
        if Instant::now() > deadline {
            bail!("the group did not settle with {members} members within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    go.store(true, Ordering::Release);
    let started = Instant::now();
    let before = total.load(Ordering::Relaxed);
    if before >= a.records / 2 {
        bail!(
            "{before} of {} records were read before the group settled; use more --records",
            a.records
        );
    }
    let mut hist = histogram()?;
    let mut finished = started;
    for t in tasks {
        let (h, done) = t.await??;
        hist.add(&h)?;
        finished = finished.max(done);
    }
    report(
        counted.load(Ordering::Relaxed),
        bytes.load(Ordering::Relaxed),
        finished.duration_since(started),
        &hist,
        a.json,
        "group consume",
    )
}

/// One member commits `--records` times, one commit in flight at a time; latency is each
/// commit's round trip (committed by a majority of the offsets partition's replicas).
pub async fn commit(client: &Client, a: &BenchArgs) -> Result<()> {
    let group = fresh_group(a, "commit");
    let mut member = client.group_consumer(member_config(a, &group).auto_commit(false))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while member.assignment().is_empty() {
        if Instant::now() > deadline {
            bail!("the member got no partitions within 60 s");
        }
        member.poll(Duration::from_millis(100)).await?;
    }
    let (topic, partition) = member.assignment()[0].clone();
    // Warm up the coordinator connection.
    member
        .commit_offsets_sync(&[(topic.as_str(), partition, 0, "")])
        .await?;
    let mut hist = histogram()?;
    let started = Instant::now();
    for i in 1..=a.records {
        let t = Instant::now();
        member
            .commit_offsets_sync(&[(topic.as_str(), partition, i, "")])
            .await?;
        hist.record(t.elapsed().as_micros().max(1) as u64)?;
    }
    let elapsed = started.elapsed();
    member.close().await?;
    report(a.records, 0, elapsed, &hist, a.json, "commit")
}

/// Whether the group has `members` members that own, between them, every partition of the
/// topic, and nothing is moving.
async fn settled(client: &Client, group: &str, members: usize, partitions: u32) -> bool {
    let Ok(d) = client.admin().describe_group(group).await else {
        return false;
    };
    let owned: BTreeSet<(String, u32)> = d
        .members
        .iter()
        .flat_map(|m| {
            m.assignment
                .iter()
                .flat_map(|t| t.partitions.iter().map(|p| (t.topic.clone(), *p)))
        })
        .collect();
    d.state == "stable" && d.members.len() == members && owned.len() == partitions as usize
}

/// `--rounds` times: `--consumers` members settle, one is dropped without leaving (as a crash
/// looks to the group), and the time until the others own every partition is recorded.
pub async fn rebalance(client: &Client, a: &BenchArgs, partitions: u32) -> Result<()> {
    let n = a.consumers.unwrap_or(3).max(2);
    let mut hist = histogram()?;
    let started = Instant::now();
    for round in 0..a.rounds.max(1) {
        let group = format!("{}-{round}", fresh_group(a, "rebalance"));
        let mut tasks = Vec::new();
        for _ in 0..n {
            let (client, cfg) = (client.clone(), member_config(a, &group));
            tasks.push(tokio::spawn(async move {
                let mut member = client.group_consumer(cfg)?;
                loop {
                    member.poll(Duration::from_millis(100)).await?;
                }
                #[allow(unreachable_code)]
                anyhow::Ok(())
            }));
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while !settled(client, &group, n, partitions).await {
            if Instant::now() > deadline {
                bail!("round {round}: the group did not settle with {n} members");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Aborting the task drops the member: its heartbeats stop, it does not leave.
        let victim = tasks.remove(0);
        victim.abort();
        let crashed = Instant::now();
        while !settled(client, &group, n - 1, partitions).await {
            if Instant::now() > deadline + Duration::from_secs(60) {
                bail!("round {round}: the survivors never took over");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let took = crashed.elapsed();
        hist.record(took.as_micros().max(1) as u64)?;
        if !a.json {
            println!(
                "round {round}: survivors own all {partitions} partitions {:.0} ms after the crash (session timeout {} ms)",
                took.as_secs_f64() * 1000.0,
                a.session_timeout_ms
            );
        }
        for t in tasks {
            t.abort();
        }
    }
    report(
        a.rounds.max(1),
        0,
        started.elapsed(),
        &hist,
        a.json,
        "rebalance",
    )
}
