//! Bit flips inside sealed segments of a running cluster: found by a read or by the scrub,
//! never served, and repaired in place with another replica's copy of the damaged entries.

use std::collections::BTreeMap;
use std::time::Duration;

use keel_proto::v1::{FetchPartition, FetchRequest, RecordFormat};
use keel_tests::bit_rot::{flip_batch, sealed_segments};
use keel_tests::broker::{metric, wait_until};
use keel_tests::cluster::{ClusterProc, client};
use keel_tests::records::{produce_all, read_partition};

const WAIT: Duration = Duration::from_secs(60);

fn fetch_req(topic: &str, offset: u64) -> FetchRequest {
    FetchRequest {
        partitions: vec![FetchPartition {
            topic: topic.into(),
            partition: 0,
            offset,
            max_bytes: 0,
        }],
        max_wait_ms: 0,
        min_bytes: 0,
        max_bytes: 0,
        format: RecordFormat::Batches as i32,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bit_flips_in_sealed_segments_are_repaired_from_a_replica_and_never_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A fast scrub, so that the follower's damage (which no read touches) is found quickly.
    let mut cluster =
        ClusterProc::start_with(dir.path(), 3, &["--scrub-bytes-per-sec", "10000000"]);
    let client = client(&cluster).await;
    let config = BTreeMap::from([("segment.bytes".to_owned(), "8192".to_owned())]);
    client
        .admin()
        .create_topic("rot", 1, 3, config)
        .await
        .expect("create topic");
    let leader = cluster.wait_leader("rot", 0, WAIT).await;
    let values: Vec<String> = (0..1500).map(|i| format!("value-{i:06}")).collect();
    let acked = produce_all(&client, "rot", values).await;
    let follower = (1..=3u32).find(|i| *i != leader).expect("a follower");
    let http = |id: u32| cluster.nodes[id as usize - 1].http.clone();

    // A follower's sealed segment: nobody reads it, the background scrub finds it.
    let file = sealed_segments(&[cluster.replica_dir(follower, "rot", 0)])[1].clone();
    let flipped = flip_batch(&file, 1 << 33).expect("a batch to damage");
    let f_http = http(follower);
    wait_until("the follower's scrub to repair the flip", WAIT, || {
        metric(&f_http, "keel_log_damage_repaired_total") >= 1.0
    });
    assert!(metric(&f_http, "keel_log_damage_found_total") >= 1.0);
    assert!(
        std::fs::read(&file).expect("read") == flipped.original,
        "the follower's segment holds the replicas' bytes again"
    );

    // The leader's sealed segment, read at once: refused until repaired, never served.
    let file = sealed_segments(&[cluster.replica_dir(leader, "rot", 0)])[2].clone();
    let flipped = flip_batch(&file, 5 << 32).expect("a batch to damage");
    let damaged_offset = flipped.base_offset;
    let mut consumer = cluster.nodes[leader as usize - 1].consumer().await;
    let mut refused = 0;
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        match consumer.fetch(fetch_req("rot", damaged_offset)).await {
            Ok(resp) => {
                let p = &resp.into_inner().partitions[0];
                let mut served = 0;
                for item in keel_batch::BatchIter::new(&p.record_batches) {
                    let (h, raw) = item.expect("whole batches");
                    keel_batch::verify_crc(&h, raw).expect("every batch served is intact");
                    served += 1;
                }
                assert!(served > 0, "the fetch returned the damaged batch's range");
                break;
            }
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
                refused += 1;
            }
        }
        assert!(std::time::Instant::now() < deadline, "never repaired");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let l_http = http(leader);
    wait_until("the leader to report the repair", WAIT, || {
        metric(&l_http, "keel_log_damage_repaired_total") >= 1.0
    });
    assert!(
        std::fs::read(&file).expect("read") == flipped.original,
        "the leader's segment holds the replicas' bytes again"
    );
    eprintln!("the damaged batch was refused {refused} times before it was repaired");

    // Every acknowledged record reads back from the leader, and from each replica once it leads.
    let log = read_partition(&client, "rot", 0, true).await;
    for (v, o) in &acked {
        assert_eq!(log.get(o), Some(v), "record {v} at offset {o}");
    }
    assert_eq!(log.len(), acked.len());
    assert_eq!(
        metric(&l_http, "keel_log_damaged_segments") + metric(&f_http, "keel_log_damaged_segments"),
        0.0
    );
    cluster.node(leader).kill9();
    let log = read_partition(&client, "rot", 0, true).await;
    assert_eq!(
        log.len(),
        acked.len(),
        "the other replicas serve the same records"
    );
}
