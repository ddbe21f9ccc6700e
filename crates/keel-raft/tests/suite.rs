//! openraft's own storage conformance suite against the keel-log store: once through
//! `Suite::test_all`, and once per case so a failure names the case.

#[macro_use]
mod support;

use std::io;

use keel_raft::{KeelLogStore, KeelRaft};
use openraft::testing::log::{StoreBuilder, Suite};
use support::{Builder, MemStateMachine};

type S = Suite<KeelRaft, KeelLogStore, MemStateMachine, Builder, tempfile::TempDir>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_suite_test_all() {
    if let Err(e) = Suite::test_all(Builder).await {
        panic!("suite failed: {e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_snapshot() -> io::Result<()> {
    S::transfer_snapshot(&Builder).await
}

state_machine_suite_cases!(
    case,
    Builder;
    get_initial_state_inverted_log_order,
    get_initial_state_conflict_at_same_index,
    get_initial_state_log_ids,
    save_vote,
    get_log_entries,
    limited_get_log_entries,
    leader_bounded_stream,
    entries_stream,
    try_get_log_entry,
    log_reader_reads_new_entries,
    initial_logs,
    get_log_state,
    get_log_id,
    last_id_in_log,
    purge_logs_upto_0,
    purge_logs_upto_5,
    purge_logs_upto_20,
    delete_logs_after_11,
    delete_logs_after_5,
    delete_logs_after_0,
    delete_logs_after_none,
    append_to_log,
    snapshot_meta,
    snapshot_meta_optional,
);
